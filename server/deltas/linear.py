"""DeltaLinear: an ``nn.Linear`` / GPT-2 ``Conv1D`` that adds each token's delta terms after the base (D1, D2).

Same call signature as the wrapped layer (vLLM ``vllm/lora/layers/base_linear.py``; gpt-fast
``quantize.py``): ``y = base(x)``, then, in the order of ``delta_store/delta.py``::

    x_in = x * in_scale[slot]           # (IA)3, PEFT feed-forward modules; on a copy of x
    y    = base(x_in) * out_scale[slot] # (IA)3 output scaling (base bias scaled too)
    y   += lora(x)                      # LoRA, rank read per slot (D3)
    y    = y * g[slot] + shift[slot]    # DoRA slots only: g = m / ||W + sBA||, shift = (1 - g) b0 (DoraPool)
    y   += bias[slot]                   # BitFit / BEFT / lora_B bias / bias="all" deltas
    y   += adapter(src)                 # bottleneck adapter, only on residual-site output modules

Each kind runs only when a slot active in this step has it at this layer, decided from host-side
flags (no device sync). Neutral pool rows (rank 0, bias 0, scale 1) make every other token exact:
``y + 0.0 == y`` and ``y * 1.0 == y`` in IEEE arithmetic, so base-only tokens match the bare model bit
for bit even in a mixed step.

Pool memory per wrapped layer, ``S`` slots, ``R`` max rank, element size ``e`` bytes:
``S * (R * (in + out) + 2 * out + in) * e`` plus 8 bytes per slot (scale, rank); e.g. a 4096x4096
projection with S=32, R=64, fp16: 32 * (64 * 8192 + 12288) * 2 = 34.3 MB. Adapter pools
(``AdapterPool``) and DoRA pools (``DoraPool``: ``S * (2 * out * 4 + 4)`` bytes) are added on a module's first
adapter or DoRA delta.
"""
from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

import kernels
from delta_store.delta import ModuleDelta
from delta_store.errors import DeltaError

from .adapter import AdapterPool, ResidualTap
from .batch import DeltaBatch
from .dora import DoraPool, check_dora


