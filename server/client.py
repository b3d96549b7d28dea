"""The deltaserve gRPC client: one channel, the caller's API key on every call; a blocking face (:class:`Client`)
for the CLI, scripts and tests, and an asyncio face (:class:`AsyncClient`) for the load tools.

    with Client("127.0.0.1:50051", api_key) as c:
        version = c.upload("support-bot", "path/to/peft_adapter/")   # folder (sent as tar.gz), archive, file, bytes
        for chunk in c.generate("Hello", delta="support-bot", max_new_tokens=16, temperature=0.0):
            print(chunk.text, end="")
        chat = c.generate([{"role": "user", "content": "Hi!"}])          # chat: the model's template

    async with AsyncClient(address, admin_key) as c:                  # waits until the channel is ready
        tenant, key = await c.create_tenant("acme")
        call = c.with_key(key).generate([3, 4, 5], max_new_tokens=8)  # the call: iterate it, or cancel() it
        async for chunk in call: ...

Both faces have the same methods and return the ``deltaserve.v1`` protobuf messages (the API contract,
``protos/``); a refused call raises ``grpc.RpcError`` with the server's status code. ``with_key`` gives a
client that shares the channel but sends another tenant's key. Imports only grpc and the generated stubs
(``server/pb``), never torch, so a separate load process starts in about a second.
"""
from __future__ import annotations

import asyncio
import copy
import io
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import grpc

from .pb import common_pb2, deltas_pb2, deltas_pb2_grpc, inference_pb2, inference_pb2_grpc, tenants_pb2
from .pb import tenants_pb2_grpc

