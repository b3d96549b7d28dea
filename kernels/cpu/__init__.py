"""The CPU backend: every delta op in torch, tuned for the CPU serving path (D5), and decode's LoRA and
bottleneck adapters in a C loop where a compiler is at hand (the native plan below).

Same semantics as the Triton kernels (the public ops in ``kernels/__init__.py`` check the arguments
once and dispatch here); intermediates stay in fp32 like the kernels' (vLLM ``punica_cpu.py`` keeps an
fp32 shrink buffer for the same reason). It runs on any device, but on CUDA only as the fallback of a
machine without triton. Each op runs on ``threads.op_threads()`` intra-op threads (default 1; the
reason and the numbers are in ``threads.py``).

Seven execution plans, chosen per call from the step metadata (``plans.choose_plan``). Numbers: ratio
of the delta to the base matmul, q_proj 1024x1024, r=16, fp32, 1 thread, CPU time
(``benchmarks/bench_kernels.py``; a PEFT-style loop over the distinct deltas costs 1.4-1.5x at decode,
T=32 on 32 deltas, and 0.43x at prefill, T=2048 on 32 deltas, on an idle 2-core machine):

* runs: each maximal run of tokens sharing a slot is a contiguous row range, so two matmuls on
  views add into ``y`` with no gather or scatter (prefill, one run per sequence: ~0.1x at T=2048).
  Chosen first whenever runs average RUN_MIN_TOKENS tokens: one big group costs grouped_mm 0.19 ms
  against 0.05 ms for the plain mm (T=64, one slot).
* strided (``strided.py``; its blocks ``blocks.py``): ``torch.bmm`` straight on strided ``[cells, r, in]`` views
  of evenly spaced cells of one rank, each cell's tokens padded to the block's most (free cells inside a block are
  read and dropped), blocks cut by a cost model, x rows gathered once and scaled, nothing of A or B gathered. The
  default in fp32 without the native loops while no slot has more than ``STRIDED_MAX_SEG`` (8) tokens, i.e.
  decode: T=32 on 32 slots the
  seven Llama projections together ~0.25-0.3x of their base matmuls with the runs back to back, ~0.45x in
  fragmented rank-bucket regions, against ~0.45x / ~0.8x for the grouped plan (loaded 2-core machine).
* native (``looped.py``, the C loops ``csrc/rows.c`` built by ``native.py``): fp32 on the CPU, any step with a run
  shorter than ``looped.LONG_RUN`` (8) tokens: one C call per module streams each working slot's cell once (four
  rows' dots with the token, then those four B rows into y), straight from the pages (no gather, no padding, no
  free cell read); runs of 8 tokens or more in such a step (prefill chunks beside decode tokens) take two matmuls
  on their slices. 32 tokens on 32 slots of ranks 4-64, rows cold, one thread: 1024 -> 1024 0.31 ms against 0.79
  for the strided plan, 256 -> 256 0.14 against 0.67. The loop reads the slot tables itself and walks the step's
  segments (one list per token layout), so a call costs no host work per slot; a step it serves whole (every run
  shorter than 8 tokens) gets its ops bound once (``native_step.py``, ``kernels.step_ops``): each call then checks
  only its activations, and a module's (IA)3 / LoRA / DoRA / bias terms run as one call (``apply_terms``).
  Without a C compiler (or ``DELTASERVE_CPU_NATIVE=off``) the other plans serve.
* grouped (``grouped.py``): tokens sorted by cell against strided views of the pages with ``F.grouped_mm``,
  one shrink/expand pair per cluster of evenly spaced runs of one rank, nothing gathered. The default
  otherwise, where grouped_mm runs (CPU, fp32): many tokens per slot, unevenly (zipf popularity, 256 tokens on
  32 slots: 1.9 ms against 2.2 for the strided plan, whose cells would pad to the hot slots' counts).
* padded: each active slot's tokens padded to the longest segment; A/B rows gathered once per slot and
  two batched matmuls (64 tokens on 8 or 32 slots: ~0.2x / ~0.65x, vs ~0.25x / ~1.0x for a loop).
* segments: tokens gathered grouped by slot, one matmul pair per slot, scattered back (many tokens
  per slot, interleaved, uneven).
* gather: each token's A/B rows gathered into reused buffers, two batched matmuls; with mixed ranks,
  one gather per rank group so a rank-4 token does not pay rank 64 (D3). Decode (T=32, 32 slots)
  costs ~0.6-0.8x on one projection vs ~1.4x for the loop; the seven Llama projections together
  ~0.43x of their base matmuls.
Every plan reads a slot's weights only inside its own run of rows (``kernels/pages.py``): the gathered plans
clamp their row indices to the run and mask the copies past the slot's rank to zero, the others slice it
(rows outside every run may hold NaN). The strided plan also reads the rows of cells between a block's
members (free cells, idle slots' cells) and drops what it computed from them: they never reach ``y``.
"""
from __future__ import annotations

from .bottleneck import cpu_add_bottleneck
from .lora import cpu_add_lora
from .packed import cpu_shrink_lora
from .plans import PLANS, choose_plan, force_plan
from .rows import cpu_add_bias, cpu_mul_rows
from .scale_shift import cpu_scale_shift_rows
from . import native_step  # kernels.step_ops: a decode step's ops bound to its meta
from .threads import OP_THREADS_DEFAULT, op_threads, set_op_threads
from .token_rows import cpu_head_rows, cpu_replace_rows

__all__ = ["OP_THREADS_DEFAULT", "PLANS", "choose_plan", "cpu_add_bias", "cpu_add_bottleneck", "cpu_add_lora",
           "cpu_head_rows", "cpu_mul_rows", "cpu_replace_rows", "cpu_scale_shift_rows", "cpu_shrink_lora", "force_plan",
           "native_step", "op_threads",
           "set_op_threads"]