def linear_features(layer: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    raise TypeError(f"DeltaLinear wraps nn.Linear or Conv1D, got {type(layer).__name__}")


class DeltaLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, batch: DeltaBatch, *, path: str, max_slots: int, max_rank: int,
                 max_bottleneck: int = 256):
        super().__init__()
        self.base = base
        self.batch = batch
        self.path = path
        self.in_features, self.out_features = linear_features(base)
        self.max_slots, self.max_rank = max_slots, max_rank
        S, R, fin, fout = max_slots, max_rank, self.in_features, self.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        dev = base.weight.device
        self.register_buffer("lora_a", torch.zeros(S, R, fin, **kw), persistent=False)  # [S, R, in]
        # B stored [S, R, out] and handed to the ops as its transpose(1, 2) view [S, out, R] (``lora_b``): a slot's
        # rank-r rows are then one contiguous block, so the CPU grouped plan's expand reads them in place
        # (1024 -> 2816, T=32 on 32 slots: 0.17 ms against 0.30 ms from [S, out, R] storage).
        self.register_buffer("lora_b_rows", torch.zeros(S, R, fout, **kw), persistent=False)  # [S, R, out]
        self.register_buffer("lora_scale", torch.zeros(S, dtype=torch.float32, device=dev), persistent=False)  # [S]
        self.register_buffer("lora_rank", torch.zeros(S, dtype=torch.int32, device=dev), persistent=False)  # [S]
        self.register_buffer("bias_delta", torch.zeros(S, fout, **kw), persistent=False)  # [S, out]
        self.register_buffer("out_scale", torch.ones(S, fout, **kw), persistent=False)  # [S, out]
        self.register_buffer("in_scale", torch.ones(S, fin, **kw), persistent=False)  # [S, in]
        # Host copies of "slot s has this kind here": the per-step skip test reads these, never the device.
        self.has = {k: [False] * S for k in ("lora", "bias", "out_scale", "in_scale", "dora")}
        self.adapters: AdapterPool | None = None  # allocated on the first adapter delta (load path)
        self.dora: DoraPool | None = None  # allocated on the first DoRA delta (load path)
        self.tap: ResidualTap | None = None  # set on residual-site output modules
        self.max_bottleneck = max_bottleneck

    @property
    def lora_b(self) -> torch.Tensor:
        """The B pool as the kernels take it: [S, out, R], a transpose view of the [S, R, out] storage."""
        return self.lora_b_rows.transpose(1, 2)

    @classmethod
    def can_replace(cls, layer: torch.nn.Module) -> bool:
        return isinstance(layer, (torch.nn.Linear, Conv1D))

    @classmethod
    def from_layer(cls, layer: torch.nn.Module, batch: DeltaBatch, *, path: str, max_slots: int,
                   max_rank: int, max_bottleneck: int = 256) -> "DeltaLinear":
        return cls(layer, batch, path=path, max_slots=max_slots, max_rank=max_rank, max_bottleneck=max_bottleneck)

    def make_site(self, tap: ResidualTap) -> None:
        """Mark this module as a residual site's output: its adapters may then read ``h`` from ``tap``."""
        self.tap = tap

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:  # not constructed yet: nothing to forward to
                raise
            return getattr(base, name)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False)) + (
            self.adapters.nbytes() if self.adapters is not None else 0) + (
            self.dora.nbytes() if self.dora is not None else 0)

    # ---------------------------------------------------------------- load path
    def check(self, md: ModuleDelta) -> None:
        """Raise DeltaError naming this module, the expected and the found shape; changes nothing."""
        fin, fout, p = self.in_features, self.out_features, self.path
        if md.lora is not None:
            r = md.lora.rank
            if not 1 <= r <= self.max_rank:
                raise DeltaError(f"{p}: LoRA rank {r} outside [1, max_rank={self.max_rank}]")
            for name, shape in (("a", (r, fin)), ("b", (fout, r))):
                found = tuple(getattr(md.lora, name).shape)
                if found != shape:
                    raise DeltaError(f"{p}: lora.{name} expected shape {shape}, found {found}")
        for name, n in (("bias", fout), ("out_scale", fout), ("in_scale", fin)):
            t = getattr(md, name)
            if t is not None and tuple(t.shape) != (n,):
                raise DeltaError(f"{p}: {name} expected shape ({n},), found {tuple(t.shape)}")
        if md.dora_magnitude is not None:
            check_dora(md, fout, p)
        if md.adapter is not None:
            # An adapter on the module output (OpenDelta) fits any wrapped module; one reading the
            # residual stream needs the site's pre-norm tap.
            if self.tap is None and md.adapter.source != "output":
                raise DeltaError(f"{p}: an adapter reading {md.adapter.source!r} attaches only to residual-site "
                                 f"output modules (o_proj/down_proj, GPT-2 attn.c_proj/mlp.c_proj)")
            self._adapter_pool().check(p, md.adapter)

    def _adapter_pool(self) -> AdapterPool:
        # Allocated on the first adapter delta for this site: the load path, never the step loop.
        if self.adapters is None:
            w = self.base.weight
            self.adapters = AdapterPool(self.max_slots, self.max_bottleneck, self.out_features, w.device, w.dtype)
        return self.adapters

    @torch.inference_mode()
    def set_delta(self, slot: int, md: ModuleDelta) -> None:
        self.check(md)
        self.clear(slot)
        if md.lora is not None:
            r = md.lora.rank
            self.lora_a[slot, :r].copy_(md.lora.a)
            self.lora_b_rows[slot, :r].copy_(md.lora.b.t())  # b [out, r] -> rows [r, out]
            self.lora_scale[slot] = float(md.lora.scale)
            self.lora_rank[slot] = r
            self.has["lora"][slot] = True
        for name, pool in (("bias", self.bias_delta), ("out_scale", self.out_scale), ("in_scale", self.in_scale)):
            t = getattr(md, name)
            if t is not None:
                pool[slot].copy_(t)
                self.has[name][slot] = True
        if md.adapter is not None:
            self._adapter_pool().set(slot, md.adapter)
        if md.dora_magnitude is not None:
            if self.dora is None:  # the load path, never the step loop
                self.dora = DoraPool(self.max_slots, self.out_features, self.base.weight.device)
            w = self.base.weight
            self.dora.set(slot, w.t() if isinstance(self.base, Conv1D) else w, getattr(self.base, "bias", None), md,
                          self.path)
            self.has["dora"][slot] = True

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b_rows[slot].zero_()
        self.lora_scale[slot] = 0.0
        self.lora_rank[slot] = 0
        self.bias_delta[slot].zero_()
        self.out_scale[slot].fill_(1.0)
        self.in_scale[slot].fill_(1.0)
        for has in self.has.values():
            has[slot] = False
        if self.adapters is not None:
            self.adapters.clear(slot)
        if self.dora is not None:
            self.dora.clear(slot)

    # ---------------------------------------------------------------- step path
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        meta = batch.meta
        if meta.no_delta:
            if self.tap is not None:
                self.tap.h = self.tap.normed = None
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)  # [num_tokens, in]
        batch.check_tokens(x2.shape[0], self.path)
        active = meta.active_slots_host
        has = self.has
        if any(has["in_scale"][s] for s in active):
            x_in = x2.clone()  # the shared input feeds q/k/v too: never scale it in place
            kernels.mul_rows(x_in, self.in_scale, meta)
            y = self.base(x_in.view(x.shape))
        else:
            y = self.base(x)
        y2 = y.view(-1, self.out_features)  # [num_tokens, out]; base outputs are fresh, contiguous tensors
        if any(has["out_scale"][s] for s in active):
            kernels.mul_rows(y2, self.out_scale, meta)
        if any(has["lora"][s] for s in active):
            kernels.add_lora(y2, x2.contiguous(), self.lora_a, self.lora_b, self.lora_scale, self.lora_rank, meta)
        if any(has["dora"][s] for s in active):  # after the LoRA add, before the bias deltas (not scaled)
            kernels.scale_shift_rows(y2, self.dora.scale, self.dora.shift, self.dora.flag, meta)
        if any(has["bias"][s] for s in active):
            kernels.add_bias(y2, self.bias_delta, meta)
        if self.adapters is not None:
            self.adapters.apply(y2, self.tap, meta, self.path)
        if self.tap is not None:  # drop the references: one residual per site alive would cost 2*L*T*h
            self.tap.h = self.tap.normed = None
        return y

    def extra_repr(self) -> str:
        site = ", site" if self.tap is not None else ""
        return f"in={self.in_features}, out={self.out_features}, slots={self.max_slots}, max_rank={self.max_rank}{site}"
