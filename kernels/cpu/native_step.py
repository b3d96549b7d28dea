"""NativeStep: the ops of one decode step bound to its meta, for the CPU backend's native plan (``looped.py``).

Why: a decode step of the demo model with 32 deltas ran ~76 op calls, and each paid its way through the public op
(argument checks, the op-threads section, host values, the plan choice, the layout lookup) before one C call: 20-25
us a call with the caches warm and ~70 us inside a step (cold), ~4 ms of the step's ~8 ms of delta work. The step
decides once what every call would decide again: the plan (native: fp32 on the CPU, a run shorter than
``looped.LONG_RUN``, no forced plan, no autograd), the segments (``looped.split``) and the library; a step's prefill
chunks beside its decode tokens take the plan's matmuls on their row slices, the loop the rest. Each call then
checks only its activations (shape, dtype, device, last stride: attribute reads) and, the first time it sees a pages
object, that object in full through the public op's own checks (``kernels._checks``; the verdict is kept per pages
object, whose tensors never change). The loop reads the per-slot tables and checks every run before it writes.
Anything that does not fit (another width, dtype or layout; pages the loops cannot read) goes through the public op,
which checks it, says what is wrong or runs it on another plan: same results either way.
"""
from __future__ import annotations

import weakref

import torch

from .. import _checks
from ..meta import DeltaKernelMeta
from ..pages import AdapterPages, LoraPages, ModuleTerms, RowPages, ScaleShiftPages
from . import looped, native
from .bottleneck import ADAPTER_TENSORS, cpu_add_bottleneck
from .bottleneck import add_long_runs as add_long_bottleneck
from .lora import LORA_TENSORS, cpu_add_lora
from .lora import add_long_runs as add_long_lora
from .plans import plan_forced
from .rows import cpu_add_bias, cpu_mul_rows
from .scale_shift import cpu_scale_shift_rows

TERM_CODES = {"add_bias": 0, "mul_rows": 1, "add_lora": 2, "scale_shift_rows": 3}  # csrc/rows.c TERM_*


def native_step(meta: DeltaKernelMeta) -> "NativeStep | None":
    """The bound ops of ``meta``'s step, or None where the native plan does not serve it (no run shorter than
    ``LONG_RUN`` tokens: a prefill alone, whose siblings share their shrink; a forced plan, autograd on, no
    library): call the public ops then. A step with prefill chunks beside its decode tokens is bound too: the
    chunks take the native plan's matmuls on their row slices, as the public ops do there."""
    if plan_forced() or torch.is_grad_enabled() or meta.no_delta or meta.capacity:
        return None
    memo = meta.memo
    if "native_step" in memo:
        return memo["native_step"]
    step = None
    if native.available() and meta.token_slots.device.type == "cpu" and meta.shortest_run < looped.LONG_RUN:
        step = NativeStep(meta)
    memo["native_step"] = step
    return step


def _fits(t, rows: int, width: int) -> bool:
    return (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == rows and t.shape[1] == width
            and t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(1) == 1)


