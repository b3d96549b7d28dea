"""The Inference servicer: Generate, streamed (DESIGN D9). Thin: pb -> GenerationRequest, submit to
the engine, TokenOutput -> pb. No torch here.

Lifecycle of one call: authenticate -> parse and validate -> resolve the delta in the caller's
namespace (another tenant's name is NOT_FOUND) -> admit against the tenant's rate limits and
concurrency cap -> stream engine outputs. A deadline arms a timer that aborts the request in the
engine (its KV blocks and slot pin are freed at once) and ends the call with DEADLINE_EXCEEDED; a
client that cancels or disconnects cancels this handler, whose ``finally`` aborts the request too.

Nothing expensive runs before the request is bounded: a text prompt's size is checked in bytes
against ``max_prompt_bytes`` (a 7.5 MB prompt used to take 15 s of tokenizing on the event loop,
freezing every tenant's calls and the health checks), a token-id prompt's length against
``max_model_len``, and tokenization itself runs on a worker thread (the tokenizer releases the GIL).
A stream the SIGTERM drain has to cut ends UNAVAILABLE "server shutting down" (``App.cut_streams``).
"""
from __future__ import annotations

import asyncio
import time
import uuid

from delta_store.errors import DeadlineExceeded, InvalidArgument, Unavailable, error_for_code

from ..logs import get_logger
from ..pb import common_pb2, inference_pb2, inference_pb2_grpc
from ..types import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, FinishReason, GenerationRequest, SamplingParams, TokenOutput
from .auth import rate_limits, tenant_name
from .errors import status_of

log = get_logger("inference")

FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_NONE,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
    FinishReason.ABORTED: common_pb2.FINISH_REASON_ABORTED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
DEFAULT_MAX_NEW_TOKENS = 64
MAX_REQUEST_ID_CHARS = 128
# The client's deadline runs ahead of ours by the request's transit time, so when it gives up it
# cancels a call we still see ~1 ms from its deadline; a cancel that close is counted as a deadline.
DEADLINE_SLACK_S = 0.05
UNKNOWN_TENANT = "-"  # metrics label of calls refused before authentication
DRAIN_RETRY_S = 1.0  # a stream cut by the drain: another replica can take it at once


def sampling_from_pb(msg: inference_pb2.SamplingParams) -> SamplingParams:
    if len(msg.stop_strings) > MAX_STOP_STRINGS or len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:  # before copying
        raise InvalidArgument(f"sampling: at most {MAX_STOP_STRINGS} stop_strings and {MAX_STOP_TOKEN_IDS} "
                              f"stop_token_ids")
    try:
        return SamplingParams(
            max_new_tokens=msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            temperature=msg.temperature if msg.HasField("temperature") else 1.0,
            top_k=msg.top_k,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
            seed=msg.seed if msg.HasField("seed") else None,
            stop_token_ids=list(msg.stop_token_ids),
            stop_strings=list(msg.stop_strings),
            ignore_eos=msg.ignore_eos,
            logprobs=msg.logprobs,
        )
    except ValueError as exc:
        raise InvalidArgument(f"sampling: {exc}") from None


