"""PHM (parameterised hypercomplex multiplication) projections, multiplied out into dense ``nn.Linear`` weights.

Compacter's down and up projections (AdapterHub ``adapters`` ``PHMLayer``; OpenDelta ``PHMLinear``,
both from rabeehk/compacter) are, with ``n = phm_dim``::

    W_k = W_left[k] @ W_right[k]            # [in/n, out/n]; rank phm_rank (or a stored W [n, in/n, out/n])
    R_k = phm_rule[k]                       # [n, n] (or phm_rule_left[k] @ phm_rule_right[k])
    M   = sum_k kron(R_k, W_k)              # [in, out] (torch.kron; the libraries' kronecker_product)
    y   = x @ M + b

so ``M.T`` is an ordinary ``[out, in]`` Linear weight and the adapter is an ordinary bottleneck once
expanded (exactly: the same sums, done once at import). ``kron(W_k, R_k)`` has the same shape and is
wrong; the fixture cases move by 0.7 or more under that swap. Worked example (the fixtures: hidden 64,
n 4, bottleneck 8, rank 1): the down projection has W_left [4, 16, 1], W_right [4, 1, 2], so
``M = sum_k kron([4, 4], [16, 2]) = [64, 8]`` and the Linear weight is ``[8, 64]``.
"""
from __future__ import annotations

import torch

from ..errors import DeltaError


def rule_of(parts: dict[str, torch.Tensor], n: int, where: str) -> torch.Tensor:
    """The ``[n, n, n]`` rule: ``phm_rule``, or ``phm_rule_left [n, n, 1] @ phm_rule_right [n, 1, n]``."""
    if "phm_rule" in parts:
        rule = parts["phm_rule"]
    elif "phm_rule_left" in parts and "phm_rule_right" in parts:
        left, right = parts["phm_rule_left"], parts["phm_rule_right"]
        if left.dim() != 3 or right.dim() != 3 or left.shape[0] != right.shape[0] or left.shape[2] != right.shape[1]:
            raise DeltaError(f"{where}: phm_rule_left {tuple(left.shape)} and phm_rule_right {tuple(right.shape)} "
                             f"are not [n, n, k] and [n, k, n]")
        rule = torch.bmm(left, right)
    else:
        raise DeltaError(f"{where}: no phm_rule (nor phm_rule_left/phm_rule_right) for this projection")
    if tuple(rule.shape) != (n, n, n):
        raise DeltaError(f"{where}: phm_rule expected shape ({n}, {n}, {n}) for phm_dim {n}, found {tuple(rule.shape)}")
    return rule


def factor_of(parts: dict[str, torch.Tensor], n: int, fin: int, fout: int, rank: int | None,
              where: str) -> torch.Tensor:
    """``W [n, in/n, out/n]`` from ``W_left`` @ ``W_right`` (rank ``rank`` when given) or a stored ``W``."""
    if fin % n or fout % n:
        raise DeltaError(f"{where}: projection {fin} -> {fout} is not divisible by phm_dim {n}")
    want = (n, fin // n, fout // n)
    if "W_left" in parts or "W_right" in parts:
        left, right = parts.get("W_left"), parts.get("W_right")
        if left is None or right is None:
            raise DeltaError(f"{where}: W_left and W_right must come together")
        k = left.shape[-1] if left.dim() == 3 else -1
        if left.dim() != 3 or tuple(left.shape) != (n, fin // n, k) or tuple(right.shape) != (n, k, fout // n):
            raise DeltaError(f"{where}: W_left {tuple(left.shape)} and W_right {tuple(right.shape)} are not "
                             f"[{n}, {fin // n}, k] and [{n}, k, {fout // n}] (phm_dim {n}, {fin} -> {fout})")
        if rank is not None and k != rank:
            raise DeltaError(f"{where}: W_left/W_right have rank {k}, the config says phm_rank {rank}")
        return torch.bmm(left, right)
    w = parts.get("W")
    if w is None:
        raise DeltaError(f"{where}: no W_left/W_right (nor W) for this projection")
    if tuple(w.shape) != want:
        raise DeltaError(f"{where}: W expected shape {want}, found {tuple(w.shape)}")
    return w


def dense_weight(rule: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(sum_k kron(rule[k], factor[k])).T``: the ``[out, in]`` Linear weight, in fp32 at least."""
    dt = torch.promote_types(torch.promote_types(rule.dtype, factor.dtype), torch.float32)
    n = rule.shape[0]
    m = sum(torch.kron(rule[k].to(dt), factor[k].to(dt)) for k in range(n))  # [in, out]
    return m.T.contiguous()


def bias_of(parts: dict[str, torch.Tensor], fout: int, dtype: torch.dtype, where: str) -> torch.Tensor:
    """The projection's ``b [out]``, zeros when the layer has none (``phm_bias`` / ``use_bias_*`` false)."""
    b = parts.get("b")
    if b is None:
        return torch.zeros(fout, dtype=dtype)
    if tuple(b.shape) != (fout,):
        raise DeltaError(f"{where}: b expected shape ({fout},), found {tuple(b.shape)}")
    return b.to(dtype).contiguous()
