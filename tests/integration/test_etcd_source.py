"""The etcd source against a real etcd 3.5.1: range and watch into a real Pool, lease
expiry, restarts, compaction, auth, TLS with client certificates, endpoint fallback,
every kind of bad input, and a Runtime that forwards to what etcd names."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lbproxy.app import build_sources
from lbproxy.config import Config, from_mapping
from lbproxy.discovery import etcd as etcd_module
from lbproxy.discovery.etcd import EtcdSource
from lbproxy.model import SOURCE_ETCD_APIADDRESSES, SOURCE_ETCD_MASTERLEASES, SOURCE_STATE, Endpoint
from lbproxy.pool.states import State
from lbproxy.runtime import Runtime
from tests.helpers import Backends, echo, wait_until
from tests.integration.etcd_fixture import (
    REAL_MASTERLEASE,
    EtcdClient,
    EtcdServer,
    FaultProxy,
    Keys,
    TlsFiles,
    Watched,
    free_port,
    logged,
    masterlease_value,
)

A = SOURCE_ETCD_APIADDRESSES
M = SOURCE_ETCD_MASTERLEASES

Logs = list[dict[str, Any]]
INVALID_TOKEN = (
    b'{"error":"etcdserver: invalid auth token","code":16,'
    b'"message":"etcdserver: invalid auth token"}'
)
Watch = Callable[..., Watched]


def addresses(*items: str) -> str:
    """The value k3s writes: json.Encoder output, with its newline."""
    return json.dumps(list(items)) + "\n"


def eps(*texts: str) -> frozenset[Endpoint]:
    out = set()
    for text in texts:
        host, _, port = text.rpartition(":")
        out.add(Endpoint(host.strip("[]"), int(port)))
    return frozenset(out)


async def watching(w: Watched) -> None:
    """Both followers have ranged and have a watch open."""
    await w.wait(lambda: w.source.watches.get(A) and w.source.watches.get(M))


async def wait_logged(logs: Logs, event: str, *, within: float = 5.0, **match: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not logged(logs, event, **match):
        if loop.time() > deadline:
            seen = [(e.get("event"), e.get("error")) for e in logs]
            raise AssertionError(f"no {event} {match} logged within {within}s; saw {seen}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- range and watch
async def test_initial_range_reports_both_key_spaces(
    client: EtcdClient, keys: Keys, watch: Watch
) -> None:
    await client.put(keys.apiaddresses, addresses("10.0.0.1:6443", "[fd00::1]:6443"))
    await client.put(keys.lease("192.168.202.156"), REAL_MASTERLEASE)
    await client.put(keys.lease("10.0.0.2"), masterlease_value("10.0.0.2"))

    w = watch(keys.config(client.url), default_port=7443)
    await watching(w)

    assert w.reported(A) == [eps("10.0.0.1:6443", "[fd00::1]:6443")]
    assert w.reported(M) == [eps("192.168.202.156:7443", "10.0.0.2:7443")]
    assert w.listed_by(A) == {"10.0.0.1:6443", "[fd00::1]:6443"}
    assert w.listed_by(M) == {"192.168.202.156:7443", "10.0.0.2:7443"}
    assert w.source.ranges == {A: 1, M: 1}


async def test_empty_etcd_reports_empty_sets(client: EtcdClient, keys: Keys, watch: Watch) -> None:
    w = watch(keys.config(client.url))
    await watching(w)
    assert w.reported(A) == [frozenset()]
    assert w.reported(M) == [frozenset()]
    await client.put(keys.lease("10.0.0.3"), masterlease_value("10.0.0.3"))
    await w.wait(lambda: w.in_pool() == {"10.0.0.3:6443"}, within=1.0)


async def test_puts_and_deletes_reach_the_pool_within_a_second(
    client: EtcdClient, keys: Keys, watch: Watch
) -> None:
    await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
    w = watch(keys.config(client.url))
    await watching(w)
    took: list[float] = []

    async def change(write: Any, predicate: Callable[[], object]) -> None:
        await write
        took.append(await w.wait(predicate, within=1.0))

    await change(
        client.put(keys.apiaddresses, addresses("10.0.0.1:6443", "10.0.0.3:6443")),
        lambda: w.listed_by(A) == {"10.0.0.1:6443", "10.0.0.3:6443"},
    )
    await change(
        client.put(keys.lease("10.0.0.4"), masterlease_value("10.0.0.4")),
        lambda: w.listed_by(M) == {"10.0.0.4:6443"},
    )
    await change(client.delete(keys.lease("10.0.0.4")), lambda: "10.0.0.4:6443" not in w.in_pool())

    # A masterlease that disappears marks its endpoint failed at once (it stays while
    # apiaddresses still lists it).
    await change(
        client.put(keys.lease("10.0.0.1"), masterlease_value("10.0.0.1")),
        lambda: w.listed_by(M) == {"10.0.0.1:6443"},
    )
    await change(client.delete(keys.lease("10.0.0.1")), lambda: not w.listed_by(M))
    assert w.pool.records[Endpoint("10.0.0.1", 6443)].state is State.FAILED

    await change(
        client.put(keys.apiaddresses, addresses("10.0.0.3:6443")),
        lambda: w.in_pool() == {"10.0.0.3:6443"},
    )
    # The key goes away: the source reports an empty set, and the pool keeps its last
    # known endpoint rather than emptying.
    await change(client.delete(keys.apiaddresses), lambda: w.reported(A)[-1] == frozenset())
    assert w.in_pool() == {"10.0.0.3:6443"}
    assert w.pool.records[Endpoint("10.0.0.3", 6443)].sources == {SOURCE_STATE}
    assert max(took) < 1.0, took
    assert w.source.ranges == {A: 1, M: 1}


@pytest.mark.slow
async def test_expired_masterlease_leaves_the_pool(
    client: EtcdClient, keys: Keys, watch: Watch
) -> None:
    await client.put(keys.apiaddresses, addresses("10.0.0.9:6443"))
    lease = await client.grant(15)  # what kube-apiserver grants for each refresh
    await client.put(keys.lease("10.0.0.5"), masterlease_value("10.0.0.5"), lease=lease)
    w = watch(keys.config(client.url))
    await w.wait(lambda: w.listed_by(M) == {"10.0.0.5:6443"})

    took = await w.wait(lambda: "10.0.0.5:6443" not in w.in_pool(), within=25.0)
    assert 10.0 < took < 20.0
    assert w.reported(M)[-1] == frozenset()
    assert w.in_pool() == {"10.0.0.9:6443"}


# --------------------------------------------------------------------------- restarts
async def test_watch_resumes_after_etcd_is_killed_and_restarted(
    etcd_factory: Callable[..., EtcdServer], keys: Keys, watch: Watch, logs: Logs
) -> None:
    server = etcd_factory()
    client = EtcdClient(server.url)
    try:
        await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
        for i in (1, 2):
            await client.put(keys.lease(f"10.0.1.{i}"), masterlease_value(f"10.0.1.{i}"))
        w = watch(keys.config(server.url))
        await watching(w)

        await asyncio.to_thread(server.restart, kill=True)
        # Written at once after the restart: the source may still be reconnecting.
        for i in range(3, 9):
            await client.put(keys.lease(f"10.0.1.{i}"), masterlease_value(f"10.0.1.{i}"))
        await client.delete(keys.lease("10.0.1.1"))
        await client.put(keys.apiaddresses, addresses("10.0.0.2:6443"))

        expected = {f"10.0.1.{i}:6443" for i in range(2, 9)}
        await w.wait(lambda: w.listed_by(M) == expected and w.listed_by(A) == {"10.0.0.2:6443"})
        # Resumed from the last revision seen, not re-read.
        assert w.source.ranges == {A: 1, M: 1}
        assert w.source.watches[M] >= 2
        assert logged(logs, "etcd.watch_interrupted", source=M)
    finally:
        await client.close()


async def test_writes_while_the_watch_is_cut_arrive_after_resume(
    etcd_factory: Callable[..., EtcdServer], keys: Keys, watch: Watch, logs: Logs
) -> None:
    server = etcd_factory()
    client = EtcdClient(server.url)
    aside = EtcdClient(server.url_at(free_port()))
    try:
        await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
        await client.put(keys.lease("10.0.2.1"), masterlease_value("10.0.2.1"))
        w = watch(keys.config(server.url))
        await watching(w)
        reports = len(w.events)

        # etcd comes back on another port: up, but out of the source's reach.
        aside_port = int(aside.url.rsplit(":", 1)[1])
        await asyncio.to_thread(server.restart, kill=False, client_port=aside_port)
        for i in range(2, 6):
            await aside.put(keys.lease(f"10.0.2.{i}"), masterlease_value(f"10.0.2.{i}"))
        await aside.delete(keys.lease("10.0.2.1"))
        await aside.put(keys.apiaddresses, addresses("10.0.0.1:6443", "10.0.0.2:6443"))
        await wait_logged(logs, "etcd.unavailable", source=M)
        # While etcd cannot be reached nothing is reported and the pool keeps its set.
        assert len(w.events) == reports
        assert w.in_pool() == {"10.0.0.1:6443", "10.0.2.1:6443"}

        await asyncio.to_thread(server.restart, kill=False)
        await w.wait(
            lambda: (
                w.listed_by(M) == {f"10.0.2.{i}:6443" for i in range(2, 6)}
                and w.listed_by(A) == {"10.0.0.1:6443", "10.0.0.2:6443"}
            )
        )
        assert w.source.ranges == {A: 1, M: 1}
    finally:
        await client.close()
        await aside.close()


async def test_frozen_etcd_is_dropped_after_the_idle_timeout(
    etcd_factory: Callable[..., EtcdServer],
    keys: Keys,
    watch: Watch,
    logs: Logs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stopped (SIGSTOP) etcd keeps its sockets open but sends nothing, not even
    progress notifications: the watch gives up after the idle timeout and resumes."""
    monkeypatch.setattr(etcd_module, "WATCH_IDLE_TIMEOUT", 2.0)
    server = etcd_factory()
    client = EtcdClient(server.url)
    try:
        await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
        w = watch(keys.config(server.url))
        await watching(w)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            await wait_logged(logs, "etcd.watch_interrupted", error="Timeout", within=6.0)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        await client.put(keys.apiaddresses, addresses("10.0.0.2:6443"))
        await w.wait(lambda: w.listed_by(A) == {"10.0.0.2:6443"})
        assert w.listed_by(A) == {"10.0.0.2:6443"}
        assert w.source.ranges == {A: 1, M: 1}
    finally:
        await client.close()


