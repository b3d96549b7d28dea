"""The gRPC server: the three deltaserve services, standard health and reflection, one error
interceptor. ``create_server(app) -> (server, port)`` binds ``app.config.listen`` (port 0 in tests).

Health (``grpc.health.v1``) says SERVING only while the model is loaded and the engine loop is
alive, and NOT_SERVING from the moment a drain starts, so a load balancer stops routing before
in-flight requests finish. Source: grpc ``helloworld/async_greeter_server_with_graceful_shutdown.py``.
"""
from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..pb import deltas_pb2, deltas_pb2_grpc, inference_pb2, inference_pb2_grpc, tenants_pb2, tenants_pb2_grpc
from .errors import ErrorInterceptor
from .grpc_deltas import DeltasServicer
from .grpc_inference import InferenceServicer
from .grpc_tenants import TenantsServicer
from .routing import ReplicaInterceptor

SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            deltas_pb2.DESCRIPTOR.services_by_name["Deltas"].full_name,
            tenants_pb2.DESCRIPTOR.services_by_name["Tenants"].full_name)
MAX_MESSAGE_BYTES = 8 << 20  # upload chunks are <= 4 MiB; room for the framing
HEALTH_POLL_S = 0.5  # how soon health follows an engine loop that died


class HealthReporter:
    """Keeps the health servicer in step with ``app.ready()`` (model loaded, engine loop alive)."""

    def __init__(self, app):
        self.app = app
        self.servicer = health.aio.HealthServicer()
        self.draining = False
        self._task: asyncio.Task | None = None
        self._last: int | None = None

    async def update(self) -> None:
        ok = not self.draining and self.app.ready()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        if status != self._last:
            self._last = status
            for name in ("",) + SERVICES:
                await self.servicer.set(name, status)

    async def _watch(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(HEALTH_POLL_S)

    async def start(self) -> None:
        await self.update()
        self._task = asyncio.create_task(self._watch(), name="health-watch")

    async def drain(self) -> None:
        self.draining = True
        await self.update()
        if self._task is not None:
            self._task.cancel()


def create_server(app) -> tuple[grpc.aio.Server, int]:
    """Build the server with every service registered and bind ``app.config.listen``; not started yet."""
    server = grpc.aio.server(
        interceptors=[ReplicaInterceptor(app.replica_id), ErrorInterceptor(app.metrics.on_rpc)],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)])
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(app), server)
    deltas_pb2_grpc.add_DeltasServicer_to_server(DeltasServicer(app), server)
    tenants_pb2_grpc.add_TenantsServicer_to_server(TenantsServicer(app), server)
    app.health = HealthReporter(app)
    health_pb2_grpc.add_HealthServicer_to_server(app.health.servicer, server)
    reflection.enable_server_reflection(SERVICES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(app.config.listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {app.config.listen}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {app.config.listen}: address in use or not available")
    return server, port
