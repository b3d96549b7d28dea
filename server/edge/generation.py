"""One generation call, whatever the protocol: what the gRPC ``Generate`` and the OpenAI front share.

    call = GenerationCall(app, api="grpc")          # counts and logs the call once, however it ends
    tenant = await call.authenticate(metadata)       # UNAUTHENTICATED
    await call.prepare(tenant, prompt, fields, delta_ref, request_id, merge=[(name, weight), ...])
                                                     # INVALID_ARGUMENT, NOT_FOUND, ...
    call.admit(tenant)                               # RESOURCE_EXHAUSTED (rate limits, concurrency)
    async for out in call.stream(deadline_s): ...    # TokenOutput; typed errors from the engine
    call.finish(status)                              # metrics + one info log line

The prompt is text, token ids or chat messages (rendered with the model's template, whose end-of-turn
token then stops generation). The delta is one of the caller's versions, or a merge of several of its LoRA
deltas: each part resolved in the caller's namespace (another tenant's name is NOT_FOUND), its kinds checked,
the merged delta built once (``server/deltas/merges.py``) and named by a key of its parts' digests and weights. Unset sampling fields take the served model's generation_config values,
then the API defaults (``server/types.py``, ``DEFAULT_MAX_NEW_TOKENS`` / ``DEFAULT_CHAT_MAX_NEW_TOKENS``).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from delta_store.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, error_for_code
from delta_store.merge_rules import check_weights, unmergeable_reason

from ..logs import get_logger
from ..models.chat import require
from ..types import FinishReason, GenerationRequest, SamplingParams, TokenOutput
from .auth import rate_limits, tenant_name

log = get_logger("requests")

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_CHAT_MAX_NEW_TOKENS = 512  # an answer runs longer than a continuation; the end-of-turn token stops it
MAX_REQUEST_ID_CHARS = 128
UNKNOWN_TENANT = "-"  # metrics label of calls refused before authentication
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


@dataclass(frozen=True, slots=True)
class Prompt:
    """Exactly one of text, token_ids, messages (a list of {"role", "content"} or objects with both)."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def sampling_params(fields: dict, defaults, *, chat: bool, extra_stop_ids=()) -> SamplingParams:
    """SamplingParams from the fields a request set (absent or None = unset): the request's value, else the
    model's (``defaults``: GenerationDefaults or None), else the API default."""
    given = {k: v for k, v in fields.items() if v is not None}
    model = defaults.sampling_fields() if defaults is not None else {}
    values = {k: given.get(k, model.get(k)) for k in SAMPLING_FIELDS}
    values = {k: v for k, v in values.items() if v is not None}
    values.setdefault("max_new_tokens", DEFAULT_CHAT_MAX_NEW_TOKENS if chat else DEFAULT_MAX_NEW_TOKENS)
    stop_ids = list(given.get("stop_token_ids", ()))
    stop_ids += [t for t in extra_stop_ids if t not in stop_ids]
    other = {k: given[k] for k in ("seed", "stop_strings", "ignore_eos", "logprobs") if k in given}
    try:
        return SamplingParams(**values, stop_token_ids=stop_ids, **other)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"sampling: {exc}") from None