async def test_compaction_past_the_watched_revision_ranges_again(
    etcd_factory: Callable[..., EtcdServer], keys: Keys, watch: Watch, logs: Logs
) -> None:
    server = etcd_factory()
    client = EtcdClient(server.url)
    aside = EtcdClient(server.url_at(free_port()))
    try:
        await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
        await client.put(keys.lease("10.0.3.1"), masterlease_value("10.0.3.1"))
        w = watch(keys.config(server.url))
        await watching(w)

        aside_port = int(aside.url.rsplit(":", 1)[1])
        await asyncio.to_thread(server.restart, kill=False, client_port=aside_port)
        await aside.put(keys.lease("10.0.3.2"), masterlease_value("10.0.3.2"))
        await aside.delete(keys.lease("10.0.3.1"))
        await aside.put(keys.apiaddresses, addresses("10.0.0.2:6443"))
        await aside.put("unrelated", "x")
        await aside.compact(await aside.revision())
        await asyncio.to_thread(server.restart, kill=False)

        await w.wait(
            lambda: w.listed_by(M) == {"10.0.3.2:6443"} and w.listed_by(A) == {"10.0.0.2:6443"}
        )
        assert w.source.ranges == {A: 2, M: 2}
        assert logged(logs, "etcd.resync", source=A, reason="compacted")
        assert logged(logs, "etcd.resync", source=M, reason="compacted")
        # And the watch goes on from the new range.
        await client.put(keys.lease("10.0.3.3"), masterlease_value("10.0.3.3"))
        await w.wait(lambda: w.listed_by(M) == {"10.0.3.2:6443", "10.0.3.3:6443"}, within=1.0)
    finally:
        await client.close()
        await aside.close()


