"""Shared test fixtures: tiny models built from configs (never downloaded), popularity patterns,
tolerances and a verbose assert_close. Benchmarks import from here too rather than copying."""
from __future__ import annotations

import math
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Fixture kinds (case.json "delta_type") whose delta has a prompt part: served by the engine's shared KV
# prefix, not by the wrapped layers alone, so layer-only parity tests leave them to the prompt tests.
PROMPT_FIXTURE_KINDS = frozenset({"prefix_tuning", "prefix_tuning_flat", "mam", "unipelt", "prefix", "soft_prompt"})


def fixture_cases(arch: str | None = None, *, prompt: bool | None = None) -> list[Path]:
    """AdapterHub/OpenDelta case folders (``tests/fixtures/README.md``), for one base arch or all;
    ``prompt=True`` only those with a prompt part, ``False`` only layer-only ones, None every case."""
    import json

    out = []
    for lib in ("adapterhub", "opendelta"):
        for case in sorted((FIXTURES / lib).glob(f"{arch or '*'}-*")):
            if not case.is_dir():
                continue
            kind = json.loads((case / "case.json").read_text())["delta_type"]
            if prompt is None or prompt == (kind in PROMPT_FIXTURE_KINDS):
                out.append(case)
    return out

# fp32 compares against fp32 references; fp16 tolerances cover one rounding of the output.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=8e-2, rtol=5e-2),
}


def tiny_llama(seed: int = 0, *, hidden: int = 64, layers: int = 2, vocab: int = 256, model_type: str = "llama",
               intermediate: int = 128, heads: int = 4, kv_heads: int = 2) -> torch.nn.Module:
    """A random Llama-family model (llama / mistral / qwen2) small enough for CPU tests."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    cfg = cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
              max_position_embeddings=512, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def tiny_gpt2(seed: int = 0, *, hidden: int = 64, layers: int = 2, vocab: int = 256) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=512,
                     initializer_range=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-zero biases make "absolute vs delta" bias mistakes visible
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def popularity(num_tokens: int, num_deltas: int, kind: str, *, seed: int = 0, none_fraction: float = 0.0) -> list[int]:
    """Per-token delta index in [0, num_deltas) (or -1 for "no delta") following a popularity pattern.

    identical: every token uses delta 0; distinct: token i uses delta i % num_deltas (each delta
    once when num_tokens == num_deltas); uniform: i.i.d. uniform; zipf: P(k) ~ 1/(k+1)^1.2;
    skewed: 90% of tokens on delta 0, the rest uniform.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "identical":
        ids = torch.zeros(num_tokens, dtype=torch.long)
    elif kind == "distinct":
        ids = torch.arange(num_tokens) % num_deltas
    elif kind == "uniform":
        ids = torch.randint(0, num_deltas, (num_tokens,), generator=g)
    elif kind == "zipf":
        w = torch.tensor([1.0 / math.pow(k + 1, 1.2) for k in range(num_deltas)])
        ids = torch.multinomial(w, num_tokens, replacement=True, generator=g)
    elif kind == "skewed":
        ids = torch.where(torch.rand(num_tokens, generator=g) < 0.9, torch.zeros(num_tokens, dtype=torch.long),
                          torch.randint(0, num_deltas, (num_tokens,), generator=g))
    else:
        raise ValueError(f"unknown popularity pattern {kind!r}")
    if none_fraction > 0:
        ids = torch.where(torch.rand(num_tokens, generator=g) < none_fraction, torch.full_like(ids, -1), ids)
    return ids.tolist()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """torch.testing.assert_close with the worst element spelled out."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = diff > bound
    if bad.any():
        idx = tuple(int(i) for i in torch.unravel_index((diff - bound).flatten().argmax(), diff.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{diff.numel()} elements differ; max |diff| {diff.max().item():.3e} "
            f"(atol {atol:g}, rtol {rtol:g}); worst at {idx}: actual {actual[idx].item():.6g} "
            f"expected {expected[idx].item():.6g}")


def random_delta(spec, *, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), bias: bool = False,
                 seed: int = 0, dtype: torch.dtype = torch.float32):
    """A canonical LoRA (+ optional BitFit bias) Delta on every ``targets`` leaf of ``spec`` (a BaseSpec),
    random but seeded: for store, slot and benchmark tests that need a valid delta without PEFT."""
    from delta_store.delta import Delta, LoraTerm, ModuleDelta

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for path, info in sorted(spec.modules.items()):
        if info.kind not in ("linear", "conv1d") or path.rsplit(".", 1)[-1] not in targets:
            continue
        a = (0.1 * torch.randn(rank, info.in_features, generator=g)).to(dtype)
        b = (0.1 * torch.randn(info.out_features, rank, generator=g)).to(dtype)
        md = ModuleDelta(lora=LoraTerm(a, b, 2.0 / rank))
        if bias:
            md.bias = (0.05 * torch.randn(info.out_features, generator=g)).to(dtype)
        mods[path] = md
    return Delta(mods, "native", spec.fingerprint)


def store_settings(**overrides):
    """The StoreSettings the server builds from ``ServerConfig()`` defaults (``server.app.store_config``,
    unpinned host memory), with ``overrides`` replaced."""
    import dataclasses

    from server.app import store_config
    from server.config import ServerConfig

    _limits, settings = store_config(ServerConfig(), pin_host_memory=False)
    return dataclasses.replace(settings, **overrides)


def tenant_quotas(**overrides):
    """The server's default TenantQuotas (from ``ServerConfig()``), with ``overrides`` replaced (and validated)."""
    import dataclasses

    return dataclasses.replace(store_settings().default_quotas, **overrides)


def import_delta(path, spec, source_format: str = "auto", *, limits=None):
    """A payload file or folder through the upload's import path (``delta_store.importer.Importer``, the
    server's store settings) -> the validated Delta stamped with ``spec.fingerprint``. ``limits``: the
    pools' ceilings (default: anything structurally valid)."""
    import tempfile

    from delta_store.importer import Importer
    from delta_store.scratch import Scratch
    from delta_store.validate import Limits

    with tempfile.TemporaryDirectory() as tmp, Scratch(tmp) as scratch:
        return Importer(spec, limits or Limits(), store_settings(), scratch).read(path, source_format)


def assert_nothing_stored(store, tenant) -> None:
    """After a refused ``store.put``: no version listed, no blob written, no scratch file left."""
    assert store.list(tenant) == ([], "")
    assert list(store.blobs.iter()) == []
    assert list((store.data_dir / "tmp").iterdir()) == []
