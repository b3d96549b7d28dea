"""The nouns the engine and the gRPC edge share. Plain dataclasses: no torch, no protobuf.

A request names its delta by ``delta_store.records.DeltaKey`` (tenant, name, version, digest)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the key is delta_store's noun; importing it here would pull in torch
    from delta_store.records import DeltaKey


class FinishReason:
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop token id or stop string
    EOS = "eos"  # the model's end-of-sequence token
    ABORTED = "aborted"  # cancelled by the client or the server
    ERROR = "error"


MAX_STOP_STRINGS = 16  # each is searched in the pending text after every token: bounded, or one request stalls steps
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    repetition_penalty: float = 1.0  # 1 -> off (HF semantics: divide positive logits, multiply negative)
    seed: int | None = None  # same seed, same output, whatever else is in the batch
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # per-token logprob of the sampled token

    def __post_init__(self) -> None:
        if not (1 <= self.max_new_tokens <= 1 << 16):
            raise ValueError(f"max_new_tokens must be in [1, 65536], got {self.max_new_tokens}")
        if not (self.temperature >= 0.0 and self.temperature <= 100.0):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or len(self.stop_strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids and {MAX_STOP_STRINGS} stop_strings, got "
                             f"{len(self.stop_token_ids)} and {len(self.stop_strings)}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop_strings):
            raise ValueError(f"stop_strings must be at most {MAX_STOP_STRING_CHARS} characters each")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    tenant: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    delta: DeltaKey | None = None  # None = the base model alone
    arrival_time: float = 0.0  # time.monotonic() when the server received it (the edge sets it); the engine's if 0


@dataclass(slots=True)
class TokenOutput:
    """One streamed chunk for one request: the tokens produced by one engine step."""

    request_id: str
    token_ids: list[int]
    text: str = ""  # incremental detokenised text; never splits a multi-byte character
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # set on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    error: str | None = None  # set with finish_reason == "error"
    error_code: str | None = None  # the typed error's gRPC code name (delta_store/errors.py), e.g. "NOT_FOUND"
    # timings (seconds), set on the last chunk
    queue_time: float | None = None
    ttft: float | None = None
    total_time: float | None = None
