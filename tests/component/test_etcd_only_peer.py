"""The seed bug itself (k3s 11311): the only seed is a k3s etcd-only peer that accepts TLS
and answers every apiserver request with 503 "apiserver disabled". Clients still get
through to it (never empty), but as soon as a real apiserver is known and healthy,
traffic moves to it and the peer's client connections are closed."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from lbproxy.model import SOURCE_KUBERNETES, SOURCE_STATIC, Endpoint
from lbproxy.pool.events import EndpointsDiscovered
from lbproxy.pool.states import State
from tests.fakeapi import FakeApiServer
from tests.helpers import RuntimeHarness, wait_until

BOTH_LOOPS = True


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[FakeApiServer, FakeApiServer]]:
    ca = trustme.CA()
    async with (
        FakeApiServer(mode="etcd-only", ca=ca) as peer,
        FakeApiServer(ca=ca) as api,
    ):
        yield peer, api


async def get(
    port: int, ctx: ssl.SSLContext, path: str
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """One HTTP/1.1 request over TLS through lbproxy; the connection stays open."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="kubernetes"
    )
    writer.write(f"GET {path} HTTP/1.1\r\nHost: kubernetes\r\n\r\n".encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    return status, reader, writer


async def test_traffic_moves_off_the_etcd_only_peer(
    runtimes: RuntimeHarness, cluster: tuple[FakeApiServer, FakeApiServer]
) -> None:
    peer, api = cluster
    peer_ep, api_ep = Endpoint("127.0.0.1", peer.port), Endpoint("127.0.0.1", api.port)
    rt = await runtimes.start(
        [peer.address],
        probe={
            "kind": "https",
            "interval": 0.2,
            "timeout": 0.5,
            "fall": 2,
            "ca_file": str(peer.ca_pem_path),
            "cert_file": str(api.client_cert_path),
            "key_file": str(api.client_key_path),
            "server_name": "kubernetes",
        },
    )
    await wait_until(
        lambda: rt.pool.records[peer_ep].state is State.NOT_APISERVER, what="peer classified"
    )
    ctx = api.client_ssl_context()
    port = rt.listen_addresses[0][1]

    # Nothing better is known: the client still reaches the peer, and gets its 503.
    status, held_reader, held_writer = await get(port, ctx, "/version")
    assert status.startswith(b"HTTP/1.1 503")
    assert len(rt.bridges.get(peer_ep, ())) == 1

    # A real apiserver appears (here from a discovery source, as etcd or the Kubernetes
    # API would report it).
    rt.report(EndpointsDiscovered(SOURCE_KUBERNETES, frozenset({api_ep})))
    await wait_until(lambda: rt.pool.records[api_ep].healthy_apiserver, what="apiserver healthy")

    # The connection held open to the peer is closed by lbproxy ...
    async with asyncio.timeout(5):
        while await held_reader.read(65536):
            pass
    held_writer.close()
    await wait_until(lambda: not rt.bridges.get(peer_ep), what="peer connections closed")

    # ... and new connections reach the apiserver, never the peer.
    for _ in range(5):
        status, _reader, writer = await get(port, ctx, "/version")
        assert status.startswith(b"HTTP/1.1 200"), status
        writer.close()
    assert rt.pool.candidates()[0] == api_ep
    assert peer_ep not in rt.pool.candidates()
    versions = [r for r in api.requests if r.path_qs == "/version"]
    assert len(versions) == 5


async def test_seed_only_peer_stays_last_after_the_apiserver_is_added_as_a_seed(
    runtimes: RuntimeHarness, cluster: tuple[FakeApiServer, FakeApiServer]
) -> None:
    """Same story with seeds only: the apiserver is confirmed by its /readyz answer."""
    peer, api = cluster
    peer_ep, api_ep = Endpoint("127.0.0.1", peer.port), Endpoint("127.0.0.1", api.port)
    rt = await runtimes.start(
        [peer.address],
        probe={
            "kind": "https",
            "interval": 0.2,
            "timeout": 0.5,
            "ca_file": str(peer.ca_pem_path),
            "cert_file": str(api.client_cert_path),
            "key_file": str(api.client_key_path),
        },
    )
    await wait_until(lambda: rt.pool.records[peer_ep].state is State.NOT_APISERVER)
    rt.report(EndpointsDiscovered(SOURCE_STATIC, frozenset({peer_ep, api_ep})))
    await wait_until(lambda: rt.pool.has_healthy_apiserver, what="apiserver confirmed by probe")
    assert rt.pool.candidates() == [api_ep]
    status, _, writer = await get(rt.listen_addresses[0][1], api.client_ssl_context(), "/readyz")
    writer.close()
    assert status.startswith(b"HTTP/1.1 200")
