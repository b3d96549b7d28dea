"""An asyncio gRPC client of deltaserve for the load tools: tenants, uploads, delta calls, and one
timed ``Generate`` that turns a planned request into a :class:`Record`.

Only the generated stubs (``server/pb``) and grpc are imported, never torch, so the separate load
process starts in about a second and leaves the cores to the server.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import grpc

from server.pb import common_pb2, deltas_pb2, deltas_pb2_grpc, inference_pb2, inference_pb2_grpc, tenants_pb2
from server.pb import tenants_pb2_grpc

from .workload import PlannedRequest

UPLOAD_CHUNK = 1 << 20  # 1 MiB messages, like the CLI: a 10 MB delta is 10 messages, far under the 4 MiB cap
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
GENEROUS_QUOTAS = dict(max_deltas=10_000, max_delta_bytes=64 << 30, requests_per_minute=1_000_000,
                       tokens_per_minute=1_000_000_000, max_concurrent=100_000)
"""The load measures the engine, not the rate limiter: its tenants get quotas it never reaches."""
FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in common_pb2.FinishReason.items()}


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass(slots=True)
class Record:
    """What the client saw of one Generate call. Times are seconds after the phase start."""

    index: int
    tenant: int
    delta: str
    kind: str
    cold: bool
    prompt_tokens: int
    max_new_tokens: int
    planned: float  # planned send time
    sent: float  # actual send time (open-loop fidelity: sent - planned)
    first: float | None  # first chunk carrying tokens
    end: float  # stream closed (last chunk or error)
    tokens: int  # tokens received
    status: str  # grpc.StatusCode name, or "HANG" when the client's hard bound fired
    finish: str  # finish reason of the last chunk ("" without one)
    detail: str = ""  # first line of the error details
    server_ttft: float | None = None  # the server's own timings from the last chunk
    server_total: float | None = None
    server_queue: float | None = None
    cancelled_by_client: bool = False
    timeout_s: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (the server's definition too)."""
        if self.first is None or self.tokens < 2:
            return None
        return (self.end - self.first) / (self.tokens - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class Client:
    """Stubs over one channel. Use as ``async with Client(address) as c``."""

    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.deltas = deltas_pb2_grpc.DeltasStub(self.channel)
        self.tenants = tenants_pb2_grpc.TenantsStub(self.channel)

    async def __aenter__(self) -> "Client":
        await asyncio.wait_for(self.channel.channel_ready(), timeout=30.0)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    # ---- tenants (admin key) ------------------------------------------------------------------
    async def create_tenant(self, admin_key: str, name: str, quotas: dict | None = None) -> str:
        q = common_pb2.Quotas(**(GENEROUS_QUOTAS if quotas is None else quotas))
        reply = await self.tenants.CreateTenant(tenants_pb2.CreateTenantRequest(name=name, quotas=q),
                                                metadata=bearer(admin_key), timeout=30.0)
        return reply.api_key

    async def delete_tenant(self, admin_key: str, name: str) -> None:
        await self.tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(name=name), metadata=bearer(admin_key),
                                        timeout=60.0)

    # ---- deltas -------------------------------------------------------------------------------
    async def upload(self, key: str, name: str, payload: bytes, *, description: str = "",
                     labels: dict | None = None, timeout: float = 120.0) -> deltas_pb2.DeltaVersion:
        def messages():
            yield deltas_pb2.UploadDeltaRequest(header=deltas_pb2.UploadHeader(
                name=name, source_format=common_pb2.SOURCE_FORMAT_AUTO, description=description,
                labels=labels or {}, total_bytes=len(payload)))
            for i in range(0, len(payload), UPLOAD_CHUNK):
                yield deltas_pb2.UploadDeltaRequest(chunk=payload[i:i + UPLOAD_CHUNK])

        reply = await self.deltas.UploadDelta(messages(), metadata=bearer(key), timeout=timeout)
        return reply.version

    async def get(self, key: str, name: str, timeout: float = 30.0) -> deltas_pb2.DeltaInfo:
        reply = await self.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name=name), metadata=bearer(key),
                                           timeout=timeout)
        return reply.delta

    async def list_all(self, key: str, page_size: int = 100, max_pages: int = 1000) -> list[deltas_pb2.DeltaInfo]:
        token, out = "", []
        for _ in range(max_pages):  # bounded: 1000 pages of 100 is past any tenant quota we set
            page = await self.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(page_size=page_size, page_token=token),
                                                metadata=bearer(key), timeout=30.0)
            out.extend(page.deltas)
            token = page.next_page_token
            if not token:
                return out
        raise RuntimeError(f"ListDeltas did not end after {max_pages} pages")

    async def delete(self, key: str, name: str, timeout: float = 30.0) -> int:
        reply = await self.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name=name), metadata=bearer(key),
                                              timeout=timeout)
        return reply.deleted_versions

    async def preload(self, key: str, name: str, device: bool = True,
                      timeout: float = 60.0) -> deltas_pb2.PreloadDeltaResponse:
        tier = deltas_pb2.CACHE_TIER_DEVICE if device else deltas_pb2.CACHE_TIER_HOST
        return await self.deltas.PreloadDelta(deltas_pb2.PreloadDeltaRequest(delta=name, tier=tier),
                                              metadata=bearer(key), timeout=timeout)

    # ---- generate -----------------------------------------------------------------------------
    async def generate(self, key: str, req: PlannedRequest, t0: float, *, hard_timeout_s: float) -> Record:
        """Run one planned request; never raises for a gRPC status (it is recorded). ``t0``: the
        phase start on ``time.perf_counter``; ``hard_timeout_s``: the bound after which a call
        without its own deadline is abandoned and recorded as ``HANG``."""
        sampling = inference_pb2.SamplingParams(max_new_tokens=req.max_new_tokens, temperature=1.0, seed=req.seed,
                                                ignore_eos=True)
        msg = inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=req.prompt), delta=req.delta,
                                            sampling=sampling, request_id=f"load-{req.index}-{req.seed}")
        sent = time.perf_counter() - t0
        rec = Record(req.index, req.tenant, req.delta, req.kind, req.cold, len(req.prompt), req.max_new_tokens,
                     req.at, sent, None, sent, 0, "OK", "", timeout_s=req.timeout_s)
        call = self.inference.Generate(msg, metadata=bearer(key),
                                       timeout=req.timeout_s if req.timeout_s is not None else hard_timeout_s)
        canceller = None
        if req.cancel_after_s is not None:
            def cancel() -> None:
                rec.cancelled_by_client = True
                call.cancel()
            canceller = asyncio.get_running_loop().call_later(req.cancel_after_s, cancel)
        try:
            await asyncio.wait_for(self._consume(call, rec, t0), timeout=hard_timeout_s + 5.0)
        except asyncio.TimeoutError:
            call.cancel()
            rec.status, rec.detail = "HANG", f"no end of stream within {hard_timeout_s + 5.0:.0f} s"
        except asyncio.CancelledError:
            if not rec.cancelled_by_client:
                raise  # our own task is being cancelled, not the call
            rec.status = "CANCELLED"
        except grpc.aio.AioRpcError as exc:
            rec.status = exc.code().name
            rec.detail = (exc.details() or "").splitlines()[0] if exc.details() else ""
        finally:
            if canceller is not None:
                canceller.cancel()
            rec.end = time.perf_counter() - t0
        if rec.status == "OK" and rec.cancelled_by_client:
            rec.status = "CANCELLED"  # the cancel landed after the last chunk: recorded as ours anyway
        return rec

    @staticmethod
    async def _consume(call, rec: Record, t0: float) -> None:
        async for chunk in call:
            now = time.perf_counter() - t0
            if chunk.token_ids and rec.first is None:
                rec.first = now
            rec.tokens += len(chunk.token_ids)
            rec.end = now
            if chunk.finish_reason:
                rec.finish = FINISH_NAMES.get(chunk.finish_reason, str(chunk.finish_reason))
                rec.server_ttft = chunk.timings.ttft_seconds
                rec.server_total = chunk.timings.total_seconds
                rec.server_queue = chunk.timings.queue_seconds
