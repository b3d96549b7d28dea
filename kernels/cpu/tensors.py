"""Tensor helpers shared by the CPU backend's plans: reused scratch buffers, fp32 views, the row add
back into ``y`` and the per-row activation of the bottleneck op."""
from __future__ import annotations

import threading

import torch

from ..activations import ACT_FNS


class Workspace(threading.local):
    """Grow-only scratch buffers per (name, device, dtype). Fresh multi-MB tensors per call cost page
    faults: measured on the q_proj shape (1024 -> 1024, r=16, 32 tokens of 32 distinct deltas, fp32), a
    per-token gathered bmm takes 0.65x of the base matmul with fresh gather tensors and 0.25x gathering
    into reused ones (``index_select(..., out=)``). Thread-local, so concurrent forwards never share. A buffer
    first made inside ``torch.inference_mode()`` (the server's forwards) is an inference tensor, which torch
    refuses to write outside that mode: such a buffer is made again when asked for outside it."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        need = 1
        for d in shape:
            need *= d
        key = (name, device, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < need or (buf.is_inference() and not torch.is_inference_mode_enabled()):
            buf = torch.empty(max(need, 1), dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:need].view(shape)


WS = Workspace()


def f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def add_rows(y: torch.Tensor, ids: torch.Tensor | None, d: torch.Tensor) -> None:
    """y[ids] += d (``d`` [N, out], fp32 or y's dtype); ``ids`` None means every token in token order."""
    if ids is None:
        if y.dtype == torch.float32 or y.dtype == d.dtype:
            y.add_(d)
        else:
            y.copy_(y.float().add_(d))
    elif y.dtype == d.dtype:
        y.index_add_(0, ids, d)
    else:
        y.index_copy_(0, ids, y.index_select(0, ids).float().add_(d).to(y.dtype))


def add_slice(y: torch.Tensor, d: torch.Tensor, scale: float) -> None:
    """y += scale * d for a row slice ``y`` [n, out] and fp32 ``d``, rounded once in y's dtype."""
    if y.dtype == torch.float32:
        y.add_(d, alpha=scale)
    else:
        y.copy_(y.float().add_(d, alpha=scale))


def apply_act(h: torch.Tensor, codes: list[int], tok_act: torch.Tensor | None) -> torch.Tensor:
    """act_s(h) per row: ``codes`` the distinct activation codes present, ``tok_act`` int [n] the code of
    each row (needed only when more than one code is present)."""
    if len(codes) == 1:
        return ACT_FNS[codes[0]](h)
    mixed = torch.empty_like(h)
    for c in codes:  # at most 4 activations; usually one
        rows = tok_act == c
        mixed[rows] = ACT_FNS[c](h[rows])
    return mixed
