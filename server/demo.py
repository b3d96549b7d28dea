"""The built-in demo base model: generated deterministically at first start, never downloaded.

A small random Llama (hidden 256, 4 layers, 4 heads / 2 KV heads, vocab = the byte-level
tokenizer's 259 ids) built from a config with a fixed seed and saved with ``save_pretrained``
(safetensors) plus the tokenizer files into ``<data_dir>/demo-model/``. Its text is noise (random
weights), but it is a real HF causal LM: deltas made for it with PEFT load and serve like any other.
The same seed and config give the same bytes, hence the same base fingerprint on every machine, so
deltas uploaded against one demo install validate against another.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_DIR = "demo-model"
DEMO_SEED = 0
DEMO_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)


def demo_config(**overrides):
    from transformers import LlamaConfig

    from .engine.tokenizer import VOCAB_SIZE

    # initializer_range 0.1 (HF default 0.02): larger random weights give peakier logits, so greedy
    # continuations vary with the prompt and a delta visibly changes the output. Overrides may change any of
    # these too (a benchmark builds a real model's shape: vocab, tied embeddings).
    params = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=2048, initializer_range=0.1, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **DEMO_SHAPE)
    params.update(overrides)
    return LlamaConfig(**params)


def build_demo_model(path: str | os.PathLike, **overrides) -> Path:
    """Write the demo model (or a smaller one, for tests) to ``path``, atomically (temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .engine.tokenizer import byte_level_tokenizer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(DEMO_SEED)
        model = AutoModelForCausalLM.from_config(demo_config(**overrides), dtype=torch.float32)
        torch.random.set_rng_state(rng_state)  # leave the caller's RNG as it was
        hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the server's log
        model.save_pretrained(tmp)
        byte_level_tokenizer().save_pretrained(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_demo_model(data_dir: str | os.PathLike) -> tuple[Path, bool]:
    """``<data_dir>/demo-model``, built on first use; returns (path, created)."""
    path = Path(data_dir) / DEMO_DIR
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path, False
    if path.exists():  # a half-built folder from an older, interrupted version: rebuild it
        shutil.rmtree(path)
    for leftover in Path(data_dir).glob(f".{DEMO_DIR}-*"):  # build_demo_model's temp dir of a killed first start
        shutil.rmtree(leftover, ignore_errors=True)
    return build_demo_model(path), True