class GenerationCall:
    """One call's state from authentication to its last chunk; ``finish`` records it exactly once."""

    def __init__(self, app, api: str):
        self.app = app
        self.api = api  # "grpc" | "openai": the log line says which front took the call
        self.tenant = UNKNOWN_TENANT
        self.req: GenerationRequest | None = None
        self.version = None
        self.lease = None
        self.last: TokenOutput | None = None
        self.t0 = time.monotonic()
        self._finished = False

    async def authenticate(self, metadata):
        tenant = await asyncio.to_thread(self.app.auth.authenticate, metadata)
        self.tenant = tenant_name(tenant)
        return tenant

    def prompt_ids(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        """(prompt ids, extra stop ids): the chat template's end-of-turn ids for a conversation."""
        app = self.app
        if prompt.messages is not None:
            chat = require(getattr(app, "chat", None))
            ids, stops = chat.render(prompt.messages), chat.end_of_turn_ids
        elif prompt.token_ids is not None:
            ids, stops = list(prompt.token_ids), []
            bad = next((t for t in ids if not 0 <= t < app.vocab_size), None)
            if bad is not None:
                raise InvalidArgument(f"prompt token id {bad} is out of range [0, {app.vocab_size})")
        elif prompt.text is not None:
            ids, stops = app.encode(prompt.text), []
        else:
            raise InvalidArgument("the request needs a prompt: text, token ids or chat messages")
        if not ids:
            raise InvalidArgument("prompt is empty")
        return ids, stops

    async def prepare(self, tenant, prompt: Prompt, fields: dict, delta_ref: str = "", request_id: str = "", *,
                      merge=()):
        ids, stops = self.prompt_ids(prompt)
        sampling = sampling_params(fields, getattr(self.app, "generation_defaults", None), chat=prompt.is_chat,
                                   extra_stop_ids=stops)
        limit = self.app.config.max_model_len
        if len(ids) + sampling.max_new_tokens > limit:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds "
                                  f"max_model_len={limit}")
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
        if merge:
            self.version = await self._merged(tenant, list(merge), delta_ref)
        elif delta_ref:
            self.version = await asyncio.to_thread(self.app.store.resolve, tenant, delta_ref)
        self.req = GenerationRequest(request_id=request_id or uuid.uuid4().hex, tenant=tenant_name(tenant),
                                     prompt_token_ids=ids, sampling=sampling,
                                     delta=None if self.version is None else self.version.key,
                                     arrival_time=time.monotonic())
        return self.req

    async def _merged(self, tenant, parts: list[tuple[str, float]], delta_ref: str):
        """The MergedVersion of ``parts``: resolved in the caller's namespace, kinds checked, built once."""
        app = self.app
        if delta_ref:
            raise InvalidArgument("set delta or merge, not both")
        if getattr(app, "merges", None) is None:
            raise FailedPrecondition("this server does not serve merged deltas")
        limit = app.config.max_merge_parts
        if len(parts) > limit:
            raise InvalidArgument(f"merge names {len(parts)} deltas; at most {limit} (max_merge_parts)")
        weights = check_weights([w for _, w in parts])
        names = [name for name, _ in parts]
        versions = [await asyncio.to_thread(app.store.resolve, tenant, name) for name in names]
        for name, v in zip(names, versions):
            why = unmergeable_reason(v.kinds)
            if why:
                raise InvalidArgument(f"merge: {name} cannot be merged exactly: {why}")
        merged = app.merges.recipe(versions, weights, names)
        await asyncio.to_thread(app.merges.ensure, merged)  # DeltaError (INVALID_ARGUMENT): rank above max_rank
        return merged

    def admit(self, tenant) -> None:
        req = self.req
        self.lease = self.app.rate_limiter.admit(self.tenant, rate_limits(tenant, self.app.config),
                                                 len(req.prompt_token_ids) + req.sampling.max_new_tokens)

    async def stream(self, deadline_s: float | None = None):
        """Engine outputs; aborts the engine request unless it finished by itself. ``deadline_s``: seconds
        left for the call (None: none); past it the request is aborted and DEADLINE_EXCEEDED raised."""
        app, req = self.app, self.req
        expired, timer = [], None
        if deadline_s is not None:
            def expire():
                expired.append(True)
                app.engine.abort(req.request_id)
            timer = asyncio.get_running_loop().call_later(max(0.0, deadline_s), expire)
        app.metrics.request_started(req.tenant)
        try:
            async for out in app.engine.generate(req):
                self.last = out
                if out.finish_reason == FinishReason.ERROR:
                    # A delta deleted between admission and its load is NOT_FOUND, not INTERNAL: keep the code.
                    raise error_for_code(out.error_code, f"request {req.request_id} failed in the engine: "
                                                          f"{out.error or 'unknown'}")
                if expired and out.finish_reason is not None:
                    raise DeadlineExceeded(f"request {req.request_id}: deadline passed after "
                                           f"{out.completion_tokens} generated tokens")
                yield out
            if expired:
                raise DeadlineExceeded(f"request {req.request_id}: deadline passed")
        finally:
            if timer is not None:
                timer.cancel()
            last = self.last
            if last is None or last.finish_reason is None:  # cancelled, failed or expired mid-stream
                app.engine.abort(req.request_id)
            app.metrics.request_ended(req.tenant)
            used = last.completion_tokens if last is not None else 0
            self.lease.release(len(req.prompt_token_ids) + used)
            if self.version is not None and last is not None:  # a merge counts towards each of its parts
                keys = [k for k, _ in self.version.parts] if hasattr(self.version, "parts") else [self.version.key]
                for key in keys:
                    app.store.record_usage(key, requests=1, tokens=used)

    @property
    def delta_version(self) -> int:
        return 0 if self.version is None else self.version.version

    def finish(self, status: str, delta_ref: str = "", request_id: str = "") -> None:
        """Count the call and log its one line (idempotent: the first status wins)."""
        if self._finished:
            return
        self._finished = True
        if self.lease is not None:  # normally released by stream() with the tokens used; a no-op then
            self.lease.release()
        self.app.metrics.request_finished(self.tenant, status, self.version.kinds if self.version is not None else ())
        last = self.last
        log.info("generate", api=self.api, request_id=(self.req.request_id if self.req else request_id) or "-",
                 tenant=self.tenant, status=status, delta=delta_ref or "-",
                 prompt_tokens=len(self.req.prompt_token_ids) if self.req else 0,
                 completion_tokens=last.completion_tokens if last is not None else 0,
                 finish=(last.finish_reason or "-") if last is not None else "-",
                 seconds=round(time.monotonic() - self.t0, 4))
