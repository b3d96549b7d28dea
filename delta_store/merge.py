"""Linear merges of LoRA deltas by rank concatenation, exact (LoRAX's per-request merge; PEFT's
``add_weighted_adapter(..., combination_type="cat")``).

For parts ``(delta_i, w_i)`` the merged module computes ``sum_i w_i * s_i * (x A_i^T) B_i^T``, which is one
LoRA with ``A = cat_i(w_i s_i A_i)`` (rows), ``B = cat_i(B_i)`` (columns) and scale 1: its rank is the sum
of the parts' ranks on that module (a module only some parts touch gets only theirs). PEFT's ``cat``
builds the same A and B (``lora_A * weight * scaling``, alpha = r), so the outputs agree to rounding.

Only LoRA terms merge exactly this way. A bias delta would merge linearly too, but PEFT's ``cat`` drops
``lora_B`` biases, so there is no reference to match and they are refused with the rest:
DoRA (its column norm of ``W + s B A`` is not linear in the delta), (IA)3 (multiplies), bottleneck adapters
(a nonlinearity), trainable tokens (replace rows). Worked example: a (r=4 on q,v; s=2) and b (r=2 on q,
k; s=1) merged (0.7, 0.3): q gets rank 6 with A = [1.4 A_a; 0.3 A_b], v rank 4, k rank 2.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .delta import Delta, LoraTerm, ModuleDelta
from .errors import DeltaError
from .merge_rules import check_weights, unmergeable_reason


def merge_lora(parts: Sequence[tuple[Delta, float]], *, names: Sequence[str] | None = None,
               max_rank: int | None = None) -> Delta:
    """The exact rank-concatenated merge of ``parts``; refuses non-LoRA kinds and ranks above ``max_rank``."""
    weights = check_weights([w for _, w in parts])
    names = list(names) if names is not None else [f"part {i}" for i in range(len(parts))]
    fingerprints = {d.base_fingerprint for d, _ in parts if d.base_fingerprint}
    if len(fingerprints) > 1:
        raise DeltaError(f"merge: the deltas were built for different bases ({sorted(fingerprints)})")
    for (delta, _), name in zip(parts, names):
        why = unmergeable_reason(sorted(delta.kinds()))
        if why:
            raise DeltaError(f"merge: {name} cannot be merged exactly: {why}")
    paths = sorted({p for d, _ in parts for p in d.modules})
    modules: dict[str, ModuleDelta] = {}
    for path in paths:
        terms = [(d.modules[path].lora, w) for (d, _), w in zip(parts, weights) if path in d.modules]
        dtype = terms[0][0].a.dtype
        for lora, _ in terms:
            dtype = torch.promote_types(dtype, lora.a.dtype)
        a = torch.cat([lora.a.to(dtype) * (w * lora.scale) for lora, w in terms])  # [sum r, in]
        b = torch.cat([lora.b.to(dtype) for lora, _ in terms], dim=1)  # [out, sum r]
        if max_rank is not None and a.shape[0] > max_rank:
            raise DeltaError(f"merge: {path} would have rank {a.shape[0]} (the sum of its parts'), above the "
                             f"server's max_rank {max_rank}")
        modules[path] = ModuleDelta(lora=LoraTerm(a.contiguous(), b.contiguous(), 1.0))
    desc = " + ".join(f"{w:g} * {n}" for n, w in zip(names, weights))
    return Delta(modules, source_format="merge", base_fingerprint=next(iter(fingerprints), ""),
                 description=f"merge: {desc}")
