"""Prometheus metrics, read from the runtime at scrape time so the data path pays nothing."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from lbproxy.pool.states import STATE_CODES, State

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

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
        self.registry = CollectorRegistry(auto_describe=False)
        self.dial_ok = Histogram()
        self.dial_error = Histogram()
        self.registry.register(_PoolCollector(runtime, self))

    def observe_dial(self, seconds: float, ok: bool) -> None:
        (self.dial_ok if ok else self.dial_error).observe(seconds)


class _PoolCollector(Collector):
    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.runtime = runtime
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        stats = rt.stats
        dial = HistogramMetricFamily(
            "lbproxy_dial_duration_seconds",
            "Time to connect to an upstream endpoint.",
            labels=["result"],
        )
        for result, hist in (("ok", self.metrics.dial_ok), ("error", self.metrics.dial_error)):
            dial.add_metric([result], hist.cumulative(), hist.sum)
        yield dial
        conns = GaugeMetricFamily(
            "lbproxy_endpoint_connections",
            "Open client connections per endpoint.",
            labels=["endpoint"],
        )
        state = GaugeMetricFamily(
            "lbproxy_endpoint_state",
            "1 for the endpoint's current state, 0 otherwise.",
            labels=["endpoint", "state"],
        )
        code = GaugeMetricFamily(
            "lbproxy_endpoint_health",
            "Endpoint state as a number: 0 not-an-apiserver, 1 failed, 2 unchecked, "
            "3 recovering, 4 healthy.",
            labels=["endpoint"],
        )
        for ep, rec in rt.pool.records.items():
            name = str(ep)
            conns.add_metric([name], len(rt.bridges.get(ep, ())))
            for s in State:
                state.add_metric([name, s.value], 1.0 if rec.state is s else 0.0)
            code.add_metric([name], STATE_CODES[rec.state])
        yield conns
        yield state
        yield code
        ready = GaugeMetricFamily("lbproxy_ready", "1 while at least one endpoint is healthy.")
        ready.add_metric([], 1.0 if rt.pool.ready else 0.0)
        yield ready
        failures = CounterMetricFamily(
            "lbproxy_dial_failures", "Failed upstream dials.", labels=["endpoint"]
        )
        for name, n in sorted(stats.dial_failures.items()):
            failures.add_metric([name], n)
        yield failures
        probes = CounterMetricFamily(
            "lbproxy_probe_results", "Active probe results.", labels=["endpoint", "outcome"]
        )
        for (name, outcome), n in sorted(stats.probe_results.items()):
            probes.add_metric([name, outcome], n)
        yield probes
        up, down = stats.bytes_up_closed, stats.bytes_down_closed
        for group in rt.bridges.values():
            for bridge in group:
                up += bridge.bytes_up
                down += bridge.bytes_down
        forwarded = CounterMetricFamily(
            "lbproxy_bytes_forwarded", "Bytes forwarded.", labels=["direction"]
        )
        forwarded.add_metric(["client_to_upstream"], up)
        forwarded.add_metric(["upstream_to_client"], down)
        yield forwarded
        accepted = CounterMetricFamily(
            "lbproxy_connections_accepted", "Client connections forwarded."
        )
        accepted.add_metric([], stats.accepted)
        yield accepted
        rejected = CounterMetricFamily(
            "lbproxy_connections_rejected", "Client connections closed because every dial failed."
        )
        rejected.add_metric([], stats.rejected)
        yield rejected
