"""Open-loop request plans: Poisson arrivals, delta popularity, prompt/output length distributions.

A plan is made up front from a seed, so the same settings replay the same requests against the base
model alone and against the deltas (only the ``delta`` field differs). Arrivals are open-loop: a
request is sent at its planned time whatever is still running, as in S-LoRA's and vLLM's serving
benchmarks (a closed loop would slow its own arrivals down when the server slows, hiding queueing).

Popularity over the warm deltas in use:
  uniform - each request picks one of them uniformly;
  zipf    - P(k) ~ 1/(k+1)^s, s = 1.2 (the skew of ``tests/helpers.popularity``);
  hot     - one hot tenant: ``hot_fraction`` of requests go to tenant 0's deltas, the rest uniformly
            to the other tenants' deltas;
  none    - the base model alone (empty ``delta``).
``cold_fraction`` of requests instead use a never-seen delta, each cold delta exactly once.
No torch here: the load process imports only this, the client and the stubs.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

POPULARITY = ("none", "uniform", "zipf", "hot")


@dataclass(slots=True, frozen=True)
class LengthDist:
    """Log-normal token counts, clipped to [lo, hi]: chat prompts and replies are right-skewed
    (ShareGPT input lengths have a median near 1/3 of their mean)."""

    median: int
    sigma: float
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not (1 <= self.lo <= self.median <= self.hi):
            raise ValueError(f"LengthDist needs 1 <= lo <= median <= hi, got lo={self.lo} median={self.median} "
                             f"hi={self.hi}")
        if self.sigma < 0:
            raise ValueError(f"LengthDist sigma must be >= 0, got {self.sigma}")

    def sample(self, rng: random.Random) -> int:
        return max(self.lo, min(self.hi, round(self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))))

    def mean(self, rng_seed: int = 0, n: int = 4096) -> float:
        rng = random.Random(rng_seed)
        return sum(self.sample(rng) for _ in range(n)) / n


PROMPT_LEN = LengthDist(48, 0.6, 8, 192)  # default prompt tokens of every load
OUTPUT_LEN = LengthDist(24, 0.5, 4, 64)  # default generated tokens


@dataclass(slots=True, frozen=True)
class DeltaRef:
    """One uploaded delta as the load sees it: who owns it, its name, what it is."""

    tenant: int  # index into the tenant key list
    name: str
    kind: str  # recipe label, e.g. "lora_r16_all", "ia3", "bottleneck_w32"


@dataclass(slots=True)
class WorkloadConfig:
    rate: float  # mean arrivals per second (Poisson)
    duration_s: float  # no arrival after this
    max_requests: int  # nor more than this many
    popularity: str = "uniform"
    num_deltas: int = 32  # warm deltas in use: the first num_deltas of the pool
    cold_fraction: float = 0.0
    hot_fraction: float = 0.8
    zipf_s: float = 1.2
    prompt_len: LengthDist = PROMPT_LEN
    output_len: LengthDist = OUTPUT_LEN
    vocab_size: int = 259
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"workload rate must be a positive number of requests/s, got {self.rate}")
        if not (self.duration_s > 0):
            raise ValueError(f"workload duration_s must be > 0, got {self.duration_s}")
        if self.max_requests < 1:
            raise ValueError(f"workload max_requests must be >= 1, got {self.max_requests}")
        if self.popularity not in POPULARITY:
            raise ValueError(f"workload popularity must be one of {POPULARITY}, got {self.popularity!r}")
        if not (0.0 <= self.cold_fraction < 1.0):
            raise ValueError(f"workload cold_fraction must be in [0, 1), got {self.cold_fraction}")
        if not (0.0 <= self.hot_fraction <= 1.0):
            raise ValueError(f"workload hot_fraction must be in [0, 1], got {self.hot_fraction}")
        if self.popularity != "none" and self.num_deltas < 1:
            raise ValueError(f"workload popularity {self.popularity!r} needs num_deltas >= 1, got {self.num_deltas}")


@dataclass(slots=True)
class PlannedRequest:
    index: int
    at: float  # seconds after the phase starts
    tenant: int  # index into the tenant key list
    delta: str  # "" = the base model alone
    kind: str  # recipe label of the delta, "base" without one
    cold: bool  # first use of a never-seen delta
    prompt: list[int]  # token ids
    max_new_tokens: int
    seed: int
    timeout_s: float | None = None  # gRPC deadline; None = the driver's bound
    cancel_after_s: float | None = None  # the client cancels the call after this long
    cancel_after_tokens: int | None = None  # ... or once this many tokens streamed (mid-stream for sure)


def expected_cold(cfg: WorkloadConfig) -> int:
    """How many cold deltas a plan of ``cfg`` may consume: an upper bound to upload beforehand."""
    expected = min(cfg.max_requests, cfg.rate * cfg.duration_s) * cfg.cold_fraction
    return int(math.ceil(expected + 3.0 * math.sqrt(max(expected, 1.0)))) if cfg.cold_fraction > 0 else 0


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def make_plan(cfg: WorkloadConfig, warm: list[DeltaRef], cold: list[DeltaRef] = (), *,
              base_tenants: int = 1) -> list[PlannedRequest]:
    """The requests of one phase. ``warm``: the pool (the first ``cfg.num_deltas`` are used);
    ``cold``: never-used deltas, each consumed by one request; ``base_tenants``: how many tenants
    share the base-model load when ``popularity == "none"``."""
    if cfg.popularity != "none" and len(warm) < cfg.num_deltas:
        raise ValueError(f"workload wants {cfg.num_deltas} warm deltas, the pool has {len(warm)}")
    rng = random.Random(cfg.seed)
    pool = list(warm[:cfg.num_deltas]) if cfg.popularity != "none" else []
    hot = [d for d in pool if d.tenant == 0]
    rest = [d for d in pool if d.tenant != 0]
    if cfg.popularity == "hot" and (not hot or not rest):
        raise ValueError("workload popularity 'hot' needs deltas of tenant 0 and of at least one other tenant")
    weights = _zipf_weights(len(pool), cfg.zipf_s) if cfg.popularity == "zipf" else None
    cold_left = list(cold)
    plan: list[PlannedRequest] = []
    t = 0.0
    while len(plan) < cfg.max_requests:
        t += rng.expovariate(cfg.rate)
        if t >= cfg.duration_s:
            break
        is_cold = cfg.cold_fraction > 0 and rng.random() < cfg.cold_fraction and bool(cold_left)
        if is_cold:
            ref = cold_left.pop(0)
        elif cfg.popularity == "none":
            ref = None
        elif cfg.popularity == "uniform":
            ref = rng.choice(pool)
        elif cfg.popularity == "zipf":
            ref = rng.choices(pool, weights=weights)[0]
        else:
            ref = rng.choice(hot) if rng.random() < cfg.hot_fraction else rng.choice(rest)
        n_prompt = cfg.prompt_len.sample(rng)
        plan.append(PlannedRequest(
            index=len(plan), at=t,
            tenant=ref.tenant if ref is not None else len(plan) % max(1, base_tenants),
            delta=ref.name if ref is not None else "", kind=ref.kind if ref is not None else "base",
            cold=is_cold, prompt=[rng.randrange(3, cfg.vocab_size) for _ in range(n_prompt)],
            max_new_tokens=cfg.output_len.sample(rng), seed=rng.randrange(1 << 31)))
    return plan


def fresh_prompts(plan: list[PlannedRequest], salt: int, vocab_size: int) -> list[PlannedRequest]:
    """The same arrivals, lengths and deltas with new prompt tokens, drawn from ``salt``: phases that replay one
    plan must not reuse each other's KV through prefix caching (D14), or the second of two identical phases
    skips most of its prefill and a ratio bracketed by the two compares unequal work (bench_serving measured
    base phases 1.5x apart in tokens per CPU-second that way)."""
    out = []
    for p in plan:
        rng = random.Random(f"{salt}:{p.index}")
        out.append(replace(p, prompt=[rng.randrange(3, vocab_size) for _ in p.prompt]))
    return out


def as_base(plan: list[PlannedRequest]) -> list[PlannedRequest]:
    """The same arrivals, prompts and lengths against the base model alone (the in-run baseline)."""
    return [PlannedRequest(p.index, p.at, p.tenant, "", "base", False, p.prompt, p.max_new_tokens, p.seed,
                           p.timeout_s, p.cancel_after_s, p.cancel_after_tokens) for p in plan]
