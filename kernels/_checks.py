"""Argument checks of the public ops (``kernels/__init__.py``), done once before either backend runs:
one ValueError naming the op, the argument, what was expected and the shape that came. Checks read
only shapes, dtypes, devices and strides, never values, so they cost no device sync.

A pages object's own checks (its tensors' shapes, dtypes, devices and strides against each other and against
the activations' width, dtype and device) run once per object: the layers build a pages object once and hand
the same one to every step until their storage moves (``server/deltas/linear.py``), so what each call checks
is only its activations and the step's meta. Measured before (rank-8 LoRA, 576 -> 576, one token, one
thread): the full ``check_lora`` was 28-70 us of a 39 us LoRA; 210 wrapped layers of a 30-layer model
paid it at every decode step.
"""
from __future__ import annotations

import weakref

import torch

from .meta import DeltaKernelMeta
from .pages import AdapterPages, LoraPages, PackedLoraPages, RowPages, ScaleShiftPages, TokenPages

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt(shape) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def expect(op: str, name: str, t, shape: tuple, dtype: torch.dtype | tuple, device: torch.device | None,
           *, contiguous: bool | str = True) -> tuple[int, ...]:
    """Check ``t`` against ``shape`` (None = any size), ``dtype`` (one or a tuple), ``device`` and layout.
    ``contiguous=False`` still needs unit stride on the last dimension (row-strided views are fine);
    ``"any"`` checks no layout (a column of a row arena, e.g. the adapters' down bias)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    got = tuple(t.shape)
    if len(got) != len(shape):
        raise ValueError(f"{op}: {name} has shape {list(got)}, expected {_fmt(shape)}")
    for e, g in zip(shape, got):
        if e is not None and e != g:
            raise ValueError(f"{op}: {name} has shape {list(got)}, expected {_fmt(shape)}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} (shape {list(got)}) has dtype {t.dtype}, expected "
                         f"{' or '.join(str(d) for d in dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} (shape {list(got)}) is on {t.device}, expected {device}")
    if contiguous == "any":
        return got
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} (shape {list(got)}, strides {list(t.stride())}) must be contiguous")
    if not contiguous and t.dim() and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} (shape {list(got)}, strides {list(t.stride())}) needs unit stride "
                         "on its last dimension")
    return got


def expect_meta(op: str, meta, num_tokens: int, device: torch.device) -> None:
    if not isinstance(meta, DeltaKernelMeta):
        raise ValueError(f"{op}: meta must be a DeltaKernelMeta, got {type(meta).__name__}")
    if meta.num_tokens != num_tokens:
        raise ValueError(f"{op}: meta is for {meta.num_tokens} tokens but the activations have {num_tokens} rows")
    if meta.token_slots.device != device:
        raise ValueError(f"{op}: meta.token_slots is on {meta.token_slots.device}, activations on {device}")


_PASSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # pages object -> the key it passed for


def _pages_once(pages, key: tuple, check) -> None:
    """Run ``check()`` (``pages``' own checks for ``key`` = op, dtype, device and the activations' width) unless
    this very object passed them for that key; a failing check raises and is asked again next call."""
    if _PASSED.get(pages) != key:
        check()
        _PASSED[pages] = key


def _rows(op, name, t, width, dtype, device):
    """A row tensor [N, width]: unit stride on the last dim, any row stride (column slices of a wider
    arena are fine); returns N."""
    n, w = expect(op, name, t, (None, width), dtype, device, contiguous=False)
    if n > 1 and t.stride(0) < w:
        raise ValueError(f"{op}: {name} (shape {list(t.shape)}, strides {list(t.stride())}) has overlapping rows")
    return n


def _bound(op, name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{op}: {name} must be a non-negative int (a host bound), got {value!r}")


def _passed(op: str, pages, cls, y, meta, other=None, width_of: str | None = None) -> bool:
    """The common case, asked before the full checks: ``pages`` (a ``cls``) already passed its own checks for y's
    dtype, device and width, and y, meta and the op's other activation (x of add_lora, as wide as the pages'
    ``width_of`` rows; u of add_bottleneck, as wide as y) agree in a few attribute reads. The full checks (10 us a call at T = 1 on this
    machine) run otherwise and say what is wrong."""
    if type(pages) is not cls or type(meta) is not DeltaKernelMeta or not isinstance(y, torch.Tensor) or y.dim() != 2:
        return False
    if _PASSED.get(pages) != (op, y.dtype, y.device, y.shape[1]):
        return False
    if not (y.shape[0] == meta.num_tokens and y.stride(1) == 1 and y.device == meta.token_slots.device):
        return False
    if other is None:
        return True
    width = y.shape[1] if width_of is None else getattr(pages, width_of).shape[1]
    return (isinstance(other, torch.Tensor) and other.dim() == 2 and other.dtype == y.dtype
            and other.shape[0] == y.shape[0] and other.shape[1] == width and other.stride(1) == 1
            and other.device == y.device)


def check_lora(y, x, pages, meta, op: str = "add_lora") -> None:
    if _passed(op, pages, LoraPages, y, meta, x, "a_rows"):
        return
    if not isinstance(pages, LoraPages):
        raise ValueError(f"{op}: pages must be a kernels.LoraPages, got {type(pages).__name__}")
    t_, n_out = expect(op, "y", y, (None, None), FLOAT_DTYPES, None, contiguous=False)
    dev, dt = y.device, y.dtype

    def own():
        n_rows = _rows(op, "pages.a_rows", pages.a_rows, None, dt, dev)
        expect(op, "pages.b_rows", pages.b_rows, (n_rows, n_out), dt, dev, contiguous=False)
        _rows(op, "pages.b_rows", pages.b_rows, n_out, dt, dev)
        s_, = expect(op, "pages.rank", pages.rank, (None,), torch.int32, dev)
        expect(op, "pages.start", pages.start, (s_,), torch.int32, dev)
        expect(op, "pages.scale", pages.scale, (s_,), torch.float32, dev)
        _bound(op, "pages.max_rank", pages.max_rank)

    _pages_once(pages, (op, dt, dev, n_out), own)
    expect(op, "x", x, (t_, pages.a_rows.shape[1]), dt, dev, contiguous=False)
    expect_meta(op, meta, t_, dev)


def check_lora_packed(x, pages, meta, op: str = "shrink_lora") -> None:
    """``kernels.shrink_lora``: the packed pages' own checks once per object (every member a LoraPages on the same
    A rows, its tables as long as the stacks'), then the activations and the meta."""
    if not isinstance(pages, PackedLoraPages):
        raise ValueError(f"{op}: pages must be a kernels.PackedLoraPages, got {type(pages).__name__}")
    t_, _ = expect(op, "x", x, (None, None), FLOAT_DTYPES, None, contiguous=False)
    dev, dt = x.device, x.dtype

    def own():
        _rows(op, "pages.a_rows", pages.a_rows, None, dt, dev)
        s_, = expect(op, "pages.rank", pages.rank, (None,), torch.int32, dev)
        expect(op, "pages.start", pages.start, (s_,), torch.int32, dev)
        _bound(op, "pages.max_rank", pages.max_rank)
        if not isinstance(pages.members, tuple) or not pages.members:
            raise ValueError(f"{op}: pages.members must be a non-empty tuple of kernels.LoraPages")
        for m, mp in enumerate(pages.members):
            name = f"pages.members[{m}]"
            if not isinstance(mp, LoraPages):
                raise ValueError(f"{op}: {name} must be a kernels.LoraPages, got {type(mp).__name__}")
            a = mp.a_rows
            if (tuple(a.shape) != tuple(pages.a_rows.shape) or a.data_ptr() != pages.a_rows.data_ptr()
                    or a.stride() != pages.a_rows.stride()):
                raise ValueError(f"{op}: {name}.a_rows (shape {list(a.shape)}) must be pages.a_rows "
                                 f"(shape {list(pages.a_rows.shape)}): a member's rows live in the stacks")
            n_rows = a.shape[0]
            expect(op, f"{name}.b_rows", mp.b_rows, (n_rows, None), dt, dev, contiguous=False)
            _rows(op, f"{name}.b_rows", mp.b_rows, mp.b_rows.shape[1], dt, dev)
            for field, dtype in (("rank", torch.int32), ("start", torch.int32), ("scale", torch.float32)):
                expect(op, f"{name}.{field}", getattr(mp, field), (s_,), dtype, dev)
            _bound(op, f"{name}.max_rank", mp.max_rank)

    _pages_once(pages, (op, dt, dev), own)
    expect(op, "x", x, (t_, pages.a_rows.shape[1]), dt, dev, contiguous=False)
    expect_meta(op, meta, t_, dev)