async def test_etcd_replaced_by_one_at_an_older_revision(
    etcd_factory: Callable[..., EtcdServer], keys: Keys, watch: Watch, logs: Logs, tmp_path: Path
) -> None:
    """A restore from a snapshot (or a new cluster) moves the revision back: the source
    must notice and range, not wait for a revision that may never come."""
    server = etcd_factory()
    client = EtcdClient(server.url)
    fresh = EtcdServer(tmp_path / "fresh")
    fresh.client_port, fresh.peer_port = server.client_port, server.peer_port
    try:
        await client.put(keys.lease("10.0.6.1"), masterlease_value("10.0.6.1"))
        for i in range(30):
            await client.put(keys.apiaddresses, addresses(f"10.0.0.{i + 1}:6443"))
        w = watch(keys.config(server.url))
        await watching(w)
        assert w.listed_by(A) == {"10.0.0.30:6443"}

        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(fresh.start)
        await client.put(keys.lease("10.0.6.2"), masterlease_value("10.0.6.2"))
        await client.put(keys.apiaddresses, addresses("10.0.0.99:6443"))
        await w.wait(
            lambda: w.listed_by(A) == {"10.0.0.99:6443"} and w.listed_by(M) == {"10.0.6.2:6443"}
        )
        assert logged(logs, "etcd.resync", source=A, reason="behind")
        assert w.source.ranges == {A: 2, M: 2}
    finally:
        await asyncio.to_thread(fresh.stop)
        await client.close()


