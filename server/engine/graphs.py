"""DecodeGraphs: pure decode steps replayed from CUDA graphs captured per bucket (``ServerConfig.cuda_graphs``).

A decode step of B sequences launches, per layer, the base matmuls, the paged attention and every delta op of
every wrapped module: hundreds of small launches whose CPU cost, not their bytes, bounds a small batch
(docs/PROFILE.md §2, §5). vLLM captures its decode step once per batch-size bucket and replays it; this does
the same with deltas in the batch (vLLM's LoRA path: max_loras + 1 programs exiting on slot -1):

* **Buckets.** A step of B decode tokens whose longest sequence reads L keys runs in the graph of
  ``(batch bucket >= B, key bucket >= L)``: batch buckets 1, 2, 4, 8, then multiples of 8 up to
  ``max_running``; key buckets powers of two from 64 up to the KV cache's rows. Graphs are captured on first
  use (warmup on a side stream, then capture into one shared memory pool) and kept.
* **Fixed buffers, refilled in place.** Per graph: ``input_ids``/``position_ids`` [1, Bb], the rows kept for the
  head (all of them) and the attention metadata (:class:`StaticStep`: write rows [Bb], read rows [Bb * Lb],
  key lengths [Bb]); the delta metadata are the DeltaBatch's own buffers (``prepare_static``: slot ids padded with
  -1, a capacity meta whose launches read their counts on the device). Padding rows of the bucket write and
  read one reserved KV block (``scratch``), so no sequence's cache is touched.
* **A fixed op sequence.** In graph mode each wrapped layer runs every term kind it holds over all tokens
  (``DeltaLinear.forward_static``): what launches depends on the layers' plan (``DeltaModel.static_plan``: kinds,
  bounds, storage versions), never on the step's slots. When the plan changes (a layer gains or loses a kind, a
  bound grows, an arena relayouts) every graph is dropped and recaptured on next use.
* **Eager otherwise.** Prefill or mixed steps, steps past the largest bucket and prompt-prefix work run the eager
  path unchanged. A capture that fails turns graphs off for the process with one warning; the step then runs
  eagerly.

``capture=False`` runs the same fixed-buffer, fixed-op path without capturing (the CPU tests check it against the
eager path; it is how the graph-mode op sequence is validated where no GPU is).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .attention import PagedStep

log = logging.getLogger("deltaserve.engine")

MIN_KEY_BUCKET = 64


def batch_buckets(max_running: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... (multiples of 8) up to and including ``max_running``."""
    out = [b for b in (1, 2, 4) if b < max_running]
    b = 8
    while b < max_running:
        out.append(b)
        b += 8
    out.append(max_running)
    return out


def key_bucket(length: int, max_rows: int) -> int | None:
    """The smallest power of two >= ``length`` (at least 64, at most ``max_rows``); None past ``max_rows``."""
    if length > max_rows:
        return None
    b = MIN_KEY_BUCKET
    while b < length:
        b *= 2
    return min(b, max_rows)


class StaticStep:
    """The attention metadata of one (batch bucket, key bucket), in fixed device buffers refilled per step."""

    def __init__(self, batch: int, keys: int, scratch_row: int, block_size: int, device):
        self.batch, self.keys, self.scratch_row, self.block_size = batch, keys, scratch_row, block_size
        self.host = torch.empty(batch * (2 + keys), dtype=torch.long)  # [write | lens | read] staged on the host
        self.device_buf = torch.zeros(batch * (2 + keys), dtype=torch.long, device=device)
        b = batch
        self.step = PagedStep(write_rows=self.device_buf[:b], read_rows=self.device_buf[2 * b:],
                              num_decode=b, decode_len=keys, decode_lens=self.device_buf[b:2 * b])

    def fill(self, block_tables: list[list[int]], starts: list[int]) -> None:
        """Rows of the step's decode tokens (``attention.build_step``'s, padded to the buckets); the bucket's
        padding rows write and read the scratch row, with key length 1."""
        n, b, lk, bs = len(starts), self.batch, self.keys, self.block_size
        h = self.host
        pos = torch.tensor(starts, dtype=torch.long)  # [n]
        nb = (lk + bs - 1) // bs
        scratch_block = self.scratch_row // bs
        table = torch.tensor([bt[:nb] + [scratch_block] * (nb - len(bt[:nb])) for bt in block_tables],
                             dtype=torch.long)  # [n, nb]
        rows = (table[:, :, None] * bs + torch.arange(bs)).reshape(n, nb * bs)[:, :lk]  # [n, Lb]
        h[:n] = rows.gather(1, pos[:, None]).squeeze(1)
        h[n:b] = self.scratch_row
        h[b:b + n] = pos + 1
        h[b + n:2 * b] = 1
        read = h[2 * b:].view(b, lk)
        read[:n] = rows.gather(1, torch.minimum(torch.arange(lk)[None, :], pos[:, None]))  # clamp to own last row
        read[n:] = self.scratch_row
        self.device_buf.copy_(h)


