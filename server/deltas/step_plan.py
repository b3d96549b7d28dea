"""StepPlan: what one DeltaLinear runs for one set of active slots (``linear.py`` keeps one per layer)."""
from __future__ import annotations

import kernels

ALL = "all"  # a step plan's "every active slot has the term": the step's meta as is, nothing restricted


class StepPlan:
    """What one layer runs for one set of active slots, decided once from the host sets and reused by every step
    with the same active slots until the layer's terms change (decode steps usually repeat their set). Each
    one-row term holds ``ALL``, the frozenset of the active slots that have it here (its tokens only: the step's
    meta restricted, ``meta.restrict``), or None (nothing to run). Per wrapped module at T = 1 this replaced
    three set scans, two ``any`` over the active slots and a list over the adapter sources per step."""

    __slots__ = ("in_scale", "out_scale", "lora", "dora", "bias", "sources", "kinds")

    def __init__(self, layer, active: list[int]):
        def which(has: set[int]):
            mine = frozenset(s for s in active if s in has) if has else frozenset()
            return None if not mine else (ALL if len(mine) == len(active) else mine)

        h = layer.has
        self.in_scale, self.out_scale, self.bias = which(h["in_scale"]), which(h["out_scale"]), which(h["bias"])
        self.lora = bool(h["lora"]) and any(s in h["lora"] for s in active)
        self.dora = bool(h["dora"]) and any(s in h["dora"] for s in active)
        self.sources = tuple(i for i, has_i in enumerate(layer.has_adapter) if has_i and any(s in has_i for s in active))
        # out_scale, LoRA, DoRA, bias: 0 not run, 1 every active slot (LoRA / DoRA: run), 2 a subset (bound_terms.py)
        self.kinds = tuple(0 if w is None or w is False else 1 if w is ALL or w is True else 2
                           for w in (self.out_scale, self.lora, self.dora, self.bias))

    @staticmethod
    def meta_for(meta: kernels.DeltaKernelMeta, which, pages: kernels.RowPages, t) -> kernels.DeltaKernelMeta:
        """The meta a one-row term on ``t`` runs on: the step's (``ALL``, or when the op skips the tokens on the
        pages' neutral row itself, ``kernels.skips_neutral``: the CPU native plan at decode) or restricted to ``which``
        slots' tokens (a restricted meta is built once per step and set of slots, ~25 us a call of the demo step)."""
        if which is ALL or (pages.neutral >= 0 and kernels.skips_neutral(t, meta)):
            return meta
        return meta.restrict(which)

    @property
    def empty(self) -> bool:
        return not (self.lora or self.dora or self.sources) and self.in_scale is None and self.out_scale is None \
            and self.bias is None
