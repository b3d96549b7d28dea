"""A Prometheus text-format scrape, parsed into samples, and the arithmetic the load tools need:
sums over label sets, histogram deltas between two scrapes, and bucket-interpolated quantiles.

The server exports on its own port (``server/metrics.py``); counters appear as ``<name>_total``,
histograms as ``<name>_bucket{le=...}``, ``<name>_sum`` and ``<name>_count``. Histogram quantiles
here interpolate linearly inside a bucket, as PromQL's ``histogram_quantile`` does, so they are
only as fine as the buckets (``LATENCY_BUCKETS``: 0.1 s wide around 0.25 s).
"""
from __future__ import annotations

import math
import re
import urllib.request
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\d+)?$")
_LABEL = re.compile(r'(?P<k>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<v>(?:[^"\\]|\\.)*)"')
SCRAPE_TIMEOUT_S = 5.0  # a metrics endpoint on loopback answers in ms; 5 s means it is wedged


class ScrapeError(RuntimeError):
    """The metrics endpoint could not be read or parsed; the message names the URL or the line."""


def _float(text: str, line: str) -> float:
    try:
        return float(text)  # accepts "+Inf", "NaN"
    except ValueError:
        raise ScrapeError(f"metrics: bad sample value {text!r} in line {line!r}") from None


@dataclass(slots=True)
class Scrape:
    """Every sample of one scrape: name -> list of (labels, value)."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "Scrape":
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m is None:
                raise ScrapeError(f"metrics: cannot parse line {line!r}")
            labels = {lm["k"]: lm["v"].replace('\\"', '"').replace("\\\\", "\\")
                      for lm in _LABEL.finditer(m["labels"] or "")}
            out.setdefault(m["name"], []).append((labels, _float(m["value"], line)))
        return cls(out)

    def value(self, name: str, **labels: str) -> float:
        """Sum of ``name`` over every label set that contains ``labels`` (0 when absent)."""
        return sum(v for lab, v in self.samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``name`` summed per value of one label, e.g. requests per status."""
        out: dict[str, float] = {}
        for lab, v in self.samples.get(name, []):
            out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + v
        return out

    def histogram(self, name: str, **labels: str) -> "Histogram":
        """``name`` (without suffix) summed over label sets matching ``labels``."""
        buckets: dict[float, float] = {}
        for lab, v in self.samples.get(f"{name}_bucket", []):
            if all(lab.get(k) == x for k, x in labels.items()):
                le = _float(lab["le"], f"{name}_bucket le={lab['le']}")
                buckets[le] = buckets.get(le, 0.0) + v
        return Histogram(dict(sorted(buckets.items())), self.value(f"{name}_sum", **labels),
                         self.value(f"{name}_count", **labels))


@dataclass(slots=True)
class Histogram:
    buckets: dict[float, float]  # upper bound (le) -> cumulative count, ascending, +Inf last
    sum: float
    count: float

    def __sub__(self, before: "Histogram") -> "Histogram":
        return Histogram({le: c - before.buckets.get(le, 0.0) for le, c in self.buckets.items()},
                         self.sum - before.sum, self.count - before.count)

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count > 0 else math.nan

    def quantile(self, q: float) -> float:
        """PromQL-style estimate: linear inside the bucket holding rank q*count."""
        if self.count <= 0 or not self.buckets:
            return math.nan
        rank, lower, below = q * self.count, 0.0, 0.0
        for le, cum in self.buckets.items():
            if cum >= rank:
                if math.isinf(le):
                    return lower  # past the last finite bound: its value is all we know
                inside = cum - below
                return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 1.0)
            lower, below = le, cum
        return lower


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Scrape:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we started
            text = resp.read().decode()
    except OSError as exc:
        raise ScrapeError(f"metrics: cannot read {url}: {exc}") from None
    return Scrape.parse(text)
