"""The random Llamas the serving benchmarks serve, built under a data dir with the demo model's builder (its
byte-level tokenizer, a fixed seed): DESIGN's benchmark shapes, and a real model's shape for memory checks."""
from __future__ import annotations

from pathlib import Path

SHAPES = {
    "demo": {},
    # DESIGN "Benchmark conventions": the CPU benchmark model, and a realistic-width one for a GPU
    "cpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4),
    "gpu": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                num_key_value_heads=8),
    # SmolLM2-135M's shape (a Llama: 134.5M parameters, embeddings tied, 538 MB in fp32), random weights
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


def build_model(data_dir: Path, shape: str, layers: int | None = None) -> Path:
    """The model folder of ``shape`` (with ``layers`` decoder layers if given) under ``data_dir``."""
    from server.demo import build_demo_model, ensure_demo_model

    if shape == "demo" and not layers:
        return ensure_demo_model(data_dir)[0]  # the server finds it there and does not rebuild it
    overrides = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    path = Path(data_dir) / f"model-{shape}"
    if (path / "config.json").is_file():
        return path
    return build_demo_model(path, **overrides)
