"""Argument checks of the public ops (``kernels/__init__.py``), done once before either backend runs:
one ValueError naming the op, the argument, what was expected and the shape that came. Checks read
only shapes, dtypes, devices and strides, never values, so they cost no device sync (about 1 us each,
28 wrapped layers per step)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def expect(op: str, name: str, t, shape: tuple, dtype: torch.dtype | tuple, device: torch.device | None,
           *, contiguous: bool | str = True) -> tuple[int, ...]:
    """Check ``t`` against ``shape`` (None = any size), ``dtype`` (one or a tuple), ``device`` and layout.
    ``contiguous=False`` still needs unit stride on the last dimension (row-strided views are fine);
    ``"or_transposed"`` also accepts a ``transpose(1, 2)`` view of a contiguous pool (up-projection pools
    stored [S, R, out] make the CPU decode gather contiguous: see ``cpu.gather.up_rows``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    got = tuple(t.shape)
    if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
        raise ValueError(f"{op}: {name} has shape {list(got)}, expected {_fmt(shape)}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} (shape {list(got)}) has dtype {t.dtype}, expected "
                         f"{' or '.join(str(d) for d in dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} (shape {list(got)}) is on {t.device}, expected {device}")
    if contiguous == "or_transposed":
        if not (t.is_contiguous() or t.transpose(-1, -2).is_contiguous()):
            raise ValueError(f"{op}: {name} (shape {list(got)}, strides {list(t.stride())}) must be contiguous, "
                             "or a transpose(1, 2) view of a contiguous tensor")
    elif contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} (shape {list(got)}, strides {list(t.stride())}) must be contiguous")
    if not contiguous and t.dim() and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} (shape {list(got)}, strides {list(t.stride())}) needs unit stride "
                         "on its last dimension")
    return got


def expect_meta(op: str, meta, num_tokens: int, device: torch.device) -> None:
    from .meta import DeltaKernelMeta

    if not isinstance(meta, DeltaKernelMeta):
        raise ValueError(f"{op}: meta must be a DeltaKernelMeta, got {type(meta).__name__}")
    if meta.num_tokens != num_tokens:
        raise ValueError(f"{op}: meta is for {meta.num_tokens} tokens but the activations have {num_tokens} rows")
    if meta.token_slots.device != device:
        raise ValueError(f"{op}: meta.token_slots is on {meta.token_slots.device}, activations on {device}")


def check_lora(y, x, lora_a, lora_b, scale, rank, meta, op: str = "add_lora") -> None:
    t_, n_out = expect(op, "y", y, (None, None), FLOAT_DTYPES, None, contiguous=False)
    dev, dt = y.device, y.dtype
    s_, r_, n_in = expect(op, "lora_a", lora_a, (None, None, None), dt, dev)
    expect(op, "x", x, (t_, n_in), dt, dev, contiguous=False)
    expect(op, "lora_b", lora_b, (s_, n_out, r_), dt, dev, contiguous="or_transposed")
    expect(op, "scale", scale, (s_,), torch.float32, dev)
    expect(op, "rank", rank, (s_,), torch.int32, dev)
    expect_meta(op, meta, t_, dev)


def check_bottleneck(y, u, down, down_bias, up, up_bias, scale, width, act, meta, op: str = "add_bottleneck") -> None:
    t_, h_ = expect(op, "y", y, (None, None), FLOAT_DTYPES, None, contiguous=False)
    dev, dt = y.device, y.dtype
    expect(op, "u", u, (t_, h_), dt, dev, contiguous=False)
    s_, m_, _ = expect(op, "down", down, (None, None, h_), dt, dev)
    expect(op, "down_bias", down_bias, (s_, m_), dt, dev)
    expect(op, "up", up, (s_, h_, m_), dt, dev, contiguous="or_transposed")
    expect(op, "up_bias", up_bias, (s_, h_), dt, dev)
    expect(op, "scale", scale, (s_,), torch.float32, dev)
    expect(op, "width", width, (s_,), torch.int32, dev)
    expect(op, "act", act, (s_,), torch.int32, dev)
    expect_meta(op, meta, t_, dev)


def check_rows_op(op: str, tname: str, t, pname: str, pool, meta) -> None:
    t_, n_ = expect(op, tname, t, (None, None), FLOAT_DTYPES, None, contiguous=False)
    expect(op, pname, pool, (None, n_), t.dtype, t.device)
    expect_meta(op, meta, t_, t.device)


def check_scale_shift(y, scale, shift, flag, meta, op: str = "scale_shift_rows") -> None:
    t_, n_ = expect(op, "y", y, (None, None), FLOAT_DTYPES, None, contiguous=False)
    s_, _ = expect(op, "scale", scale, (None, n_), torch.float32, y.device)
    expect(op, "shift", shift, (s_, n_), torch.float32, y.device)
    expect(op, "flag", flag, (s_,), torch.int32, y.device)
    expect_meta(op, meta, t_, y.device)


def check_replace_rows(y, ids, index, values, count, meta, op: str = "replace_rows") -> None:
    t_, h_ = expect(op, "y", y, (None, None), FLOAT_DTYPES, None)
    expect(op, "ids", ids, (t_,), torch.int64, y.device)
    s_, r_ = expect(op, "index", index, (None, None), torch.int64, y.device)
    expect(op, "values", values, (s_, r_, h_), y.dtype, y.device)
    expect(op, "count", count, (s_,), torch.int32, y.device)
    expect_meta(op, meta, t_, y.device)


def check_head_rows(logits, h, index, values, count, meta, op: str = "head_rows") -> None:
    t_, _ = expect(op, "logits", logits, (None, None), FLOAT_DTYPES, None, contiguous=False)
    _, h_ = expect(op, "h", h, (t_, None), FLOAT_DTYPES, logits.device, contiguous=False)
    s_, r_ = expect(op, "index", index, (None, None), torch.int64, logits.device)
    expect(op, "values", values, (s_, r_, h_), h.dtype, logits.device)
    expect(op, "count", count, (s_,), torch.int32, logits.device)
    expect_meta(op, meta, t_, logits.device)
