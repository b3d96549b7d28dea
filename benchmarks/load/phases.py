"""Runs one load phase end to end: scrape the server's metrics, replay the plan from the load process,
scrape again, summarise, cross-check, write the JSONL row and print one line.

Each phase also reads the server's CPU time (psutil on its pid) around the replay: on a 2-core box
shared with other jobs, wall-clock tokens/s of two identical phases a few seconds apart differ by up to
2x, tokens per server CPU-second far less, so both are reported.
"""
from __future__ import annotations

import math
import time

try:
    import psutil
except ImportError:  # the GPU image may lack it: server CPU time is then reported as NaN
    psutil = None

from .record import Record
from .driver import LoadDriver
from .prom import scrape
from .report import cross_check, format_check, format_check_short, summarize


class PhaseRunner:
    def __init__(self, results, *, address: str, metrics_url: str, keys: list[str], driver: LoadDriver,
                 hard_timeout_s: float, server_pid: int | None = None, verbose: bool = False):
        self.results = results
        self.address, self.metrics_url, self.keys, self.driver = address, metrics_url, keys, driver
        self.hard_timeout_s = hard_timeout_s
        self.server = psutil.Process(server_pid) if server_pid and psutil is not None else None
        self.verbose = verbose
        self.rows: list[dict] = []
        self.records: dict[str, list[Record]] = {}
        self.check_failures: list[str] = []

    def _cpu(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds of the server so far."""
        if self.server is None:
            return None
        t = self.server.cpu_times()
        return t.user, t.system

    def add(self, row: dict) -> dict:
        """A derived point (not a replay), written and kept like the others."""
        self.results.write(row)
        self.rows.append(row)
        return row

    def run(self, name: str, group: str, plan, **meta) -> dict:
        before = scrape(self.metrics_url) if self.metrics_url else None
        cpu0 = self._cpu()
        t0 = time.perf_counter()
        records = [Record(**d) for d in self.driver.run(self.address, self.keys, plan, self.hard_timeout_s)]
        wall = time.perf_counter() - t0
        user, system = (a - b for a, b in zip(self._cpu(), cpu0)) if cpu0 is not None else (math.nan, math.nan)
        cpu = user + system
        stats = summarize(records)
        stats["server_cpu_s"], stats["server_sys_s"] = cpu, system  # system time: page faults, futex waits
        stats["tok_per_cpu_s"] = stats["output_tokens"] / cpu if cpu > 0 else math.nan
        check = None
        if before is not None:
            check = cross_check(records, before, scrape(self.metrics_url))
            if not check["ok"]:
                self.check_failures.append(name)
        ok = [r for r in records if r.status == "OK" and r.ttft is not None]
        row = {"phase": name, "group": group, **meta, "wall_s": wall, **stats, "metrics_check": check,
               # per-request samples for the CDF plots (0.1 ms is far below the noise here)
               "samples": {"ttft_ms": [round(1e3 * r.ttft, 1) for r in ok],
                           "tpot_ms": [round(1e3 * r.tpot, 2) if r.tpot is not None else None for r in ok],
                           "cold": [r.cold for r in ok]}}
        self.add(row)
        self.records[name] = records
        print(f"{name:20s} n={stats['requests']:3d} ok={stats['ok']:3d} req/s={stats['req_per_s']:6.2f} "
              f"tok/s={stats['tok_per_s']:7.1f} tok/cpu-s={stats['tok_per_cpu_s']:6.1f} "
              f"ttft p50/p99={stats['ttft_p50_ms']:6.1f}/{stats['ttft_p99_ms']:6.1f} ms "
              f"tpot p50/p99={stats['tpot_p50_ms']:5.1f}/{stats['tpot_p99_ms']:5.1f} ms "
              f"errors={stats['by_status'] if stats['errors'] else 0} lag_max={stats['send_lag_max_ms']:.0f} ms "
              f"wall={wall:.1f} s", flush=True)
        if group == "throughput" and not stats["saturated"]:
            print(f"  warning: {name} kept up with its arrivals (drain < 25% of the span): its tokens/s is the "
                  f"offered load, not the capacity; raise sat_factor", flush=True)
        if check is not None:
            print("\n".join(format_check(check)) if self.verbose or not check["ok"] else format_check_short(check),
                  flush=True)
        return row
