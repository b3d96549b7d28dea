"""What the load client saw of one Generate call (:class:`Record`), and :func:`timed_generate`, which runs
one planned request through ``server.client.AsyncClient`` and records it.

Only grpc and the generated stubs are imported (through ``server.client``), never torch, so the separate
load process starts in about a second and leaves the cores to the server.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import grpc

from server.client import FINISH_NAMES, AsyncClient

from .workload import PlannedRequest

CALL_TIMEOUT_S = 120.0
"""Deadline of every call but Generate (which has its own): a 10 MB upload takes about a second; this bounds a hang."""
GENEROUS_QUOTAS = dict(max_deltas=10_000, max_delta_bytes=64 << 30, requests_per_minute=1_000_000,
                       tokens_per_minute=1_000_000_000, max_concurrent=100_000)
"""The load measures the engine, not the rate limiter: its tenants get quotas it never reaches."""


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


async def timed_generate(client: AsyncClient, req: PlannedRequest, t0: float, *, hard_timeout_s: float) -> Record:
    """Run one planned request with ``client``'s key; never raises for a gRPC status (it is recorded).
    ``t0``: the phase start on ``time.perf_counter``; ``hard_timeout_s``: the bound after which a call
    without its own deadline is abandoned and recorded as ``HANG``."""
    sent = time.perf_counter() - t0
    rec = Record(req.index, req.tenant, req.delta, req.kind, req.cold, len(req.prompt), req.max_new_tokens,
                 req.at, sent, None, sent, 0, "OK", "", timeout_s=req.timeout_s)
    call = client.generate(req.prompt, delta=req.delta, request_id=f"load-{req.index}-{req.seed}",
                           timeout=req.timeout_s if req.timeout_s is not None else hard_timeout_s,
                           max_new_tokens=req.max_new_tokens, temperature=1.0, seed=req.seed, ignore_eos=True)

    def cancel() -> None:
        rec.cancelled_by_client = True
        call.cancel()

    canceller = None
    if req.cancel_after_s is not None:
        canceller = asyncio.get_running_loop().call_later(req.cancel_after_s, cancel)
    try:
        await asyncio.wait_for(_consume(call, rec, t0, req.cancel_after_tokens, cancel),
                               timeout=hard_timeout_s + 5.0)
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


async def _consume(call, rec: Record, t0: float, cancel_after_tokens: int | None = None, cancel=None) -> None:
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
        elif cancel_after_tokens is not None and rec.tokens >= cancel_after_tokens:
            cancel()  # the stream raises CancelledError at its next read
