"""The Deltas servicer: upload (client stream), get, list, delete, preload. Every call is confined
to the caller's namespace: the store resolves names inside the caller's tenant only, so another
tenant's delta is NOT_FOUND exactly like a missing one (no enumeration).

An upload is bounded before its payload is read: the header's name, description and labels and the
tenant's quotas are checked first (``store.check_upload``), and the upload takes a slot of
``app.uploads`` (at most ``max_uploads`` at once, ``max_uploads_per_tenant`` per tenant; past either,
RESOURCE_EXHAUSTED with a retry hint). The payload is then spooled to a scratch file of the store
(``store.scratch``: swept after any crash) while the bytes are counted; past ``max_upload_bytes`` (or
the header's ``total_bytes``) the call fails at once with INVALID_ARGUMENT. Only a complete payload
goes to ``store.put``, on the app's upload threads (``app.upload_pool``, so conversions never starve the
threads every other call uses), which converts and validates it and writes the version atomically
(DESIGN D7). The slot is held until that thread is done, even when the client gave up first; a client
that cancels after its whole payload arrived may still find the version stored. Refusals name the
payload "upload", never the server's scratch files; every failed upload is logged at info.
"""
from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

from delta_store.errors import InvalidArgument
from delta_store.names import check_name, parse_ref

from ..logs import get_logger
from ..pb import common_pb2, deltas_pb2, deltas_pb2_grpc
from .auth import tenant_name
from .errors import status_of
from .routing import check_delta_header

log = get_logger("deltas")

SOURCE_FORMATS = {common_pb2.SOURCE_FORMAT_AUTO: "auto", common_pb2.SOURCE_FORMAT_PEFT: "peft",
                  common_pb2.SOURCE_FORMAT_ADAPTERHUB: "adapterhub", common_pb2.SOURCE_FORMAT_OPENDELTA: "opendelta",
                  common_pb2.SOURCE_FORMAT_BITFIT: "bitfit", common_pb2.SOURCE_FORMAT_NATIVE: "native"}
FORMAT_TO_PB = {v: k for k, v in SOURCE_FORMATS.items()}
KIND_TO_PB = {"lora": common_pb2.DELTA_KIND_LORA, "bottleneck": common_pb2.DELTA_KIND_BOTTLENECK,
              "bitfit": common_pb2.DELTA_KIND_BITFIT, "ia3": common_pb2.DELTA_KIND_IA3,
              "dora": common_pb2.DELTA_KIND_DORA, "tokens": common_pb2.DELTA_KIND_TOKENS,
              "prompt": common_pb2.DELTA_KIND_PROMPT, "prefix": common_pb2.DELTA_KIND_PREFIX}
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000


def version_to_pb(v) -> deltas_pb2.DeltaVersion:
    return deltas_pb2.DeltaVersion(
        name=v.name, version=v.version, digest=v.digest, kinds=[KIND_TO_PB[k] for k in v.kinds if k in KIND_TO_PB],
        source_format=FORMAT_TO_PB.get(v.source_format, common_pb2.SOURCE_FORMAT_NATIVE), size_bytes=v.size,
        num_parameters=v.num_parameters, max_rank=v.max_rank, created_unix_ms=int(v.created * 1000),
        description=v.description, labels=v.labels)


def info_to_pb(versions: list) -> deltas_pb2.DeltaInfo:
    versions = sorted(versions, key=lambda v: v.version)
    used = [v.last_used for v in versions if v.last_used]
    usage = deltas_pb2.DeltaUsage(requests=sum(v.requests for v in versions),
                                  tokens_generated=sum(v.tokens for v in versions),
                                  last_used_unix_ms=int(max(used) * 1000) if used else 0)
    return deltas_pb2.DeltaInfo(name=versions[0].name, versions=[version_to_pb(v) for v in versions], usage=usage)


