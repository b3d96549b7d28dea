"""The OpenAI API's request bodies and response shapes, as far as deltaserve serves them.

Requests are pydantic models with ``extra="forbid"``: a field the API does not have (a typo) is a 400
naming it. Fields the API has but we do not serve (``n`` > 1, ``logit_bias``, ``tools``, ``logprobs``,
...) are refused by :func:`refuse_unsupported` with a 400 naming the field, never silently ignored.
Extensions, under vLLM's names: ``top_k``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``.

Sources: the OpenAI API reference (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, the
error object) and vLLM ``vllm/entrypoints/openai/protocol.py``.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from delta_store.errors import InvalidArgument

from ..types import FinishReason

MAX_STOP_STRINGS = 16


class InvalidField(InvalidArgument):
    """An InvalidArgument about one request field: the error body's ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # the caller's end-user id: logged with the request, as OpenAI uses it
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # extensions (vLLM's names)
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: str
    content: str | list[TextPart | dict[str, Any]]
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    response_format: dict[str, Any] | None = None


# ---- unsupported fields ---------------------------------------------------------------------------
def _refuse(param: str, why: str) -> None:
    raise InvalidField(param, f"{param}: {why}")


def refuse_unsupported(body: _Sampling) -> None:
    """400 naming the first field whose value asks for something deltaserve does not do."""
    if body.n not in (None, 1):
        _refuse("n", f"only n=1 is supported, got {body.n}")
    if body.logit_bias:
        _refuse("logit_bias", "not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            _refuse(name, "not supported (repetition_penalty, HF's multiplicative penalty, is)")
    if body.stream_options is not None and not body.stream:
        _refuse("stream_options", "only allowed with stream=true")
    if body.stream_options is not None and body.stream_options.continuous_usage_stats:
        _refuse("stream_options.continuous_usage_stats", "not supported")
    if isinstance(body, CompletionRequest):
        if body.logprobs is not None:
            _refuse("logprobs", "not supported by this endpoint yet (the gRPC API returns per-token logprobs)")
        if body.echo:
            _refuse("echo", "not supported")
        if body.suffix:
            _refuse("suffix", "not supported")
        if body.best_of not in (None, 1):
            _refuse("best_of", f"only best_of=1 is supported, got {body.best_of}")
    if isinstance(body, ChatRequest):
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
            if getattr(body, name) is not None:
                _refuse(name, "tool and function calling is not supported")
        if body.logprobs:
            _refuse("logprobs", "not supported by this endpoint yet (the gRPC API returns per-token logprobs)")
        if body.top_logprobs:
            _refuse("top_logprobs", "not supported")
        if body.response_format is not None and body.response_format.get("type") != "text":
            _refuse("response_format", "only {\"type\": \"text\"} is supported")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            _refuse("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > MAX_STOP_STRINGS:
        _refuse("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return items


def sampling_fields(body: _Sampling) -> dict:
    """The generation call's sampling fields (None = unset: the model's default applies)."""
    max_tokens = body.max_tokens
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    return {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "repetition_penalty": body.repetition_penalty, "seed": body.seed,
            "stop_strings": stop_strings(body.stop), "stop_token_ids": list(body.stop_token_ids or []),
            "ignore_eos": bool(body.ignore_eos)}


def completion_prompt(body: CompletionRequest) -> dict:
    """{"text": ...} or {"token_ids": [...]}: one prompt (a batch of several is n-like and refused)."""
    p = body.prompt
    if isinstance(p, str):
        return {"text": p}
    if p and all(isinstance(t, int) for t in p):
        return {"token_ids": list(p)}
    if len(p) == 1:
        return {"text": p[0]} if isinstance(p[0], str) else {"token_ids": list(p[0])}
    _refuse("prompt", f"one prompt per request is supported, got a batch of {len(p)}")


def chat_messages(body: ChatRequest) -> list[dict]:
    """{"role", "content"} per message; ``developer`` (OpenAI's newer name for system) is a system turn;
    content given as parts must be text parts."""
    out = []
    for i, m in enumerate(body.messages):
        if m.name is not None:
            _refuse(f"messages[{i}].name", "not supported")
        content = m.content
        if not isinstance(content, str):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, TextPart):
                    kind = part.get("type", "?") if isinstance(part, dict) else "?"
                    _refuse(f"messages[{i}].content[{j}]", f"content parts of type {kind!r} are not supported "
                            "(text only)")
                texts.append(part.text)
            content = "".join(texts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


# ---- responses ------------------------------------------------------------------------------------
def finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == FinishReason.LENGTH else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, created: int, text: str, reason: str | None, use: dict) -> dict:
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}],
            "usage": use}


def completion_chunk(rid: str, model: str, created: int, text: str, reason: str | None) -> dict:
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(reason)}]}


def chat_body(rid: str, model: str, created: int, text: str, reason: str | None, use: dict) -> dict:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason(reason)}],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict, reason: str | None) -> dict:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason(reason)}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    prefix = "chatcmpl" if obj == "chat.completion.chunk" else "cmpl"
    return {"id": f"{prefix}-{rid}", "object": obj, "created": created, "model": model, "choices": [],
            "usage": use}


def model_card(model_id: str, owner: str, created: int, parent: str | None = None) -> dict:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": owner}
    if parent is not None:
        card["parent"] = parent
    return card


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def now() -> int:
    return int(time.time())
