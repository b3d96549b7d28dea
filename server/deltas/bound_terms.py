"""BoundTerms: one DeltaLinear's output scale, LoRA, DoRA and bias terms as a ``kernels.ModuleTerms``, for a step's
bound ops (``kernels.step_ops``: ``apply_terms``, one native call a module instead of one per term; the demo model's
served mix has ~2.4 such terms a wrapped module). One per set of kinds a step plan runs (``StepPlan.kinds``), kept
while the layer's storage stays put: its terms version (installs, clears), slot table and arena versions (and, for
a sibling, the shared arena's), so a decode step only builds a key and looks it up."""
from __future__ import annotations

import kernels

from .step_plan import ALL, StepPlan

_MISSING = object()


class BoundTerms:
    __slots__ = ("_key", "_known")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._known: dict[tuple, kernels.ModuleTerms | None] = {}

    def get(self, layer, plan: StepPlan) -> kernels.ModuleTerms | None:
        """``layer``'s terms for ``plan``; None where a one-row term must run on a restricted meta (a subset of the
        step's slots has it and its arena has no neutral row to skip the others by) or there is none."""
        r = layer.rows
        key = (layer._terms_version, r.fields.version, *[a.version for a in r.arenas.values()],
               -1 if layer.shared is None else layer.shared.arena.version)
        if key != self._key:
            self._key, self._known = key, {}
        terms = self._known.get(plan.kinds, _MISSING)
        if terms is _MISSING:
            terms = self._known[plan.kinds] = self._build(layer, plan)
        return terms

    @staticmethod
    def _build(layer, plan: StepPlan) -> kernels.ModuleTerms | None:
        ops, restricted = [], False
        for kind, which, op in (("out_scale", plan.out_scale, "mul_rows"), ("lora", plan.lora, "add_lora"),
                                ("dora", plan.dora, "scale_shift_rows"), ("bias", plan.bias, "add_bias")):
            if which is None or which is False:
                continue
            if kind == "lora":
                pages = layer.lora_pages()
            elif kind == "dora":
                pages = layer.dora_pages()
            else:
                pages = layer.row_pages(kind)
                restricted |= which is not ALL and pages.neutral < 0
            ops.append((op, pages))
        return kernels.ModuleTerms(tuple(ops)) if ops and not restricted else None