class DeltasServicer(deltas_pb2_grpc.DeltasServicer):
    def __init__(self, app):
        self.app = app

    async def _tenant(self, context):
        return await asyncio.to_thread(self.app.auth.authenticate, context.invocation_metadata())

    async def _spool(self, requests, path: Path, limit: int, declared: int | None) -> int:
        """Write the chunks to ``path``, counting bytes; raise as soon as the limit is passed."""
        received = 0
        with open(path, "xb") as f:
            async for msg in requests:
                if msg.WhichOneof("part") != "chunk":
                    raise InvalidArgument("upload: only the first message may be a header; later ones carry chunks")
                received += len(msg.chunk)
                if received > limit:
                    raise InvalidArgument(f"upload: payload exceeds the size limit of {limit} bytes")
                if declared is not None and received > declared:
                    raise InvalidArgument(f"upload: payload is longer than the announced total_bytes={declared}")
                f.write(msg.chunk)
        if declared is not None and received != declared:
            raise InvalidArgument(f"upload: truncated payload, {received} of the announced {declared} bytes arrived")
        if received == 0:
            raise InvalidArgument("upload: empty payload")
        return received

    async def _header(self, request_iterator, tenant, context):
        """The upload's header, checked with everything known before the payload: (header, format, labels)."""
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("upload: the first message must carry the header (name, source_format, ...)")
        header = first.header
        check_name(header.name)
        check_delta_header(context.invocation_metadata(), header.name)
        fmt = SOURCE_FORMATS.get(header.source_format)
        if fmt is None:
            raise InvalidArgument(f"upload: unknown source_format {header.source_format}")
        limit = self.app.config.max_upload_bytes
        if header.HasField("total_bytes") and header.total_bytes > limit:
            raise InvalidArgument(f"upload: announced total_bytes={header.total_bytes} exceeds the size limit of "
                                  f"{limit} bytes")
        max_labels = self.app.store.settings.max_labels
        if len(header.labels) > max_labels:  # before copying the map
            raise InvalidArgument(f"labels must be a mapping of at most {max_labels} pairs")
        labels = await asyncio.to_thread(self.app.store.check_upload, tenant, header.name, header.description,
                                         dict(header.labels))
        return header, fmt, labels

    async def UploadDelta(self, request_iterator, context):
        app = self.app
        tenant = await self._tenant(context)
        name, delta, status, received, lease, path, work = tenant_name(tenant), "-", "ok", 0, None, None, None
        version, reason = None, ""
        t0 = time.monotonic()
        try:
            header, fmt, labels = await self._header(request_iterator, tenant, context)
            delta = header.name
            lease = app.uploads.admit(name)
            path = Path(app.store.scratch.path("spool", ".payload"))
            declared = header.total_bytes if header.HasField("total_bytes") else None
            received = await self._spool(request_iterator, path, app.config.max_upload_bytes, declared)
            put = functools.partial(app.store.put, tenant, header.name, path, source_format=fmt,
                                    description=header.description, labels=labels, label="upload")
            work = asyncio.get_running_loop().run_in_executor(app.upload_pool, put)
            version = await asyncio.shield(work)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            status = "cancelled" if cancelled else status_of(exc)[0].name.lower()
            reason = "the client went away" if cancelled else status_of(exc)[1]
            raise
        finally:
            def done(_=None):
                if work is not None and not work.cancelled():
                    work.exception()  # retrieved: the client that would have read it is gone
                if path is not None:
                    path.unlink(missing_ok=True)
                if lease is not None:
                    lease.release()
            if work is None or work.done():
                done()
            else:  # the client gave up while the conversion runs: hold the slot (and the spool) until it ends
                work.add_done_callback(done)
            app.metrics.upload_finished(name, status, received)
            fields = {"reason": reason} if reason else {}
            log.info("upload", tenant=name, status=status,  # one line per upload, any outcome, at info
                     delta=version.ref if version is not None else delta, bytes=received,
                     kinds=",".join(version.kinds) if version is not None else "-", seconds=time.monotonic() - t0,
                     **fields)
        return deltas_pb2.UploadDeltaResponse(version=version_to_pb(version))

    async def GetDelta(self, request, context):
        tenant = await self._tenant(context)
        name, _ = parse_ref(request.name)
        check_delta_header(context.invocation_metadata(), request.name)
        versions = await asyncio.to_thread(self.app.store.versions, tenant, name)
        return deltas_pb2.GetDeltaResponse(delta=info_to_pb(versions))

    async def ListDeltas(self, request, context):
        tenant = await self._tenant(context)
        size = request.page_size or DEFAULT_PAGE_SIZE
        if size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be <= {MAX_PAGE_SIZE}, got {size}")
        page, token = await asyncio.to_thread(self.app.store.list, tenant, size,
                                              request.page_token)
        infos = []
        for latest in page:
            versions = await asyncio.to_thread(self.app.store.versions, tenant, latest.name)
            infos.append(info_to_pb(versions))
        return deltas_pb2.ListDeltasResponse(deltas=infos, next_page_token=token or "")

    async def DeleteDelta(self, request, context):
        tenant = await self._tenant(context)
        parse_ref(request.name)
        check_delta_header(context.invocation_metadata(), request.name)
        deleted = await asyncio.to_thread(self.app.store.delete, tenant, request.name)
        log.info("delta_deleted", tenant=tenant_name(tenant), delta=request.name, versions=len(deleted))
        return deltas_pb2.DeleteDeltaResponse(deleted_versions=len(deleted))

    async def PreloadDelta(self, request, context):
        tenant = await self._tenant(context)
        check_delta_header(context.invocation_metadata(), request.delta)
        version = await asyncio.to_thread(self.app.store.resolve, tenant, request.delta)
        t0 = time.monotonic()
        await asyncio.to_thread(self.app.store.load, version)  # host tier (a no-op when already there)
        tier = deltas_pb2.CACHE_TIER_HOST
        if request.tier == deltas_pb2.CACHE_TIER_DEVICE and await self.app.preload_device(version.key):
            tier = deltas_pb2.CACHE_TIER_DEVICE
        return deltas_pb2.PreloadDeltaResponse(version=version_to_pb(version), tier=tier,
                                               load_seconds=time.monotonic() - t0)
