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
the merged delta built once (``server/deltas/merges.py``) and named by a key of its parts' digests and
weights. Unset sampling fields take the served model's generation_config values, then the API defaults
(``server/types.py``, ``DEFAULT_MAX_NEW_TOKENS`` / ``DEFAULT_CHAT_MAX_NEW_TOKENS``).

Nothing expensive runs before the prompt is bounded (D17): text and chat messages in UTF-8 bytes against
``max_prompt_bytes`` (a 7.5 MB prompt once took 15 s of tokenizing on the event loop, freezing every
tenant's calls and the health checks), token ids in count against ``max_model_len``; tokenizing and chat
rendering then run on a worker thread. Every call has a request id from its start (the client's, or one
made here), so its log line always names the id its responses carry. A stream the SIGTERM drain has to
cut ends UNAVAILABLE "server shutting down" (``App.cut_streams``), retryable elsewhere at once.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from delta_store.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable, error_for_code
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
# A call with a deadline is ended by the server DEADLINE_EXCEEDED a little before it: the client's deadline
# runs ahead of ours by the time its headers took to reach the handler (~1 ms idle, but over 50 ms on a
# loaded 2-core machine, where the client's deadline then fired first and the call was counted cancelled).
# 0.1 s, or a quarter of a shorter deadline, covers that transit plus one late turn of the event loop.
DEADLINE_MARGIN_S = 0.1
DRAIN_RETRY_S = 1.0  # a stream cut by the drain: another replica can take it at once
CUT_SLACK_S = 1.0  # after the drain cuts the last streams, the fronts wait this long for their last words to go out


@dataclass(frozen=True, slots=True)
class Prompt:
    """Exactly one of text, token_ids, messages (a list of {"role", "content"} or objects with both)."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def deadline_margin(remaining_s: float) -> float:
    """How long before the client's deadline the server ends a call that has ``remaining_s`` left."""
    return max(0.0, min(DEADLINE_MARGIN_S, remaining_s / 4))


def check_prompt_size(prompt: Prompt, config) -> None:
    """InvalidArgument for a prompt that cannot fit, decided in time linear in its length at worst and
    without tokenizing: characters <= UTF-8 bytes, so a text longer than the limit in characters is
    refused without encoding it."""
    limit = config.prompt_bytes_limit
    if prompt.text is not None:
        size = _utf8_size(prompt.text, limit)
        if size > limit:
            raise InvalidArgument(f"prompt text is {size} bytes or more, over max_prompt_bytes={limit} "
                                  f"(max_model_len={config.max_model_len} tokens)")
    elif prompt.token_ids is not None:
        if len(prompt.token_ids) > config.max_model_len:
            raise InvalidArgument(f"prompt has {len(prompt.token_ids)} token ids, over "
                                  f"max_model_len={config.max_model_len}")
    elif prompt.messages is not None:
        size = 0
        for m in prompt.messages:
            content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            size += _utf8_size(content, limit) if isinstance(content, str) else 0
            if size > limit:
                raise InvalidArgument(f"chat messages are {size} bytes or more, over max_prompt_bytes={limit} "
                                      f"(max_model_len={config.max_model_len} tokens)")


def _utf8_size(text: str, limit: int) -> int:
    return len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))


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
        self.expired = False  # the server's deadline timer fired (the call ends DEADLINE_EXCEEDED)
        self.margin_s = 0.0  # how early that timer was set (deadline_margin)
        self.last: TokenOutput | None = None
        self.t0 = time.monotonic()
        self.request_id = uuid.uuid4().hex  # the client's replaces it in prepare(); either way, logged
        self._given_id = False
        self._finished = False

    async def authenticate(self, metadata):
        tenant = await asyncio.to_thread(self.app.auth.authenticate, metadata)
        self.tenant = tenant_name(tenant)
        return tenant

    async def prompt_ids(self, prompt: Prompt) -> tuple[list[int], list[int]]:
        """(prompt ids, extra stop ids): the chat template's end-of-turn ids for a conversation. Bounded
        first; tokenizing and rendering run off the event loop (the tokenizer releases the GIL)."""
        app = self.app
        check_prompt_size(prompt, app.config)
        if prompt.messages is not None:
            chat = require(getattr(app, "chat", None))
            ids, stops = await asyncio.to_thread(chat.render, prompt.messages), chat.end_of_turn_ids
        elif prompt.token_ids is not None:
            ids, stops = list(prompt.token_ids), []
            bad = next((t for t in ids if not 0 <= t < app.vocab_size), None)
            if bad is not None:
                raise InvalidArgument(f"prompt token id {bad} is out of range [0, {app.vocab_size})")
        elif prompt.text is not None:
            ids, stops = (await asyncio.to_thread(app.encode, prompt.text) if prompt.text else []), []
        else:
            raise InvalidArgument("the request needs a prompt: text, token ids or chat messages")
        if not ids:
            raise InvalidArgument("prompt is empty")
        return ids, stops

    async def prepare(self, tenant, prompt: Prompt, fields: dict, delta_ref: str = "", request_id: str = "", *,
                      merge=()):
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
        if request_id:
            self.request_id, self._given_id = request_id, True
        defaults = getattr(self.app, "generation_defaults", None)
        sampling = sampling_params(fields, defaults, chat=prompt.is_chat)  # bad sampling: refused before tokenizing
        ids, stops = await self.prompt_ids(prompt)
        if stops:
            sampling = sampling_params(fields, defaults, chat=True, extra_stop_ids=stops)
        limit = self.app.config.max_model_len
        if len(ids) + sampling.max_new_tokens > limit:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds "
                                  f"max_model_len={limit}")
        if merge:
            self.version = await self._merged(tenant, list(merge), delta_ref)
        elif delta_ref:
            self.version = await asyncio.to_thread(self.app.store.resolve, tenant, delta_ref)
        self.req = GenerationRequest(request_id=self.request_id, tenant=tenant_name(tenant),
                                     prompt_token_ids=ids, sampling=sampling,
                                     delta=None if self.version is None else self.version.key,
                                     arrival_time=self.t0)  # the RPC's receipt: TTFT and queue wait count
        # authentication, tokenizing and delta resolution too (worker threads that a loaded 2-core box has been
        # seen to hold for ~300 ms before the engine saw the request), as a client measures them
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
        left for the call (None: none); :func:`deadline_margin` before it the request is aborted and
        DEADLINE_EXCEEDED raised, so the server ends the call, not the client's timer."""
        app, req = self.app, self.req
        timer = None
        if deadline_s is not None:
            def expire():
                self.expired = True
                app.engine.abort(req.request_id)
            self.margin_s = deadline_margin(deadline_s)
            timer = asyncio.get_running_loop().call_later(max(0.0, deadline_s - self.margin_s), expire)
        app.metrics.request_started(req.tenant)
        app.running_streams.add(req.request_id)
        try:
            async for out in app.engine.generate(req):
                self.last = out
                if out.finish_reason == FinishReason.ABORTED and app.cutting and not self.expired:
                    raise Unavailable(f"server shutting down: request {req.request_id} was cut by the drain after "
                                      f"{out.completion_tokens} tokens; retry it", retry_after=DRAIN_RETRY_S)
                if out.finish_reason == FinishReason.ERROR:
                    # A delta deleted between admission and its load is NOT_FOUND, not INTERNAL: keep the code.
                    raise error_for_code(out.error_code, f"request {req.request_id} failed in the engine: "
                                                          f"{out.error or 'unknown'}")
                if self.expired and out.finish_reason is not None:
                    raise DeadlineExceeded(f"request {req.request_id}: deadline passed after "
                                           f"{out.completion_tokens} generated tokens")
                yield out
            if self.expired:
                raise DeadlineExceeded(f"request {req.request_id}: deadline passed")
        finally:
            app.running_streams.discard(req.request_id)
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
        if not self._given_id and request_id and len(request_id) <= MAX_REQUEST_ID_CHARS:
            self.request_id = request_id  # refused before prepare(): the client's id, if it sent a sane one
        log.info("generate", api=self.api, request_id=self.request_id,
                 tenant=self.tenant, status=status, delta=delta_ref or "-",
                 prompt_tokens=len(self.req.prompt_token_ids) if self.req else 0,
                 completion_tokens=last.completion_tokens if last is not None else 0,
                 finish=(last.finish_reason or "-") if last is not None else "-",
                 seconds=round(time.monotonic() - self.t0, 4))