CHUNK_BYTES = 1 << 20  # 1 MiB upload messages: well under gRPC's 4 MiB default, ~100 for a 100 MB delta
CHANNEL_OPTIONS = (("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20))
READY_TIMEOUT_S = 30.0  # AsyncClient's `async with` waits this long for the channel to connect
MAX_PAGES = 1000  # list_deltas stops with an error past this many pages (100 000 deltas at the default size)
FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in common_pb2.FinishReason.items()}
"""FinishReason enum value -> "length" / "stop" / "eos" / "aborted" / "error" ("none" before the last chunk)."""
KIND_NAMES = {v: k.removeprefix("DELTA_KIND_").lower() for k, v in common_pb2.DeltaKind.items()}
SOURCE_FORMATS = tuple(k.removeprefix("SOURCE_FORMAT_").lower() for k in common_pb2.SourceFormat.keys())

Payload = str | os.PathLike | bytes


DELTA_HEADER = "x-deltaserve-delta"
"""Request metadata: the delta reference a call names (``name`` or ``name@N``), exactly as in the request
body. Routers hash on it for delta affinity (deploy/nginx, deploy/envoy); the server refuses a call whose
header disagrees with its body, so a router's choice can never serve another delta. Optional: a call
without it is served the same, only without affinity."""
REPLICA_HEADER = "x-deltaserve-replica"
"""Response metadata (initial, on every call): the ``replica_id`` of the replica that served it."""


def bearer(api_key: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``api_key`` (``authorization: Bearer <key>``)."""
    return (("authorization", f"Bearer {api_key}"),)


def generate_request(prompt: str | Sequence[int] | Sequence[Mapping[str, str]], *, delta: str = "",
                     request_id: str = "", merge: Sequence[tuple[str, float]] = (),
                     **sampling) -> inference_pb2.GenerateRequest:
    """A GenerateRequest: ``prompt`` as text, token ids, or chat messages (``[{"role": "user", "content":
    "..."}]``, rendered by the server with the model's chat template); ``merge``: ``(delta, weight)`` parts of
    a linear merge of the caller's LoRA deltas (instead of ``delta``); ``sampling`` are ``SamplingParams``
    fields (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop_strings``, ...);
    None leaves a field unset (the served model's default)."""
    params = inference_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    common = dict(delta=delta, sampling=params, request_id=request_id,
                  merge=[inference_pb2.MergePart(delta=name, weight=float(w)) for name, w in merge])
    if isinstance(prompt, str):
        return inference_pb2.GenerateRequest(text=prompt, **common)
    if prompt and isinstance(prompt[0], Mapping):
        chat = inference_pb2.ChatPrompt(messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"])
                                                  for m in prompt])
        return inference_pb2.GenerateRequest(chat=chat, **common)
    return inference_pb2.GenerateRequest(token_ids=inference_pb2.TokenIds(ids=list(prompt)), **common)


def source_format(name: str) -> int:
    """``"auto"``, ``"peft"``, ... -> the SourceFormat enum value; ValueError naming the choices."""
    try:
        return common_pb2.SourceFormat.Value(f"SOURCE_FORMAT_{name.upper()}")
    except ValueError:
        raise ValueError(f"source format {name!r}: one of {', '.join(SOURCE_FORMATS)}") from None


def open_payload(payload: Payload) -> BinaryIO:
    """An open binary file of what to send: the bytes, the file, or a folder packed as tar.gz in a temp file."""
    if isinstance(payload, bytes):
        return io.BytesIO(payload)
    path = Path(payload)
    if path.is_file():
        return open(path, "rb")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    tmp = tempfile.TemporaryFile()
    with tarfile.open(fileobj=tmp, mode="w:gz") as tar:
        for item in sorted(path.rglob("*")):
            if item.is_file() and not item.is_symlink():
                tar.add(item, arcname=str(item.relative_to(path)), recursive=False)
    tmp.seek(0)
    return tmp


def upload_messages(name: str, f: BinaryIO, *, total_bytes: int | None = None, format: str = "auto",
                    description: str = "", labels: dict[str, str] | None = None, chunk_bytes: int = CHUNK_BYTES,
                    on_progress: Callable[[int], None] | None = None) -> Iterator[deltas_pb2.UploadDeltaRequest]:
    """The UploadDelta client stream: one header, then ``f`` in chunks. ``total_bytes`` (optional) lets the
    server refuse an oversized upload before it arrives; ``on_progress(bytes_sent)`` after each chunk."""
    header = deltas_pb2.UploadHeader(name=name, source_format=source_format(format), description=description,
                                     labels=labels or {})
    if total_bytes is not None:
        header.total_bytes = total_bytes
    yield deltas_pb2.UploadDeltaRequest(header=header)
    sent = 0
    while chunk := f.read(chunk_bytes):
        sent += len(chunk)
        yield deltas_pb2.UploadDeltaRequest(chunk=chunk)
        if on_progress is not None:
            on_progress(sent)


def _size(f: BinaryIO) -> int:
    total = f.seek(0, io.SEEK_END)
    f.seek(0)
    return total


class _Channel:
    """What both faces share: the address, the stubs, the key and the default deadline."""

    def __init__(self, address: str, api_key: str, timeout: float | None, channel):
        self.address = address
        self.api_key = api_key
        self.timeout = timeout  # seconds per call; None = no deadline
        self.channel = channel
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.deltas = deltas_pb2_grpc.DeltasStub(channel)
        self.tenants = tenants_pb2_grpc.TenantsStub(channel)
        self._owner = True

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.api_key)

    def with_key(self, api_key: str):
        """A client of the same channel that sends ``api_key``; closing it leaves the channel open."""
        other = copy.copy(self)
        other.api_key = api_key
        other._owner = False
        return other

    def _kw(self, timeout: float | None, delta: str = "") -> dict:
        """Call options: the key, the deadline and, for a call that names a delta, the routing header."""
        routed = delta and delta.isascii() and delta.isprintable()  # else the server's name check answers
        metadata = self.metadata + (((DELTA_HEADER, delta),) if routed else ())
        return {"metadata": metadata, "timeout": self.timeout if timeout is None else timeout}


class Client(_Channel):
    """Blocking client. ``timeout``: the default deadline of each call in seconds (None: none)."""

    def __init__(self, address: str, api_key: str = "", *, timeout: float | None = None):
        super().__init__(address, api_key, timeout, grpc.insecure_channel(address, options=CHANNEL_OPTIONS))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._owner:
            self.channel.close()

    # ---- inference ----------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], *, delta: str = "", request_id: str = "",
                 merge: Sequence[tuple[str, float]] = (), timeout: float | None = None,
                 **sampling) -> Iterator[inference_pb2.GenerateResponse]:
        """The stream of chunks (iterate it; ``cancel()`` stops it). See :func:`generate_request`."""
        req = generate_request(prompt, delta=delta, request_id=request_id, merge=merge, **sampling)
        return self.inference.Generate(req, **self._kw(timeout, delta))

    # ---- deltas -------------------------------------------------------------------------------------
    def upload(self, name: str, payload: Payload, *, format: str = "auto", description: str = "",
               labels: dict[str, str] | None = None, on_progress: Callable[[int, int], None] | None = None,
               timeout: float | None = None) -> deltas_pb2.DeltaVersion:
        """Upload a new version of ``name``; ``on_progress(sent, total)`` after each chunk."""
        with open_payload(payload) as f:
            total = _size(f)
            progress = None if on_progress is None else (lambda sent: on_progress(sent, total))
            msgs = upload_messages(name, f, total_bytes=total, format=format, description=description,
                                   labels=labels, on_progress=progress)
            return self.deltas.UploadDelta(msgs, **self._kw(timeout, name)).version

    def get_delta(self, name: str, *, timeout: float | None = None) -> deltas_pb2.DeltaInfo:
        return self.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name=name), **self._kw(timeout, name)).delta

    def list_deltas(self, *, page_size: int = 100, timeout: float | None = None) -> list[deltas_pb2.DeltaInfo]:
        """Every delta of the caller, following the pages."""
        token, out = "", []
        for _ in range(MAX_PAGES):
            page = self.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(page_size=page_size, page_token=token),
                                          **self._kw(timeout))
            out.extend(page.deltas)
            token = page.next_page_token
            if not token:
                return out
        raise RuntimeError(f"ListDeltas did not end after {MAX_PAGES} pages")

    def delete_delta(self, ref: str, *, timeout: float | None = None) -> int:
        """Delete ``name`` (every version) or ``name@N``; returns the number of versions deleted."""
        return self.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name=ref),
                                       **self._kw(timeout, ref)).deleted_versions

    def preload_delta(self, ref: str, *, device: bool = True,
                      timeout: float | None = None) -> deltas_pb2.PreloadDeltaResponse:
        tier = deltas_pb2.CACHE_TIER_DEVICE if device else deltas_pb2.CACHE_TIER_HOST
        return self.deltas.PreloadDelta(deltas_pb2.PreloadDeltaRequest(delta=ref, tier=tier), **self._kw(timeout, ref))

    # ---- tenants (admin key) ------------------------------------------------------------------------
    def create_tenant(self, name: str, *, admin: bool = False, quotas: dict[str, int] | None = None,
                      timeout: float | None = None) -> tuple[tenants_pb2.Tenant, str]:
        """The new tenant and its API key (shown once). ``quotas``: ``common_pb2.Quotas`` fields; unset
        fields take the server's defaults."""
        req = tenants_pb2.CreateTenantRequest(name=name, admin=admin, quotas=common_pb2.Quotas(**(quotas or {})))
        reply = self.tenants.CreateTenant(req, **self._kw(timeout))
        return reply.tenant, reply.api_key

    def list_tenants(self, *, timeout: float | None = None) -> list[tenants_pb2.Tenant]:
        return list(self.tenants.ListTenants(tenants_pb2.ListTenantsRequest(), **self._kw(timeout)).tenants)

    def delete_tenant(self, name: str, *, timeout: float | None = None) -> None:
        self.tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(name=name), **self._kw(timeout))

    def rotate_key(self, name: str, *, timeout: float | None = None) -> str:
        return self.tenants.RotateKey(tenants_pb2.RotateKeyRequest(name=name), **self._kw(timeout)).api_key

    def set_quotas(self, name: str, *, timeout: float | None = None, **quotas: int) -> tenants_pb2.Tenant:
        """Change the named quota fields (``common_pb2.Quotas`` names); the others stay as they are."""
        req = tenants_pb2.SetQuotasRequest(name=name, quotas=common_pb2.Quotas(**quotas))
        return self.tenants.SetQuotas(req, **self._kw(timeout)).tenant


