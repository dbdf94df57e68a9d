"""Metrics state: counters and histograms the runtime keeps, turned into Prometheus text
only when scraped, so the data path pays nothing.

prometheus-client itself (about 5 MB of resident memory) is imported on the first scrape,
by ``exposition.py``; a node nobody scrapes never loads it."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from lbproxy.runtime import Runtime


@dataclass
class Stats:
    """Counters the runtime bumps outside the per-chunk hot path."""

    accepted: int = 0
    rejected: int = 0
    bytes_up_closed: int = 0  # bytes from closed connections; open ones are added at scrape
    bytes_down_closed: int = 0
    dial_failures: Counter[str] = field(default_factory=Counter)
    probe_results: Counter[tuple[str, str]] = field(default_factory=Counter)


DIAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """A lock-free histogram for one event loop: an observation is a bisect and two adds
    (prometheus-client's own takes a lock and walks every bucket, once per connection)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DIAL_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(DIAL_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*DIAL_BUCKETS, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.dial_ok = Histogram()
        self.dial_error = Histogram()
        self._registry: CollectorRegistry | None = None

    def observe_dial(self, seconds: float, ok: bool) -> None:
        (self.dial_ok if ok else self.dial_error).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from lbproxy.admin import exposition

        if self._registry is None:
            self._registry = exposition.registry(self.runtime, self)
        return exposition.render(self._registry)
