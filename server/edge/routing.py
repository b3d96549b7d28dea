"""Routing metadata: the delta header a router hashes on, checked against the body; the serving replica's name.

A router in front of several replicas (deploy/nginx, deploy/envoy) picks a replica by consistent hashing
on ``x-deltaserve-delta`` (``server.client.DELTA_HEADER``), so each delta's requests reach the replica
that keeps it resident. The server derives nothing from that header: it resolves the body's reference,
and refuses a call whose header names another delta (INVALID_ARGUMENT), so a misbehaving client cannot
make a router's affinity disagree with what it is served. Every response carries
``x-deltaserve-replica`` (gRPC: initial metadata; the OpenAI-compatible HTTP front: a response header),
so affinity is observable from the client.
"""
from __future__ import annotations

import grpc

from delta_store.errors import InvalidArgument

from ..client import DELTA_HEADER, REPLICA_HEADER


def check_delta_header(metadata, ref: str) -> None:
    """Refuse a call whose ``x-deltaserve-delta`` header (if sent) is not the body's delta reference."""
    values = [v for k, v in (metadata or ()) if k.lower() == DELTA_HEADER]
    if not values:
        return
    sent = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    if len(values) > 1 or sent != ref:
        shown = ", ".join(repr(v) for v in values)
        raise InvalidArgument(f"{DELTA_HEADER} metadata {shown} disagrees with the request's delta {ref!r}: "
                              f"send the body's reference, or no header")


class ReplicaInterceptor(grpc.aio.ServerInterceptor):
    """Sends ``x-deltaserve-replica: <replica_id>`` as initial metadata of every call, before the handler runs."""

    def __init__(self, replica_id: str):
        self._metadata = ((REPLICA_HEADER, replica_id),)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        metadata = self._metadata

        def unary(behavior):
            async def wrapped(request, context):
                await context.send_initial_metadata(metadata)
                return await behavior(request, context)
            return wrapped

        def stream(behavior):
            async def wrapped(request, context):
                await context.send_initial_metadata(metadata)
                async for item in behavior(request, context):
                    yield item
            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), handler.request_deserializer,
                                                     handler.response_serializer)


class ReplicaHeaderASGI:
    """The same ``x-deltaserve-replica`` on every HTTP response of the OpenAI-compatible front (ASGI middleware,
    so streamed responses carry it too)."""

    def __init__(self, app, replica_id: str):
        self.app = app
        self._header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", ()), self._header])
            await send(message)

        return await self.app(scope, receive, send_with_header)