# --------------------------------------------------------------------------- auth and TLS
async def test_username_and_password_auth(
    etcd_factory: Callable[..., EtcdServer],
    keys: Keys,
    watch: Watch,
    logs: Logs,
    tmp_path: Path,
) -> None:
    server = etcd_factory()
    client = EtcdClient(server.url)
    try:
        await client.enable_auth("s3cret")
        await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))

        # Without credentials etcd answers 400 "user name is empty": logged, retried.
        anonymous = watch(keys.config(server.url))
        await wait_logged(logs, "etcd.unavailable", error="user name is empty")

        # A wrong password: a clear error, retried; the password file is read again.
        password = tmp_path / "etcd-password"
        password.write_text("wrong\n")
        w = watch(keys.config(server.url, username="root", password_file=str(password)))
        await wait_logged(logs, "etcd.auth_failed", error="authentication failed")
        assert not w.events
        assert not anonymous.events
        password.write_text("s3cret\n")
        await w.wait(lambda: w.listed_by(A) == {"10.0.0.1:6443"})
        assert logged(logs, "etcd.authenticated", user="root")
        assert all(entry.get("password") is None for entry in logs)

        # Simple tokens do not survive a restart: the resumed watch is refused
        # (PermissionDenied) and the source authenticates again.
        authenticated = len(logged(logs, "etcd.authenticated"))
        await asyncio.to_thread(server.restart, kill=False)
        await client.login("s3cret")
        await client.put(keys.apiaddresses, addresses("10.0.0.2:6443"))
        await w.wait(lambda: w.listed_by(A) == {"10.0.0.2:6443"})
        assert len(logged(logs, "etcd.authenticated")) > authenticated
        assert not anonymous.events

        # A 401 "invalid auth token" (code 16) answer: a new token, and the same request
        # again at once.
        proxy = FaultProxy(server.url)
        await proxy.start()
        try:
            via_proxy = watch(keys.config(proxy.url, username="root", password_file=str(password)))
            await watching(via_proxy)
            authenticated = len(logged(logs, "etcd.authenticated"))
            # The restart above may itself have drawn a 401 from etcd, depending on which
            # request met the dead token first: count from here.
            rejected = len(logged(logs, "etcd.token_rejected"))
            proxy.fail_with(401, INVALID_TOKEN, times=1)
            proxy.cut_streams()
            await wait_logged(logs, "etcd.token_rejected", error="invalid auth token")
            await client.put(keys.apiaddresses, addresses("10.0.0.3:6443"))
            await via_proxy.wait(lambda: via_proxy.listed_by(A) == {"10.0.0.3:6443"})
            # One new token, whichever follower got the 401 (the other's token is
            # still good).
            await via_proxy.wait(lambda: len(logged(logs, "etcd.authenticated")) > authenticated)
            assert len(logged(logs, "etcd.token_rejected")) == rejected + 1
            assert via_proxy.source.ranges == {A: 1, M: 1}
        finally:
            await proxy.close()
    finally:
        await client.close()


