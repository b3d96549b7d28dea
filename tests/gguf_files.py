"""Small GGUF files written in the tests, so the GGUF path runs without the 98 MB embedded model.

``write_llama_gguf`` writes a random tiny Llama exactly as llama.cpp's ``convert_hf_to_gguf.py`` lays
one out (tensor names, metadata keys, q/k rows permuted for its rotary layout, a "gpt2" byte-level
tokenizer), so transformers' GGUF loader reads it back to the same weights: the conversion can be
checked bit for bit against the model that was written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from server.engine.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, _bytes_to_unicode

TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_LAYER_NAMES = (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "ffn_norm"))


def tiny_gguf_llama(seed: int = 0):
    """A random 2-layer Llama over the byte-level tokenizer's 259 ids (what ``write_llama_gguf`` writes)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.1, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _rotary_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py ``LlamaModel.permute``); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, *, name: str = "tiny-llama", chat_template: str | None = TINY_CHAT_TEMPLATE,
                     architecture: str = "llama") -> Path:
    """Write ``model`` (a LlamaForCausalLM over the byte-level vocabulary) as an F32 GGUF file."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(SPECIAL_TOKENS) + _bytes_to_unicode())
    w.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * 256)  # 3 = control, 1 = normal
    w.add_token_scores([0.0] * VOCAB_SIZE)
    w.add_token_merges([])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _LAYER_NAMES:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for key, tensor in model.state_dict().items():
        value = tensor.detach().to("cpu").float().numpy()
        if key.endswith("q_proj.weight"):
            value = _rotary_permute(value, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            value = _rotary_permute(value, cfg.num_key_value_heads)
        w.add_tensor(names[key], np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_metadata_only_gguf(path: Path, architecture: str) -> Path:
    """A well-formed GGUF file of ``architecture`` with a name and no tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name(f"tiny-{architecture}")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
