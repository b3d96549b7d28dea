"""Plots of the serving benchmark, drawn from its JSONL results (matplotlib, Agg, PNG).

    python benchmarks/plot.py                          # last run of the newest bench_serving-*.jsonl
    python benchmarks/plot.py results.jsonl [--run RUN_ID] [--out-dir DIR]

Two figures per run, next to the JSONL file (<label> = quick|full-<model shape>, e.g. quick-demo):
  bench_serving-throughput-<label>-<date>.png  output tokens/s against the number of distinct deltas under
      uniform popularity, with the base model alone (median of the bracketing base phases, band =
      min-max); right panel: the ratio to the base (wall clock and per server CPU-second) and, when
      ``bench_engine-*.jsonl`` has them, the in-process engine's and PEFT's mixed batch's ratios;
  bench_serving-latency-<label>-<date>.png     CDFs of TTFT and TPOT per latency phase (base, uniform, zipf,
      one hot tenant), and TTFT of warm against cold-delta requests.
The machine (CPU or GPU, cores, torch) is written under each title.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def read_rows(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
    return rows


def _machine_line(row: dict) -> str:
    m = row.get("machine", {})
    dev = m.get("gpu") or m.get("cpu", "?")
    return (f"{dev}, {m.get('cpu_count', '?')} cores, torch {m.get('torch', '?')}, "
            f"run {row.get('run', '?')}, {'quick' if row.get('settings', {}).get('quick') else 'full'} grid")


def engine_baselines(results_dir: Path) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, [(num_deltas, ratio to base)]) from the newest ``bench_engine-*.jsonl`` run, if any.

    bench_engine measures in-process (no gRPC) on its own model, so only its ratios are comparable:
    the engine's ``lora_N`` variants against its base, and PEFT's mixed batch of 32 adapters
    (``peft_mixed_32``, ``ratio_to_engine_base``) against the same engine base."""
    files = sorted(results_dir.glob("bench_engine-*.jsonl"))
    rows = read_rows(files[-1]) if files else []
    if not rows:
        return []
    last = rows[-1].get("run")
    engine, peft = [], []
    for r in rows:
        if r.get("run") != last or r.get("workload") != "uniform":
            continue
        v = str(r.get("variant", ""))
        if v.startswith("lora_") and v[5:].isdigit() and isinstance(r.get("ratio_to_base"), (int, float)):
            engine.append((int(v[5:]), float(r["ratio_to_base"])))
        elif v.startswith("peft_mixed_") and v[11:].isdigit() and isinstance(r.get("ratio_to_engine_base"), (int, float)):
            peft.append((int(v[11:]), float(r["ratio_to_engine_base"])))
    out = []
    if engine:
        out.append(("engine in-process, no gRPC (bench_engine)", sorted(engine)))
    if peft:
        out.append(("PEFT mixed batch, adapter_names (bench_engine)", sorted(peft)))
    return out


