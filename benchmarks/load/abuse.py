"""The abusive part of the soak's load (issue 15): what a careless or hostile tenant sends beside the
normal traffic, each attempt recorded with the status it ended with and checked against the statuses it
may end with.

    big_prompt     a text prompt as long as a gRPC message carries          INVALID_ARGUMENT (bounded in bytes)
    zip_bomb       a zip that expands ~1000x                                 INVALID_ARGUMENT (expansion bound)
    garbage        random bytes as an upload                                 INVALID_ARGUMENT
    upload_cancel  half a payload, then the client cancels                   CANCELLED, nothing stored
    over_quota     an upload past the tenant's byte quota                    RESOURCE_EXHAUSTED, nothing stored
    upload_burst   one more upload at once than the tenant's upload slots    RESOURCE_EXHAUSTED (with retry-after-ms)
                   (the admitted ones are completed and deleted)            for the extra one, OK for the others

No torch here: the load process imports only this, the client and the stubs.
"""
from __future__ import annotations

import asyncio
import io
import random
import time
import zipfile
from collections import Counter
from dataclasses import dataclass

import grpc

from server.client import AsyncClient, upload_messages

KINDS = ("big_prompt", "zip_bomb", "garbage", "upload_cancel", "over_quota", "upload_burst")
ALLOWED = {"big_prompt": {"INVALID_ARGUMENT"}, "zip_bomb": {"INVALID_ARGUMENT"}, "garbage": {"INVALID_ARGUMENT"},
           "upload_cancel": {"CANCELLED"}, "over_quota": {"RESOURCE_EXHAUSTED"},
           "upload_burst": {"OK", "RESOURCE_EXHAUSTED"}}
BIG_PROMPT_BYTES = (8 << 20) - (64 << 10)  # just under the server's 8 MiB gRPC message limit


@dataclass(slots=True)
class Attempt:
    kind: str
    status: str  # grpc.StatusCode name
    detail: str
    seconds: float
    retry_hint: bool = False  # RESOURCE_EXHAUSTED carried retry-after-ms


