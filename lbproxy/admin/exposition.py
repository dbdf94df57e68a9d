"""Prometheus exposition of the runtime's pool, counters and histograms (prometheus-client)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from lbproxy.pool.states import STATE_CODES, State

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from lbproxy.admin.metrics import Metrics
    from lbproxy.runtime import Runtime


def registry(runtime: Runtime, metrics: Metrics) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_PoolCollector(runtime, metrics))
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(reg), CONTENT_TYPE_LATEST


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
