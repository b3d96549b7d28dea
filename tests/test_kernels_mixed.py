"""Every delta kind in one batch (D4): tokens of LoRA-only, LoRA+BitFit, bottleneck-only, (IA)³-only and
all-kinds deltas, plus tokens with no delta, through the op sequence a wrapped linear layer runs
(``delta_store/delta.py`` semantics), on both backends against a float64 per-token loop, every kind's
weights as pages in its own layout."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import ACT_CODES, DeltaKernelMeta
from tests.helpers import TOLERANCES, assert_close
from tests.kernel_cases import DEVICE, adapter_pages, bottleneck_pools, lora_pages, lora_pools, row_pages, slots_tensor

N_IN, N_OUT, SLOTS = 40, 72, 6
# slot -> kinds it carries; slot 5 is resident but unused this step
KINDS = {0: {"lora"}, 1: {"lora", "bitfit"}, 2: {"bottleneck"}, 3: {"ia3"},
         4: {"lora", "bitfit", "bottleneck", "ia3"}, 5: {"lora"}}
TOKENS = [0, 0, 0, 1, -1, 2, 2, 3, 4, 4, 4, 4, -1, 1, 3, 0, 2, 4, -1, 1, 1, 1, 3, 0]


def _pools(dtype):
    g = torch.Generator().manual_seed(5)
    ranks = [4 if "lora" in KINDS[s] else 0 for s in range(SLOTS)]
    ranks[1], ranks[4] = 64, 16
    lp = lora_pools(SLOTS, N_IN, N_OUT, ranks, dtype=dtype, device=DEVICE)
    widths = [16 if "bottleneck" in KINDS[s] else 0 for s in range(SLOTS)]
    bp = bottleneck_pools(SLOTS, N_OUT, widths, [ACT_CODES["gelu"]] * 3 + [ACT_CODES["silu"]] * 3, dtype=dtype,
                          device=DEVICE)
    has = lambda kind: torch.tensor([kind in KINDS[s] for s in range(SLOTS)]).unsqueeze(1)  # noqa: E731
    bias = torch.randn(SLOTS, N_OUT, generator=g) * has("bitfit")  # zeros = no BitFit
    l_in = torch.where(has("ia3"), 1 + 0.3 * torch.randn(SLOTS, N_IN, generator=g), torch.ones(SLOTS, N_IN))
    l_out = torch.where(has("ia3"), 1 + 0.3 * torch.randn(SLOTS, N_OUT, generator=g), torch.ones(SLOTS, N_OUT))
    w = torch.randn(N_OUT, N_IN, generator=g) / N_IN ** 0.5
    b0 = torch.randn(N_OUT, generator=g) / 4
    x = torch.randn(len(TOKENS), N_IN, generator=g)
    bias, l_in, l_out = bias.to(DEVICE, dtype), l_in.to(DEVICE, dtype), l_out.to(DEVICE, dtype)
    nan = float("nan")
    pages = dict(lora=lora_pages(lp, layout="regions", fill=nan), adapter=adapter_pages(bp, layout="reversed", fill=nan),
                 bias=row_pages(bias, layout="scattered", seed=1, fill=nan),
                 l_in=row_pages(l_in, layout="scattered", seed=2, fill=nan),
                 l_out=row_pages(l_out, layout="packed", fill=nan))
    return dict(lp=lp, bp=bp, bias=bias, l_in=l_in, l_out=l_out, w=w.to(DEVICE, dtype), b0=b0.to(DEVICE, dtype),
                x=x.to(DEVICE, dtype), pages=pages)


def _layer(p, meta):
    """What a wrapped linear runs: (IA)3 on the input, base, (IA)3 on the output, LoRA, BitFit, adapter."""
    x, pg = p["x"], p["pages"]
    x_in = x.clone()
    kernels.mul_rows(x_in, pg["l_in"], meta)
    y = F.linear(x_in, p["w"], p["b0"])  # [T, out]
    kernels.mul_rows(y, pg["l_out"], meta)
    kernels.add_lora(y, x, pg["lora"], meta)
    kernels.add_bias(y, pg["bias"], meta)
    kernels.add_bottleneck(y, y, pg["adapter"], meta)  # "output" placement: reads the y it adds to
    return y


def _loop64(p):
    d = lambda t: t.double().cpu()  # noqa: E731
    lp, bp = p["lp"], p["bp"]
    acts = {ACT_CODES["gelu"]: F.gelu, ACT_CODES["silu"]: F.silu}
    out = []
    for t, s in enumerate(TOKENS):
        x = d(p["x"][t])
        if s < 0:
            out.append(d(p["w"]) @ x + d(p["b0"]))
            continue
        y = (d(p["w"]) @ (x * d(p["l_in"][s])) + d(p["b0"])) * d(p["l_out"][s])
        r = int(lp["rank"][s])
        if r:
            y += float(lp["scale"][s]) * d(lp["lora_b"][s, :, :r]) @ (d(lp["lora_a"][s, :r]) @ x)
        y += d(p["bias"][s])
        m = int(bp["width"][s])
        if m:
            h = acts[int(bp["act"][s])](d(bp["down"][s, :m]) @ y + d(bp["down_bias"][s, :m]))
            y = y + float(bp["scale"][s]) * (d(bp["up"][s, :, :m]) @ h + d(bp["up_bias"][s]))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_every_kind_in_one_batch(backend, dtype):
    p = _pools(dtype)
    meta = DeltaKernelMeta.build(slots_tensor(TOKENS, DEVICE), TOKENS)
    with kernels.backend(backend):
        y = _layer(p, meta)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    assert_close(y, _loop64(p), **tol, what=f"{backend} {dtype}")
    base = F.linear(p["x"], p["w"], p["b0"])
    none = [t for t, s in enumerate(TOKENS) if s < 0]
    assert torch.equal(y[none], base[none])  # tokens without a delta are the base, bit for bit


def test_backends_agree_on_mixed_batch():
    p = _pools(torch.float32)
    meta = DeltaKernelMeta.build(slots_tensor(TOKENS, DEVICE), TOKENS)
    outs = {}
    for backend in ("triton", "cpu"):
        with kernels.backend(backend):
            outs[backend] = _layer(p, meta)
    assert_close(outs["triton"], outs["cpu"], **TOLERANCES[torch.float32], what="triton vs cpu")


def test_per_kind_maps_equal_one_shared_map():
    # A layer may instead build one map per kind (-1 where the slot lacks the kind): same result.
    p = _pools(torch.float32)
    shared = DeltaKernelMeta.build(slots_tensor(TOKENS, DEVICE), TOKENS)
    y_shared = _layer(p, shared)

    def per_kind(kind):
        ids = [s if s >= 0 and kind in KINDS[s] else -1 for s in TOKENS]
        return DeltaKernelMeta.build(slots_tensor(ids, DEVICE), ids)

    pg = p["pages"]
    x_in = p["x"].clone()
    kernels.mul_rows(x_in, pg["l_in"], per_kind("ia3"))
    y = F.linear(x_in, p["w"], p["b0"])
    kernels.mul_rows(y, pg["l_out"], per_kind("ia3"))
    kernels.add_lora(y, p["x"], pg["lora"], per_kind("lora"))
    kernels.add_bias(y, pg["bias"], per_kind("bitfit"))
    kernels.add_bottleneck(y, y, pg["adapter"], per_kind("bottleneck"))
    assert_close(y, y_shared, **TOLERANCES[torch.float32], what="per-kind maps")