def zip_bomb(expanded_bytes: int = 64 << 20) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("adapter_config.json", b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
        zf.writestr("adapter_model.safetensors", b"\0" * expanded_bytes)
    return buf.getvalue()


class Abuser:
    """Runs the abusive attempts with the keys of the ``abuse`` tenant (upload slots, cancels, bombs) and the
    ``tight`` tenant (a byte quota smaller than any delta); ``payload``: a valid upload (for bursts, cancels)."""

    def __init__(self, abuse_key: str, tight_key: str, payload: bytes, upload_slots: int, rng: random.Random,
                 every_s: float):
        self.abuse_key, self.tight_key, self.payload = abuse_key, tight_key, payload
        self.upload_slots, self.rng, self.every_s = upload_slots, rng, every_s
        self.bomb = zip_bomb()
        self.records: list[Attempt] = []
        self.stored: list[str] = []  # names an attempt stored (the burst's admitted uploads) and deleted again
        self.counter = 0

    async def run(self, c: AsyncClient, until: float) -> None:
        k = 0
        while time.perf_counter() < until:
            kind = KINDS[k % len(KINDS)]
            k += 1
            await getattr(self, kind)(c)
            await asyncio.sleep(min(self.every_s, max(0.0, until - time.perf_counter())))

    def _name(self, kind: str) -> str:
        self.counter += 1
        return f"abuse{self.counter:05d}-{kind}"

    async def _record(self, kind: str, coro) -> None:
        t0 = time.perf_counter()
        status, detail, hint = "OK", "", False
        try:
            await coro
        except grpc.aio.AioRpcError as exc:
            status, detail = exc.code().name, (exc.details() or "").splitlines()[0] if exc.details() else ""
            hint = "retry-after-ms" in dict(exc.trailing_metadata() or ())
        except asyncio.CancelledError:
            status = "CANCELLED"
        self.records.append(Attempt(kind, status, detail, time.perf_counter() - t0, hint))

    async def _upload(self, key: str, name: str, data: bytes, c: AsyncClient) -> None:
        await c.with_key(key).upload(name, data, timeout=120.0)

    # ---- the attempts -------------------------------------------------------------------------
    async def big_prompt(self, c: AsyncClient) -> None:
        call = c.with_key(self.abuse_key).generate("a" * BIG_PROMPT_BYTES, max_new_tokens=4, timeout=60.0)

        async def consume():
            async for _ in call:
                pass
        await self._record("big_prompt", consume())

    async def zip_bomb(self, c: AsyncClient) -> None:
        await self._record("zip_bomb", self._upload(self.abuse_key, self._name("bomb"), self.bomb, c))

    async def garbage(self, c: AsyncClient) -> None:
        junk = self.rng.randbytes(self.rng.choice((100, 10_000, 1 << 20)))
        await self._record("garbage", self._upload(self.abuse_key, self._name("junk"), junk, c))

    async def over_quota(self, c: AsyncClient) -> None:
        await self._record("over_quota", self._upload(self.tight_key, self._name("big"), self.payload, c))

    async def upload_cancel(self, c: AsyncClient) -> None:
        name, half = self._name("cut"), len(self.payload) // 2
        gate = asyncio.Event()

        async def messages():
            for msg in upload_messages(name, io.BytesIO(self.payload[:half]), total_bytes=len(self.payload),
                                       chunk_bytes=64 << 10):
                yield msg
            gate.set()
            await asyncio.sleep(3600)  # the rest never comes: the client cancels first

        ac = c.with_key(self.abuse_key)
        call = ac.deltas.UploadDelta(messages(), metadata=ac.metadata, timeout=60.0)

        async def cancel_when_half_sent():
            await gate.wait()
            await asyncio.sleep(0.05)
            call.cancel()
            await call
        await self._record("upload_cancel", cancel_when_half_sent())

    async def upload_burst(self, c: AsyncClient) -> None:
        """``upload_slots + 1`` uploads at once: each sends its header and waits until all have, then
        sends the payload. Exactly the extra one must be refused (RESOURCE_EXHAUSTED, retry hint)."""
        names = [self._name("burst") for _ in range(self.upload_slots + 1)]
        started, go = Counter(), asyncio.Event()
        ac = c.with_key(self.abuse_key)

        def stream(name: str):
            async def messages():
                gen = upload_messages(name, io.BytesIO(self.payload), total_bytes=len(self.payload),
                                      chunk_bytes=256 << 10)
                yield next(gen)  # the header: the server admits or refuses on it
                started["n"] += 1
                if started["n"] == len(names):
                    go.set()
                await asyncio.wait_for(go.wait(), 30)
                await asyncio.sleep(0.3)  # every header has reached the server before any payload does
                for msg in gen:
                    yield msg
            return messages()

        async def one(name: str):
            await ac.deltas.UploadDelta(stream(name), metadata=ac.metadata, timeout=120.0)
            self.stored.append(name)

        before = len(self.records)
        await asyncio.gather(*(self._record("upload_burst", one(n)) for n in names))
        for name in list(self.stored):
            await ac.delete_delta(name)
            self.stored.remove(name)
        burst = self.records[before:]
        refused = [a for a in burst if a.status == "RESOURCE_EXHAUSTED"]
        if len(refused) != 1 or not refused[0].retry_hint:
            self.records.append(Attempt("upload_burst", "BURST_NOT_BOUNDED",
                                        f"{len(refused)} of {len(burst)} concurrent uploads refused "
                                        f"(expected exactly 1, with retry-after-ms)", 0.0))

    # ---- checks -------------------------------------------------------------------------------
    def violations(self) -> list[str]:
        out = []
        for a in self.records:
            if a.status not in ALLOWED[a.kind]:
                out.append(f"{a.kind} ended {a.status} ({a.detail or 'no details'}); allowed: {sorted(ALLOWED[a.kind])}")
            elif a.kind == "zip_bomb" and "expand" not in a.detail:
                out.append(f"zip_bomb refused for another reason than its expansion: {a.detail}")
            elif a.kind == "big_prompt" and "bytes" not in a.detail:
                out.append(f"big_prompt refused for another reason than its size: {a.detail}")
        return out

    def counts(self) -> dict[str, int]:
        return dict(Counter(f"{a.kind}:{a.status}" for a in self.records))
