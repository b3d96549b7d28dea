"""AdapterHub Compacter / Compacter++ (``phm_layer: true``): PHM down/up projections -> dense bottleneck weights.

``adapters`` 1.3.0 ``PHMLayer`` (``methods/utils.py``). Placement, activation and scaling are those of the
bottleneck config (``compacter`` = Houlsby ``double_seq_bn`` placement, ``compacter++`` = Pfeiffer
``seq_bn``; activation ``gelu`` = exact erf GELU); only the two projections differ. Keys, for adapter
``<name>`` in layer ``i`` at site ``attention_adapters`` / ``output_adapters``::

    <layer>.<site>.adapters.<name>.adapter_down.0.{W_left, W_right | W, b, phm_rule | phm_rule_left/right}
    <layer>.<site>.adapters.<name>.adapter_up.{...same...}
    <base>.shared_parameters.<name>.{phm_rule | phm_rule_left, phm_rule_right}      (shared_phm_rule, default)
    <base>.shared_parameters.<name>.{W_down_left, W_down_right, W_up_left, W_up_right | W_down, W_up}  (shared_W_phm)

The fixture cases: shared ``phm_rule [4, 4, 4]``, per-projection rank-1 ``W_left``/``W_right`` and ``b``.
"""
from __future__ import annotations

import re

import torch

from ..errors import DeltaError
from .phm import bias_of, dense_weight, factor_of, rule_of

PHM_DEFAULTS = dict(phm_dim=4, phm_rank=1, shared_phm_rule=True, factorized_phm_rule=False, shared_W_phm=False,
                    factorized_phm_W=True, phm_bias=True)
_PHM_LEAVES = ("W_left", "W_right", "W", "b", "phm_rule", "phm_rule_left", "phm_rule_right")


def take_shared(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Remove ``<base>.shared_parameters.<name>.*`` from ``tensors``; returns ``{leaf: tensor}``."""
    key_re = re.compile(rf"^(?:.+\.)?shared_parameters\.{re.escape(name)}\.(?P<leaf>[^.]+)$")
    shared = {}
    for key in [k for k in tensors if key_re.match(k)]:
        leaf = key_re.match(key).group("leaf")
        if leaf in shared:
            raise DeltaError(f"adapterhub: two shared PHM tensors named {leaf!r}")
        shared[leaf] = tensors.pop(key)
    return shared


def is_phm_leaf(rest: str) -> bool:
    """Whether a key tail (``adapter_down.0.W_left``) is a PHM projection tensor."""
    return rest.rsplit(".", 1)[-1] in _PHM_LEAVES


def projections(cfg: dict, params: dict[str, tuple[str, torch.Tensor]], shared: dict[str, torch.Tensor],
                hidden: int, width: int, where: str):
    """``(down [m, h], down_bias [m], up [h, m], up_bias [h])`` of one adapter from its PHM tensors."""
    n, rank = int(cfg["phm_dim"]), int(cfg["phm_rank"])
    down_parts = {k.rsplit(".", 1)[-1]: t for k, (_, t) in params.items() if k.startswith("adapter_down.")}
    up_parts = {k.rsplit(".", 1)[-1]: t for k, (_, t) in params.items() if k.startswith("adapter_up.")}
    unknown = sorted(k for k in params if k != "scaling"  # a learned/channel scaling is the bottleneck's (_scaling)
                     and not (k.startswith(("adapter_down.0.", "adapter_up.")) and is_phm_leaf(k)))
    if unknown:
        raise DeltaError(f"{where}: unknown tensor {params[unknown[0]][0]!r} for a PHM (Compacter) adapter")
    out = []
    for position, parts, fin, fout in (("down", down_parts, hidden, width), ("up", up_parts, width, hidden)):
        at = f"{where} adapter_{position}"
        if cfg["shared_phm_rule"]:
            if any(k.startswith("phm_rule") for k in parts):
                raise DeltaError(f"{at}: shared_phm_rule=true but the projection has its own phm_rule")
            rule = rule_of(shared, n, f"{where} shared_parameters")
        else:
            rule = rule_of(parts, n, at)
        if cfg["shared_W_phm"]:
            if any(k.startswith("W") for k in parts):
                raise DeltaError(f"{at}: shared_W_phm=true but the projection has its own W factors")
            w_parts = {"W_left": shared.get(f"W_{position}_left"), "W_right": shared.get(f"W_{position}_right"),
                       "W": shared.get(f"W_{position}")}
            factor = factor_of({k: v for k, v in w_parts.items() if v is not None}, n, fin, fout,
                               rank if cfg["factorized_phm_W"] else None, f"{where} shared W_{position}")
        else:
            if cfg["factorized_phm_W"] != ("W_left" in parts):
                raise DeltaError(f"{at}: factorized_phm_W={cfg['factorized_phm_W']} but the projection holds "
                                 f"{sorted(k for k in parts if k.startswith('W'))}")
            factor = factor_of(parts, n, fin, fout, rank if cfg["factorized_phm_W"] else None, at)
        weight = dense_weight(rule, factor)  # [fout, fin]
        if cfg["phm_bias"] != ("b" in parts):
            has = "has no" if cfg["phm_bias"] else "has a"
            raise DeltaError(f"{at}: phm_bias={cfg['phm_bias']} but the projection {has} b")
        out += [weight, bias_of(parts, fout, weight.dtype, at)]
    return tuple(out)
