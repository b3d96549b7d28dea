"""The OpenAI-compatible HTTP front: Starlette on uvicorn, in the server's own process and event loop.

    POST /v1/completions        text (or token ids) in, text out; "stream": true -> server-sent events
    POST /v1/chat/completions   messages in, the assistant's turn out (the model's chat template)
    GET  /v1/models             the base model and the caller's deltas
    GET  /v1/models/{model}     one of them
    DELETE /v1/models/{model}   delete a delta (every version, or name@N); the base model: 403
    GET  /health                200 while the engine runs and no drain began, 503 otherwise (load balancers)

``model`` names a delta of the caller (``name`` or ``name@N``) or the base model (its served name, as
/v1/models lists it; a delta of that name is shadowed). ``Authorization: Bearer <tenant key>``.
Every call goes through the same :class:`~server.edge.generation.GenerationCall` as gRPC ``Generate``:
same validation, rate limits and concurrency caps, engine, metrics and log line. Errors use OpenAI's
error object with the HTTP status of ``errors.http_status_of`` (429 with ``Retry-After``); an error
after a stream has started is sent as a last ``data: {"error": ...}`` event before ``data: [DONE]``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from delta_store.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

from ..logs import get_logger
from . import openai_schema as schema
from .errors import http_status_of
from .generation import CUT_SLACK_S, GenerationCall, Prompt
from .routing import ReplicaHeaderASGI

log = get_logger("openai")
MAX_BODY_BYTES = 4 << 20  # a request body; prompts are bounded by max_model_len long before this
LIST_PAGE = 1000


def _metadata(request: Request) -> list[tuple[str, str]]:
    value = request.headers.get("authorization")
    return [("authorization", value)] if value is not None else []


def _error_response(exc: BaseException) -> JSONResponse:
    status, code, message, headers = http_status_of(exc)
    param = getattr(exc, "param", None)
    code_name = "model_not_found" if isinstance(exc, ModelNotFound) else code.name.lower()
    return JSONResponse(schema.error_body(status, message, code_name, param), status_code=status, headers=headers)


class ModelNotFound(NotFound):
    """The ``model`` field names neither the base model nor a delta of the caller."""

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' does not exist (GET /v1/models lists the base model and your deltas)")
        self.param = "model"


async def _body(request: Request, kind):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused before a byte of it is read
        raise InvalidArgument(f"request body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies have no length: stop reading at the bound
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidArgument(f"request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw or b"null")
    except ValueError as exc:
        raise InvalidArgument(f"request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    try:
        body = kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        what = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise schema.InvalidField(where, f"{where}: {what}") from None
    schema.refuse_unsupported(body)
    return body


class OpenAIFront:
    """The Starlette app over one :class:`~server.app.App`, and its uvicorn server."""

    def __init__(self, app):
        self.app = app
        self.draining = False
        self.created = schema.now()
        self.starlette = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET", "DELETE"]),
            Route("/health", self.health, methods=["GET"]),
        ], middleware=[Middleware(ReplicaHeaderASGI, replica_id=app.replica_id)])
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    # ---- routes -----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        ok = self.app.ready() and not self.draining and not self.app.draining  # 503 from the SIGTERM on
        return Response(status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        call = GenerationCall(self.app, api="openai")
        try:
            tenant = await call.authenticate(_metadata(request))
            cards = [schema.model_card(self.app.model_name, "deltaserve", self.created)]
            token = ""
            while True:
                page, token = await asyncio.to_thread(self.app.store.list, tenant, LIST_PAGE, token)
                cards += [schema.model_card(v.name, call.tenant, int(v.created), parent=self.app.model_name)
                          for v in page]
                if not token:
                    break
        except Exception as exc:  # noqa: BLE001 - every error becomes an OpenAI error object
            self._count("GET /v1/models", exc)
            return _error_response(exc)
        self._count("GET /v1/models", None)
        return JSONResponse({"object": "list", "data": cards})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        route = f"{request.method} /v1/models/{{model}}"
        call = GenerationCall(self.app, api="openai")
        try:
            tenant = await call.authenticate(_metadata(request))
            if request.method == "DELETE":
                if name == self.app.model_name:
                    raise PermissionDenied(f"the base model '{name}' cannot be deleted; only your deltas can")
                try:
                    await asyncio.to_thread(self.app.store.delete, tenant, name)
                except NotFound:
                    raise ModelNotFound(name) from None
                reply = {"id": name, "object": "model", "deleted": True}
            elif name == self.app.model_name:
                reply = schema.model_card(name, "deltaserve", self.created)
            else:
                try:
                    v = await asyncio.to_thread(self.app.store.resolve, tenant, name)
                except (NotFound, InvalidArgument):
                    raise ModelNotFound(name) from None
                reply = schema.model_card(name, call.tenant, int(v.created), parent=self.app.model_name)
        except Exception as exc:  # noqa: BLE001
            self._count(route, exc)
            return _error_response(exc)
        self._count(route, None)
        return JSONResponse(reply)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # ---- one generation ---------------------------------------------------------------------------
    async def _generate(self, request: Request, *, chat: bool) -> Response:
        route = "POST /v1/chat/completions" if chat else "POST /v1/completions"
        call = GenerationCall(self.app, api="openai")
        body, delta = None, ""
        try:
            if self.draining:
                raise Unavailable("the server is shutting down")
            tenant = await call.authenticate(_metadata(request))
            body = await _body(request, schema.ChatRequest if chat else schema.CompletionRequest)
            prompt = Prompt(messages=schema.chat_messages(body)) if chat else Prompt(**schema.completion_prompt(body))
            delta = "" if body.model == self.app.model_name else body.model
            try:
                await call.prepare(tenant, prompt, schema.sampling_fields(body), delta)
            except NotFound:
                if delta and call.version is None:  # the delta lookup itself failed
                    raise ModelNotFound(body.model) from None
                raise
            call.admit(tenant)
        except Exception as exc:  # noqa: BLE001 - refused before any token: a plain error response
            status = http_status_of(exc)[1].name.lower()
            call.finish(status, delta)
            self._count(route, exc)
            return _error_response(exc)
        if body.stream:
            return StreamingResponse(self._sse(call, body, chat, route, delta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(call, body, chat, route, delta)

    async def _whole(self, call: GenerationCall, body, chat: bool, route: str, delta: str) -> Response:
        text, last, status = [], None, "ok"
        try:
            async for out in call.stream():
                text.append(out.text)
                last = out
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001
            status = http_status_of(exc)[1].name.lower()
            self._count(route, exc)
            return _error_response(exc)
        finally:
            call.finish(status, delta)
        self._count(route, None)
        rid, use = call.req.request_id, schema.usage(last.prompt_tokens, last.completion_tokens)
        build = schema.chat_body if chat else schema.completion_body
        return JSONResponse(build(rid, body.model, schema.now(), "".join(text), last.finish_reason, use))

    async def _sse(self, call: GenerationCall, body, chat: bool, route: str, delta_ref: str):
        rid, created, model, status = call.req.request_id, schema.now(), body.model, "ok"
        obj = "chat.completion.chunk" if chat else "text_completion"
        last = None
        try:
            if chat:  # OpenAI's first chunk carries the role
                yield _event(schema.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
            async for out in call.stream():
                last = out
                if out.text or out.finish_reason is not None:
                    if chat:
                        delta = {"content": out.text} if out.text else {}
                        yield _event(schema.chat_chunk(rid, model, created, delta, None))
                    elif out.text:
                        yield _event(schema.completion_chunk(rid, model, created, out.text, None))
            reason = last.finish_reason if last is not None else None
            final = (schema.chat_chunk(rid, model, created, {}, reason) if chat
                     else schema.completion_chunk(rid, model, created, "", reason))
            yield _event(final)
            if body.stream_options is not None and body.stream_options.include_usage and last is not None:
                yield _event(schema.usage_chunk(rid, model, created, obj,
                                                schema.usage(last.prompt_tokens, last.completion_tokens)))
            self._count(route, None)
        except asyncio.CancelledError:  # the client went away: stream() has aborted the engine request
            status = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - the status line is gone: the error is the last event
            http, code, message, _ = http_status_of(exc)
            status = code.name.lower()
            self._count(route, exc)
            yield _event(schema.error_body(http, message, status))
        finally:
            call.finish(status, delta_ref)
        yield "data: [DONE]\n\n"

    def _count(self, route: str, exc: BaseException | None) -> None:
        self.app.metrics.on_rpc(route, "OK" if exc is None else http_status_of(exc)[1])

    # ---- serving ----------------------------------------------------------------------------------
    async def start(self, listen: str) -> int:
        """Bind ``listen`` (HOST:PORT, port 0 = any) and serve on the running loop; returns the port."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, int(port)), family=family, reuse_port=False)
        except OSError as exc:
            raise OSError(f"cannot listen on {listen} (openai_listen): {exc.strerror}") from None
        config = uvicorn.Config(self.starlette, log_level="warning", access_log=False, lifespan="off",
                                # the drain cuts streams at grace_seconds (App.cut_streams): let their
                                # last event go out before uvicorn cancels what is left
                                timeout_graceful_shutdown=self.app.config.grace_seconds + CUT_SLACK_S)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="openai-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the OpenAI front on {listen} stopped while starting")
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        """Refuse new generations (503), let open ones finish within grace_seconds, then close."""
        self.draining = True
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: the process's drain (app.run) owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
