"""Per-tenant rate limits and concurrency caps (DESIGN D10): token buckets, checked at admission; and
:class:`UploadSlots`, the bound on uploads in progress per tenant and per server.

A Generate call takes one unit from the tenant's request bucket and ``prompt + max_new_tokens``
from its token bucket, and holds one concurrency unit until it ends; tokens it did not generate
are given back when it ends (a request stopped at EOS after 5 of 64 tokens costs prompt + 5). A
refused call raises :class:`ResourceExhausted` with ``retry_after`` = when the bucket will hold
enough, which the edge sends as ``retry-after-ms``. Delta count/bytes quotas are the store's (on put).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from delta_store.errors import ResourceExhausted

# A concurrency slot frees when some running request ends; nothing predicts when, so the hint
# is a short poll interval rather than a promise.
CONCURRENCY_RETRY_S = 0.25
# An upload takes about a second per 10 MB (spool, convert, fsync); a shorter hint just spins.
UPLOAD_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class RateLimits:
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent: int

    def __post_init__(self) -> None:
        for key in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


class TokenBucket:
    """``capacity`` units, refilled continuously at ``capacity`` per ``period_s`` (a minute)."""

    def __init__(self, capacity: float, period_s: float, now: float):
        self.capacity = float(capacity)
        self.rate = self.capacity / period_s  # units per second
        self.level = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until ``n`` units are available (0 = now); inf if ``n`` exceeds the capacity."""
        self._refill(now)
        if n <= self.level:
            return 0.0
        if n > self.capacity or self.rate <= 0:
            return float("inf")
        return (n - self.level) / self.rate

    def take(self, n: float) -> None:
        self.level -= n

    def give(self, n: float) -> None:
        self.level = min(self.capacity, self.level + n)


class _TenantState:
    __slots__ = ("limits", "requests", "tokens", "running")

    def __init__(self, limits: RateLimits, now: float, period_s: float):
        self.limits = limits
        self.requests = TokenBucket(limits.requests_per_minute, period_s, now)
        self.tokens = TokenBucket(limits.tokens_per_minute, period_s, now)
        self.running = 0


class Lease:
    """One admitted request. ``settle(used_tokens)`` refunds unused tokens; ``release()`` frees the
    concurrency unit (idempotent; also on ``with`` exit)."""

    def __init__(self, limiter: "RateLimiter", tenant: str, charged: int):
        self._limiter, self._tenant, self._charged = limiter, tenant, charged
        self._released = False

    def release(self, used_tokens: int | None = None) -> None:
        if self._released:
            return
        self._released = True
        refund = 0 if used_tokens is None else max(0, self._charged - used_tokens)
        self._limiter._release(self._tenant, refund)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RateLimiter:
    """Admission control per tenant. Thread-safe; the clock is injectable for tests."""

    def __init__(self, *, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._period_s = period_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tenants: dict[str, _TenantState] = {}

    def admit(self, tenant: str, limits: RateLimits, tokens: int) -> Lease:
        """Admit one request that may use ``tokens`` tokens, or raise ResourceExhausted with a retry hint."""
        with self._lock:
            now = self._clock()
            state = self._tenants.get(tenant)
            if state is None or state.limits != limits:  # new tenant, or its quotas were changed
                running = state.running if state else 0
                state = self._tenants[tenant] = _TenantState(limits, now, self._period_s)
                state.running = running
            if state.running >= limits.max_concurrent:
                raise ResourceExhausted(f"tenant {tenant!r}: {state.running} requests running, limit "
                                        f"max_concurrent={limits.max_concurrent}", retry_after=CONCURRENCY_RETRY_S)
            wait_req = state.requests.wait_for(1, now)
            if wait_req > 0:
                raise ResourceExhausted(f"tenant {tenant!r}: rate limit requests_per_minute="
                                        f"{limits.requests_per_minute} reached", retry_after=wait_req)
            wait_tok = state.tokens.wait_for(tokens, now)
            if wait_tok == float("inf"):
                raise ResourceExhausted(f"tenant {tenant!r}: request needs {tokens} tokens (prompt + max_new_tokens), "
                                        f"more than tokens_per_minute={limits.tokens_per_minute}")
            if wait_tok > 0:
                raise ResourceExhausted(f"tenant {tenant!r}: rate limit tokens_per_minute="
                                        f"{limits.tokens_per_minute} reached", retry_after=wait_tok)
            state.requests.take(1)
            state.tokens.take(tokens)
            state.running += 1
            return Lease(self, tenant, tokens)

    def running(self, tenant: str) -> int:
        with self._lock:
            state = self._tenants.get(tenant)
            return state.running if state else 0

    def _release(self, tenant: str, refund: int) -> None:
        with self._lock:
            state = self._tenants.get(tenant)
            if state is not None:
                state.running = max(0, state.running - 1)
                state.tokens.give(refund)

    def forget(self, tenant: str) -> None:
        """Drop a deleted tenant's buckets."""
        with self._lock:
            self._tenants.pop(tenant, None)


class UploadSlots:
    """How many uploads run at once, per tenant and in all (DESIGN D10). Each upload holds disk (its spool,
    an extraction), memory (its tensors) and a conversion thread until it ends, so past ``max_total`` or a
    tenant's ``max_per_tenant`` a new one is refused with ResourceExhausted and a retry hint, before any
    payload byte is read. Thread-safe; a lease is released exactly once."""

    def __init__(self, max_total: int, max_per_tenant: int):
        if max_total < 1 or max_per_tenant < 1:
            raise ValueError(f"upload limits must be >= 1, got {max_total} and {max_per_tenant}")
        self.max_total, self.max_per_tenant = max_total, max_per_tenant
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}

    def admit(self, tenant: str) -> "UploadLease":
        with self._lock:
            total = sum(self._running.values())
            mine = self._running.get(tenant, 0)
            if mine >= self.max_per_tenant:
                raise ResourceExhausted(f"tenant {tenant!r}: {mine} uploads in progress, limit "
                                        f"max_uploads_per_tenant={self.max_per_tenant}", retry_after=UPLOAD_RETRY_S)
            if total >= self.max_total:
                raise ResourceExhausted(f"server busy: {total} uploads in progress, limit max_uploads="
                                        f"{self.max_total}", retry_after=UPLOAD_RETRY_S)
            self._running[tenant] = mine + 1
        return UploadLease(self, tenant)

    def running(self, tenant: str | None = None) -> int:
        with self._lock:
            return sum(self._running.values()) if tenant is None else self._running.get(tenant, 0)

    def _release(self, tenant: str) -> None:
        with self._lock:
            left = self._running.get(tenant, 0) - 1
            if left > 0:
                self._running[tenant] = left
            else:
                self._running.pop(tenant, None)


class UploadLease:
    def __init__(self, slots: UploadSlots, tenant: str):
        self._slots, self._tenant, self._released = slots, tenant, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slots._release(self._tenant)
