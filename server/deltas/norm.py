"""DeltaNorm: a wrapped LayerNorm/RMSNorm that feeds residual adapters and carries BitFit bias deltas.

Two jobs, both per step and both free when no delta is active:

* At a residual site (Llama ``input_layernorm``/``post_attention_layernorm``, GPT-2 ``ln_1``/``ln_2``) its
  input is ``h``, the residual stream entering the sub-block. It hands that tensor *by reference* to
  the site's output module through a :class:`ResidualTap`, for Pfeiffer (``h + y``) and parallel
  (``h``) adapters (docs/DELTAS.md §3.4). Pre-LN blocks build ``h + a`` as a new tensor, so ``h`` is not
  overwritten before the adapter reads it.
* On a LayerNorm (GPT-2 ``ln_1``, ``ln_2``, ``ln_f``; OpenDelta gpt2-bitfit trains them) it adds a
  per-slot bias delta to the output: ``y = LN(x) + bias[slot]``. RMSNorm has no bias and no tool
  produces one (docs/DELTAS.md §5), so RMSNorm wrappers have no bias pool.
"""
from __future__ import annotations

import torch

import kernels
from delta_store.delta import ModuleDelta
from delta_store.errors import DeltaError

from .adapter import ResidualTap
from .batch import DeltaBatch
from .pages import RowArena
from .slot_fields import SlotFields
from .terms import Staged, TermRows, TermSpec, align

TERMS = {"bias": TermSpec("vec", "bias_row", 0.0)}


def norm_features(layer: torch.nn.Module) -> int:
    if isinstance(layer, torch.nn.LayerNorm):
        return int(layer.normalized_shape[-1])
    return int(layer.weight.shape[-1])


class DeltaNorm(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, batch: DeltaBatch, *, path: str, tap: ResidualTap | None = None):
        super().__init__()
        self.base = base
        self.batch = batch
        self.path = path
        self.tap = tap
        self.features = norm_features(base)
        self.has_bias_pool = isinstance(base, torch.nn.LayerNorm)
        w = base.weight
        self.rows = TermRows({"vec": RowArena(align(self.features, w.dtype), w.dtype, w.device)}, TERMS,
                             SlotFields({"bias_row": 0}, {}, w.device))
        self.has_bias: set[int] = set()
        self._pages = None  # (key, RowPages)

    @classmethod
    def can_replace(cls, layer: torch.nn.Module) -> bool:
        return isinstance(layer, torch.nn.LayerNorm) or (type(layer).__name__.endswith("RMSNorm")
                                                         and isinstance(getattr(layer, "weight", None), torch.Tensor))

    @classmethod
    def from_layer(cls, layer: torch.nn.Module, batch: DeltaBatch, *, path: str,
                   tap: ResidualTap | None = None) -> "DeltaNorm":
        return cls(layer, batch, path=path, tap=tap)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def nbytes(self) -> int:
        return self.rows.capacity_bytes

    def check(self, md: ModuleDelta) -> None:
        extra = md.kinds() - {"bitfit"}
        if extra:
            raise DeltaError(f"{self.path}: a norm module carries only a bias delta, found {sorted(extra)}")
        if md.bias is None:
            return
        if not self.has_bias_pool:
            raise DeltaError(f"{self.path}: {type(self.base).__name__} has no bias; a bias delta cannot be served here")
        if tuple(md.bias.shape) != (self.features,):
            raise DeltaError(f"{self.path}: bias expected shape ({self.features},), found {tuple(md.bias.shape)}")

    @staticmethod
    def term_rows(md: ModuleDelta) -> dict[str, int]:
        return {"bias": 1} if md.bias is not None else {}

    def stage(self, md: ModuleDelta, pin: bool = False) -> Staged:
        self.check(md)
        rows = {}
        if md.bias is not None:
            rows["bias"] = md.bias.to(self.base.weight.dtype).reshape(1, -1)
            if pin:
                rows["bias"] = rows["bias"].pin_memory()
        return Staged(rows, {}, set(rows))

    def place(self, slot: int, staged: Staged, capacity: int) -> None:
        self.clear(slot, keep_neutrals=True)  # the install's demand counted on this layer's neutral rows
        self.rows.place(slot, staged.rows, capacity)
        if "bias" in staged.kinds:
            self.has_bias.add(slot)

    def clear(self, slot: int, *, keep_neutrals: bool = False) -> None:
        if slot in self.rows.cells:
            self.has_bias.discard(slot)
            self.rows.clear(slot, keep_neutrals=keep_neutrals)

    def bias_pages(self) -> kernels.RowPages:
        arena, f = self.rows.arenas["vec"], self.rows.fields
        neutral = self.rows.neutral_row(TERMS["bias"])  # the zero row of the slots without a bias
        key = (arena.version, f.version, neutral)
        if self._pages is None or self._pages[0] != key:
            self._pages = (key, kernels.RowPages(arena.rows[:, :self.features], f.view("bias_row"),
                                                 host={"row": f.host["bias_row"]}, neutral=neutral))
        return self._pages[1]

    def static_plan(self) -> tuple:
        """Graph mode (``DeltaLinear.static_plan``): whether the bias op runs, and the storage versions."""
        return (bool(self.has_bias), self.rows.arenas["vec"].version, self.rows.fields.version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        meta = self.batch.meta
        if self.batch.static:  # graph mode: the tap always, the bias op whenever a slot has one here
            return self._forward_static(x, y, meta)
        if meta.no_delta:
            return y
        if self.tap is not None:
            self.tap.h = x.reshape(-1, self.features)  # [num_tokens, hidden]; a view, no copy
            self.tap.normed = y.view(-1, self.features)  # its output (BitFit below lands in it too)
        if self.has_bias and any(s in self.has_bias for s in meta.active_slots_host):
            y2 = y.view(-1, self.features)  # [num_tokens, n]
            self.batch.check_tokens(y2.shape[0], self.path)
            ops = kernels.step_ops(meta, y2)  # the step's bound ops at decode (kernels/cpu/native_step.py)
            if ops is not None:
                ops.add_bias(y2, self.bias_pages())
            else:
                kernels.add_bias(y2, self.bias_pages(), meta)
        return y

    def _forward_static(self, x: torch.Tensor, y: torch.Tensor, meta) -> torch.Tensor:
        if self.tap is not None:
            self.tap.h = x.reshape(-1, self.features)  # [bucket, hidden]
            self.tap.normed = y.view(-1, self.features)
        if self.has_bias:
            y2 = y.view(-1, self.features)
            self.batch.check_tokens(y2.shape[0], self.path)
            kernels.add_bias(y2, self.bias_pages(), meta)  # slots without a bias here: the neutral zero row
        return y

    def extra_repr(self) -> str:
        return f"features={self.features}, bias_pool={self.has_bias_pool}, site={self.tap is not None}"
