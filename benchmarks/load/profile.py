"""Where a server's CPU samples go: py-spy's collapsed stacks of one run, summed into the rooms of the request path.

    bench_serving.py --py-spy prof.txt ...   # records the server process (py-spy record --threads -f raw)
    python -m benchmarks.load.profile prof.txt

py-spy writes one line per distinct stack, ``thread (tid): name;frame;frame;... count``, each frame
``function (file.py:line)``. Samples are taken only while a thread runs on a CPU (no ``--idle``), so the
shares are shares of CPU time. Each sample of the forward thread goes to the first bucket of ``BUCKETS`` whose
frame it contains (deepest buckets first: a LoRA op inside a DeltaLinear counts as the op); each sample of
the event-loop thread to the handler it runs under. Stdlib only: it reads text.
"""
from __future__ import annotations

import collections
import re
import sys
from dataclasses import dataclass, field

FORWARD_THREAD = "deltaserve-forward"
# (bucket, frames that put a sample in it), most specific first
BUCKETS = (
    ("engine: batch.prepare (delta metadata)", ("DeltaBatch.prepare",)),
    ("engine: attention metadata (build_step)", ("build_step",)),
    ("engine: sampling", ("sample",)),
    ("delta op: add_lora", ("add_lora",)),
    ("delta op: bottleneck adapters", ("add_bottleneck",)),
    ("delta op: add_bias", ("add_bias",)),
    ("delta op: mul_rows ((IA)3)", ("mul_rows",)),
    ("delta op: scale_shift_rows (DoRA)", ("scale_shift_rows",)),
    ("delta op: token rows", ("replace_rows", "head_rows")),
    ("attention", ("paged_attention", "PagedCache.update")),
    ("base matmuls (nn.Linear)", ("Linear.forward",)),
    ("wrapper Python (DeltaLinear/DeltaNorm/adapters)", ("DeltaLinear.forward", "DeltaNorm.forward",
                                                         "AdapterPool.apply", "DeltaHead.forward",
                                                         "DeltaEmbedding.forward")),
)
LOOP_HANDLERS = (
    ("edge: Generate calls (auth, prepare, stream, pb)", ("InferenceServicer.Generate",)),
    ("edge: uploads and other RPCs", ("DeltasServicer.", "TenantsServicer.")),
    ("engine: schedule (installs, scheduler)", ("Engine._schedule",)),
    ("engine: emit (detokenize, deliver, stats)", ("Engine._emit",)),
    ("engine: other step-loop work", ("Engine._loop",)),
    ("event loop: select / callbacks", ("BaseEventLoop._run_once",)),
)
_FRAME = re.compile(r"^(.*?) \((.*?):\d+\)$")


@dataclass
class Profile:
    total: int = 0
    threads: collections.Counter = field(default_factory=collections.Counter)
    forward: collections.Counter = field(default_factory=collections.Counter)
    loop: collections.Counter = field(default_factory=collections.Counter)


def _names(frames: list[str]) -> list[str]:
    out = []
    for f in frames:
        m = _FRAME.match(f)
        out.append(m.group(1) if m else f)
    return out


def _bucket(names: list[str], table) -> str | None:
    for bucket, keys in table:
        if any(n == k or (k.endswith(".") and n.startswith(k)) for n in names for k in keys):
            return bucket
    return None


def read(lines) -> Profile:
    """Parse py-spy raw output (``--threads``: the first frame names the thread)."""
    p = Profile()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ?", "", thread).strip() or "?"
        p.total += n
        p.threads[re.sub(r"_\d+$", "", thread)] += n
        names = _names(frames)
        if thread.startswith(FORWARD_THREAD):
            p.forward[_bucket(names, BUCKETS) or "other (HF modules, norms, rotary, glue)"] += n
        elif thread == "MainThread" and "BaseEventLoop.run_forever" in names:
            p.loop[_bucket(names, LOOP_HANDLERS) or "event loop: other"] += n
    return p


def report(p: Profile) -> str:
    if not p.total:
        return "no samples"
    rows = [f"{p.total} samples; by thread:"]
    rows += [f"  {100 * n / p.total:5.1f}%  {t}" for t, n in p.threads.most_common(8)]
    fwd = sum(p.forward.values())
    if fwd:
        rows.append(f"forward thread ({fwd} samples), share of its samples:")
        rows += [f"  {100 * n / fwd:5.1f}%  {b}" for b, n in p.forward.most_common()]
    loop = sum(p.loop.values())
    if loop:
        rows.append(f"event loop ({loop} samples = {100 * loop / p.total:.1f}% of all), share of all samples:")
        rows += [f"  {100 * n / p.total:5.2f}%  {b}" for b, n in p.loop.most_common()]
    return "\n".join(rows)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.load.profile PY_SPY_RAW_FILE", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        print(report(read(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