async def test_tls_with_client_certificates(
    etcd_factory: Callable[..., EtcdServer],
    tls_files: TlsFiles,
    keys: Keys,
    watch: Watch,
    logs: Logs,
) -> None:
    server = etcd_factory(tls=tls_files)
    assert server.url.startswith("https://")
    client = EtcdClient(server.url, ssl_context=tls_files.client_context())
    try:
        await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
        await client.put(keys.lease("10.0.4.1"), masterlease_value("10.0.4.1"))
        w = watch(
            keys.config(
                server.url,
                ca_file=tls_files.ca_file,
                cert_file=tls_files.client_cert,
                key_file=tls_files.client_key,
            )
        )
        await watching(w)
        assert w.in_pool() == {"10.0.0.1:6443", "10.0.4.1:6443"}
        await client.put(keys.lease("10.0.4.2"), masterlease_value("10.0.4.2"))
        await w.wait(lambda: "10.0.4.2:6443" in w.listed_by(M), within=1.0)

        # Without a client certificate the handshake fails: logged, nothing reported.
        anonymous = watch(keys.config(server.url, ca_file=tls_files.ca_file))
        await wait_logged(logs, "etcd.unavailable", endpoint=server.url)
        assert not anonymous.events
    finally:
        await client.close()


async def test_endpoints_are_tried_in_order(
    client: EtcdClient, keys: Keys, watch: Watch, logs: Logs
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
    w = watch(keys.config(closed, client.url))
    await watching(w)
    assert w.listed_by(A) == {"10.0.0.1:6443"}
    assert logged(logs, "etcd.endpoint_selected", endpoint=client.url, previous=closed)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "value",
    [
        b"garbage",
        b'{"10.0.0.1": 6443}',
        b'"10.0.0.1:6443"',
        b'["not-an-address", 7, "10.0.0.1:99999"]',
        b"\xff\xfe\x00",
        b"[" * 50_000,
    ],
    ids=["garbage", "object", "string", "no-usable-entry", "not-utf8", "deep-nesting"],
)
async def test_unusable_apiaddresses_keep_the_last_good_set(
    client: EtcdClient, keys: Keys, watch: Watch, logs: Logs, value: bytes
) -> None:
    await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
    w = watch(keys.config(client.url))
    await watching(w)
    await client.put(keys.apiaddresses, value)
    await wait_logged(logs, "etcd.value_invalid", etcd_key=keys.apiaddresses)
    assert w.reported(A) == [eps("10.0.0.1:6443")]
    assert w.listed_by(A) == {"10.0.0.1:6443"}
    # The source goes on.
    await client.put(keys.apiaddresses, addresses("10.0.0.2:6443"))
    await w.wait(lambda: w.listed_by(A) == {"10.0.0.2:6443"}, within=1.0)