def plot_throughput(rows: list[dict], out: Path, results_dir: Path) -> Path | None:
    import statistics

    import matplotlib.pyplot as plt

    points = sorted((r for r in rows if r.get("group") == "ratio"), key=lambda r: r["num_deltas"])
    bases = [r["tok_per_s"] for r in rows if r.get("group") == "throughput" and r.get("num_deltas") == 0]
    if not points or not bases:
        return None
    base = statistics.median(bases)
    xs = [p["num_deltas"] for p in points]
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot(xs, [p["tok_per_s"] for p in points], "o-", color="C0", label="deltaserve, uniform popularity (median)")
    ax.axhline(base, color="k", ls="--", lw=1, label=f"base model alone (median of {len(bases)})")
    ax.axhspan(min(bases), max(bases), color="k", alpha=0.08, label="base model alone, min-max")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct deltas in the load")
    ax.set_ylabel("output tokens / s (saturated)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for key, many, color, label in (("throughput_ratio_vs_base", "ratios", "C0", "tokens/s, wall clock"),
                                    ("cpu_ratio_vs_base", "cpu_ratios", "C1", "tokens per server CPU-second")):
        ys = [p[key] for p in points]
        lo = [y - min(p[many]) for y, p in zip(ys, points)]
        hi = [max(p[many]) - y for y, p in zip(ys, points)]
        axr.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=color, capsize=3, label=label)
    for i, (label, pts) in enumerate(engine_baselines(results_dir)):
        px, py = zip(*pts)
        axr.plot(px, py, "s:", color=f"C{i + 2}", label=label)
    axr.axhline(1.0, color="k", ls="--", lw=1)
    axr.axhline(0.8, color="C3", ls=":", lw=1, label="target 0.80")
    axr.set_xscale("log", base=2)
    axr.set_xlabel("distinct deltas in the load")
    axr.set_ylabel("ratio to the base model alone (median, min-max)")
    axr.set_ylim(0, 1.3)
    axr.legend(fontsize=7)
    axr.grid(alpha=0.3)
    fig.suptitle("Serving throughput vs number of distinct deltas (saturating open-loop load)\n"
                 + _machine_line(rows[0]), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _cdf(ax, values: list[float], label: str, **kw) -> None:
    if not values:
        return
    xs = sorted(values)
    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{label} (n={len(xs)})", **kw)


def plot_latency(rows: list[dict], out: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lat = [r for r in rows if r.get("group") == "latency" and r.get("samples")]
    if not lat:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, r in enumerate(lat):
        _cdf(axes[0], r["samples"]["ttft_ms"], r["phase"], color=f"C{i}")
        _cdf(axes[1], [v for v in r["samples"]["tpot_ms"] if v is not None], r["phase"], color=f"C{i}")
    warm, cold = [], []
    for r in lat:
        if r.get("num_deltas", 0) > 0:
            for v, c in zip(r["samples"]["ttft_ms"], r["samples"]["cold"]):
                (cold if c else warm).append(v)
    _cdf(axes[2], warm, "warm deltas", color="C0")
    _cdf(axes[2], cold, "cold deltas (first use)", color="C3")
    for ax, what in zip(axes, ("TTFT (ms)", "TPOT (ms)", "TTFT (ms), delta phases")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 10 20 50 100 ...: plain labels
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(what)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    rate = lat[0].get("rate")
    fig.suptitle(f"Latency CDFs at {rate:.2f} req/s open-loop Poisson\n" + _machine_line(lat[0]), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(jsonl: str | Path, run: str | None = None, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of one run (default: the last in the file); returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    jsonl = Path(jsonl)
    rows = read_rows(jsonl)
    if not rows:
        raise ValueError(f"{jsonl}: no result rows")
    run = run or rows[-1]["run"]
    rows = [r for r in rows if r.get("run") == run]
    if not rows:
        raise ValueError(f"{jsonl}: no rows of run {run!r}")
    out_dir = Path(out_dir or jsonl.parent)
    date = "-".join(jsonl.stem.rsplit("-", 3)[-3:])  # bench_serving-YYYY-MM-DD
    label = rows[0].get("settings", {}).get("label")  # e.g. quick-demo, full-cpu: one figure per kind of run
    stem = f"{label}-{date}" if label else date
    made = [plot_throughput(rows, out_dir / f"bench_serving-throughput-{stem}.png", jsonl.parent),
            plot_latency(rows, out_dir / f"bench_serving-latency-{stem}.png")]
    return [p for p in made if p is not None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Plot bench_serving JSONL results.")
    p.add_argument("jsonl", nargs="?", help="results file (default: newest benchmarks/results/bench_serving-*.jsonl)")
    p.add_argument("--run", help="run id (default: the file's last run)")
    p.add_argument("--out-dir", help="where the PNGs go (default: next to the JSONL)")
    args = p.parse_args(argv)
    path = args.jsonl
    if path is None:
        files = sorted(RESULTS.glob("bench_serving-*.jsonl"))
        if not files:
            print("plot: no benchmarks/results/bench_serving-*.jsonl yet; run bench_serving.py first", file=sys.stderr)
            return 1
        path = files[-1]
    try:
        for out in plot_run(path, args.run, args.out_dir):
            print(out)
    except (OSError, ValueError) as exc:
        print(f"plot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
