"""The load generator in its own process: replays open-loop plans over grpc.aio and hands back
one :class:`Record` (as a dict) per request.

A separate process keeps the client's per-chunk work (one protobuf message per engine step per
stream) off the interpreter that orchestrates and parses, and, on a machine with more cores, off
the server's. The process is started once (spawn: no gRPC state crosses a fork) and runs one plan
per command, so its ~1 s of imports is paid once per benchmark, not once per phase.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

from server.client import AsyncClient

from .record import timed_generate
from .workload import PlannedRequest

START_LEAD_S = 0.05  # plans start this long after the command arrives, so request 0 is not late by construction
REPLY_SLACK_S = 60.0  # the parent waits this long past the plan's own bound before declaring the driver dead


async def replay(address: str, keys: list[str], plan: list[PlannedRequest], hard_timeout_s: float) -> list[dict]:
    """Send every request at its planned time (open loop), wait for all, return their records."""
    async with AsyncClient(address) as client:
        t0 = time.perf_counter() + START_LEAD_S
        tasks = []
        for req in plan:
            delay = t0 + req.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(timed_generate(client.with_key(keys[req.tenant]), req, t0,
                                                            hard_timeout_s=hard_timeout_s)))
        records = await asyncio.gather(*tasks)
    return [r.to_dict() for r in records]


def _serve(conn) -> None:
    """Child main loop: ("run", address, keys, plan, hard_timeout_s) -> ("ok", records) | ("error", text)."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        _, address, keys, plan, hard_timeout_s = msg
        try:
            conn.send(("ok", asyncio.run(replay(address, keys, plan, hard_timeout_s))))
        except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class LoadDriver:
    """``with LoadDriver() as d: records = d.run(address, keys, plan, hard_timeout_s)``."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="deltaserve-load", daemon=True)
        self._proc.start()
        child.close()

    def run(self, address: str, keys: list[str], plan: list[PlannedRequest], hard_timeout_s: float) -> list[dict]:
        if not plan:
            return []
        self._conn.send(("run", address, keys, plan, hard_timeout_s))
        bound = plan[-1].at + hard_timeout_s + REPLY_SLACK_S
        if not self._conn.poll(bound):
            raise RuntimeError(f"load driver: no result within {bound:.0f} s (plan of {len(plan)} requests)")
        status, payload = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"load driver failed: {payload}")
        return payload

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            self._proc.join(10.0)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)
        self._conn.close()

    def __enter__(self) -> "LoadDriver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
