"""PEFT ``adapter_config.json``: what is refused, which modules are targeted, per-module LoRA scale.

Rules follow peft 0.21.2 (docs/DELTAS.md §2.3-§2.5): ``check_target_module_exists`` for targeting,
``get_pattern_key`` for rank/alpha patterns (dot-boundary suffix regexes, first match wins), and the
(IA)3 feed-forward test (``endswith`` *without* a dot boundary, hence GPT-2's ``"mlp.c_proj"``).
"""
from __future__ import annotations

import math
import re

from ..errors import DeltaError, UnsupportedDelta
from .peft_prompt import REFUSED_PROMPT_TYPES, SERVED_PROMPT_TYPES
from .peft_refusals import refusal_reason

SERVED_TYPES = ("LORA", "IA3", "BEFT", "ADALORA", "VERA", "TRAINABLE_TOKENS")

# LoRA variants whose forward pass is not plain LoRA (docs/DELTAS.md §2.4 table, last row).
LORA_VARIANT_FIELDS = ("alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config",
                       "monteclora_config", "kasa_config", "use_qalora", "megatron_config")
# Initialisations that subtract s*B0@A0 from the *base* weights: outputs need a mutated base (§2.4).
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def check_supported(cfg: dict, where: str) -> str:
    """Raise :class:`UnsupportedDelta` for anything that cannot be served faithfully; return peft_type."""
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type in REFUSED_PROMPT_TYPES:
        raise UnsupportedDelta(f"{where}: peft_type {peft_type} {REFUSED_PROMPT_TYPES[peft_type]}")
    if peft_type not in SERVED_TYPES + SERVED_PROMPT_TYPES:
        why = refusal_reason(peft_type)
        raise UnsupportedDelta(f"{where}: peft_type {peft_type or '(missing)'} is not supported"
                               + (f": {why}" if why else f" (supported: {', '.join(SERVED_TYPES + SERVED_PROMPT_TYPES)})"))
    if cfg.get("modules_to_save"):
        raise UnsupportedDelta(f"{where}: modules_to_save {cfg['modules_to_save']} stores full trained copies of "
                               f"whole modules (a full-weight payload), not a delta")
    if peft_type in SERVED_PROMPT_TYPES:
        return peft_type  # one prompt_embeddings tensor; peft_prompt checks it
    if cfg.get("target_parameters"):
        raise UnsupportedDelta(f"{where}: target_parameters (LoRA on raw parameters) is not supported")
    if peft_type in ("LORA", "ADALORA"):
        if cfg.get("enable_lora") is not None:
            raise UnsupportedDelta(f"{where}: enable_lora is the PEFT <=0.2 MergedLinear format, which PEFT itself "
                                   f"can no longer load")
        if cfg.get("use_dora") and cfg.get("lora_bias"):
            raise UnsupportedDelta(f"{where}: use_dora with lora_bias, which PEFT refuses ('lora_bias=True is not "
                                   f"supported for DoRA'), so no PEFT output defines it")
        if cfg.get("use_dora") and peft_type == "ADALORA":
            raise UnsupportedDelta(f"{where}: use_dora with AdaLoRA, which PEFT itself does not support")
        if cfg.get("use_dora") not in (None, False, True):
            raise UnsupportedDelta(f"{where}: use_dora={cfg['use_dora']!r} is not a DoRA variant this server knows")
        if cfg.get("layer_replication"):
            raise UnsupportedDelta(f"{where}: layer_replication duplicates base layers; not supported")
        for name in LORA_VARIANT_FIELDS:
            if cfg.get(name):
                raise UnsupportedDelta(f"{where}: {name} is a LoRA variant whose forward pass is not plain LoRA")
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
            raise UnsupportedDelta(f"{where}: init_lora_weights={init!r} subtracts the initial adapter from the "
                                   f"base weights, so it only reproduces training on a mutated base; convert it "
                                   f"to plain LoRA with PEFT (path_initial_model_for_weight_conversion) first")
    if peft_type == "VERA" and cfg.get("bias", "none") not in ("none", "all", "vera_only"):
        raise DeltaError(f"{where}: VeRA bias={cfg['bias']!r} is not one of none, all, vera_only")
    return peft_type


def is_targeted(cfg: dict, key: str) -> bool:
    """peft's ``check_target_module_exists`` for module path ``key`` (relative to the wrapped model)."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith("." + e) for e in exclude):
            return False
    targets = cfg.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    pattern = cfg.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def is_feedforward(cfg: dict, key: str) -> bool:
    ff = cfg.get("feedforward_modules")
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(f) for f in ff)


def _pattern_value(patterns: dict | None, key: str):
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return None


def lora_scale(cfg: dict, key: str, rank: int, *, where: str) -> float:
    """Resolved scale of module ``key``: alpha_m/r_m, or alpha_m/sqrt(r_m) with rsLoRA (docs/DELTAS.md §2.4.2).

    ``rank`` is the file's ``lora_A.shape[0]``; PEFT fails to load a file whose rank disagrees with the
    config's r (or its rank_pattern entry), so we refuse it too rather than guess which one was trained.
    """
    r_cfg = _pattern_value(cfg.get("rank_pattern"), key)
    r_cfg = int(cfg.get("r", 8)) if r_cfg is None else int(r_cfg)
    if r_cfg != rank:
        raise DeltaError(f"{where}: {key}: config says rank {r_cfg} (r / rank_pattern), lora_A has rank {rank}")
    alpha = _pattern_value(cfg.get("alpha_pattern"), key)
    alpha = float(cfg.get("lora_alpha", 8) if alpha is None else alpha)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
