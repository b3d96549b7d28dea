"""The exact reference of every delta op: its semantics in float64, written as plainly as possible.

This is the oracle the tests hold both backends to (the Triton kernels, under ``TRITON_INTERPRET=1``
or on CUDA, and the CPU backend ``kernels/cpu/``) and the benchmarks' correctness check. It is not a
backend: each function returns a new float64 tensor on the inputs' device and changes nothing.
Nothing here is shared with the backends but the activation table: no ``DeltaKernelMeta`` (the
tokens are grouped from ``slots`` directly, so a wrong grouping in the metadata shows up as a
mismatch), no plans, no scratch buffers.

``slots`` is the per-token slot id, a list of ints or an int tensor, -1 = no delta. The loop runs
over the step's distinct slots (a few dozen at most), each slot's tokens in one float64 matmul pair,
so a 4096-token case on a GPU stays cheap. Values past a slot's rank or width are never read.
"""
from __future__ import annotations

import torch

from .activations import ACT_FNS


def _tokens_by_slot(slots, device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """(slot, int64 token ids [n_s]) for every slot >= 0 that has tokens, in slot order."""
    host = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
    rows: dict[int, list[int]] = {}
    for t, s in enumerate(host):
        if s >= 0:
            rows.setdefault(int(s), []).append(t)
    return [(s, torch.tensor(ids, dtype=torch.int64, device=device)) for s, ids in sorted(rows.items())]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def ref_add_lora(y, x, lora_a, lora_b, scale, rank, slots) -> torch.Tensor:
    """y[t] + scale[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T for s = slots[t] >= 0, r = rank[s]
    (rank 0: y[t]). y [T, out], x [T, in], lora_a [S, R, in], lora_b [S, out, R]; float64 [T, out]."""
    out, x64 = _f64(y).clone(), _f64(x)
    for s, ids in _tokens_by_slot(slots, out.device):
        r = int(rank[s])
        if r:
            h = x64.index_select(0, ids) @ _f64(lora_a[s, :r]).T  # [n_s, r]
            out[ids] += float(scale[s]) * (h @ _f64(lora_b[s, :, :r]).T)
    return out


def ref_add_lora_packed(y, x, stack_a, offset, lora_b, scale, rank, slots) -> torch.Tensor:
    """One member of a packed LoRA (``kernels.shrink_lora``): y[t] + scale[s] * (x[t] @ A.T) @ lora_b[s, :, :r].T
    with A = stack_a[s, o : o + r] the member's rows of slot s's stack, o = offset[s], r = rank[s] (rank 0: y[t]).
    y [T, out], x [T, in], stack_a [S, R, in], offset / rank [S], lora_b [S, out, Rm]; float64 [T, out]."""
    out, x64 = _f64(y).clone(), _f64(x)
    for s, ids in _tokens_by_slot(slots, out.device):
        r, o = int(rank[s]), int(offset[s])
        if r:
            h = x64.index_select(0, ids) @ _f64(stack_a[s, o:o + r]).T  # [n_s, r]
            out[ids] += float(scale[s]) * (h @ _f64(lora_b[s, :, :r]).T)
    return out


def ref_add_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, slots) -> torch.Tensor:
    """y[t] + scale[s] * (act_s(u[t] @ down[s, :m].T + down_bias[s, :m]) @ up[s, :, :m].T + up_bias[s]) for
    s = slots[t] >= 0, m = width[s] (width 0: y[t], no up_bias either). ``u`` may be ``y``: both are read
    once, before anything is computed. Shapes as ``kernels.add_bottleneck``; float64 [T, h]."""
    out, u64 = _f64(y).clone(), _f64(u).clone()
    for s, ids in _tokens_by_slot(slots, out.device):
        m = int(width[s])
        if m:
            h = ACT_FNS[int(act[s])](u64.index_select(0, ids) @ _f64(down[s, :m]).T + _f64(down_bias[s, :m]))
            out[ids] += float(scale[s]) * (h @ _f64(up[s, :, :m]).T + _f64(up_bias[s]))
    return out


def ref_add_bias(y, bias, slots) -> torch.Tensor:
    """y[t] + bias[slots[t]] for slots[t] >= 0.  y [T, out], bias [S, out]; float64 [T, out]."""
    out = _f64(y).clone()
    for s, ids in _tokens_by_slot(slots, out.device):
        out[ids] += _f64(bias[s])
    return out


def ref_mul_rows(t, vec, slots) -> torch.Tensor:
    """t[i] * vec[slots[i]] for slots[i] >= 0.  t [T, n], vec [S, n]; float64 [T, n]."""
    out = _f64(t).clone()
    for s, ids in _tokens_by_slot(slots, out.device):
        out[ids] *= _f64(vec[s])
    return out


def ref_scale_shift_rows(y, scale, shift, flag, slots) -> torch.Tensor:
    """y[t] * scale[s] + shift[s] for s = slots[t] >= 0 with flag[s] != 0, else y[t].  y [T, n], scale and
    shift [S, n], flag [S]; float64 [T, n]."""
    out = _f64(y).clone()
    for s, ids in _tokens_by_slot(slots, out.device):
        if int(flag[s]):
            out[ids] = out[ids] * _f64(scale[s]) + _f64(shift[s])
    return out


def ref_replace_rows(y, ids, index, values, count, slots) -> torch.Tensor:
    """y[t] replaced by values[s, j] where index[s, j] == ids[t] for some j < count[s], s = slots[t] >= 0.
    y [T, h], ids [T], index [S, R], values [S, R, h], count [S]; float64 [T, h]."""
    out = _f64(y).clone()
    for s, toks in _tokens_by_slot(slots, out.device):
        for t in toks.tolist():
            for j in range(int(count[s])):
                if int(index[s, j]) == int(ids[t]):
                    out[t] = _f64(values[s, j])
    return out


def ref_head_rows(logits, h, index, values, count, slots) -> torch.Tensor:
    """logits with logits[t, index[s, j]] = h[t] . values[s, j] for j < count[s], s = slots[t] >= 0.
    logits [T, V], h [T, H], index [S, R], values [S, R, H], count [S]; float64 [T, V]."""
    out = _f64(logits).clone()
    for s, toks in _tokens_by_slot(slots, out.device):
        c = int(count[s])
        if c:
            cols = index[s, :c].to(out.device).long()
            out[toks.unsqueeze(1), cols.unsqueeze(0)] = _f64(h).index_select(0, toks) @ _f64(values[s, :c]).T
    return out
