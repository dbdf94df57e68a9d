"""The DNS source against a real (test) DNS server on 127.0.0.1, over UDP and TCP."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from typing import Any

import dns.asyncresolver
import dns.resolver
import pytest
from structlog.testing import capture_logs

from lbproxy.app import build_sources
from lbproxy.config import DnsConfig, from_mapping
from lbproxy.discovery import dns as dns_source
from lbproxy.discovery.dns import DnsSource, make_resolver
from lbproxy.model import SOURCE_DNS, Endpoint
from lbproxy.pool.events import EndpointsDiscovered
from lbproxy.runtime import Runtime
from tests.dnsserver import DnsServer, Mode
from tests.helpers import wait_until

BOTH_LOOPS = True

# Short enough that a test sees several rounds in well under a second.
FAST = {"min_refresh": 0.2, "max_refresh": 10.0, "timeout": 0.3}


class Follower:
    """Runs one DnsSource and records what it reports."""

    def __init__(self, source: DnsSource) -> None:
        self.source = source
        self.events: list[EndpointsDiscovered] = []
        self.times: list[float] = []
        self.task: asyncio.Task[None] | None = None

    def _emit(self, event: EndpointsDiscovered) -> None:
        assert event.source == SOURCE_DNS
        self.times.append(asyncio.get_running_loop().time())
        self.events.append(event)

    def start(self) -> Follower:
        self.started_at = asyncio.get_running_loop().time()
        self.task = asyncio.create_task(self.source.run(self._emit))
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            assert self.task.cancelled(), f"source stopped on its own: {self.task}"

    @property
    def sets(self) -> list[frozenset[Endpoint]]:
        return [e.endpoints for e in self.events]

    @property
    def last(self) -> frozenset[Endpoint] | None:
        return self.events[-1].endpoints if self.events else None

    async def reports(self, *expected: Endpoint, within: float = 5.0) -> None:
        want = frozenset(expected)
        await wait_until(lambda: self.last == want, within=within, what=f"report of {want}")


Follow = Callable[..., Follower]


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with DnsServer() as srv:
        yield srv


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
async def follow(server: DnsServer) -> AsyncIterator[Follow]:
    running: list[Follower] = []

    def start(default_port: int = 6443, **cfg: Any) -> Follower:
        settings = {**FAST, "nameservers": (server.nameserver,), **cfg}
        source = DnsSource(DnsConfig(**settings), default_port, rng=random.Random(7))
        follower = Follower(source).start()
        running.append(follower)
        return follower

    try:
        yield start
    finally:
        for follower in running:
            await follower.stop()


def ep(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(host.strip("[]"), int(port))


def failures(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "dns.resolve_failed" and e["name"] == name]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def rounds(server: DnsServer, name: str, n: int, rdtype: str = "A") -> None:
    await wait_until(
        lambda: len(server.queries_for(name, rdtype)) >= n, what=f"{n} {rdtype} queries for {name}"
    )


# ------------------------------------------------------------------ answers to endpoints
async def test_a_aaaa_cname_and_ports(server: DnsServer, follow: Follow) -> None:
    server.set_address("api.test", "10.0.0.1", "10.0.0.2", "fd00::1")
    server.set_address("v6.test", "FD00:0:0::2")
    server.set_cname("alias.test", "api.test")
    f = follow(names=("api.test", "v6.test:7443", "alias.test.:9443", "10.9.9.9:8000"))
    await f.reports(
        ep("10.0.0.1:6443"),
        ep("10.0.0.2:6443"),
        ep("[fd00::1]:6443"),
        ep("[fd00::2]:7443"),
        ep("10.0.0.1:9443"),
        ep("10.0.0.2:9443"),
        ep("[fd00::1]:9443"),
        ep("10.9.9.9:8000"),  # an address literal needs no lookup
    )
    assert {q.rdtype for q in server.queries_for("v6.test")} == {"A", "AAAA"}
    assert all(q.transport == "udp" for q in server.queries)


async def test_srv_ports_priorities_and_glue(
    server: DnsServer, follow: Follow, logs: list[MutableMapping[str, Any]]
) -> None:
    server.set_address("a.test", "10.0.0.1", "fd00::1")
    server.set_address("b.test", "10.0.0.2")
    server.set_address("c.test", "10.0.0.3")
    server.set_srv("_api._tcp.test", [(10, 5, 6443, "a.test"), (20, 1, 7443, "b.test")], glue=True)
    server.set_srv("_other._tcp.test", [(0, 0, 8443, "c.test"), (5, 0, 0, "nowhere.test")])
    f = follow(srv=("_api._tcp.test", "_other._tcp.test"))
    # Every priority becomes an endpoint (the pool probes them); port 0 is skipped.
    await f.reports(
        ep("10.0.0.1:6443"), ep("[fd00::1]:6443"), ep("10.0.0.2:7443"), ep("10.0.0.3:8443")
    )
    # Glue answered for a.test and b.test; c.test had to be asked.
    assert server.queries_for("a.test") == []
    assert server.queries_for("b.test") == []
    assert {q.rdtype for q in server.queries_for("c.test")} == {"A", "AAAA"}
    assert server.queries_for("nowhere.test") == []
    [records] = [
        e for e in logs if e["event"] == "dns.srv_records" and e["name"] == "_api._tcp.test"
    ]
    assert records["records"] == [
        {"priority": 10, "weight": 5, "port": 6443, "target": "a.test."},
        {"priority": 20, "weight": 1, "port": 7443, "target": "b.test."},
    ]


async def test_truncated_udp_answers_are_retried_over_tcp(
    server: DnsServer, follow: Follow
) -> None:
    server.truncate = True
    server.set_address("api.test", "10.0.0.1")
    server.set_srv("_api._tcp.test", [(10, 5, 6443, "api.test")], glue=True)
    f = follow(names=("api.test",), srv=("_api._tcp.test",))
    await f.reports(ep("10.0.0.1:6443"))
    assert {q.transport for q in server.queries_for("api.test", "A")} == {"udp", "tcp"}
    assert {q.transport for q in server.queries_for("_api._tcp.test")} == {"udp", "tcp"}


# ------------------------------------------------------------------ refresh timing
async def test_ttl_drives_refresh_and_a_change_is_picked_up(
    server: DnsServer, follow: Follow
) -> None:
    server.set_address("api.test", "10.0.0.1", ttl=1)
    f = follow(names=("api.test",))
    await f.reports(ep("10.0.0.1:6443"))
    server.set_address("api.test", "10.0.0.7", ttl=1)
    await f.reports(ep("10.0.0.7:6443"), within=3)
    [first, second] = [q.at for q in server.queries_for("api.test", "A")][:2]
    assert 0.9 <= second - first <= 1.6, "re-queried at the 1 s TTL, not at min_refresh"
    assert f.sets == [{ep("10.0.0.1:6443")}, {ep("10.0.0.7:6443")}]


async def test_min_and_max_refresh_bound_the_ttl(server: DnsServer, follow: Follow) -> None:
    server.set_address("zero.test", "10.0.0.1", ttl=0)
    server.set_address("long.test", "10.0.0.2", ttl=86400)
    follow(names=("zero.test", "long.test"), min_refresh=0.3, max_refresh=0.6)
    await rounds(server, "long.test", 2)
    await rounds(server, "zero.test", 3)
    zero = gaps([q.at for q in server.queries_for("zero.test", "A")])
    long = gaps([q.at for q in server.queries_for("long.test", "A")])
    assert all(0.28 <= g <= 0.55 for g in zero), zero  # TTL 0 waits for min_refresh
    assert all(0.58 <= g <= 0.9 for g in long), long  # a day's TTL is cut to max_refresh


async def test_failed_rounds_retry_at_min_refresh_with_jitter(
    server: DnsServer, follow: Follow
) -> None:
    server.set_address("api.test", "10.0.0.1", ttl=60)
    server.mode("api.test", Mode.SERVFAIL)
    f = follow(names=("api.test",), min_refresh=0.2)
    await rounds(server, "api.test", 4)
    retries = gaps([q.at for q in server.queries_for("api.test", "A")])
    assert all(0.19 <= g <= 0.45 for g in retries), retries  # [1, 1.5) x min_refresh
    assert len({round(g, 3) for g in retries}) > 1, "retries are jittered"
    server.mode("api.test", Mode.OK)
    await f.reports(ep("10.0.0.1:6443"), within=2)
    done = len(server.queries_for("api.test", "A"))
    await asyncio.sleep(0.6)  # a good answer with a 60 s TTL: no query for a while
    assert len(server.queries_for("api.test", "A")) == done


# ------------------------------------------------------------------ failures
@pytest.mark.parametrize(
    ("mode", "error"),
    [
        (Mode.NXDOMAIN, "NXDOMAIN"),
        (Mode.SERVFAIL, "SERVFAIL"),
        (Mode.DROP, "timeout"),
        (Mode.EMPTY, "no records"),
    ],
)
async def test_failures_keep_the_last_set(
    server: DnsServer, follow: Follow, logs: list[MutableMapping[str, Any]], mode: Mode, error: str
) -> None:
    server.set_address("api.test", "10.0.0.1", "fd00::1", ttl=0)
    server.set_address("other.test", "10.0.0.9", ttl=0)
    f = follow(names=("api.test", "other.test"))
    before = frozenset({ep("10.0.0.1:6443"), ep("[fd00::1]:6443"), ep("10.0.0.9:6443")})
    await f.reports(*before)
    server.mode("api.test", mode)
    seen = len(server.queries_for("api.test", "A"))
    await rounds(server, "api.test", seen + 2)  # two failed rounds
    await asyncio.sleep(0.05 + (0.3 if mode is Mode.DROP else 0))  # let the last one end
    assert f.last == before
    assert all(s == before for s in f.sets[f.sets.index(before) :])
    failed = failures(logs, "api.test")
    assert failed, "the failure is logged"
    assert failed[0]["error"] == error
    assert failed[0]["kept"] == ["10.0.0.1:6443", "[fd00::1]:6443"]
    assert failed[0]["log_level"] == "warning"
    assert {e["log_level"] for e in failed[1:]} <= {"debug"}, "one warning per streak"
    assert failures(logs, "other.test") == []
    # Recovery: a change is picked up again, and the recovery is logged.
    server.mode("api.test", Mode.OK)
    server.set_address("api.test", "10.0.0.2", ttl=0)
    await f.reports(ep("10.0.0.2:6443"), ep("10.0.0.9:6443"), within=3)
    assert any(e["event"] == "dns.resolve_recovered" for e in logs)


async def test_a_failed_family_keeps_its_addresses_an_empty_one_does_not(
    server: DnsServer, follow: Follow, logs: list[MutableMapping[str, Any]]
) -> None:
    server.set_address("api.test", "10.0.0.1", "fd00::1", ttl=0)
    f = follow(names=("api.test",))
    await f.reports(ep("10.0.0.1:6443"), ep("[fd00::1]:6443"))
    # AAAA times out while A moves: the new A and the old AAAA.
    server.mode("api.test", Mode.DROP, rdtype="AAAA")
    server.set_address("api.test", "10.0.0.2", "fd00::2", ttl=0)
    await f.reports(ep("10.0.0.2:6443"), ep("[fd00::1]:6443"))
    [failed, *_] = [e for e in failures(logs, "api.test") if e.get("rdtype") == "AAAA"]
    assert failed["error"] == "timeout"
    assert failed["kept"] == ["fd00::1"]
    # AAAA answers again, with no records: the name left IPv6.
    server.mode("api.test", Mode.OK, rdtype="AAAA")
    server.set_address("api.test", "10.0.0.2", ttl=0)
    await f.reports(ep("10.0.0.2:6443"))


async def test_srv_failures_keep_the_last_set(
    server: DnsServer, follow: Follow, logs: list[MutableMapping[str, Any]]
) -> None:
    server.set_address("a.test", "10.0.0.1", ttl=0)
    server.set_address("b.test", "10.0.0.2", ttl=0)
    server.set_srv("_api._tcp.test", [(10, 5, 6443, "a.test"), (10, 5, 6443, "b.test")], ttl=0)
    f = follow(srv=("_api._tcp.test",))
    both = (ep("10.0.0.1:6443"), ep("10.0.0.2:6443"))
    await f.reports(*both)
    # The SRV question fails: everything stays.
    server.mode("_api._tcp.test", Mode.SERVFAIL)
    seen = len(server.queries_for("_api._tcp.test"))
    await rounds(server, "_api._tcp.test", seen + 2, rdtype="SRV")
    assert f.last == frozenset(both)
    assert failures(logs, "_api._tcp.test")[0]["error"] == "SERVFAIL"
    # One target fails, the other moves: the failed one keeps its address.
    server.mode("_api._tcp.test", Mode.OK)
    server.mode("b.test", Mode.SERVFAIL)
    server.set_address("a.test", "10.0.0.3", ttl=0)
    await f.reports(ep("10.0.0.3:6443"), ep("10.0.0.2:6443"))
    # Every target gone (NXDOMAIN): that is no usable answer, so the last set stays.
    server.mode("b.test", Mode.OK)
    server.remove("a.test")
    server.remove("b.test")
    seen = len(server.queries_for("_api._tcp.test"))
    await rounds(server, "_api._tcp.test", seen + 2, rdtype="SRV")
    assert f.last == {ep("10.0.0.3:6443"), ep("10.0.0.2:6443")}


async def test_a_dead_name_contributes_nothing_and_blocks_nobody(
    server: DnsServer, follow: Follow, logs: list[MutableMapping[str, Any]]
) -> None:
    server.set_address("dead.test", "10.0.0.66")
    server.mode("dead.test", Mode.DROP)
    server.set_address("api.test", "10.0.0.1")
    f = follow(names=("dead.test", "api.test"), timeout=0.8)
    await f.reports(ep("10.0.0.1:6443"))
    assert f.times[0] - f.started_at < 0.5, "reported before the dead name timed out"
    await wait_until(lambda: failures(logs, "dead.test"), within=3, what="the timeout")
    assert f.sets == [{ep("10.0.0.1:6443")}]
    assert failures(logs, "dead.test")[0]["kept"] == []


async def test_nothing_resolves_reports_the_empty_set_once(
    server: DnsServer, follow: Follow
) -> None:
    server.set_address("api.test", "10.0.0.1")
    server.mode("api.test", Mode.EMPTY)
    f = follow(names=("gone.test", "api.test"), srv=("_gone._tcp.test",))
    await rounds(server, "gone.test", 3)
    await rounds(server, "_gone._tcp.test", 3, rdtype="SRV")
    assert f.sets == [frozenset()]


async def test_the_resolver_is_retried_when_there_is_none(
    server: DnsServer,
    follow: Follow,
    monkeypatch: pytest.MonkeyPatch,
    logs: list[MutableMapping[str, Any]],
) -> None:
    real = make_resolver
    calls: list[DnsConfig] = []

    def flaky(cfg: DnsConfig) -> dns.asyncresolver.Resolver:
        calls.append(cfg)
        if len(calls) == 1:
            raise dns.resolver.NoResolverConfiguration("no nameservers")
        return real(cfg)

    monkeypatch.setattr(dns_source, "make_resolver", flaky)
    server.set_address("api.test", "10.0.0.1")
    f = follow(names=("api.test",))
    await f.reports(ep("10.0.0.1:6443"))
    assert len(calls) == 2
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["dns.resolver_unavailable"]


# ------------------------------------------------------------------ configuration
def test_resolver_settings_and_invalid_entries(logs: list[MutableMapping[str, Any]]) -> None:
    cfg = DnsConfig(
        names=("ok.test", "bad name", "½.test"),
        srv=("_x._tcp.test", "_x._tcp.test:443"),
        nameservers=("127.0.0.1:5353", "[::1]", "::1"),
        timeout=1.5,
    )
    resolver = make_resolver(cfg)
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [  # type: ignore[union-attr]
        ("127.0.0.1", 5353),
        ("::1", 53),
        ("::1", 53),
    ]
    assert resolver.timeout == resolver.lifetime == 1.5
    assert resolver.cache is None
    source = DnsSource(cfg, 6443)
    assert source.endpoints == frozenset()
    bad = [e["name"] for e in logs if e["event"] == "dns.name_invalid"]
    assert bad == ["bad name", "½.test", "_x._tcp.test:443"]


async def test_wired_into_the_runtime(server: DnsServer, tmp_path: Any) -> None:
    server.set_address("api.test", "127.0.0.1", ttl=0)
    cfg = from_mapping(
        {
            "admin": "",
            "state_file": str(tmp_path / "state.json"),
            "probe": {"kind": "tcp", "interval": 0.5, "timeout": 0.2},
            "discovery": {"dns": {"names": ["api.test:1"], "nameservers": [server.nameserver]}},
        }
    )
    cfg = dataclasses.replace(cfg, listen=(Endpoint("127.0.0.1", 0),), drain_timeout=0.5)
    runtime = Runtime(cfg)
    [source] = build_sources(cfg, runtime)
    assert isinstance(source, DnsSource)
    runtime.sources.append(source)
    task = asyncio.create_task(runtime.run())
    try:
        await wait_until(
            lambda: (
                SOURCE_DNS in getattr(runtime.pool.records.get(ep("127.0.0.1:1")), "sources", ())
            ),
            what="the DNS endpoint in the pool",
        )
    finally:
        runtime.request_stop()
        async with asyncio.timeout(10):
            await task


async def test_stopping_mid_query_leaves_no_socket_behind(server: DnsServer) -> None:
    """Cancel the source at every step of its first round; then its loop must close.

    uvloop's loop.close() blocks forever on a UDP handle left open by a cancelled
    create_datagram_endpoint (see DnsSource._ask). The source runs on a loop of the same
    kind in a thread of its own, so that a regression fails this test instead of hanging
    the test run."""
    server.set_address("a.test", "10.0.0.1")
    server.set_srv("_api._tcp.test", [(10, 5, 6443, "a.test"), (10, 5, 6443, "b.test")])
    cfg = DnsConfig(names=("a.test",), srv=("_api._tcp.test",), nameservers=(server.nameserver,))
    loop_class = type(asyncio.get_running_loop())
    errors: list[BaseException] = []

    async def cancel_at_every_step() -> None:
        for steps in range(16):
            follower = Follower(DnsSource(cfg, 6443)).start()
            for _ in range(steps):
                await asyncio.sleep(0)
            await follower.stop()

    def scenario() -> None:
        loop = loop_class()
        try:
            loop.run_until_complete(cancel_at_every_step())
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=scenario, name="dns-cancel", daemon=True)
    thread.start()
    await wait_until(lambda: not thread.is_alive(), within=15, what="the source's loop to close")
    assert errors == []
    assert len(server.queries) > 16
