"""Upload payloads for the load tools: real deltas for the served base, made the way tenants make them.

PEFT deltas (LoRA at ranks 4-64 on some or all projections, LoRA with a bias term, (IA)3, BEFT) are
created with PEFT itself on the served model, given random weights (PEFT initialises LoRA B to zero
and (IA)3 to ones, which would be no-ops), saved with ``save_pretrained`` and packed as a tar archive,
as ``deltaserve upload`` sends a folder. Bottleneck adapters and BitFit biases are written in the
native format with ``delta_store.native.dump_native``. Sizes follow from the base: on the demo model
(hidden 256, 4 layers) a rank-16 LoRA on all seven projections is 1.2 MB, rank 64 is 4.7 MB.
"""
from __future__ import annotations

import copy
import io
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.oracles import randomise_peft

LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

RECIPES: dict[str, dict] = {
    # name -> how to build it; the mix cycles through these in order
    "lora_r4_qv": dict(method="lora", r=4, alpha=8, targets=("q_proj", "v_proj")),
    "lora_r16_all": dict(method="lora", r=16, alpha=32, targets=LLAMA_PROJ),
    "ia3": dict(method="ia3"),
    "lora_r8_attn_bias": dict(method="lora", r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                              lora_bias=True),
    "bottleneck_w32": dict(method="bottleneck", width=32, activation="relu"),
    "lora_r64_all": dict(method="lora", r=64, alpha=64, targets=LLAMA_PROJ),
    "beft": dict(method="beft", targets=("v_proj", "o_proj", "down_proj")),
    "lora_r32_mlp": dict(method="lora", r=32, alpha=32, targets=("gate_proj", "up_proj", "down_proj")),
    "bitfit": dict(method="bitfit"),
    "bottleneck_w64_gelu": dict(method="bottleneck", width=64, activation="gelu"),
}
MIX = tuple(RECIPES)
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
RECIPES.update({f"lora_r{r}_qkvo": dict(method="native_lora", r=r, targets=QKVO) for r in (4, 8, 16, 32, 64)})
SCALE_MIX = ("lora_r4_qkvo", "lora_r8_qkvo", "lora_r16_qkvo", "lora_r32_qkvo", "lora_r64_qkvo") * 3 + (
    "lora_r16_qkvo", "bottleneck_w32", "bitfit", "ia3")
"""bench_scale's cycle of 19: ranks 4-64 on q/k/v/o (LoRA, 16 of 19), a bottleneck adapter, BitFit, (IA)3. The LoRAs
are written in the native format (random A and B of PEFT-trained magnitudes): building and uploading thousands
of PEFT folders would take most of the benchmark's time on 2 cores, and the format does not change the serving."""


@dataclass(slots=True)
class Payload:
    recipe: str
    data: bytes  # what UploadDelta receives
    source_format: str  # "peft" (tar of a PEFT folder) | "native"


def _tar(folder: Path) -> bytes:
    # Plain tar, not tar.gz: random fp32 weights do not compress, and gzip of a 4 MB rank-64 LoRA
    # costs ~0.3 s of a shared core per delta for nothing.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in sorted(folder.rglob("*")):
            if item.is_file():
                tar.add(item, arcname=str(item.relative_to(folder)), recursive=False)
    return buf.getvalue()


def recipe_mix(n: int, offset: int = 0, mix: tuple[str, ...] = MIX) -> list[str]:
    """``n`` recipe names cycling through ``mix`` (default every kind, so any prefix of 10 holds each once)."""
    return [mix[(offset + i) % len(mix)] for i in range(n)]


