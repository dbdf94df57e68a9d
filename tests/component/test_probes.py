"""The active probes against real TLS servers: the fake apiserver and the fake k3s
etcd-only supervisor from tests/fakeapi."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from lbproxy.config import ProbeConfig, ProbeKind
from lbproxy.errors import ConfigError
from lbproxy.health.checks import Checker
from lbproxy.model import Endpoint
from lbproxy.pool.states import ProbeOutcome
from tests.fakeapi import FakeApiServer

BOTH_LOOPS = True


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        yield server


def https(api: FakeApiServer, *, cert: bool = True, **kw: object) -> Checker:
    cfg = ProbeConfig(
        kind=ProbeKind.HTTPS,
        timeout=0.5,
        ca_file=str(api.ca_pem_path),
        cert_file=str(api.client_cert_path) if cert else "",
        key_file=str(api.client_key_path) if cert else "",
        **kw,  # type: ignore[arg-type]
    )
    return Checker(cfg)


def ep(api: FakeApiServer) -> Endpoint:
    return Endpoint(api.host, api.port)


async def test_https_with_client_cert_is_a_confirmed_healthy_apiserver(
    api: FakeApiServer,
) -> None:
    result = await https(api)(ep(api))
    assert result.outcome is ProbeOutcome.OK
    assert result.confirms_apiserver
    assert result.latency is not None
    assert result.latency > 0
    assert any(r.path_qs == "/readyz" for r in api.requests)


async def test_anonymous_probe_gets_401_and_still_counts_as_a_live_apiserver(
    api: FakeApiServer,
) -> None:
    result = await https(api, cert=False)(ep(api))
    assert result.outcome is ProbeOutcome.UNAUTHORIZED
    assert result.confirms_apiserver


async def test_server_name_is_verified_against_the_certificate(api: FakeApiServer) -> None:
    ok = await https(api, server_name="kubernetes")(ep(api))
    assert ok.outcome is ProbeOutcome.OK
    wrong = await https(api, server_name="not-in-the-cert.example")(ep(api))
    assert wrong.outcome is ProbeOutcome.FAILED
    assert wrong.error is not None
    assert "TLS" in wrong.error


async def test_etcd_only_supervisor_is_not_an_apiserver() -> None:
    async with FakeApiServer(mode="etcd-only") as peer:
        result = await https(peer)(ep(peer))
    assert result.outcome is ProbeOutcome.NOT_APISERVER
    assert not result.confirms_apiserver
    assert result.error is not None
    assert "apiserver disabled" in result.error


async def test_a_500_is_a_failure_with_the_status_in_the_error(api: FakeApiServer) -> None:
    api.ready = False
    result = await https(api)(ep(api))
    assert result.outcome is ProbeOutcome.FAILED
    assert result.error is not None
    assert result.error.startswith("HTTP 5")


async def test_a_frozen_server_fails_through_the_timeout(api: FakeApiServer) -> None:
    api.freeze()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await https(api)(ep(api))
        took = loop.time() - started
    finally:
        api.unfreeze()
    assert result.outcome is ProbeOutcome.FAILED
    assert result.error == "timeout after 0.5s"
    assert took < 5  # bounded by the probe timeout, not by the server


async def test_untrusted_certificate_fails_the_tls_probe(api: FakeApiServer) -> None:
    other_ca = trustme.CA()
    with other_ca.cert_pem.tempfile() as ca_path:
        checker = Checker(ProbeConfig(kind=ProbeKind.TLS, timeout=0.5, ca_file=ca_path))
        result = await checker(ep(api))
    assert result.outcome is ProbeOutcome.FAILED
    assert result.error is not None
    assert result.error.startswith("TLS")


async def test_tls_probe_completes_a_handshake_but_confirms_nothing(api: FakeApiServer) -> None:
    checker = Checker(ProbeConfig(kind=ProbeKind.TLS, timeout=0.5, ca_file=str(api.ca_pem_path)))
    result = await checker(ep(api))
    assert result.outcome is ProbeOutcome.OK
    assert not result.confirms_apiserver


async def test_tcp_probe_refused_and_ok() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    checker = Checker(ProbeConfig(kind=ProbeKind.TCP, timeout=0.5))
    refused = await checker(Endpoint("127.0.0.1", port))  # bound, not listening
    listener.listen()
    try:
        ok = await checker(Endpoint("127.0.0.1", port))
    finally:
        listener.close()
    assert refused.outcome is ProbeOutcome.FAILED
    assert refused.error == "Connection refused"
    assert ok.outcome is ProbeOutcome.OK
    assert not ok.confirms_apiserver


async def test_unresolvable_name_says_so() -> None:
    checker = Checker(ProbeConfig(kind=ProbeKind.TCP, timeout=2.0))
    result = await checker(Endpoint("does-not-exist.invalid", 6443))
    assert result.outcome is ProbeOutcome.FAILED
    assert result.error is not None
    assert result.error.startswith("cannot resolve")


def test_unreadable_client_certificate_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "client.crt"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError) as info:
        Checker(ProbeConfig(kind=ProbeKind.HTTPS, cert_file=str(bad), key_file=str(bad)))
    assert info.value.problems[0][0] == "probe.cert_file"
