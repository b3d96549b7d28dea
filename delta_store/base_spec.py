"""What importers and validation need to know about the served base model, without the model.

Built once by the server from the loaded HF model (``BaseSpec.from_model``) and handed to the
delta store, so that ``delta_store/`` never holds the model itself. Module paths are the served
``*ForCausalLM``'s ``named_modules()`` names (``model.layers.3.mlp.down_proj``,
``transformer.h.0.attn.c_attn``).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")

# Residual sites of pre-LN decoder blocks: (pre-norm leaf, sub-block output module leaf).
# The adapter at a site reads `h` = the pre-norm's input (docs/DELTAS.md §3.4).
SITES: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {"attn": ("input_layernorm", "self_attn.o_proj"), "ffn": ("post_attention_layernorm", "mlp.down_proj")},
    "gpt2": {"attn": ("ln_1", "attn.c_proj"), "ffn": ("ln_2", "mlp.c_proj")},
}
SITES["mistral"] = SITES["qwen2"] = SITES["qwen3"] = SITES["llama"]


def layer_index(path: str) -> int | None:
    """Decoder layer index of a module path (``model.layers.3.self_attn.q_proj`` -> 3)."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, slots=True)
class ModuleInfo:
    path: str
    kind: str  # "linear" | "conv1d" | "layernorm" | "rmsnorm" | "embedding"
    in_features: int  # norms: normalized size; embeddings: num_embeddings (the vocabulary)
    out_features: int  # embeddings: embedding_dim
    has_bias: bool
    layer: int | None  # decoder layer index, None outside the decoder layers

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass(slots=True)
class BaseSpec:
    model_type: str  # "llama", "gpt2", "qwen2", "mistral", ...
    num_layers: int
    hidden_size: int
    vocab_size: int
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # path -> base bias [out] (CPU fp32 copy)
    fingerprint: str = ""
    input_embedding: str = ""  # path of get_input_embeddings() ("model.embed_tokens", "transformer.wte")
    output_head: str = ""  # path of get_output_embeddings() ("lm_head")
    tied_embeddings: bool = False  # the head's weight *is* the input embedding's (GPT-2)
    # Attention geometry, what a prompt/prefix delta must fit (its K/V go into the served KV cache):
    num_attention_heads: int = 0
    num_kv_heads: int = 0  # < num_attention_heads for grouped-query attention (Llama-family configs)
    head_dim: int = 0
    max_positions: int = 0  # max_position_embeddings / GPT-2 n_positions (0 = unknown)

    @property
    def arch(self) -> str:
        return "gpt2" if self.model_type == "gpt2" else "llama"

    def sites(self) -> dict[str, tuple[str, str]]:
        return SITES.get(self.model_type, SITES["llama"])

    def find(self, layer: int | None, suffix: str) -> ModuleInfo | None:
        """The module of decoder layer ``layer`` whose path ends with ``.suffix`` (dot boundary)."""
        for info in self.modules.values():
            if info.layer == layer and (info.path == suffix or info.path.endswith("." + suffix)):
                return info
        return None

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "BaseSpec":
        from transformers.pytorch_utils import Conv1D

        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        modules: dict[str, ModuleInfo] = {}
        biases: dict[str, torch.Tensor] = {}
        for path, mod in model.named_modules():
            kind = None
            if isinstance(mod, torch.nn.Linear):
                kind, fin, fout = "linear", mod.in_features, mod.out_features
            elif isinstance(mod, Conv1D):
                kind, fin, fout = "conv1d", mod.weight.shape[0], mod.weight.shape[1]
            elif isinstance(mod, torch.nn.LayerNorm):
                kind, fin = "layernorm", int(mod.normalized_shape[-1])
                fout = fin
            elif type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "weight"):
                kind, fin = "rmsnorm", int(mod.weight.shape[-1])
                fout = fin
            elif isinstance(mod, torch.nn.Embedding):
                kind, fin, fout = "embedding", mod.num_embeddings, mod.embedding_dim
            if kind is None:
                continue
            bias = getattr(mod, "bias", None)
            has_bias = isinstance(bias, torch.Tensor)
            modules[path] = ModuleInfo(path, kind, int(fin), int(fout), has_bias, layer_index(path))
            if has_bias:
                biases[path] = bias.detach().to("cpu", torch.float32).clone()
        hidden = int(getattr(text_cfg, "hidden_size", getattr(text_cfg, "n_embd", 0)))
        heads = int(getattr(text_cfg, "num_attention_heads", getattr(text_cfg, "n_head", 0)) or 0)
        kv_heads = int(getattr(text_cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text_cfg, "head_dim", None) or (hidden // heads if heads else 0))
        spec = cls(
            model_type=str(text_cfg.model_type),
            num_layers=int(getattr(text_cfg, "num_hidden_layers", getattr(text_cfg, "n_layer", 0))),
            hidden_size=hidden,
            vocab_size=int(text_cfg.vocab_size),
            modules=modules,
            biases=biases,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_positions=int(getattr(text_cfg, "max_position_embeddings", 0) or 0),
        )
        spec.input_embedding, spec.output_head, spec.tied_embeddings = _embeddings(model)
        spec.fingerprint = fingerprint(model)
        return spec


def _embeddings(model: torch.nn.Module) -> tuple[str, str, bool]:
    """(input embedding path, output head path, tied): "" where the model has no such module."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    paths = {id(m): p for p, m in model.named_modules()}
    tied = emb is not None and head is not None and getattr(emb, "weight", None) is getattr(head, "weight", 0)
    return paths.get(id(emb), ""), paths.get(id(head), ""), bool(tied)


def fingerprint(model: torch.nn.Module, sample_bytes: int = 1 << 16) -> str:
    """sha256 over the architecture and a sample of every parameter's bytes.

    Hashing every byte of a 7B model would take ~30 s at start-up; 64 KiB from the start, middle
    and end of each tensor catches a different checkpoint of the same architecture all the same.
    """
    h = hashlib.sha256()
    cfg = model.config
    h.update(str(getattr(cfg, "model_type", "")).encode())
    for name, p in sorted(model.state_dict().items()):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        raw = t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        n = raw.numel()
        if n <= 3 * sample_bytes:
            h.update(raw.numpy().tobytes())
        else:
            mid = n // 2
            for lo in (0, mid - sample_bytes // 2, n - sample_bytes):
                h.update(raw[lo:lo + sample_bytes].numpy().tobytes())
    return h.hexdigest()[:32]