class AsyncClient(_Channel):
    """The asyncio face: the same methods as :class:`Client`, awaited; ``generate`` returns the call."""

    def __init__(self, address: str, api_key: str = "", *, timeout: float | None = None):
        super().__init__(address, api_key, timeout, grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))

    async def __aenter__(self) -> "AsyncClient":
        await asyncio.wait_for(self.channel.channel_ready(), timeout=READY_TIMEOUT_S)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owner:
            await self.channel.close()

    def generate(self, prompt: str | Sequence[int], *, delta: str = "", request_id: str = "",
                 merge: Sequence[tuple[str, float]] = (), timeout: float | None = None,
                 **sampling) -> grpc.aio.UnaryStreamCall:
        """The call (not a coroutine): ``async for chunk in call``; ``call.cancel()`` stops it."""
        req = generate_request(prompt, delta=delta, request_id=request_id, merge=merge, **sampling)
        return self.inference.Generate(req, **self._kw(timeout, delta))

    async def upload(self, name: str, payload: Payload, *, format: str = "auto", description: str = "",
                     labels: dict[str, str] | None = None, timeout: float | None = None) -> deltas_pb2.DeltaVersion:
        with open_payload(payload) as f:
            msgs = upload_messages(name, f, total_bytes=_size(f), format=format, description=description,
                                   labels=labels)
            return (await self.deltas.UploadDelta(msgs, **self._kw(timeout, name))).version

    async def get_delta(self, name: str, *, timeout: float | None = None) -> deltas_pb2.DeltaInfo:
        return (await self.deltas.GetDelta(deltas_pb2.GetDeltaRequest(name=name), **self._kw(timeout, name))).delta

    async def list_deltas(self, *, page_size: int = 100, timeout: float | None = None) -> list[deltas_pb2.DeltaInfo]:
        token, out = "", []
        for _ in range(MAX_PAGES):
            page = await self.deltas.ListDeltas(deltas_pb2.ListDeltasRequest(page_size=page_size, page_token=token),
                                                **self._kw(timeout))
            out.extend(page.deltas)
            token = page.next_page_token
            if not token:
                return out
        raise RuntimeError(f"ListDeltas did not end after {MAX_PAGES} pages")

    async def delete_delta(self, ref: str, *, timeout: float | None = None) -> int:
        reply = await self.deltas.DeleteDelta(deltas_pb2.DeleteDeltaRequest(name=ref), **self._kw(timeout, ref))
        return reply.deleted_versions

    async def preload_delta(self, ref: str, *, device: bool = True,
                            timeout: float | None = None) -> deltas_pb2.PreloadDeltaResponse:
        tier = deltas_pb2.CACHE_TIER_DEVICE if device else deltas_pb2.CACHE_TIER_HOST
        return await self.deltas.PreloadDelta(deltas_pb2.PreloadDeltaRequest(delta=ref, tier=tier),
                                              **self._kw(timeout, ref))

    async def create_tenant(self, name: str, *, admin: bool = False, quotas: dict[str, int] | None = None,
                            timeout: float | None = None) -> tuple[tenants_pb2.Tenant, str]:
        req = tenants_pb2.CreateTenantRequest(name=name, admin=admin, quotas=common_pb2.Quotas(**(quotas or {})))
        reply = await self.tenants.CreateTenant(req, **self._kw(timeout))
        return reply.tenant, reply.api_key

    async def list_tenants(self, *, timeout: float | None = None) -> list[tenants_pb2.Tenant]:
        return list((await self.tenants.ListTenants(tenants_pb2.ListTenantsRequest(), **self._kw(timeout))).tenants)

    async def delete_tenant(self, name: str, *, timeout: float | None = None) -> None:
        await self.tenants.DeleteTenant(tenants_pb2.DeleteTenantRequest(name=name), **self._kw(timeout))

    async def rotate_key(self, name: str, *, timeout: float | None = None) -> str:
        return (await self.tenants.RotateKey(tenants_pb2.RotateKeyRequest(name=name), **self._kw(timeout))).api_key

    async def set_quotas(self, name: str, *, timeout: float | None = None, **quotas: int) -> tenants_pb2.Tenant:
        req = tenants_pb2.SetQuotasRequest(name=name, quotas=common_pb2.Quotas(**quotas))
        return (await self.tenants.SetQuotas(req, **self._kw(timeout))).tenant
