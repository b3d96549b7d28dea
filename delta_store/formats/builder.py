"""Accumulates the canonical :class:`Delta` while an importer walks a file's tensors.

Every importer resolves its library's rules (scales, absolute biases, placements) and hands the
result here, so that the rules for *combining* terms on one module live in one place: biases add
(a ``lora_B`` bias plus a ``bias="all"`` delta on the same module), (IA)3 vectors multiply, and a
second LoRA or adapter on one module is an error.
"""
from __future__ import annotations

import torch

from ..base_spec import BaseSpec, ModuleInfo
from ..delta import AdapterTerm, Delta, LoraTerm, ModuleDelta, RowsTerm
from ..errors import DeltaError
from ..prompt import PromptPart


class DeltaBuilder:
    def __init__(self, spec: BaseSpec, source_format: str):
        self.spec = spec
        self.source_format = source_format
        self.modules: dict[str, ModuleDelta] = {}
        self._prompt: PromptPart | None = None

    def _md(self, info: ModuleInfo) -> ModuleDelta:
        return self.modules.setdefault(info.path, ModuleDelta())

    def lora(self, info: ModuleInfo, a: torch.Tensor, b: torch.Tensor, scale: float, *, key: str) -> None:
        md = self._md(info)
        if md.lora is not None:
            raise DeltaError(f"{self.source_format}: tensor {key!r} adds a second LoRA to {info.path}")
        md.lora = LoraTerm(a.contiguous(), b.contiguous(), float(scale))

    def additive_bias(self, info: ModuleInfo, delta: torch.Tensor) -> None:
        """Add an additive bias delta ``[out]`` (kept in fp32: it is summed with other bias terms)."""
        md = self._md(info)
        delta = delta.reshape(-1).to(torch.float32)
        md.bias = delta.contiguous() if md.bias is None else (md.bias + delta).contiguous()

    def absolute_bias(self, info: ModuleInfo, stored: torch.Tensor, *, key: str) -> None:
        """An absolute trained bias: the delta is ``stored - base`` (``stored`` where the base has none).

        Exactly-zero deltas are dropped: PEFT ``bias="all"`` saves every bias of the model, most of them
        untouched, and an all-zero term would cost a kernel launch per layer for nothing.
        """
        stored = stored.reshape(-1).to(torch.float32)
        base = self.spec.biases.get(info.path)
        if base is not None:
            if base.shape != stored.shape:
                raise DeltaError(f"{self.source_format}: tensor {key!r} for {info.path}: expected bias shape "
                                 f"{tuple(base.shape)}, found {tuple(stored.shape)}")
            stored = stored - base
        if torch.count_nonzero(stored) == 0:
            return
        self.additive_bias(info, stored)

    def out_scale(self, info: ModuleInfo, vec: torch.Tensor) -> None:
        md = self._md(info)
        vec = vec.reshape(-1)
        md.out_scale = vec.contiguous() if md.out_scale is None else (md.out_scale * vec).contiguous()

    def in_scale(self, info: ModuleInfo, vec: torch.Tensor) -> None:
        md = self._md(info)
        vec = vec.reshape(-1)
        md.in_scale = vec.contiguous() if md.in_scale is None else (md.in_scale * vec).contiguous()

    def adapter(self, info: ModuleInfo, term: AdapterTerm, *, key: str) -> None:
        md = self._md(info)
        if md.adapter is not None:
            raise DeltaError(f"{self.source_format}: tensor {key!r} adds a second bottleneck adapter to {info.path}")
        md.adapter = term

    def dora(self, info: ModuleInfo, magnitude: torch.Tensor, *, key: str) -> None:
        md = self._md(info)
        if md.dora_magnitude is not None:
            raise DeltaError(f"{self.source_format}: tensor {key!r} adds a second DoRA magnitude to {info.path}")
        md.dora_magnitude = magnitude.contiguous()

    def rows(self, info: ModuleInfo, term: RowsTerm, *, key: str) -> None:
        md = self._md(info)
        if md.rows is not None:
            raise DeltaError(f"{self.source_format}: tensor {key!r} adds a second set of token rows to {info.path}")
        md.rows = term
    def prompt(self, part: PromptPart) -> None:
        """The delta's prompt part (virtual tokens / prefix K/V); a delta holds at most one."""
        if self._prompt is not None:
            raise DeltaError(f"{self.source_format}: a second prompt/prefix part in one delta")
        self._prompt = part

    def build(self, description: str = "") -> Delta:
        mods = {p: md for p, md in self.modules.items() if md.kinds()}
        return Delta(dict(sorted(mods.items())), source_format=self.source_format, description=description,
                     prompt=self._prompt)
