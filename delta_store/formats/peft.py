"""HF PEFT adapter folders -> canonical :class:`Delta` (peft 0.21.2 semantics, docs/DELTAS.md §2).

Served: LoRA (rank/alpha patterns, rsLoRA, ``lora_bias``, ``bias="all"/"lora_only"``, Conv1D
targets, ``layers_to_transform``, DoRA, trainable tokens), AdaLoRA, (IA)3, BEFT, VeRA (expanded
into LoRA: ``peft_vera.py``) and trainable tokens (``peft_tokens.py``); prompt tuning, P-tuning, CPT,
prefix tuning and CARTRIDGE as the delta's prompt part (``peft_prompt.py``); refused kinds and their
reasons: ``peft_refusals.py``. File keys are
``base_model.model.<module path>.<suffix>``; ``<module path>`` is what PEFT matched its config
against, so targeting and patterns are evaluated on it, and it is mapped onto the served model by
:class:`KeyMapper` (layer index + name, never the prefix).

Worked example (tiny Llama, r=4, alpha=8, rank_pattern {"model.layers.1.self_attn.q_proj": 2},
alpha_pattern {"down_proj": 16}): q/v scale 8/4 = 2.0, down_proj 16/4 = 4.0, layer-1 q_proj 8/2 = 4.0.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..base_spec import BaseSpec
from ..delta import Delta
from ..errors import DeltaError, UnsupportedDelta
from .builder import DeltaBuilder
from .files import first_existing, read_json, read_tensors
from .keys import KeyMapper
from .peft_config import check_supported, is_feedforward, is_targeted, lora_scale
from .peft_prompt import SERVED_PROMPT_TYPES, load_peft_prompt
from .peft_tokens import take_token_rows
from .peft_vera import expand as expand_vera
from .peft_vera import take_projection as take_vera_projection

log = logging.getLogger(__name__)
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."

# <module>.<param>[.<adapter name>][.weight|.bias]: the in-memory adapter name is stripped on disk,
# but tolerated here for state dicts saved by hand.
_LORA_RE = re.compile(r"^(?P<mod>.+)\.(?P<param>lora_A|lora_B|lora_E|lora_magnitude_vector|lora_embedding_A|"
                      r"lora_embedding_B|ia3_l|beft_bias|vera_lambda_b|vera_lambda_d)"
                      r"(?:\.(?P<name>[^.]+))??(?:\.(?P<leaf>weight|bias))?$")
_BIAS_RE = re.compile(r"^(?P<mod>.+?)(?:\.base_layer)?\.bias$")


def adapter_folder(path: Path) -> Path:
    """The folder holding one adapter: ``path`` itself, or an error listing the adapters under a root."""
    if (path / CONFIG_NAME).is_file():
        return path
    subs = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()) \
        if path.is_dir() else []
    if subs:
        raise DeltaError(f"{path}: holds several PEFT adapters in subfolders ({', '.join(subs)}); "
                         f"upload the folder of one of them")
    raise DeltaError(f"{path}: no {CONFIG_NAME}, not a PEFT adapter folder")


def load_peft(path: str | Path, spec: BaseSpec) -> Delta:
    folder = adapter_folder(Path(path))
    where = f"peft {folder.name or folder}"
    cfg = read_json(folder / CONFIG_NAME)
    peft_type = check_supported(cfg, where)
    weights = first_existing(folder, WEIGHT_NAMES)
    if weights is None:
        raise DeltaError(f"{folder}: no {' or '.join(WEIGHT_NAMES)} next to {CONFIG_NAME}")
    tensors = read_tensors(weights)
    if peft_type in SERVED_PROMPT_TYPES:
        return load_peft_prompt(cfg, peft_type, tensors, spec, where)
    if "prompt_embeddings" in tensors:
        raise DeltaError(f"{where}: a {peft_type} adapter holding prompt_embeddings (a prompt-learning tensor)")
    importer = _PeftImporter(cfg, peft_type, spec, where)
    take_token_rows(tensors, cfg, peft_type, spec, importer.keys, importer.builder, where)
    if peft_type == "VERA":
        importer.vera = take_vera_projection(tensors, cfg, where)
    importer.run(tensors)
    base = cfg.get("base_model_name_or_path") or "unknown base"
    note = ""
    if cfg.get("bias") == "lora_only" and not any(_BIAS_RE.match(k) for k in tensors):
        # PEFT 0.7.0 - ~0.20 silently saved no biases for "lora_only" (peft issue #3306): the trained
        # biases are lost and cannot be recovered here, only flagged
        note = "; bias='lora_only' but the file holds no biases (PEFT 0.7-0.20 bug): trained biases are missing"
        log.warning("%s: %s", where, note[2:])
    return importer.builder.build(description=f"peft {peft_type} from {base}{note}")


class _PeftImporter:
    def __init__(self, cfg: dict, peft_type: str, spec: BaseSpec, where: str):
        self.cfg, self.peft_type, self.spec, self.where = cfg, peft_type, spec, where
        self.keys = KeyMapper(spec, where)
        self.builder = DeltaBuilder(spec, "peft")
        self.vera = None  # VeraProjection of a VERA adapter, taken from the file before run()

    def run(self, tensors: dict[str, torch.Tensor]) -> None:
        groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # module path -> param -> (key, tensor)
        for key, t in tensors.items():
            rel = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA_RE.match(rel)
            if m is not None:
                param = m.group("param") + ("_bias" if m.group("leaf") == "bias" else "")
                groups.setdefault(m.group("mod"), {})[param] = (key, t)
                continue
            b = _BIAS_RE.match(rel)
            if b is not None and self.cfg.get("bias", "none") in ("all", "lora_only", "vera_only"):
                self.builder.absolute_bias(self.keys.module(b.group("mod"), key=key), t, key=key)
                continue
            if rel.endswith(".weight"):
                raise UnsupportedDelta(f"{self.where}: tensor {key!r} is a full weight (modules_to_save or a "
                                       f"saved embedding), not a delta")
            raise DeltaError(f"{self.where}: unknown tensor {key!r}; refusing rather than ignoring it")
        for mod, params in groups.items():
            self._module(mod, params)

    def _module(self, mod: str, params: dict[str, tuple[str, torch.Tensor]]) -> None:
        any_key = next(iter(params.values()))[0]
        if "lora_embedding_A" in params or "lora_embedding_B" in params:
            raise UnsupportedDelta(f"{self.where}: {any_key!r}: LoRA on an embedding layer is not supported")
        if not is_targeted(self.cfg, mod):
            # PEFT loads with strict=False and would silently drop this tensor; serving it would differ
            raise DeltaError(f"{self.where}: tensor {any_key!r} is for module {mod!r}, which the config's "
                             f"target_modules/exclude_modules/layers_to_transform do not target")
        info = self.keys.module(mod, key=any_key)
        allowed = {"LORA": {"lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector"},
                   "ADALORA": {"lora_A", "lora_B", "lora_E"}, "IA3": {"ia3_l"}, "BEFT": {"beft_bias"},
                   "VERA": {"vera_lambda_b", "vera_lambda_d"}, "TRAINABLE_TOKENS": set()}[self.peft_type]
        extra = sorted(set(params) - allowed)
        if extra:
            raise DeltaError(f"{self.where}: tensor {params[extra[0]][0]!r} does not belong in a "
                             f"{self.peft_type} adapter")
        if self.peft_type in ("LORA", "ADALORA"):
            self._lora(mod, info, params)
        elif self.peft_type == "VERA":  # y += lambda_b * (lambda_d * x A_s^T) B_s^T: a LoRA at scale 1
            a, b = expand_vera(self.vera, params, info, self.where)
            self.builder.lora(info, a, b, 1.0, key=any_key)
        elif self.peft_type == "IA3":
            key, vec = params["ia3_l"]
            ff = is_feedforward(self.cfg, mod)
            want = (1, info.in_features) if ff else (info.out_features, 1)
            if tuple(vec.shape) != want:
                raise DeltaError(f"{self.where}: {key!r}: expected shape {want} ({'input' if ff else 'output'} "
                                 f"scaling of {info.path}), found {tuple(vec.shape)}")
            (self.builder.in_scale if ff else self.builder.out_scale)(info, vec)
        else:  # BEFT: additive [1, out]
            key, vec = params["beft_bias"]
            if vec.numel() != info.out_features:
                raise DeltaError(f"{self.where}: {key!r}: expected shape (1, {info.out_features}) for "
                                 f"{info.path}, found {tuple(vec.shape)}")
            self.builder.additive_bias(info, vec)

    def _lora(self, mod: str, info, params: dict[str, tuple[str, torch.Tensor]]) -> None:
        missing = [p for p in (("lora_A", "lora_B", "lora_E") if self.peft_type == "ADALORA" else ("lora_A", "lora_B"))
                   if p not in params]
        if missing:
            raise DeltaError(f"{self.where}: module {mod!r} has no {missing[0]} tensor")
        key_a, a = params["lora_A"]
        key_b, b = params["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise DeltaError(f"{self.where}: {info.path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             f"are not [r, in] and [out, r]")
        if self.peft_type == "ADALORA":
            key_e, e = params["lora_E"]
            if a.shape[0] == 0:
                return  # every singular value pruned: the module is a no-op
            if tuple(e.shape) != (a.shape[0], 1):
                raise DeltaError(f"{self.where}: {key_e!r}: expected shape ({a.shape[0]}, 1), found {tuple(e.shape)}")
            # y += (x (A*E)^T B^T) * alpha / (ranknum + 1e-5); ranknum = init_r, kept after pruning (§2.4.8)
            init_r = int(self.cfg.get("init_r", 12))
            alpha = float(self.cfg.get("lora_alpha", 8))
            alpha = alpha if alpha > 0 else float(init_r)
            self.builder.lora(info, a * e, b, alpha / (init_r + 1e-5), key=key_a)
            return
        scale = lora_scale(self.cfg, mod, int(a.shape[0]), where=self.where)
        self.builder.lora(info, a, b, scale, key=key_a)
        if bool(self.cfg.get("use_dora")) != ("lora_magnitude_vector" in params):
            raise DeltaError(f"{self.where}: module {mod!r}: use_dora={bool(self.cfg.get('use_dora'))} but the file "
                             f"{'has no' if self.cfg.get('use_dora') else 'has a'} lora_magnitude_vector for it")
        if "lora_magnitude_vector" in params:
            # DoRA: y = (m / ||W + s B A||) * (x W^T + s x A^T B^T) + b0 (delta_store/dora.py); the base bias b0
            # (and any bias="all"/"lora_only" delta) is not scaled
            key_m, mag = params["lora_magnitude_vector"]
            if tuple(mag.shape) != (info.out_features,):
                raise DeltaError(f"{self.where}: {key_m!r}: DoRA magnitude must have one entry per output feature of "
                                 f"{info.path} ({info.out_features},), found {tuple(mag.shape)}")
            self.builder.dora(info, mag, key=key_m)
        if "lora_B_bias" in params:  # lora_bias=true: y += s * b_B, folded into the additive bias (§2.4.1)
            key_bb, bb = params["lora_B_bias"]
            if bb.numel() != b.shape[0]:
                raise DeltaError(f"{self.where}: {key_bb!r}: expected shape ({b.shape[0]},), found {tuple(bb.shape)}")
            self.builder.additive_bias(info, bb.to(torch.float32) * scale)