class DeltaFactory:
    """Builds payloads for one base model folder (the one the server serves)."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoModelForCausalLM

        from delta_store.base_spec import BaseSpec

        self.model_dir = Path(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.spec = BaseSpec.from_model(self.base)
        self._peft_models: dict[str, torch.nn.Module] = {}  # recipe -> PeftModel, re-randomised per build
        if self.spec.arch != "llama":
            raise ValueError(f"{self.model_dir}: the load payloads target Llama-family projections, "
                             f"got model_type {self.spec.model_type!r}")

    def build(self, recipe: str, seed: int) -> Payload:
        cfg = RECIPES.get(recipe)
        if cfg is None:
            raise ValueError(f"unknown delta recipe {recipe!r}; known: {', '.join(RECIPES)}")
        method = cfg["method"]
        if method in ("lora", "ia3", "beft"):
            return Payload(recipe, self._peft(recipe, cfg, seed), "peft")
        if method == "bottleneck":
            return Payload(recipe, self._bottleneck(cfg, seed), "native")
        if method == "native_lora":
            return Payload(recipe, self._native_lora(cfg, seed), "native")
        return Payload(recipe, self._bitfit(seed), "native")

    # ---- PEFT ---------------------------------------------------------------------------------
    def _peft_model(self, cfg: dict) -> torch.nn.Module:
        from peft import BeftConfig, IA3Config, LoraConfig, get_peft_model

        method = cfg["method"]
        if method == "lora":
            pcfg = LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=list(cfg["targets"]),
                              lora_bias=cfg.get("lora_bias", False))
        elif method == "ia3":
            pcfg = IA3Config()  # k/v outputs and down_proj's input, PEFT's Llama default
        else:
            pcfg = BeftConfig(target_modules=list(cfg["targets"]))
        return get_peft_model(copy.deepcopy(self.base), pcfg)

    def _peft(self, recipe: str, cfg: dict, seed: int) -> bytes:
        with warnings.catch_warnings():  # PEFT warns that bias terms on bias-less layers cannot be merged
            warnings.simplefilter("ignore")
            pm = self._peft_models.get(recipe)
            if pm is None:
                pm = self._peft_models[recipe] = self._peft_model(cfg)
            return self._save_randomised(pm, seed)

    @staticmethod
    def _save_randomised(pm, seed: int) -> bytes:
        # (IA)3 vectors near 1 and LoRA/bias terms near 0, with magnitudes that visibly move the logits of the
        # demo model (init range 0.1) without blowing them up. Llama bases have no biases to perturb.
        randomise_peft(pm, seed, std=0.02, ia3_std=0.1, bias_std=0.02)
        with tempfile.TemporaryDirectory(prefix="deltaserve-load-") as tmp:
            pm.save_pretrained(tmp)
            return _tar(Path(tmp))

    # ---- native -------------------------------------------------------------------------------
    def _bottleneck(self, cfg: dict, seed: int) -> bytes:
        """Houlsby-style adapters after each attention and FFN output (``source="output"``)."""
        from delta_store.delta import AdapterTerm, Delta, ModuleDelta
        from delta_store.native import dump_native

        g = torch.Generator().manual_seed(seed)
        h, m, mods = self.spec.hidden_size, cfg["width"], {}
        for layer in range(self.spec.num_layers):
            for _norm_leaf, out_leaf in self.spec.sites().values():
                path = self.spec.find(layer, out_leaf).path
                mods[path] = ModuleDelta(adapter=AdapterTerm(
                    0.05 * torch.randn(m, h, generator=g), 0.01 * torch.randn(m, generator=g),
                    0.05 * torch.randn(h, m, generator=g), 0.01 * torch.randn(h, generator=g),
                    cfg["activation"], 1.0, "output"))
        return dump_native(Delta(mods, source_format="native", base_fingerprint=self.spec.fingerprint,
                                 description=f"bottleneck width {m}"))

    def _native_lora(self, cfg: dict, seed: int) -> bytes:
        """LoRA of rank r on the recipe's projections of every layer, scale alpha/r = 2, A and B of std 0.02 (as
        ``randomise_peft`` gives PEFT's LoRAs)."""
        from delta_store.delta import Delta, LoraTerm, ModuleDelta
        from delta_store.native import dump_native

        g = torch.Generator().manual_seed(seed)
        r, mods = cfg["r"], {}
        for info in self.spec.modules.values():
            if info.kind == "linear" and info.layer is not None and info.leaf in cfg["targets"]:
                mods[info.path] = ModuleDelta(lora=LoraTerm(0.02 * torch.randn(r, info.in_features, generator=g),
                                                            0.02 * torch.randn(info.out_features, r, generator=g), 2.0))
        return dump_native(Delta(mods, source_format="native", base_fingerprint=self.spec.fingerprint,
                                 description=f"lora rank {r}"))

    def _bitfit(self, seed: int) -> bytes:
        """Additive bias deltas on every projection of every layer (BitFit on a bias-less Llama)."""
        from delta_store.delta import Delta, ModuleDelta
        from delta_store.native import dump_native

        g = torch.Generator().manual_seed(seed)
        mods = {info.path: ModuleDelta(bias=0.01 * torch.randn(info.out_features, generator=g))
                for info in self.spec.modules.values()
                if info.kind == "linear" and info.layer is not None and info.leaf in LLAMA_PROJ}
        return dump_native(Delta(mods, source_format="native", base_fingerprint=self.spec.fingerprint,
                                 description="bitfit biases"))
