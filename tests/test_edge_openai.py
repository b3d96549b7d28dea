"""The OpenAI-compatible front with the official ``openai`` client: completions and chat, streaming or
not, a delta as ``model``, equal to the gRPC path's output; every error status with OpenAI's error shape."""
from __future__ import annotations

import json
import socket
import urllib.request

import openai
import pytest

from server_harness import PROMPT, Served, auth, chat_model_dir, code_of, collect, openai_client, peft_lora, upload

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("openai"), chat_model_dir(tmp_path_factory.mktemp("model")))
    yield s
    s.close()


@pytest.fixture(scope="module")
def bob(srv):
    md = srv.tenant("bob")
    data, merged = peft_lora(srv.model_dir, seed=3)
    upload(srv, md, "style", data)
    return md, md[0][1].removeprefix("Bearer ")


def _grpc_text(srv, md, prompt, delta="", n=8) -> tuple[str, object]:
    from server.client import generate_request

    chunks = list(srv.inference.Generate(generate_request(prompt, delta=delta, max_new_tokens=n, temperature=0.0),
                                         metadata=md))
    return "".join(c.text for c in chunks), chunks[-1]


@pytest.mark.parametrize("model", ["base", "style", "style@1"])
def test_completions_equal_grpc(srv, bob, model):
    md, key = bob
    name = srv.app.model_name if model == "base" else model
    text = "hello world"
    expected, last = _grpc_text(srv, md, text, delta="" if model == "base" else model)
    client = openai_client(srv, key)
    r = client.completions.create(model=name, prompt=text, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected and r.model == name and r.object == "text_completion"
    assert r.choices[0].finish_reason == ("length" if last.usage.completion_tokens == 8 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (last.usage.prompt_tokens,
                                                                 last.usage.completion_tokens)
    stream = client.completions.create(model=name, prompt=text, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == last.usage.completion_tokens


def test_token_id_prompts_and_stops(srv, bob):
    md, key = bob
    client = openai_client(srv, key)
    by_ids = client.completions.create(model=srv.app.model_name, prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == _grpc_text(srv, md, PROMPT, n=6)[0]
    full = by_ids.choices[0].text
    if len(full) > 2:
        cut = client.completions.create(model=srv.app.model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                        stop=[full[2:4]])
        assert cut.choices[0].text == full[:full.index(full[2:4])] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", ["base", "style"])
def test_chat_equals_grpc_chat(srv, bob, model):
    md, key = bob
    name = srv.app.model_name if model == "base" else model
    expected, last = _grpc_text(srv, md, MESSAGES, delta="" if model == "base" else model, n=12)
    client = openai_client(srv, key)
    r = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == last.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_prompt_is_the_template_and_stops_at_end_of_turn(srv, bob):
    md, _ = bob
    from server.client import generate_request

    req = generate_request(MESSAGES, max_new_tokens=40, temperature=0.0, ignore_eos=False)
    tokens, chunks = collect(srv.inference.Generate(req, metadata=md))
    tok = srv.app.tokenizer
    expected_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chunks[-1].usage.prompt_tokens == len(expected_prompt)
    if 2 in tokens:  # the end-of-turn token (<eos> in this template) ends the answer
        assert tokens.index(2) == len(tokens) - 1


def test_every_http_response_names_the_replica(srv, bob):
    from server.client import REPLICA_HEADER

    _md, key = bob
    client = openai_client(srv, key)
    raw = client.completions.with_raw_response.create(model="style", prompt="hi", max_tokens=2, temperature=0)
    assert raw.headers[REPLICA_HEADER] == srv.app.replica_id != ""
    with client.completions.with_streaming_response.create(model="style", prompt="hi", max_tokens=2,
                                                           temperature=0, stream=True) as streamed:
        assert streamed.headers[REPLICA_HEADER] == srv.app.replica_id
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert info.value.response.headers[REPLICA_HEADER] == srv.app.replica_id


def test_models_lists_base_and_the_callers_deltas(srv, bob):
    _, key = bob
    client = openai_client(srv, key)
    ids = [m.id for m in client.models.list().data]
    assert ids == [srv.app.model_name, "style"]
    assert client.models.retrieve("style").id == "style"
    assert client.models.retrieve(srv.app.model_name).owned_by == "deltaserve"
    admin = openai_client(srv, srv.admin_key)
    assert [m.id for m in admin.models.list().data] == [srv.app.model_name]  # bob's deltas are bob's


def _error(fn, cls):
    with pytest.raises(cls) as info:
        fn()
    err = info.value
    body = err.body if isinstance(err.body, dict) else {}
    assert set(body) >= {"message", "type", "code"}, err.body  # the client unwraps {"error": {...}}
    return err, body


def test_error_statuses(srv, bob):
    md, key = bob
    base = srv.app.model_name
    client = openai_client(srv, key)
    err, body = _error(lambda: openai_client(srv, "ds_wrong").completions.create(model=base, prompt="x"),
                       openai.AuthenticationError)
    assert err.status_code == 401 and body["type"] == "authentication_error"
    err, body = _error(lambda: client.completions.create(model="nope", prompt="x"), openai.NotFoundError)
    assert err.status_code == 404 and body["code"] == "model_not_found" and body["param"] == "model"
    for kwargs, param in ((dict(n=2), "n"), (dict(logit_bias={"5": 1.0}), "logit_bias"),
                          (dict(extra_body={"frobnicate": 1}), "frobnicate"), (dict(echo=True), "echo"),
                          (dict(presence_penalty=0.5), "presence_penalty")):
        err, body = _error(lambda: client.completions.create(model=base, prompt="x", **kwargs), openai.BadRequestError)
        assert err.status_code == 400 and body["param"] == param and param in body["message"], body
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    err, body = _error(lambda: client.chat.completions.create(model=base, messages=MESSAGES, tools=[tool]),
                       openai.BadRequestError)
    assert body["param"] == "tools"
    err, body = _error(lambda: client.chat.completions.create(
        model=base, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), openai.BadRequestError)
    assert body["param"] == "messages.0.tool_call_id" and "unknown field" in body["message"]
    err, body = _error(lambda: client.chat.completions.create(
        model=base, messages=[{"role": "wizard", "content": "x"}]), openai.BadRequestError)
    assert "messages[0].role 'wizard' is not one of system, user, assistant" in body["message"]
    err, body = _error(lambda: client.completions.create(model=base, prompt="x", max_tokens=5000),
                       openai.BadRequestError)
    assert "max_model_len" in body["message"]
    err, body = _error(lambda: client.models.delete(base), openai.PermissionDeniedError)
    assert err.status_code == 403 and body["type"] == "permission_error"


def test_rate_limit_is_429_with_retry_after(srv):
    md = srv.tenant("carol", requests_per_minute=1)
    client = openai_client(srv, md[0][1].removeprefix("Bearer "))
    client.completions.create(model=srv.app.model_name, prompt="x", max_tokens=1)
    err, body = _error(lambda: client.completions.create(model=srv.app.model_name, prompt="x", max_tokens=1),
                       openai.RateLimitError)
    assert err.status_code == 429 and body["type"] == "rate_limit_error"
    assert int(err.response.headers["retry-after"]) >= 1


def test_draining_is_503(srv, bob):
    _, key = bob
    front = srv.app.openai_front
    front.draining = True
    try:
        err, body = _error(lambda: openai_client(srv, key).completions.create(model=srv.app.model_name, prompt="x"),
                           openai.InternalServerError)
        assert err.status_code == 503 and body["code"] == "unavailable"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(srv.openai_url.removesuffix("/v1") + "/health", timeout=10)
        assert info.value.code == 503
    finally:
        front.draining = False
    assert urllib.request.urlopen(srv.openai_url.removesuffix("/v1") + "/health", timeout=10).status == 200


def test_deleting_a_delta_over_http(srv):
    md = srv.tenant("dave")
    data, _ = peft_lora(srv.model_dir, seed=5)
    upload(srv, md, "gone", data)
    client = openai_client(srv, md[0][1].removeprefix("Bearer "))
    assert client.models.delete("gone").deleted is True
    _error(lambda: client.models.retrieve("gone"), openai.NotFoundError)
    assert code_of(lambda: srv.client.with_key(client.api_key).get_delta("gone")).code().name == "NOT_FOUND"


def test_http_calls_count_in_the_same_metrics(srv, bob):
    _, key = bob
    before = _requests(srv, "bob")
    openai_client(srv, key).completions.create(model="style", prompt="hi", max_tokens=2, temperature=0)
    assert _requests(srv, "bob") == before + 1


def _requests(srv, tenant) -> float:
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("deltaserve_requests_total{") and f'tenant="{tenant}"' in line)


def test_prompts_and_bodies_are_bounded_before_any_work(srv, bob):
    """Issue 15 on this front: a prompt (or a chat's contents) past max_prompt_bytes is a 400 naming the bound,
    decided before tokenizing or rendering; a body past 4 MiB is refused, announced or chunked."""
    from server.edge.openai_http import MAX_BODY_BYTES

    md, key = bob
    base, limit = srv.app.model_name, srv.app.config.prompt_bytes_limit
    client = openai_client(srv, key)
    err, body = _error(lambda: client.completions.create(model=base, prompt="a" * (limit + 1)), openai.BadRequestError)
    assert "max_prompt_bytes" in body["message"] and str(limit) in body["message"], body
    halves = [{"role": "user", "content": "é" * (limit // 4 + 1)}] * 2  # each under, both over the bound
    err, body = _error(lambda: client.chat.completions.create(model=base, messages=halves), openai.BadRequestError)
    assert "chat messages" in body["message"] and "max_prompt_bytes" in body["message"], body
    # a body announced past the bound is refused before a byte of it is read (the client is still sending it)
    host, port = srv.openai_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n{{".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = sock.recv(65536)
            if not part:
                break
            reply += part
    assert reply.startswith(b"HTTP/1.1 400") and f"larger than {MAX_BODY_BYTES} bytes".encode() in reply, reply[:300]


def test_a_chunked_body_is_read_only_up_to_the_bound():
    """Without a length, reading stops at the first chunk past MAX_BODY_BYTES (never the whole body)."""
    import asyncio

    from starlette.requests import Request

    from delta_store.errors import InvalidArgument
    from server.edge import openai_http, openai_schema

    chunk, sent = b"x" * (1 << 20), []

    async def receive():
        sent.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": len(sent) < 64}  # 64 MiB offered

    request = Request({"type": "http", "method": "POST", "headers": [], "path": "/v1/completions"}, receive)
    with pytest.raises(InvalidArgument, match="larger than"):
        asyncio.run(openai_http._body(request, openai_schema.CompletionRequest))
    assert sum(sent) <= openai_http.MAX_BODY_BYTES + len(chunk)


def test_health_is_503_from_the_sigterm_while_generations_are_still_served(srv, bob):
    """During the drain's health grace (App.draining, before the front stops) /health tells the load balancer
    to go away, and calls already routed here are still answered."""
    _, key = bob
    health = srv.openai_url.removesuffix("/v1") + "/health"
    srv.app.draining = True
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(health, timeout=10)
        assert info.value.code == 503
        reply = openai_client(srv, key).completions.create(model=srv.app.model_name, prompt="x", max_tokens=2)
        assert reply.usage.completion_tokens >= 1
    finally:
        srv.app.draining = False
    assert urllib.request.urlopen(health, timeout=10).status == 200