def check_lora_expand(y, pages, meta, member, op: str = "shrink_lora(...).add_to") -> None:
    """``LoraShrink.add_to``: the member exists and ``y`` is its output for the shrink's tokens."""
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < len(pages.members):
        raise ValueError(f"{op}: member must be an int in [0, {len(pages.members)}), got {member!r}")
    mp = pages.members[member]
    expect(op, "y", y, (meta.num_tokens, mp.b_rows.shape[1]), mp.b_rows.dtype, mp.b_rows.device, contiguous=False)


def check_bottleneck(y, u, pages, meta, op: str = "add_bottleneck") -> None:
    if _passed(op, pages, AdapterPages, y, meta, u):
        return
    if not isinstance(pages, AdapterPages):
        raise ValueError(f"{op}: pages must be a kernels.AdapterPages, got {type(pages).__name__}")
    t_, h_ = expect(op, "y", y, (None, None), FLOAT_DTYPES, None, contiguous=False)
    dev, dt = y.device, y.dtype
    expect(op, "u", u, (t_, h_), dt, dev, contiguous=False)

    def own():
        n_rows = _rows(op, "pages.down_rows", pages.down_rows, h_, dt, dev)
        expect(op, "pages.up_rows", pages.up_rows, (n_rows, h_), dt, dev, contiguous=False)
        _rows(op, "pages.up_rows", pages.up_rows, h_, dt, dev)
        expect(op, "pages.down_bias", pages.down_bias, (n_rows,), dt, dev, contiguous="any")
        _rows(op, "pages.up_bias_rows", pages.up_bias_rows, h_, dt, dev)
        s_, = expect(op, "pages.width", pages.width, (None,), torch.int32, dev)
        for name in ("start", "up_bias_row", "act"):
            expect(op, f"pages.{name}", getattr(pages, name), (s_,), torch.int32, dev)
        expect(op, "pages.scale", pages.scale, (s_,), torch.float32, dev)
        _bound(op, "pages.max_width", pages.max_width)

    _pages_once(pages, (op, dt, dev, h_), own)
    expect_meta(op, meta, t_, dev)