class NativeStep:
    __slots__ = ("_meta", "tokens", "segs", "long", "lib", "_each")

    def __init__(self, meta: DeltaKernelMeta):
        self._meta = weakref.ref(meta)  # the meta keeps this in its memo: no cycle
        self.tokens = meta.num_tokens
        sp = looped.split(meta)
        self.segs = sp.args  # (segments, their count, tokens): what every loop of the step walks
        self.long = bool(sp.long)  # prefill chunks beside the decode tokens: their matmuls, per op
        self.lib = native.library()
        self._each = {"add_lora": self.add_lora, "scale_shift_rows": self.scale_shift_rows,
                      "add_bias": self.add_bias, "mul_rows": self.mul_rows}

    @property
    def meta(self) -> DeltaKernelMeta:
        """The step's meta (alive while its layers call these ops)."""
        return self._meta()

    def _ready(self, op: str, pages, width: int, check, tensors: tuple[str, ...]) -> bool:
        """Whether ``pages`` passed the public op's checks for ``op`` at ``width`` and the loops can read it (run
        once per pages object and op; ``check`` raises on bad pages)."""
        hit = pages.memo.get("native_step")
        if hit is not None and hit[0] == op and hit[1] == width:
            return hit[2]
        check()
        ok = looped.usable(*(getattr(pages, n) for n in tensors))
        pages.memo["native_step"] = (op, width, ok)
        return ok

    def add_lora(self, y, x, pages: LoraPages) -> None:
        """``kernels.add_lora(y, x, pages, meta)``."""
        T = self.tokens
        if (type(pages) is not LoraPages or not _fits(y, T, pages.b_rows.shape[1])
                or not _fits(x, T, pages.a_rows.shape[1])
                or not self._ready("add_lora", pages, y.shape[1], lambda: _checks.check_lora(y, x, pages, self.meta),
                                   LORA_TENSORS)):
            _checks.check_lora(y, x, pages, self.meta)
            return cpu_add_lora(y, x, pages, self.meta)
        if pages.max_rank == 0:
            return
        if self.long:
            add_long_lora(y, x, pages, self.meta)
        looped.raise_failed(self.lib.ds_lora_f32(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0),
                                                 *looped.lora_args(pages), *self.segs), "add_lora", pages, self.meta)

    def add_bottleneck(self, y, u, pages: AdapterPages) -> None:
        """``kernels.add_bottleneck(y, u, pages, meta)``; ``u`` may be ``y``."""
        T = self.tokens
        h = y.shape[1] if isinstance(y, torch.Tensor) and y.dim() == 2 else -1
        if (type(pages) is not AdapterPages or not _fits(y, T, h) or not _fits(u, T, h)
                or not self._ready("add_bottleneck", pages, h,
                                   lambda: _checks.check_bottleneck(y, u, pages, self.meta), ADAPTER_TENSORS)):
            _checks.check_bottleneck(y, u, pages, self.meta)
            return cpu_add_bottleneck(y, u, pages, self.meta)
        if pages.max_width == 0:
            return
        if self.long:  # before the loop: u may be y, and each part reads its own tokens' rows only
            add_long_bottleneck(y, u, pages, self.meta)
        looped.native_bottleneck(y, u, pages, self.meta)

    def _rows(self, op: str, t, pages: RowPages, code: int) -> None:
        T = self.tokens
        if (type(pages) is not RowPages or not _fits(t, T, pages.rows.shape[1])
                or not self._ready(op, pages, t.shape[1],
                                   lambda: _checks.check_rows_op(op, "y" if code == 0 else "t", t, pages, self.meta),
                                   ("rows",))):
            _checks.check_rows_op(op, "y" if code == 0 else "t", t, pages, self.meta)
            return (cpu_add_bias if code == 0 else cpu_mul_rows)(t, pages, self.meta)
        if self.long:
            looped.rows_long(t, pages, self.meta, code)
        looped.raise_failed(self.lib.ds_rows_f32(t.data_ptr(), t.stride(0), *looped.rows_args(pages), *self.segs,
                                                 code), op, pages, self.meta)

    def add_bias(self, y, pages: RowPages) -> None:
        """``kernels.add_bias(y, pages, meta)``; tokens on ``pages.neutral`` are not touched."""
        self._rows("add_bias", y, pages, 0)

    def mul_rows(self, t, pages: RowPages) -> None:
        """``kernels.mul_rows(t, pages, meta)``; tokens on ``pages.neutral`` are not touched."""
        self._rows("mul_rows", t, pages, 1)

    def scale_shift_rows(self, y, pages: ScaleShiftPages) -> None:
        """``kernels.scale_shift_rows(y, pages, meta)``."""
        T = self.tokens
        if (type(pages) is not ScaleShiftPages or not _fits(y, T, pages.scale_rows.shape[1])
                or not self._ready("scale_shift_rows", pages, y.shape[1],
                                   lambda: _checks.check_scale_shift(y, pages, self.meta),
                                   ("scale_rows", "shift_rows"))):
            _checks.check_scale_shift(y, pages, self.meta)
            return cpu_scale_shift_rows(y, pages, self.meta)
        looped.native_affine(y, pages, self.meta)

    def apply_terms(self, y, x, terms: ModuleTerms) -> None:
        """Each of ``terms.ops`` on ``y`` in turn (``add_lora`` reading ``x``): one native call (``ds_terms_f32``)
        where every term's pages passed their op's checks and the loops read them, else the bound ops above one by
        one, which check and say what is wrong. The same results either way."""
        packed = terms.memo.get("native_step")
        if packed is None:
            packed = self._pack(y, x, terms)
            if packed is not None:  # None: these activations do not suit the loops (this call only)
                terms.memo["native_step"] = packed
        T = self.tokens
        if packed and _fits(y, T, packed[2]) and (packed[3] < 0 or _fits(x, T, packed[3])):
            if not self.lib.ds_terms_f32(y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), packed[1],
                                         packed[0].numel(), *self.segs):
                if self.long:  # the prefill chunks' tokens (disjoint from the loop's), each term in turn
                    self._long_terms(y, x, terms)
                return
            # a record refused before anything was written: the ops one by one name it
        each = self._each
        for op, pages in terms.ops:
            if op == "add_lora":
                each[op](y, x, pages)
            else:
                each[op](y, pages)

    def _long_terms(self, y, x, terms: ModuleTerms) -> None:
        meta = self.meta
        for op, pages in terms.ops:
            if op == "add_lora":
                add_long_lora(y, x, pages, meta)
            elif op == "scale_shift_rows":
                looped.affine_long(y, pages, meta)
            else:
                looped.rows_long(y, pages, meta, TERM_CODES[op])

    def _pack(self, y, x, terms: ModuleTerms):
        """(int64 records, their pointer, y's width, x's width or -1) for ``ds_terms_f32``; False where a term's
        pages do not suit the loops (kept), None where these activations do not; each pages object's checks run
        once (``_ready``)."""
        T, meta = self.tokens, self.meta
        if not (_fits(y, T, y.shape[1] if isinstance(y, torch.Tensor) and y.dim() == 2 else -1)
                and isinstance(x, torch.Tensor) and x.dim() == 2):
            return None
        out, width_in, recs = y.shape[1], -1, []
        for op, p in terms.ops:
            if op == "add_lora":
                if not _fits(x, T, p.a_rows.shape[1]):
                    return None
                if not (p.b_rows.shape[1] == out and self._ready(
                        op, p, out, lambda: _checks.check_lora(y, x, p, meta), LORA_TENSORS)):
                    return False
                width_in = x.shape[1]
                if p.max_rank:
                    recs += [TERM_CODES[op], *looped.lora_args(p)]
            elif op == "scale_shift_rows":
                if not (p.scale_rows.shape[1] == out and self._ready(
                        op, p, out, lambda: _checks.check_scale_shift(y, p, meta), ("scale_rows", "shift_rows"))):
                    return False
                recs += [TERM_CODES[op], *looped.affine_args(p)]
            else:
                name = "y" if op == "add_bias" else "t"
                if not (p.rows.shape[1] == out and self._ready(
                        op, p, out, lambda: _checks.check_rows_op(op, name, y, p, meta), ("rows",))):
                    return False
                recs += [TERM_CODES[op], *looped.rows_args(p)]
        t = torch.tensor(recs, dtype=torch.int64)
        return t, t.data_ptr(), out, width_in
