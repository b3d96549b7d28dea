"""Which deltas a per-request merge may combine, and the merged delta's address: the rules of
``delta_store/merge.py`` without torch, so the gRPC edge checks a request before anything is loaded.

Only LoRA terms merge exactly by rank concatenation (``merge.py`` says why each other kind does not).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

from .errors import InvalidArgument

MERGEABLE_KINDS = frozenset({"lora"})
MAX_PARTS = 16
_WHY_NOT = {
    "dora": "DoRA divides by the norm of W + s*B*A, which is not linear in the delta",
    "ia3": "(IA)3 multiplies activations, so a weighted sum of two is not an (IA)3 delta",
    "bottleneck": "a bottleneck adapter passes through a nonlinearity",
    "bitfit": "bias terms are not merged by rank concatenation (PEFT's cat merge drops them)",
    "tokens": "trainable tokens replace embedding rows; two replacements do not add",
    "prompt": "virtual prompt tokens enter the attention context; two prompts do not add",
    "prefix": "prefix keys and values enter the attention context; two prefixes do not add",
}


def unmergeable_reason(kinds: Sequence[str]) -> str | None:
    """Why a delta with these kinds cannot join a merge, or None when it can."""
    bad = sorted(set(kinds) - MERGEABLE_KINDS)
    if not bad:
        return None
    return "; ".join(f"it holds {k}: {_WHY_NOT.get(k, 'not a LoRA term')}" for k in bad)


def check_weights(weights: Sequence[float]) -> list[float]:
    if not 1 <= len(weights) <= MAX_PARTS:
        raise InvalidArgument(f"a merge names 1 to {MAX_PARTS} deltas, got {len(weights)}")
    out = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InvalidArgument(f"merge weight {w!r} is not a finite number")
        out.append(float(w))
    return out


def merge_digest(parts: Sequence[tuple[str, float]]) -> str:
    """The merged delta's address: sha256 over its parts' digests and weights, in order (the order fixes
    the concatenation, so ``(a, b)`` and ``(b, a)`` are different, equally valid, deltas)."""
    body = json.dumps([[d, float(w).hex()] for d, w in parts], separators=(",", ":"))
    return hashlib.sha256(b"deltaserve.merge.v1:" + body.encode()).hexdigest()
