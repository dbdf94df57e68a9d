"""The pool's rules as a real Runtime applies them to real connections: removal closes
an endpoint's connections, least-connections spreads, sticky does not."""

from __future__ import annotations

import asyncio

from lbproxy.model import SOURCE_STATIC, Endpoint
from lbproxy.pool.events import EndpointsDiscovered
from lbproxy.pool.selection import Policy
from lbproxy.runtime import Runtime
from tests.helpers import (
    Backend,
    Backends,
    Clients,
    RuntimeHarness,
    closed_by_peer,
    confirming_tcp_check,
    connections_by_endpoint,
    echo,
    endpoint_of,
    roundtrip,
    wait_until,
)

BOTH_LOOPS = True  # see pytest_asyncio_loop_factories in conftest.py

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def two_backend_runtime(
    runtimes: RuntimeHarness, backends: Backends, policy: Policy
) -> tuple[Runtime, Backend, Backend]:
    one = await backends.start(echo)
    two = await backends.start(echo)
    # Confirmed apiservers (as an https probe's 200 would make them): the policies only
    # choose among healthy apiservers; unconfirmed seeds are a fallback tier.
    runtime = await runtimes.start(
        [one.address, two.address],
        check=confirming_tcp_check(timeout=1.0),
        policy=policy.value,
        probe={"interval": 0.5},
    )
    await wait_until(lambda: len(runtime.healthy_apiservers()) == 2, what="both healthy")
    return runtime, one, two


async def open_concurrently(clients: Clients, port: int, n: int) -> list[Conn]:
    async def one(i: int) -> Conn:
        reader, writer = await clients.open(port)
        payload = b"client %d" % i
        async with asyncio.timeout(20):
            assert await roundtrip(reader, writer, payload) == payload
        return reader, writer

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def close_all(conns: list[Conn], runtime: Runtime) -> None:
    for _, writer in conns:
        writer.close()
    await wait_until(lambda: not runtime.open_bridges, what="bridges released")


async def test_least_connections_spreads_concurrent_clients(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    runtime, one, two = await two_backend_runtime(runtimes, backends, Policy.LEAST_CONNECTIONS)
    conns = await open_concurrently(clients, runtimes.port, 20)

    counts = connections_by_endpoint(runtime)
    print("least-connections split:", sorted(counts.values()))
    assert sum(counts.values()) == 20
    # Least-connections with ties rotated: a burst splits about evenly.
    assert counts.get(one.endpoint, 0) >= 5, counts
    assert counts.get(two.endpoint, 0) >= 5, counts
    assert len(one.served) + len(two.served) == 20
    assert {ep: rec.connections for ep, rec in runtime.pool.records.items()} == counts
    await close_all(conns, runtime)
    assert all(rec.connections == 0 for rec in runtime.pool.records.values())


async def test_sticky_sends_every_client_to_the_active_endpoint(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    runtime, one, two = await two_backend_runtime(runtimes, backends, Policy.STICKY)
    active = runtime.pool.active
    assert active in (one.endpoint, two.endpoint)
    conns = await open_concurrently(clients, runtimes.port, 20)

    assert connections_by_endpoint(runtime) == {active: 20}
    chosen, other = (one, two) if active == one.endpoint else (two, one)
    assert len(chosen.served) == 20
    assert other.served == []
    assert runtime.pool.active == active
    await close_all(conns, runtime)


async def test_removed_endpoint_has_its_connections_closed(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    runtime, one, two = await two_backend_runtime(runtimes, backends, Policy.LEAST_CONNECTIONS)
    conns = await open_concurrently(clients, runtimes.port, 10)
    by_endpoint: dict[Endpoint | None, list[Conn]] = {one.endpoint: [], two.endpoint: []}
    for reader, writer in conns:
        by_endpoint[endpoint_of(runtime, writer)].append((reader, writer))
    assert by_endpoint[one.endpoint], "least-connections put nothing on the first backend"
    assert by_endpoint[two.endpoint], "least-connections put nothing on the second backend"

    # The operator drops `one` from the static seeds.
    runtime.report(EndpointsDiscovered(SOURCE_STATIC, frozenset({two.endpoint})))

    assert one.endpoint not in runtime.pool.records
    for reader, _ in by_endpoint[one.endpoint]:
        assert await closed_by_peer(reader, within=10)
    assert one.endpoint not in runtime.bridges
    # The other endpoint's clients are untouched.
    for i, (reader, writer) in enumerate(by_endpoint[two.endpoint]):
        assert await roundtrip(reader, writer, b"still %d" % i) == b"still %d" % i
    assert connections_by_endpoint(runtime) == {two.endpoint: len(by_endpoint[two.endpoint])}

    # New clients go to what is left.
    [(reader, writer)] = await open_concurrently(clients, runtimes.port, 1)
    assert endpoint_of(runtime, writer) == two.endpoint
    await close_all([*conns, (reader, writer)], runtime)