@dataclass(eq=False)
class _Graph:
    graph: "torch.cuda.CUDAGraph | None"
    attn: StaticStep
    input_ids: torch.Tensor  # [1, Bb]
    position_ids: torch.Tensor  # [1, Bb]
    keep: torch.Tensor  # [Bb] rows kept for the head: all of them
    logits: torch.Tensor | None = None  # [1, Bb, vocab]: the captured output (the graph rewrites it per replay)


class DecodeGraphs:
    def __init__(self, runner, *, capture: bool = True):
        self.runner = runner
        self.capture = capture
        self.buckets = batch_buckets(runner.config.max_running)
        kv = runner.kv
        self.scratch_block = kv.allocator.allocate(1)[0]  # the padding rows' K/V; never any sequence's
        self.scratch_row = self.scratch_block * kv.block_size
        kv.k[:, self.scratch_row:self.scratch_row + kv.block_size] = 0  # finite before the first write
        kv.v[:, self.scratch_row:self.scratch_row + kv.block_size] = 0
        self.max_keys = kv.num_blocks * kv.block_size
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._plan = None
        self.disabled = False
        self.replays = self.captures = self.plans = 0  # counters for tests and benchmarks

    def fits(self, step) -> bool:
        """A pure decode step (every chunk one token) that fits the largest buckets."""
        if self.disabled or not step.lengths or any(n != 1 for n in step.lengths):
            return False
        n = len(step.lengths)
        if n > self.buckets[-1] or step.prompt_jobs or step.block_copies or step.sample_at != list(range(n)):
            return False
        return key_bucket(max(step.starts) + 1, self.max_keys) is not None

    def run(self, step) -> torch.Tensor | None:
        """The step's logits [B, vocab] from its bucket's graph (captured now if new); None if capture failed
        (graphs are then off and the caller runs the step eagerly)."""
        n = len(step.lengths)
        bb = next(b for b in self.buckets if b >= n)
        lb = key_bucket(max(step.starts) + 1, self.max_keys)
        dm = self.runner.dm
        plan = (dm.static_plan(), dm.batch.addresses) if dm is not None else ()
        if plan != self._plan:  # a layer's op sequence or an address changed: every graph is stale
            self.graphs.clear()
            self._plan = plan
            self.plans += 1
        g = self.graphs.get((bb, lb))
        fresh = g is None
        if fresh:
            g = self._buffers(bb, lb)
        self._fill(g, step, bb)
        if not self.capture:
            g.logits = self._forward(g)
        elif fresh:
            try:
                self._capture(g)
            except Exception:  # noqa: BLE001 - a capture failure must not fail the request: run eagerly
                log.warning("cuda graph capture failed; decode steps run eagerly from now on", exc_info=True)
                self.disabled = True
                self.graphs.clear()
                return None
            self.graphs[(bb, lb)] = g
            g.graph.replay()
        else:
            g.graph.replay()
        self.replays += 1
        return g.logits[0, :n]

    # ---- internals -----------------------------------------------------------------------------
    def _buffers(self, bb: int, lb: int) -> _Graph:
        dev = self.runner.device
        attn = StaticStep(bb, lb, self.scratch_row, self.runner.kv.block_size, dev)
        return _Graph(None, attn, torch.zeros((1, bb), dtype=torch.long, device=dev),
                      torch.zeros((1, bb), dtype=torch.long, device=dev), torch.arange(bb, device=dev))

    def _fill(self, g: _Graph, step, bb: int) -> None:
        n = len(step.lengths)
        pad = [0] * (bb - n)
        host = torch.tensor([step.token_ids + pad, step.positions + pad], dtype=torch.long)  # [2, Bb]
        g.input_ids.copy_(host[0:1])
        g.position_ids.copy_(host[1:2])
        g.attn.fill(step.block_tables, step.starts)
        g.attn.step._masks.clear()  # masks are derived from the refilled key lengths (inside a captured graph)
        dm = self.runner.dm
        if dm is not None:
            dm.batch.prepare_static([dm.layer_slot(s) if s >= 0 else -1 for s in step.slots], bb)

    def _forward(self, g: _Graph) -> torch.Tensor:
        runner = self.runner
        runner.cache.set_step(g.attn.step)
        try:
            out = runner.model(input_ids=g.input_ids, position_ids=g.position_ids, cache=runner.cache, use_cache=True,
                               logits_to_keep=g.keep, paged_step=g.attn.step)
        finally:
            runner.cache.set_step(None)
        return out.logits  # [1, Bb, vocab]

    def _capture(self, g: _Graph) -> None:
        """Warm up on a side stream (Triton autotuning and compilation happen here, not under capture), then
        capture one forward into the shared pool. The warmup forwards compute this very step (same buffers),
        so their cache writes are the ones the replay makes again."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(g)
        torch.cuda.current_stream().wait_stream(side)
        g.attn.step._masks.clear()  # built inside the graph, so each replay recomputes them from the buffers
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            g.logits = self._forward(g)
        g.graph = graph
        self.captures += 1
