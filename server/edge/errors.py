"""Typed errors -> gRPC status codes and HTTP statuses, in one place (DESIGN D9).

Every error in ``delta_store/errors.py`` names its status in ``code``; :class:`ErrorInterceptor`
wraps every handler of the server, so a servicer just raises. Anything that is not a
``DeltaServeError`` becomes INTERNAL with a generic message (and one log line): internals never
leak to a client. RESOURCE_EXHAUSTED carries ``retry-after-ms`` in the trailing metadata.
The OpenAI front maps the same codes to HTTP statuses (:func:`http_status_of`), with ``Retry-After``.

Source: grpc ``examples/python/errors/server.py``; TGI ``server/text_generation_server/interceptor.py``.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import grpc

from delta_store.errors import DeltaServeError

from ..logs import get_logger

RETRY_AFTER_KEY = "retry-after-ms"
log = get_logger("errors")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(status code, one-line details, trailing metadata) for an exception raised by a handler."""
    if isinstance(exc, DeltaServeError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        trailing = ()
        if exc.retry_after is not None:
            trailing = ((RETRY_AFTER_KEY, str(max(1, int(exc.retry_after * 1000)))),)
        return code, str(exc).splitlines()[0] if str(exc) else exc.code.lower(), trailing
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", ()
    return grpc.StatusCode.INTERNAL, "internal error", ()


HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""gRPC code -> HTTP status (as grpc-gateway maps them); anything else is 500. 499 is nginx's "client closed"."""


def http_status_of(exc: BaseException) -> tuple[int, grpc.StatusCode, str, dict[str, str]]:
    """(HTTP status, gRPC code, one-line message, headers) for an exception raised by an HTTP handler;
    a RESOURCE_EXHAUSTED with a retry hint gets ``Retry-After`` in whole seconds (rounded up)."""
    code, details, _ = status_of(exc)
    headers = {}
    retry = getattr(exc, "retry_after", None)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    return HTTP_STATUS.get(code, 500), code, details, headers


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method handler: typed errors become statuses; ``on_status(method, code)`` sees every call."""

    def __init__(self, on_status: Callable[[str, grpc.StatusCode], None] | None = None):
        self._on_status = on_status or (lambda method, code: None)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method), handler.request_deserializer, handler.response_serializer)

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, exc: Exception):
        code, details, trailing = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("handler_failed", method=method, error=repr(exc))
        self._on_status(method, code)
        await context.abort(code, details, trailing_metadata=trailing)

    def _wrap_unary(self, behavior, method: str):
        async def wrapped(request, context):
            try:
                response = await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:  # the client went away: nobody reads a status any more
                self._on_status(method, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:  # noqa: BLE001 - the one place where every error becomes a status
                await self._abort(context, method, exc)
            self._on_status(method, grpc.StatusCode.OK)
            return response
        return wrapped

    def _wrap_stream(self, behavior, method: str):
        async def wrapped(request, context):
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                self._on_status(method, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:  # noqa: BLE001
                await self._abort(context, method, exc)
            self._on_status(method, grpc.StatusCode.OK)
        return wrapped