async def test_garbage_first_value_reports_nothing_until_a_good_one(
    client: EtcdClient, keys: Keys, watch: Watch, logs: Logs
) -> None:
    await client.put(keys.apiaddresses, "garbage")
    w = watch(keys.config(client.url))
    await watching(w)
    assert logged(logs, "etcd.value_invalid", etcd_key=keys.apiaddresses, action="skipped")
    assert w.reported(A) == []
    await client.put(keys.apiaddresses, addresses("10.0.0.2:6443"))
    await w.wait(lambda: w.listed_by(A) == {"10.0.0.2:6443"}, within=1.0)


async def test_bad_entries_are_skipped_and_logged(
    client: EtcdClient, keys: Keys, watch: Watch, logs: Logs
) -> None:
    await client.put(
        keys.apiaddresses,
        addresses(
            "10.0.0.1:6443",
            "300.0.0.1:6443",
            "10.0.0.2:0",
            "10.0.0.2:70000",
            "10.0.0.2",
            "api.example:6443",
            "10.0.0.1:6443",
            "[::1]:6443",
        ),
    )
    w = watch(keys.config(client.url))
    await watching(w)
    assert w.listed_by(A) == {"10.0.0.1:6443", "[::1]:6443"}
    skipped = logged(logs, "etcd.entry_skipped", etcd_key=keys.apiaddresses)
    assert len(skipped) == 6
    assert any("duplicate 10.0.0.1:6443" in e["error"] for e in skipped)

    # 10,000 entries: capped, and the cut is logged.
    many = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:6443" for i in range(10_000)]
    await client.put(keys.apiaddresses, addresses(*many))
    await w.wait(lambda: len(w.listed_by(A)) == 256, within=2.0)
    assert w.listed_by(A) == set(many[:256])
    await wait_logged(logs, "etcd.entry_skipped", error="truncated: 9744 more entries")

    # "" after a cluster reset: an empty set, logged; the pool does not empty.
    await client.put(keys.apiaddresses, "")
    await w.wait(lambda: w.reported(A)[-1] == frozenset(), within=1.0)
    assert logged(logs, "etcd.value_empty", etcd_key=keys.apiaddresses)
    assert len(w.in_pool()) == 256


async def test_bad_masterlease_keys_and_values(
    client: EtcdClient, keys: Keys, watch: Watch, logs: Logs
) -> None:
    await client.put(keys.lease("10.0.5.1"), masterlease_value("10.0.5.1"))
    await client.put(keys.lease("apiserver-a"), masterlease_value("10.0.5.9"))
    w = watch(keys.config(client.url))
    await watching(w)
    assert w.listed_by(M) == {"10.0.5.1:6443"}
    assert logged(logs, "etcd.key_invalid", etcd_key=keys.lease("apiserver-a"))

    await client.put(keys.lease("10.0.5.1/extra"), masterlease_value("10.0.5.1"))
    await client.put(keys.lease("10.0.5.2"), b"garbage")  # the key name still counts
    await client.put(keys.lease("10.0.5.3"), b"")
    await client.put(keys.lease("10.0.5.4"), masterlease_value("10.0.5.40"))  # key wins
    await client.put(keys.lease("10.0.5.5"), REAL_MASTERLEASE)
    await w.wait(lambda: len(w.listed_by(M)) == 5, within=1.0)
    assert w.listed_by(M) == {f"10.0.5.{i}:6443" for i in range(1, 6)}
    assert logged(logs, "etcd.key_invalid", etcd_key=keys.lease("10.0.5.1/extra"))
    assert logged(logs, "etcd.value_invalid", etcd_key=keys.lease("10.0.5.2"))
    assert logged(logs, "etcd.value_invalid", etcd_key=keys.lease("10.0.5.3"))
    assert logged(logs, "etcd.masterlease_mismatch", key_ip="10.0.5.4", value_ip="10.0.5.40")
    assert logged(logs, "etcd.masterlease_mismatch", key_ip="10.0.5.5", value_ip="192.168.202.156")


