"""The Inference servicer: Generate, streamed (DESIGN D9). Thin: pb -> the protocol-neutral call of
``generation.py`` (shared with the OpenAI front), TokenOutput -> pb. No torch here.

Lifecycle of one call: authenticate -> parse and validate -> resolve the delta in the caller's
namespace (another tenant's name is NOT_FOUND) -> admit against the tenant's rate limits and
concurrency cap -> stream engine outputs. A deadline arms a timer that aborts the request in the
engine (its KV blocks and slot pin are freed at once) and ends the call with DEADLINE_EXCEEDED; a
client that cancels or disconnects cancels this handler, whose ``finally`` aborts the request too.
Prompt bounds, off-loop tokenizing and the drain's cut are the call's (``generation.py``); the stop
lists are bounded here before protobuf's repeated fields are copied.
"""
from __future__ import annotations

import asyncio

from delta_store.errors import InvalidArgument

from ..pb import common_pb2, inference_pb2, inference_pb2_grpc
from ..types import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, FinishReason, TokenOutput
from .errors import status_of
from .generation import GenerationCall, Prompt
from .routing import check_delta_header

FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_NONE,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
    FinishReason.ABORTED: common_pb2.FINISH_REASON_ABORTED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
# The server ends a call with a deadline itself, a margin before it (generation.deadline_margin). A cancel
# that arrives within that margin plus this slack of the deadline is the client's deadline timer having
# fired first anyway (the client runs ahead of us by the request's transit time, ~1 ms idle, over 50 ms on a
# loaded 2-core machine), not a client giving up: it is counted as a deadline.
DEADLINE_SLACK_S = 0.05


def sampling_fields(msg: inference_pb2.SamplingParams) -> dict:
    """The fields a request set (proto3 optional: HasField; 0 / empty for the others means unset)."""
    def opt(name):
        return getattr(msg, name) if msg.HasField(name) else None

    if len(msg.stop_strings) > MAX_STOP_STRINGS or len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:  # before copying
        raise InvalidArgument(f"sampling: at most {MAX_STOP_STRINGS} stop_strings and {MAX_STOP_TOKEN_IDS} "
                              f"stop_token_ids")

    return {"max_new_tokens": msg.max_new_tokens or None, "temperature": opt("temperature"), "top_k": opt("top_k"),
            "top_p": opt("top_p"), "repetition_penalty": opt("repetition_penalty"), "seed": opt("seed"),
            "stop_token_ids": list(msg.stop_token_ids), "stop_strings": list(msg.stop_strings),
            "ignore_eos": msg.ignore_eos, "logprobs": msg.logprobs}


def prompt_from_pb(request: inference_pb2.GenerateRequest) -> Prompt:
    which = request.WhichOneof("prompt")
    if which == "text":
        return Prompt(text=request.text)
    if which == "token_ids":
        return Prompt(token_ids=list(request.token_ids.ids))
    if which == "chat":
        return Prompt(messages=list(request.chat.messages))
    raise InvalidArgument("GenerateRequest needs a prompt: set text, token_ids or chat")


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

    async def Generate(self, request, context):
        call = GenerationCall(self.app, api="grpc")
        status = "ok"
        try:
            tenant = await call.authenticate(context.invocation_metadata())
            check_delta_header(context.invocation_metadata(), request.delta)
            await call.prepare(tenant, prompt_from_pb(request), sampling_fields(request.sampling), request.delta,
                               request.request_id, merge=[(p.delta, p.weight) for p in request.merge])
            call.admit(tenant)
            async for out in call.stream(context.time_remaining()):
                yield output_to_pb(out, call.delta_version)
        except asyncio.CancelledError:  # the client went away, or gRPC ended the call at its deadline
            remaining = context.time_remaining()
            near = remaining is not None and remaining <= call.margin_s + DEADLINE_SLACK_S
            status = "deadline_exceeded" if call.expired or near else "cancelled"
            raise
        except Exception as exc:
            status = status_of(exc)[0].name.lower()
            raise
        finally:
            call.finish(status, request.delta or ("merge:" + ",".join(p.delta for p in request.merge)
                                                  if request.merge else ""), request.request_id)
