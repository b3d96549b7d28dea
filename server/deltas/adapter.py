"""AdapterPool: slot pools for bottleneck adapters on one residual site's output module.

Placements (docs/DELTAS.md §3.4, §4.3; tests/fixtures/README.md "Semantic traps"), with ``h`` the residual stream
entering the sub-block and ``y`` the sub-block output (``o_proj``/``down_proj``/GPT-2 ``c_proj``)::

    "output"           BN(y)       Houlsby double_seq_bn, OpenDelta adapter / compacter / low-rank adapter
    "output+residual"  BN(h + y)   Pfeiffer seq_bn, Compacter++
    "residual"         BN(h)       par_bn (scale 4.0)
    "normed"           BN(norm(h)) OpenDelta parallel adapter: the sub-block's input (its pre-norm's output)

and the block adds ``h + y + BN(src)``. Each slot has one source per site, but one step may mix
slots of different sources, so the pool keeps a ``scale``/``width`` row per source, zero for slots of
the other sources, and runs one ``add_bottleneck`` per source present in the step.
"""
from __future__ import annotations

import torch

import kernels
from delta_store.delta import ADAPTER_SOURCES, AdapterTerm
from delta_store.errors import DeltaError, DeltaServeError


class ResidualTap:
    """Carries ``h`` (the pre-norm's input) and ``normed`` (its output), by reference, from a site's DeltaNorm
    to its output DeltaLinear.

    A plain object, not an ``nn.Module``, so it adds nothing to ``named_modules()`` or the state dict.
    """

    __slots__ = ("h", "normed", "norm_path")

    def __init__(self, norm_path: str):
        self.norm_path = norm_path
        self.h: torch.Tensor | None = None  # [num_tokens, hidden], set by the norm, cleared by the reader
        self.normed: torch.Tensor | None = None  # [num_tokens, hidden], likewise


class AdapterPool(torch.nn.Module):
    def __init__(self, max_slots: int, max_bottleneck: int, hidden: int, device, dtype):
        super().__init__()
        S, M, H = max_slots, max_bottleneck, hidden
        self.max_bottleneck, self.hidden = M, H
        kw = dict(device=device, dtype=dtype)
        self.register_buffer("down", torch.zeros(S, M, H, **kw), persistent=False)  # [S, M, h]
        self.register_buffer("down_bias", torch.zeros(S, M, **kw), persistent=False)  # [S, M]
        # up stored [S, M, h], handed to the ops as the transpose view [S, h, M] (``up``): contiguous per-slot rows
        # for the CPU grouped plan, as DeltaLinear's B pool.
        self.register_buffer("up_rows", torch.zeros(S, M, H, **kw), persistent=False)  # [S, M, h]
        self.register_buffer("up_bias", torch.zeros(S, H, **kw), persistent=False)  # [S, h]
        self.register_buffer("act", torch.zeros(S, dtype=torch.int32, device=device), persistent=False)  # [S]
        n = len(ADAPTER_SOURCES)
        self.register_buffer("scale", torch.zeros(n, S, dtype=torch.float32, device=device), persistent=False)  # [3, S]
        self.register_buffer("width", torch.zeros(n, S, dtype=torch.int32, device=device), persistent=False)  # [3, S]
        self.has = [[False] * S for _ in range(n)]  # host copy of width > 0, per source: no device sync per step

    @property
    def up(self) -> torch.Tensor:
        """The up pool as the kernels take it: [S, h, M], a transpose view of the [S, M, h] storage."""
        return self.up_rows.transpose(1, 2)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def check(self, path: str, term: AdapterTerm) -> None:
        m, h = term.width, self.hidden
        expected = {"down": (m, h), "down_bias": (m,), "up": (h, m), "up_bias": (h,)}
        if not 1 <= m <= self.max_bottleneck:
            raise DeltaError(f"{path}: adapter width {m} outside [1, max_bottleneck={self.max_bottleneck}]")
        for name, shape in expected.items():
            found = tuple(getattr(term, name).shape)
            if found != shape:
                raise DeltaError(f"{path}: adapter.{name} expected shape {shape}, found {found}")
        if term.activation not in kernels.ACT_CODES:
            raise DeltaError(f"{path}: adapter activation {term.activation!r} not one of {sorted(kernels.ACT_CODES)}")
        if term.source not in ADAPTER_SOURCES:
            raise DeltaError(f"{path}: adapter source {term.source!r} not one of {ADAPTER_SOURCES}")

    @torch.inference_mode()
    def set(self, slot: int, term: AdapterTerm) -> None:
        self.clear(slot)
        m = term.width
        self.down[slot, :m].copy_(term.down)
        self.down_bias[slot, :m].copy_(term.down_bias)
        self.up_rows[slot, :m].copy_(term.up.t())  # up [h, m] -> rows [m, h]
        self.up_bias[slot].copy_(term.up_bias)
        self.act[slot] = kernels.ACT_CODES[term.activation]
        i = ADAPTER_SOURCES.index(term.source)
        self.scale[i, slot] = float(term.scale)
        self.width[i, slot] = m
        self.has[i][slot] = True

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        # Zero rows, not just width 0: stale weights of an evicted tenant must never be reachable.
        self.down[slot].zero_()
        self.down_bias[slot].zero_()
        self.up_rows[slot].zero_()
        self.up_bias[slot].zero_()
        self.act[slot] = 0
        self.scale[:, slot] = 0.0
        self.width[:, slot] = 0
        for has in self.has:
            has[slot] = False

    def apply(self, y: torch.Tensor, tap: ResidualTap | None, meta, where: str) -> None:
        """``y[t] += BN_slot(src_t)`` for every token whose slot has an adapter here; ``y`` [num_tokens, h], in place."""
        active = meta.active_slots_host
        sources = [i for i, has in enumerate(self.has) if any(has[s] for s in active)]
        if not sources:
            return
        # Every source reads y *before* any adapter adds to it; cloning also keeps the kernel's
        # input and output from aliasing.
        y_before = y.clone()  # [num_tokens, h]
        inputs = []
        for i in sources:
            src = ADAPTER_SOURCES[i]
            if src == "output":
                inputs.append(y_before)
                continue
            h = None if tap is None else (tap.normed if src == "normed" else tap.h)
            if h is None:
                raise DeltaServeError(f"{where}: adapter source {src!r} needs the residual stream, but "
                                      f"{tap.norm_path if tap else 'no pre-norm'} did not record it this step")
            inputs.append(h + y_before if src == "output+residual" else h)
        for i, u in zip(sources, inputs):
            kernels.add_bottleneck(y, u, self.down, self.down_bias, self.up, self.up_bias, self.scale[i],
                                   self.width[i], self.act, meta)