def check_rows_op(op: str, tname: str, t, pages, meta) -> None:
    if _passed(op, pages, RowPages, t, meta):
        return
    if not isinstance(pages, RowPages):
        raise ValueError(f"{op}: pages must be a kernels.RowPages, got {type(pages).__name__}")
    t_, n_ = expect(op, tname, t, (None, None), FLOAT_DTYPES, None, contiguous=False)

    def own():
        _rows(op, "pages.rows", pages.rows, n_, t.dtype, t.device)
        expect(op, "pages.row", pages.row, (None,), torch.int32, t.device)
        nv = pages.neutral
        if isinstance(nv, bool) or not isinstance(nv, int) or not -1 <= nv < pages.rows.shape[0]:
            raise ValueError(f"{op}: pages.neutral must be -1 or a row of pages.rows (0..{pages.rows.shape[0] - 1}), "
                             f"got {nv!r}")

    _pages_once(pages, (op, t.dtype, t.device, n_), own)
    expect_meta(op, meta, t_, t.device)


def check_scale_shift(y, pages, meta, op: str = "scale_shift_rows") -> None:
    if not isinstance(pages, ScaleShiftPages):
        raise ValueError(f"{op}: pages must be a kernels.ScaleShiftPages, got {type(pages).__name__}")
    t_, n_ = expect(op, "y", y, (None, None), FLOAT_DTYPES, None, contiguous=False)

    def own():
        n_rows = _rows(op, "pages.scale_rows", pages.scale_rows, n_, torch.float32, y.device)
        expect(op, "pages.shift_rows", pages.shift_rows, (n_rows, n_), torch.float32, y.device, contiguous=False)
        _rows(op, "pages.shift_rows", pages.shift_rows, n_, torch.float32, y.device)
        s_, = expect(op, "pages.flag", pages.flag, (None,), torch.int32, y.device)
        expect(op, "pages.row", pages.row, (s_,), torch.int32, y.device)

    _pages_once(pages, (op, y.dtype, y.device, n_), own)
    expect_meta(op, meta, t_, y.device)


def _token_pages(op, pages, h_, dtype, device) -> None:
    if not isinstance(pages, TokenPages):
        raise ValueError(f"{op}: pages must be a kernels.TokenPages, got {type(pages).__name__}")
    _rows(op, "pages.values", pages.values, h_, dtype, device)
    expect(op, "pages.ids", pages.ids, (None,), torch.int64, device, contiguous="any")
    s_, = expect(op, "pages.count", pages.count, (None,), torch.int32, device)
    for name in ("start", "id_start"):
        expect(op, f"pages.{name}", getattr(pages, name), (s_,), torch.int32, device)
    _bound(op, "pages.max_count", pages.max_count)


def check_replace_rows(y, ids, pages, meta, op: str = "replace_rows") -> None:
    t_, h_ = expect(op, "y", y, (None, None), FLOAT_DTYPES, None)
    expect(op, "ids", ids, (t_,), torch.int64, y.device)
    _token_pages(op, pages, h_, y.dtype, y.device)
    expect_meta(op, meta, t_, y.device)


def check_head_rows(logits, h, pages, meta, op: str = "head_rows") -> None:
    t_, _ = expect(op, "logits", logits, (None, None), FLOAT_DTYPES, None, contiguous=False)
    _, h_ = expect(op, "h", h, (t_, None), FLOAT_DTYPES, logits.device, contiguous=False)
    _token_pages(op, pages, h_, h.dtype, logits.device)
    expect_meta(op, meta, t_, logits.device)