async def test_http_errors_keep_the_last_known_set(
    client: EtcdClient, fault_proxy: FaultProxy, keys: Keys, watch: Watch, logs: Logs
) -> None:
    await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
    w = watch(keys.config(fault_proxy.url))
    await watching(w)
    reports = len(w.events)

    for status, body, text in [
        (503, b'{"error":"x","code":14,"message":"etcdserver: leader changed"}', "HTTP 503"),
        (500, b"", "HTTP 500"),
        (400, b'{"error":"x","code":3,"message":"etcdserver: bad request"}', "bad request"),
        (404, b"404 page not found", "HTTP 404 404 page not found"),
    ]:
        fault_proxy.fail_with(status, body)
        fault_proxy.cut_streams()
        await wait_logged(logs, "etcd.unavailable", error=text)
    assert len(w.events) == reports
    assert w.listed_by(A) == {"10.0.0.1:6443"}

    fault_proxy.fail_with(None)
    await client.put(keys.apiaddresses, addresses("10.0.0.2:6443"))
    await w.wait(lambda: w.listed_by(A) == {"10.0.0.2:6443"}, within=3.0)
    assert w.source.ranges == {A: 1, M: 1}


async def test_truncated_and_garbled_streams_resume_without_loss(
    client: EtcdClient, fault_proxy: FaultProxy, keys: Keys, watch: Watch, logs: Logs
) -> None:
    await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
    w = watch(keys.config(fault_proxy.url))
    await watching(w)

    # The stream ends in the middle of the event's line: logged, and the watch resumes
    # from the last revision, so the event arrives anyway.
    fault_proxy.truncate_next_event = True
    await client.put(keys.apiaddresses, addresses("10.0.0.2:6443"))
    await w.wait(lambda: w.listed_by(A) == {"10.0.0.2:6443"}, within=2.0)
    assert logged(logs, "etcd.watch_interrupted", source=A, error="truncated")

    # A line that is not JSON.
    fault_proxy.garbage_next_watch = b'{"result":{"header": nonsense'
    fault_proxy.cut_streams()
    await wait_logged(logs, "etcd.unavailable", error="invalid watch message")
    await client.put(keys.apiaddresses, addresses("10.0.0.3:6443"))
    await w.wait(lambda: w.listed_by(A) == {"10.0.0.3:6443"}, within=2.0)

    # The gateway's in-stream error object.
    fault_proxy.garbage_next_watch = (
        b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader",'
        b'"http_status":"Service Unavailable"}}'
    )
    fault_proxy.cut_streams()
    await wait_logged(logs, "etcd.unavailable", error="watch failed: etcdserver: no leader")
    await client.put(keys.apiaddresses, addresses("10.0.0.4:6443"))
    await w.wait(lambda: w.listed_by(A) == {"10.0.0.4:6443"}, within=2.0)
    assert w.source.ranges == {A: 1, M: 1}


async def test_absurdly_long_watch_messages_are_refused(
    client: EtcdClient, keys: Keys, watch: Watch, logs: Logs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etcd_module, "MAX_MESSAGE", 4096)  # instead of 16 MiB
    await client.put(keys.apiaddresses, addresses("10.0.0.1:6443"))
    w = watch(keys.config(client.url))
    await watching(w)
    many = [f"10.1.{i // 250}.{i % 250 + 1}:6443" for i in range(300)]  # ~6 KB
    await client.put(keys.apiaddresses, addresses(*many))
    await wait_logged(logs, "etcd.watch_message_too_long", source=A, error="over 4096")
    # The range it falls back to is refused as well; the pool keeps the last set.
    await wait_logged(logs, "etcd.unavailable", source=A, error="over 4096")
    assert w.listed_by(A) == {"10.0.0.1:6443"}
    await client.put(keys.apiaddresses, addresses("10.0.0.2:6443"))
    await w.wait(lambda: w.listed_by(A) == {"10.0.0.2:6443"}, within=3.0)
    assert w.source.ranges[A] >= 2