def output_to_pb(out: TokenOutput, delta_version: int) -> inference_pb2.GenerateResponse:
    msg = inference_pb2.GenerateResponse(
        request_id=out.request_id, text=out.text, token_ids=out.token_ids, logprobs=out.logprobs or [],
        finish_reason=FINISH_TO_PB.get(out.finish_reason, common_pb2.FINISH_REASON_ERROR),
        usage=common_pb2.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                               total_tokens=out.prompt_tokens + out.completion_tokens),
        delta_version=delta_version)
    if out.finish_reason is not None:
        msg.timings.CopyFrom(common_pb2.Timings(queue_seconds=out.queue_time or 0.0, ttft_seconds=out.ttft or 0.0,
                                                total_seconds=out.total_time or 0.0))
    return msg


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, app):
        self.app = app

    async def _prompt_ids(self, request: inference_pb2.GenerateRequest) -> list[int]:
        """The prompt's token ids, bounded before any work proportional to its size."""
        which = request.WhichOneof("prompt")
        config = self.app.config
        if which == "text":
            text, limit = request.text, config.max_prompt_bytes
            # characters <= UTF-8 bytes: a text longer than the limit in characters is refused without encoding it
            size = len(text) if len(text) > limit else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise InvalidArgument(f"prompt text is {size} bytes or more, over max_prompt_bytes={limit} "
                                      f"(max_model_len={config.max_model_len} tokens)")
            ids = await asyncio.to_thread(self.app.encode, text) if text else []
        elif which == "token_ids":
            if len(request.token_ids.ids) > config.max_model_len:
                raise InvalidArgument(f"prompt has {len(request.token_ids.ids)} token ids, over "
                                      f"max_model_len={config.max_model_len}")
            ids = list(request.token_ids.ids)
            vocab = self.app.vocab_size
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise InvalidArgument(f"prompt token id {bad} is out of range [0, {vocab})")
        else:
            raise InvalidArgument("GenerateRequest needs a prompt: set text or token_ids")
        if not ids:
            raise InvalidArgument("prompt is empty")
        return ids

    async def _request(self, request, tenant, request_id: str) -> tuple[GenerationRequest, object | None]:
        sampling = sampling_from_pb(request.sampling)
        ids = await self._prompt_ids(request)
        limit = self.app.config.max_model_len
        if len(ids) + sampling.max_new_tokens > limit:
            raise InvalidArgument(f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds "
                                  f"max_model_len={limit}")
        version = None
        if request.delta:
            version = await asyncio.to_thread(self.app.store.resolve, tenant, request.delta)
        req = GenerationRequest(request_id=request_id, tenant=tenant_name(tenant), prompt_token_ids=ids,
                                sampling=sampling, delta=None if version is None else version.key,
                                arrival_time=time.monotonic())
        return req, version

    async def Generate(self, request, context):
        app = self.app
        name, status, version, lease = UNKNOWN_TENANT, "ok", None, None
        # The id every log line and the response carry: the client's, or one made here (which the client
        # reads in each GenerateResponse.request_id), so a response can always be matched to its log line.
        request_id = request.request_id or uuid.uuid4().hex
        try:
            if len(request.request_id) > MAX_REQUEST_ID_CHARS:
                request_id = uuid.uuid4().hex
                raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
            tenant = await asyncio.to_thread(app.auth.authenticate, context.invocation_metadata())
            name = tenant_name(tenant)
            req, version = await self._request(request, tenant, request_id)
            lease = app.rate_limiter.admit(name, rate_limits(tenant, app.config),
                                           len(req.prompt_token_ids) + req.sampling.max_new_tokens)
            async for msg in self._stream(req, version, lease, context):
                yield msg
        except asyncio.CancelledError:  # the client went away, or gRPC ended the call at its deadline
            remaining = context.time_remaining()
            status = "deadline_exceeded" if remaining is not None and remaining <= DEADLINE_SLACK_S else "cancelled"
            raise
        except Exception as exc:
            status = status_of(exc)[0].name.lower()
            raise
        finally:
            if lease is not None:  # normally released by _stream with the tokens used; a no-op then
                lease.release()
            app.metrics.request_finished(name, status, version.kinds if version is not None else ())
            log.info("generate", request_id=request_id, tenant=name, status=status, delta=request.delta or "-")

    async def _stream(self, req: GenerationRequest, version, lease, context):
        """Engine outputs as pb chunks; aborts the engine request unless it finished by itself."""
        app = self.app
        last, expired, timer = None, [], None
        remaining = context.time_remaining()
        if remaining is not None:
            def expire():
                expired.append(True)
                app.engine.abort(req.request_id)
            timer = asyncio.get_running_loop().call_later(max(0.0, remaining), expire)
        app.metrics.request_started(req.tenant)
        app.running_streams.add(req.request_id)
        try:
            async for out in app.engine.generate(req):
                last = out
                if out.finish_reason == FinishReason.ABORTED and app.cutting and not expired:
                    raise Unavailable(f"server shutting down: request {req.request_id} was cut by the drain after "
                                      f"{out.completion_tokens} tokens; retry it", retry_after=DRAIN_RETRY_S)
                if out.finish_reason == FinishReason.ERROR:
                    # A delta deleted between admission and its load is NOT_FOUND, not INTERNAL: keep the code.
                    raise error_for_code(out.error_code, f"request {req.request_id} failed in the engine: "
                                                          f"{out.error or 'unknown'}")
                if expired and out.finish_reason is not None:
                    raise DeadlineExceeded(f"request {req.request_id}: deadline passed after "
                                           f"{out.completion_tokens} generated tokens")
                yield output_to_pb(out, 0 if version is None else version.version)
            if expired:
                raise DeadlineExceeded(f"request {req.request_id}: deadline passed")
        finally:
            app.running_streams.discard(req.request_id)
            if timer is not None:
                timer.cancel()
            if last is None or last.finish_reason is None:  # cancelled, failed or expired mid-stream
                app.engine.abort(req.request_id)
            app.metrics.request_ended(req.tenant)
            used = last.completion_tokens if last is not None else 0
            lease.release(len(req.prompt_token_ids) + used)
            if version is not None and last is not None:
                app.store.record_usage(version.key, requests=1, tokens=used)
