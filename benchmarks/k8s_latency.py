#!/usr/bin/env python3
"""Latency of the Kubernetes source: from an EndpointSlice change on the fake
kube-apiserver to the pool reflecting it.

Run from the repository root::

    .venv/bin/python benchmarks/k8s_latency.py                  # 100 changes, uvloop
    .venv/bin/python benchmarks/k8s_latency.py --changes 500 --loop asyncio

One process, one event loop: the fake apiserver (tests/fakeapi, real TLS on 127.0.0.1),
the source (list, then watch) and a real Pool. Each change swaps one address of the
``kubernetes`` slice; the clock stops when ``emit`` has run and the Pool's records hold
the new address and no longer the old one. The figures include the fake's own work
(serialising and writing the event), so they are an upper bound for the source.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lbproxy.config import KubernetesConfig  # noqa: E402
from lbproxy.discovery.kubernetes import KubernetesSource  # noqa: E402
from lbproxy.model import Endpoint  # noqa: E402
from lbproxy.pool.events import EndpointsDiscovered  # noqa: E402
from lbproxy.pool.pool import Pool  # noqa: E402
from tests.fakeapi import FakeApiServer, make_kubeconfig  # noqa: E402

TARGET_P99 = 0.100
STABLE = "10.0.0.1"


class View:
    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep

    def healthy_apiservers(self) -> list[Endpoint]:
        return [self.ep]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def measure(changes: int, workdir: Path) -> list[float]:
    loop = asyncio.get_running_loop()
    pool = Pool()
    want: tuple[Endpoint, Endpoint | None] | None = None
    done: asyncio.Future[float] | None = None

    def emit(event: EndpointsDiscovered) -> None:
        pool.handle(event, loop.time())
        if want is None or done is None or done.done():
            return
        new, old = want
        if new in pool.records and (old is None or old not in pool.records):
            done.set_result(time.perf_counter())

    async with FakeApiServer(bookmark_interval=0) as api:
        api.set_apiservers([STABLE, "10.0.1.1"])
        kubeconfig = make_kubeconfig(api, workdir / "kubeconfig.json", inline=True)
        cfg = KubernetesConfig(kubeconfig=str(kubeconfig), watch_timeout=300)
        source = KubernetesSource.from_config(cfg, View(Endpoint(api.host, api.port)))
        want, done = (Endpoint("10.0.1.1", 6443), None), loop.create_future()
        task = asyncio.create_task(source.run(emit))
        try:
            await asyncio.wait_for(done, 10)
            await api.wait_for_watchers(1)
            latencies: list[float] = []
            previous = "10.0.1.1"
            for i in range(changes):
                address = f"10.0.{2 + i // 250}.{i % 250 + 1}"
                want = (Endpoint(address, 6443), Endpoint(previous, 6443))
                done = loop.create_future()
                started = time.perf_counter()
                api.set_apiservers([STABLE, address])
                finished = await asyncio.wait_for(done, 5)
                latencies.append(finished - started)
                previous = address
            return latencies
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    import structlog

    # The source logs every change at info; keep the measurement free of terminal I/O.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    with tempfile.TemporaryDirectory(prefix="k8s-latency-") as tmp:
        if args.loop == "uvloop":
            import uvloop

            latencies = uvloop.run(measure(args.changes, Path(tmp)))
        else:
            latencies = asyncio.run(measure(args.changes, Path(tmp)))
    ms = [s * 1000 for s in latencies]
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    print(f"EndpointSlice change -> pool, {len(ms)} changes, loop={args.loop}")
    print(f"  p50  {p50:8.2f} ms")
    print(f"  p99  {p99:8.2f} ms")
    print(f"  mean {statistics.fmean(ms):8.2f} ms")
    print(f"  max  {max(ms):8.2f} ms")
    ok = p99 <= TARGET_P99 * 1000
    print(f"  target p99 <= {TARGET_P99 * 1000:.0f} ms: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
