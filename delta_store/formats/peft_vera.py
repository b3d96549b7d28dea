"""PEFT VeRA (peft 0.21.2 ``tuners/vera``) expanded exactly into LoRA terms.

VeRA shares one frozen random pair across every targeted module: ``base_model.vera_A [r, max_in]``
and ``base_model.vera_B [max_out, r]`` (saved with ``save_projection=True``, the default), sized for
the largest targeted module. Each module trains two vectors, ``vera_lambda_d [r]`` and
``vera_lambda_b [out]``, and computes (``VeraLayer.forward``)::

    y = base(x) + lambda_b * ((lambda_d * (x @ A_s.T)) @ B_s.T),   A_s = vera_A[:, :in], B_s = vera_B[:out, :]

slicing the shared matrices *from the start* for its own sizes. That is a LoRA with
``A' = diag(d) A_s`` and ``B' = diag(b) B_s`` at scale 1 (no alpha in VeRA), so it is served at
LoRA cost. Worked example (tiny Llama, r=8, targets q_proj [64->64] and down_proj [128->64]):
vera_A is [8, 128], vera_B [64, 8]; q_proj uses vera_A[:, :64], down_proj all 128 columns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..base_spec import ModuleInfo
from ..errors import DeltaError, UnsupportedDelta

# "base_model.vera_A" on disk; tolerate an in-memory adapter name suffix ("...vera_A.default").
_PROJ_RE = re.compile(r"^(?:.*\.)?vera_(?P<which>A|B)(?:\.[^.]+)?$")


@dataclass(slots=True)
class VeraProjection:
    a: torch.Tensor  # [r, max_in]
    b: torch.Tensor  # [max_out, r]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def take_projection(tensors: dict[str, torch.Tensor], cfg: dict, where: str) -> VeraProjection:
    """Remove the shared ``vera_A``/``vera_B`` from ``tensors`` and check them against the config's ``r``."""
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for key in [k for k in tensors if "vera_lambda" not in k and _PROJ_RE.match(k)]:
        which = _PROJ_RE.match(key).group("which")
        if which in found:
            raise DeltaError(f"{where}: two shared VeRA projections vera_{which} ({found[which][0]!r}, {key!r})")
        found[which] = (key, tensors.pop(key))
    if not cfg.get("save_projection", True) and not found:
        raise UnsupportedDelta(f"{where}: VeRA saved with save_projection=False: the shared projection vera_A/vera_B "
                               f"is not in the file and PEFT would regenerate it from projection_prng_key with "
                               f"torch's random generator; save the adapter with save_projection=True")
    missing = [w for w in "AB" if w not in found]
    if missing:
        raise DeltaError(f"{where}: VeRA shared projection base_model.vera_{missing[0]} is missing from the file")
    (key_a, a), (key_b, b) = found["A"], found["B"]
    r = int(cfg.get("r", 256))
    if a.dim() != 2 or a.shape[0] != r:
        raise DeltaError(f"{where}: {key_a!r}: expected shape ({r}, max_in) for VeRA r={r}, found {tuple(a.shape)}")
    if b.dim() != 2 or b.shape[1] != r:
        raise DeltaError(f"{where}: {key_b!r}: expected shape (max_out, {r}) for VeRA r={r}, found {tuple(b.shape)}")
    return VeraProjection(a, b)


def expand(proj: VeraProjection, params: dict[str, tuple[str, torch.Tensor]], info: ModuleInfo,
           where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A' [r, in], B' [out, r])`` of one module from its ``vera_lambda_d`` / ``vera_lambda_b``."""
    missing = [p for p in ("vera_lambda_d", "vera_lambda_b") if p not in params]
    if missing:
        raise DeltaError(f"{where}: module {info.path} has no {missing[0]} tensor")
    (key_d, d), (key_b, lam_b) = params["vera_lambda_d"], params["vera_lambda_b"]
    r, fin, fout = proj.rank, info.in_features, info.out_features
    if tuple(d.shape) != (r,):
        raise DeltaError(f"{where}: {key_d!r}: expected shape ({r},) (the projection's rank), found {tuple(d.shape)}")
    if tuple(lam_b.shape) != (fout,):
        raise DeltaError(f"{where}: {key_b!r}: expected shape ({fout},) for {info.path}, found {tuple(lam_b.shape)}")
    if proj.a.shape[1] < fin or proj.b.shape[0] < fout:
        raise DeltaError(f"{where}: VeRA projection vera_A {tuple(proj.a.shape)} / vera_B {tuple(proj.b.shape)} is "
                         f"smaller than {info.path} ({fin} -> {fout}); it must cover the largest targeted module")
    dt = torch.promote_types(torch.promote_types(proj.a.dtype, d.dtype), lam_b.dtype)
    a = d.to(dt).reshape(r, 1) * proj.a[:, :fin].to(dt)  # diag(d) A_s: [r, in]
    b = proj.b[:fout, :].to(dt) * lam_b.to(dt).reshape(fout, 1)  # diag(b) B_s: [out, r]
    return a.contiguous(), b.contiguous()
