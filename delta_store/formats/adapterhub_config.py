"""AdapterHub ``adapter_config.json``: presets, refusals, adapter input, activations, LoRA alpha.

Field defaults follow ``adapters`` 1.3.0's ``BnConfig`` / ``LoRAConfig``; the refusal list and the
flag algebra are docs/DELTAS.md §3.2-§3.4 and ``adapters/methods/modeling.py`` (``pre_forward`` /
``forward`` / ``post_forward``).
"""
from __future__ import annotations

from ..errors import DeltaError, UnsupportedDelta
from .adapterhub_phm import PHM_DEFAULTS

_BN_DEFAULTS = dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True,
                    adapter_residual_before_ln=False, ln_before=False, ln_after=False, is_parallel=False,
                    scaling=1.0, use_gating=False, leave_out=[], phm_layer=False, inv_adapter=None,
                    cross_adapter=False, **PHM_DEFAULTS)
_SEQ = dict(mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=16,
            original_ln_before=True)
_DOUBLE = dict(mh_adapter=True, output_adapter=True, non_linearity="swish", reduction_factor=16)
_PAR = dict(mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=2, is_parallel=True,
            scaling=4.0)
_COMPACTER = dict(mh_adapter=True, output_adapter=True, non_linearity="gelu", reduction_factor=32, phm_layer=True)
_COMPACTER_PP = dict(mh_adapter=False, output_adapter=True, non_linearity="gelu", reduction_factor=32,
                     original_ln_before=True, phm_layer=True)
_LORA = dict(architecture="lora", r=8, alpha=8, attn_matrices=["q", "v"], composition_mode="add")
_IA3 = dict(architecture="lora", r=1, alpha=1, attn_matrices=["k", "v"], composition_mode="scale")
PRESETS = {"seq_bn": _SEQ, "pfeiffer": _SEQ, "double_seq_bn": _DOUBLE, "houlsby": _DOUBLE, "par_bn": _PAR,
           "parallel": _PAR, "scaled_par_bn": {**_PAR, "scaling": "learned"}, "lora": _LORA, "ia3": _IA3,
           "compacter": _COMPACTER, "compacter++": _COMPACTER_PP,
           "prefix_tuning": dict(architecture="prefix_tuning"), "mam": dict(architecture="union"),
           "unipelt": dict(architecture="union")}

# Files with no "version" key predate the activation rename (adapters/utils.py: ACTIVATION_RENAME).
_ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}
# transformers.get_activation names -> ours. gelu_pytorch_tanh is the same tanh approximation as gelu_new.
_ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_new",
                "gelu_pytorch_tanh": "gelu_new"}


def bottleneck_config(meta: dict, where: str) -> dict:
    """The method config with presets expanded and bottleneck defaults filled in."""
    cfg = meta.get("config")
    if isinstance(cfg, str):
        if cfg.lower() not in PRESETS:
            raise UnsupportedDelta(f"{where}: config preset {cfg!r} is not supported")
        cfg = dict(PRESETS[cfg.lower()])
    if not isinstance(cfg, dict):
        raise DeltaError(f"{where}: adapter_config.json 'config' must be an object or a preset name")
    cfg = dict(cfg)
    if (cfg.get("architecture") or "bottleneck") == "bottleneck":
        cfg = {**_BN_DEFAULTS, **cfg}
        if "version" not in meta and cfg.get("non_linearity") in _ACTIVATION_RENAME:
            cfg["non_linearity"] = _ACTIVATION_RENAME[cfg["non_linearity"]]
    return cfg


def map_activation(name: str, where: str) -> str:
    act = _ACTIVATIONS.get(str(name).lower())
    if act is None:
        raise UnsupportedDelta(f"{where}: non_linearity {name!r} is not supported "
                               f"(relu, swish/silu, gelu, gelu_new are)")
    return act


def adapter_source(cfg: dict, where: str) -> str:
    """What the bottleneck reads on a pre-LN model, or a refusal (docs/DELTAS.md §3.4).

    Served output must be ``h + a + BN(src)`` (h = residual stream, a = sub-block output). With
    x = ``a + h`` if original_ln_before else ``a``, residual = ``a`` if residual_before_ln else x, the
    library computes ``BN(x) + residual (+ h if original_ln_after)``, which has exactly one ``h`` only
    for (residual_before_ln, original_ln_after) = (True, True) or, with original_ln_before, (False, False).
    """
    for flag, why in (("use_gating", "its gate averages over the whole sequence, which is not causal"),
                      ("ln_before", "adapter LayerNorms are not supported"),
                      ("ln_after", "adapter LayerNorms are not supported"),
                      ("inv_adapter", "invertible embedding adapters are not supported"),
                      ("cross_adapter", "cross-attention adapters need an encoder-decoder")):
        if cfg.get(flag):
            raise UnsupportedDelta(f"{where}: {flag}={cfg[flag]!r}: {why}")
    rbl, olb, ola = cfg.get("residual_before_ln"), cfg.get("original_ln_before"), cfg.get("original_ln_after")
    if rbl == "post_add":
        raise UnsupportedDelta(f"{where}: residual_before_ln='post_add' needs a post-LN model; on pre-LN models "
                               f"the library leaves the residual unset")
    if cfg.get("is_parallel"):
        if not ola:
            raise UnsupportedDelta(f"{where}: a parallel adapter with original_ln_after=False drops the residual stream")
        return "residual"
    if (rbl is True and ola) or (rbl is not True and olb and not ola):
        return "output+residual" if olb else "output"
    raise UnsupportedDelta(f"{where}: flags residual_before_ln={rbl}, original_ln_before={olb}, "
                           f"original_ln_after={ola} do not keep exactly one residual stream on a pre-LN model")


def check_lora_config(cfg: dict, where: str) -> None:
    if cfg.get("use_gating"):
        raise UnsupportedDelta(f"{where}: use_gating replaces the LoRA scale by a gate averaged over the whole "
                               f"sequence, which is not causal")
    if cfg.get("use_dora"):
        raise UnsupportedDelta(f"{where}: use_dora (DoRA) needs the base weight's row norms; not supported")
    if cfg.get("vera_d") is not None or cfg.get("vera_b") is not None:
        raise UnsupportedDelta(f"{where}: VeRA (vera_d/vera_b) shares frozen random matrices; not supported")
    if cfg.get("composition_mode", "add") not in ("add", "scale"):
        raise UnsupportedDelta(f"{where}: composition_mode {cfg.get('composition_mode')!r} is not supported")


def lora_alpha(cfg: dict, meta: dict) -> float:
    """alpha, or r for files from ``adapters`` < 1.1.0 with r != alpha (their faulty scaling, PR #770)."""
    r, alpha = cfg.get("r", 8), cfg.get("alpha", 8)
    version = str(meta.get("version", ""))
    if version.startswith("adapters.") and r != alpha and _older_than(version[len("adapters."):], (1, 1, 0)):
        return float(r)
    return float(alpha)


def _older_than(version: str, ref: tuple[int, ...]) -> bool:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts))) < ref