async def test_unusable_local_files_are_logged_and_retried(
    client: EtcdClient, keys: Keys, watch: Watch, logs: Logs, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.crt")
    tls = watch(keys.config("https://127.0.0.1:1", ca_file=missing))
    await wait_logged(logs, "etcd.tls_invalid", error="missing.crt")
    password = watch(keys.config(client.url, username="root", password_file=str(tmp_path / "nope")))
    await wait_logged(logs, "etcd.auth_failed", error="cannot read password_file")
    await asyncio.sleep(0.3)
    assert len(logged(logs, "etcd.tls_invalid")) >= 2  # retried
    assert not tls.events
    assert not password.events


# --------------------------------------------------------------------------- wiring
def test_build_sources_and_the_k3s_preset(tmp_path: Path) -> None:
    def etcd_sources(cfg: Config) -> list[EtcdSource]:
        return [s for s in build_sources(cfg, Runtime(cfg)) if isinstance(s, EtcdSource)]

    cfg = from_mapping({"state_file": "", "discovery": {"etcd": {}}})
    assert cfg.etcd is not None
    [source] = etcd_sources(cfg)
    assert source.name == "etcd"
    assert source.cfg is cfg.etcd
    assert source.default_port == 6443
    assert etcd_sources(from_mapping({"state_file": ""})) == []

    k3s = from_mapping(
        {
            "preset": "k3s",
            "data_dir": str(tmp_path),
            "default_port": 7443,
            "state_file": "",
            "probe": {"kind": "tcp"},  # the https probe's k3s files do not exist here
        }
    )
    assert k3s.etcd is not None
    assert k3s.etcd.endpoints == ("https://127.0.0.1:2382", "https://127.0.0.1:2379")
    tls = tmp_path / "server" / "tls" / "etcd"
    assert k3s.etcd.ca_file == str(tls / "server-ca.crt")
    assert k3s.etcd.cert_file == str(tls / "client.crt")
    assert k3s.etcd.key_file == str(tls / "client.key")
    # (The preset also enables the Kubernetes source, which needs a kubeconfig on disk.)
    [source] = etcd_sources(dataclasses.replace(k3s, kubernetes=None))
    assert source.cfg is k3s.etcd
    assert source.default_port == 7443


async def test_runtime_forwards_to_the_apiserver_etcd_names(
    client: EtcdClient, keys: Keys, backends: Backends, tmp_path: Path
) -> None:
    backend = await backends.start(echo)
    await client.put(keys.apiaddresses, addresses(f"127.0.0.1:{backend.port}"))
    cfg = from_mapping(
        {
            "listen": ["127.0.0.1:6445"],
            "admin": "",
            "state_file": str(tmp_path / "state.json"),
            "probe": {"kind": "tcp", "interval": 0.2, "timeout": 0.5},
            "drain_timeout": 1.0,
            "discovery": {
                "etcd": {
                    "endpoints": [client.url],
                    "apiaddresses_key": keys.apiaddresses,
                    "masterleases_prefix": keys.prefix,
                    "backoff_max": 0.5,
                }
            },
        }
    )
    # Config validation refuses port 0, which the test needs.
    cfg = dataclasses.replace(cfg, listen=(Endpoint("127.0.0.1", 0),))
    runtime = Runtime(cfg)
    runtime.sources.extend(build_sources(cfg, runtime))
    task = asyncio.create_task(runtime.run())
    try:
        async with asyncio.timeout(10):
            await runtime.started.wait()
            target = Endpoint("127.0.0.1", backend.port)

            def healthy() -> bool:
                rec = runtime.pool.records.get(target)
                return rec is not None and rec.state is State.HEALTHY

            await wait_until(healthy, within=10, what="the backend named in etcd to be healthy")
            host, port = runtime.listen_addresses[0]
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"GET /version HTTP/1.1\r\n\r\n")
                await writer.drain()
                assert await reader.readexactly(25) == b"GET /version HTTP/1.1\r\n\r\n"
            finally:
                writer.close()
                await writer.wait_closed()
        assert runtime.pool.records[target].sources == {A}
        assert any(conn.received for conn in backend.conns)
    finally:
        runtime.request_stop()
        async with asyncio.timeout(15):
            await task
        asyncio.get_running_loop().set_exception_handler(None)
