"""The Kubernetes source against the fake kube-apiserver: list, watch, resume, re-list,
fallbacks, credentials, and where it connects."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs
from yarl import URL

from lbproxy import app
from lbproxy.config import Config, KubernetesConfig, from_mapping
from lbproxy.discovery import kubernetes as k8s
from lbproxy.discovery.kubernetes import KubernetesSource, is_own_address
from lbproxy.errors import ConfigError
from lbproxy.model import SOURCE_KUBERNETES, Endpoint
from lbproxy.pool.events import EndpointsDiscovered
from lbproxy.runtime import Runtime
from tests.fakeapi import FakeApiServer, make_kubeconfig
from tests.helpers import wait_until

BOTH_LOOPS = True

SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
CORE = "/api/v1/namespaces/default/endpoints"


class View:
    """A PoolView whose healthy apiservers the test sets."""

    def __init__(self, *eps: Endpoint) -> None:
        self.eps = list(eps)
        self.calls = 0

    def healthy_apiservers(self) -> list[Endpoint]:
        self.calls += 1
        return list(self.eps)


def ep_of(api: FakeApiServer) -> Endpoint:
    return Endpoint(api.host, api.port)


@dataclasses.dataclass
class Running:
    source: KubernetesSource
    task: asyncio.Task[None]
    events: list[EndpointsDiscovered] = dataclasses.field(default_factory=list)

    @property
    def current(self) -> set[str] | None:
        return {str(e) for e in self.events[-1].endpoints} if self.events else None

    async def until(self, expected: Iterable[str], within: float = 2.0) -> float:
        want = set(expected)
        if self.task.done():
            self.task.result()
        return await wait_until(
            lambda: self.current == want or self.task.done(),
            within=within,
            what=f"set {sorted(want)} (last: {self.current})",
        )


Start = Callable[..., Awaitable[Running]]


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter waits than production, so each test takes a fraction of a second."""
    monkeypatch.setattr(k8s, "BACKOFF_START", 0.02)
    monkeypatch.setattr(k8s, "WAIT_FOR_POOL", 0.02)
    monkeypatch.setattr(k8s, "POOL_CHECK_INTERVAL", 0.02)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="s3cr3t", bookmark_interval=0) as server:
        yield server


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    running: list[Running] = []

    async def go(
        api: FakeApiServer,
        view: View | None = None,
        *,
        inline: bool = True,
        token: str | None = None,
        server: str | None = None,
        own: Iterable[Endpoint] = (),
        **settings: Any,
    ) -> Running:
        path = make_kubeconfig(
            api, tmp_path / f"kc-{len(running)}.json", inline=inline, token=token, server=server
        )
        settings.setdefault("watch_timeout", 30)
        settings.setdefault("timeout", 2.0)
        cfg = KubernetesConfig(kubeconfig=str(path), **settings)
        own_list = list(own)
        source = KubernetesSource.from_config(
            cfg, view if view is not None else View(ep_of(api)), lambda: own_list
        )
        events: list[EndpointsDiscovered] = []
        task = asyncio.create_task(source.run(events.append))
        run = Running(source, task, events)
        running.append(run)
        return run

    try:
        yield go
    finally:
        for run in running:
            run.task.cancel()
        await asyncio.gather(*(r.task for r in running), return_exceptions=True)


def lists(api: FakeApiServer, path: str = SLICES) -> list[str]:
    return [
        r.path_qs for r in api.requests if r.path_qs.startswith(path) and "watch=" not in r.path_qs
    ]


def watches(api: FakeApiServer, path: str = SLICES) -> list[dict[str, str]]:
    return [
        dict(URL(r.path_qs).query)
        for r in api.requests
        if r.path_qs.startswith(path) and "watch=" in r.path_qs
    ]


# -- list and watch -----------------------------------------------------------------------------


async def test_list_then_watch_follows_every_change(api: FakeApiServer, start: Start) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api)
    await run.until({"10.0.0.1:6443"})
    [first] = run.events
    assert first.source == SOURCE_KUBERNETES == KubernetesSource.name

    api.set_apiservers(["10.0.0.1", "10.0.0.2"])  # MODIFIED
    assert await run.until({"10.0.0.1:6443", "10.0.0.2:6443"}) < 1.0
    api.set_slice("kubernetes-v6", ["fd00::1", "fd00::2"], address_type="IPv6")  # ADDED
    assert (
        await run.until({"10.0.0.1:6443", "10.0.0.2:6443", "[fd00::1]:6443", "[fd00::2]:6443"})
        < 1.0
    )
    api.delete_slice("kubernetes")  # DELETED
    assert await run.until({"[fd00::1]:6443", "[fd00::2]:6443"}) < 1.0

    # A change that leaves the set as it was reports nothing.
    count = len(run.events)
    api.set_slice(
        "kubernetes-v6",
        ["fd00::1", "fd00::2", "fd00::3"],
        address_type="IPv6",
        ready=[True, True, False],
    )
    api.set_slice("unrelated", ["10.9.9.9"], labels={"kubernetes.io/service-name": "other"})
    api.set_slice("kubernetes-v6", ["fd00::1", "fd00::2"], address_type="IPv6", port=6443)
    await asyncio.sleep(0.2)
    assert len(run.events) == count
    # The request asks by label (dual-stack slices have other names), with bookmarks.
    [listed] = lists(api)
    assert URL(listed).query["labelSelector"] == "kubernetes.io/service-name=kubernetes"
    [watch] = watches(api)
    assert watch["allowWatchBookmarks"] == "true"
    assert watch["timeoutSeconds"] == "30"
    assert watch["labelSelector"] == "kubernetes.io/service-name=kubernetes"


async def test_dual_stack_slices_added_and_removed(api: FakeApiServer, start: Start) -> None:
    api.set_slice("kubernetes", ["10.0.0.1"])
    api.set_slice("kubernetes-v6", ["fd00::1"], address_type="IPv6")
    run = await start(api)
    await run.until({"10.0.0.1:6443", "[fd00::1]:6443"})
    api.delete_slice("kubernetes-v6")
    await run.until({"10.0.0.1:6443"})
    api.set_slice("kubernetes-v6", ["fd00::9"], address_type="IPv6", port=443)
    await run.until({"10.0.0.1:6443", "[fd00::9]:443"})


async def test_not_ready_endpoints_are_left_out(api: FakeApiServer, start: Start) -> None:
    api.set_slice(
        "kubernetes",
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
        ready=[True, False, None, {"ready": False, "serving": True, "terminating": True}],
    )
    run = await start(api)
    await run.until({"10.0.0.1:6443", "10.0.0.3:6443"})
    api.set_slice(
        "kubernetes",
        ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"],
        ready=[False, True, None, True],
    )
    await run.until({"10.0.0.2:6443", "10.0.0.3:6443", "10.0.0.4:6443"})


async def test_the_port_named_https_is_taken(api: FakeApiServer, start: Start) -> None:
    api.put_raw_slice(
        {
            "metadata": {
                "name": "kubernetes",
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}],
            "ports": [{"name": "metrics", "port": 9090}, {"name": "https", "port": 6444}],
        }
    )
    run = await start(api)
    await run.until({"10.0.0.1:6444"})


# -- resourceVersion, bookmarks, timeouts ---------------------------------------------------------


async def test_watch_resumes_from_the_last_resource_version(
    api: FakeApiServer, start: Start
) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api, watch_timeout=1)
    await run.until({"10.0.0.1:6443"})
    listed_rv = str(api.resource_version)
    rv, _ = api.set_apiservers(["10.0.0.2"])
    await run.until({"10.0.0.2:6443"})
    # timeoutSeconds=1 ends the stream; the next watch starts where the last event was.
    await api.wait_for_requests(lambda r: "watch=" in r.path_qs, n=2, within=3)
    first, second = watches(api)[:2]
    assert first["resourceVersion"] == listed_rv
    assert second["resourceVersion"] == rv
    assert len(lists(api)) == 1  # resumed, not re-listed
    assert run.source.resource_version == rv


async def test_bookmarks_move_the_resource_version(api: FakeApiServer, start: Start) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api)
    await run.until({"10.0.0.1:6443"})
    await api.wait_for_watchers(1)
    # Changes the watch does not select move the global resourceVersion on; only a
    # bookmark tells the client.
    api.set_slice("elsewhere", ["10.5.5.5"], labels={"app": "x"})
    api.set_slice("elsewhere", ["10.5.5.6"], labels={"app": "x"})
    assert api.send_bookmark() == 1
    await wait_until(lambda: run.source.resource_version == str(api.resource_version), within=2)
    api.end_watch_streams()
    await api.wait_for_requests(lambda r: "watch=" in r.path_qs, n=2, within=3)
    assert watches(api)[1]["resourceVersion"] == str(api.resource_version)
    assert len(run.events) == 1


async def test_periodic_bookmarks_are_taken(start: Start) -> None:
    async with FakeApiServer(bookmark_interval=0.1) as api:
        api.set_apiservers(["10.0.0.1"])
        run = await start(api)
        await run.until({"10.0.0.1:6443"})
        api.set_slice("elsewhere", ["10.5.5.5"], labels={"app": "x"})
        await wait_until(lambda: run.source.resource_version == str(api.resource_version), within=2)
        assert len(run.events) == 1


# -- 410 and errors -----------------------------------------------------------------------------


async def test_expired_inside_the_stream_relists(api: FakeApiServer, start: Start) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api)
    await run.until({"10.0.0.1:6443"})
    await api.wait_for_watchers(1)
    with capture_logs() as logs:
        assert api.expire_watches() == 1  # ERROR 410 event, history compacted
        api.set_apiservers(["10.0.0.7"])
        await run.until({"10.0.0.7:6443"})
    assert len(lists(api)) == 2
    assert [e["event"] for e in logs if e["event"] == "kubernetes.expired"] == [
        "kubernetes.expired"
    ]
    assert "too old resource version" in next(
        e["error"] for e in logs if e["event"] == "kubernetes.expired"
    )


async def test_expired_as_http_status_relists(api: FakeApiServer, start: Start) -> None:
    api.set_apiservers(["10.0.0.1"])
    api.fail_next_watch(410)
    run = await start(api)
    await run.until({"10.0.0.1:6443"})
    await api.wait_for_watchers(1)
    assert len(lists(api)) == 2
    api.set_apiservers(["10.0.0.2"])
    await run.until({"10.0.0.2:6443"})


async def test_resume_from_a_compacted_version_relists(api: FakeApiServer, start: Start) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api)
    await run.until({"10.0.0.1:6443"})
    await api.wait_for_watchers(1)
    api.cut_watch_streams(mid_line=False)
    api.set_apiservers(["10.0.0.3"])
    api.compact()  # the resumed watch gets 410 in its stream
    await run.until({"10.0.0.3:6443"})
    assert len(lists(api)) >= 2


async def test_a_burst_of_500s_backs_off_then_recovers(
    api: FakeApiServer, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(k8s, "BACKOFF_START", 0.05)
    api.set_apiservers(["10.0.0.1"])
    api.fail_next_requests(4, status=500)
    with capture_logs() as logs:
        run = await start(api)
        await run.until({"10.0.0.1:6443"}, within=3)
    failed = [e for e in logs if e["event"] == "kubernetes.request_failed"]
    assert len(failed) == 4
    assert all("HTTP 500: InternalError" in e["error"] for e in failed)
    delays = [e["retry_in"] for e in failed]
    # Exponential with jitter: each step within [half, full] of 0.05 * 2**n.
    for n, delay in enumerate(delays):
        assert 0.05 * 2**n / 2 <= delay <= 0.05 * 2**n
    assert len(lists(api)) == 5


async def test_backoff_is_capped(
    api: FakeApiServer, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(k8s, "BACKOFF_START", 0.01)
    api.fail_next_requests(8, status=503)
    api.set_apiservers(["10.0.0.1"])
    with capture_logs() as logs:
        run = await start(api, backoff_max=0.04)
        await run.until({"10.0.0.1:6443"}, within=3)
    delays = [e["retry_in"] for e in logs if e["event"] == "kubernetes.request_failed"]
    assert len(delays) == 8
    assert max(delays) <= 0.04
    assert min(delays[3:]) >= 0.02


async def test_a_watch_stream_cut_mid_line_resumes(api: FakeApiServer, start: Start) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api)
    await run.until({"10.0.0.1:6443"})
    await api.wait_for_watchers(1)
    rv = run.source.resource_version
    with capture_logs() as logs:
        assert api.cut_watch_streams(mid_line=True) == 1
        await api.wait_for_requests(lambda r: "watch=" in r.path_qs, n=2, within=3)
        api.set_apiservers(["10.0.0.1", "10.0.0.2"])
        await run.until({"10.0.0.1:6443", "10.0.0.2:6443"})
    assert watches(api)[1]["resourceVersion"] == rv  # the half line was not taken
    assert len(lists(api)) == 1
    events = [e["event"] for e in logs]
    assert "kubernetes.partial_line_discarded" in events
    assert "kubernetes.request_failed" in events


async def test_a_frozen_apiserver_is_left_when_the_pool_drops_it(start: Start) -> None:
    async with FakeApiServer() as api1, FakeApiServer(ca=api1.ca) as api2:
        for api in (api1, api2):
            api.set_apiservers(["10.0.0.1"])
        view = View(ep_of(api1), ep_of(api2))
        run = await start(api1, view)
        await run.until({"10.0.0.1:6443"})
        await api1.wait_for_watchers(1)
        api1.freeze()
        view.eps = [ep_of(api2)]  # the prober marked it failed
        await api2.wait_for_watchers(1, within=3)
        api2.set_apiservers(["10.0.0.1", "10.0.0.2"])
        await run.until({"10.0.0.1:6443", "10.0.0.2:6443"})
        api1.unfreeze()


# -- core/v1 Endpoints fallback --------------------------------------------------------------------


async def test_falls_back_to_endpoints_when_slices_are_not_served(
    api: FakeApiServer, start: Start
) -> None:
    api.serve_slices = False
    api.set_endpoints("kubernetes", ["10.0.0.1", "10.0.0.2"], not_ready=["10.0.0.3"])
    api.set_endpoints("other", ["10.9.9.9"])
    run = await start(api)
    await run.until({"10.0.0.1:6443", "10.0.0.2:6443"})
    api.set_endpoints("kubernetes", ["10.0.0.2"], not_ready=["10.0.0.1"])
    await run.until({"10.0.0.2:6443"})
    [listed] = lists(api, CORE)
    assert URL(listed).query["fieldSelector"] == "metadata.name=kubernetes"
    [watch] = watches(api, CORE)
    assert watch["fieldSelector"] == "metadata.name=kubernetes"
    assert run.source.resource == "endpoints"


# -- kubeconfig credentials ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inline", "token", "user"),
    [(True, None, "system:admin"), (False, None, "system:admin"), (True, "s3cr3t", "token")],
    ids=["inline-data", "files", "token"],
)
async def test_kubeconfig_credentials(
    api: FakeApiServer, start: Start, inline: bool, token: str | None, user: str
) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api, inline=inline, token=token)
    await run.until({"10.0.0.1:6443"})
    assert {r.authenticated_as for r in api.requests} == {user}


async def test_token_file_is_read_for_each_request(
    api: FakeApiServer, tmp_path: Path, start: Start
) -> None:
    api.set_apiservers(["10.0.0.1"])
    token_file = tmp_path / "token"
    token_file.write_text("wrong\n")
    path = make_kubeconfig(api, tmp_path / "kc.json", inline=True, token="x")
    doc = json.loads(path.read_text())
    doc["users"][0]["user"] = {"tokenFile": str(token_file)}
    path.write_text(json.dumps(doc))
    # No client certificate: only the token authenticates.
    cfg = KubernetesConfig(kubeconfig=str(path), watch_timeout=30)
    source = KubernetesSource.from_config(cfg, View(ep_of(api)))
    events: list[EndpointsDiscovered] = []
    task = asyncio.create_task(source.run(events.append))
    try:
        await wait_until(lambda: len(api.requests) >= 2, within=3)
        assert not events
        token_file.write_text("s3cr3t\n")  # rotated
        await wait_until(lambda: bool(events), within=3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert api.requests[0].authenticated_as is None
    assert api.requests[-1].authenticated_as == "token"


def _config(tmp_path: Path, kubeconfig: str, **extra: Any) -> Any:
    return from_mapping(
        {
            "listen": ["127.0.0.1:6445"],
            "admin": "",
            "state_file": "",
            "discovery": {"kubernetes": {"kubeconfig": kubeconfig, **extra}},
        }
    )


def _build(cfg: Config) -> list[object]:
    """What the runtime does once its listeners are bound."""
    return list(app.build_sources(cfg, Runtime(cfg)))


async def test_a_bad_kubeconfig_fails_at_build_naming_path_and_field(
    api: FakeApiServer, tmp_path: Path
) -> None:
    path = make_kubeconfig(api, tmp_path / "kc.json", inline=False)
    doc = json.loads(path.read_text())
    doc["users"][0]["user"]["client-key"] = "/x"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as info:
        _build(_config(tmp_path, str(path)))
    assert info.value.lines() == [
        f"discovery.kubernetes.kubeconfig: {path}: users[0].user.client-key: file not found: /x"
    ]
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        _build(_config(tmp_path, str(missing)))
    assert info.value.lines() == [f"discovery.kubernetes.kubeconfig: file not found: {missing}"]
    path.write_text("clusters: [\n")
    with pytest.raises(ConfigError, match=r"kc.json: not a kubeconfig this reader accepts: line 1"):
        _build(_config(tmp_path, str(path)))
    good = make_kubeconfig(api, tmp_path / "good.json", inline=True)
    with pytest.raises(ConfigError, match=r"discovery.kubernetes.namespace: must be a DNS label"):
        _build(_config(tmp_path, str(good), namespace="a/b"))


async def test_build_sources_wires_the_runtime(api: FakeApiServer, tmp_path: Path) -> None:
    good = make_kubeconfig(api, tmp_path / "good.json", inline=True)
    cfg = _config(tmp_path, str(good))
    runtime = Runtime(cfg)
    [source] = [s for s in app.build_sources(cfg, runtime) if isinstance(s, KubernetesSource)]
    assert source.pool is runtime
    runtime.listen_addresses.append(("127.0.0.1", 40000))
    assert set(source.own_addresses()) == {
        Endpoint("127.0.0.1", 6445),
        Endpoint("127.0.0.1", 40000),
    }


# -- where it connects ----------------------------------------------------------------------------


class Listener:
    """A stand-in for lbproxy's own listener: counts the connections it gets."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def endpoint(self) -> Endpoint:
        assert self.server is not None
        return Endpoint("127.0.0.1", self.server.sockets[0].getsockname()[1])


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_dials_the_pool_endpoint_not_the_kubeconfig_server(
    api: FakeApiServer, start: Start
) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api, View(ep_of(api)), server=f"https://127.0.0.1:{closed_port()}")
    await run.until({"10.0.0.1:6443"})


async def test_never_dials_its_own_listener_and_waits_for_the_pool(
    api: FakeApiServer, start: Start
) -> None:
    api.set_apiservers(["10.0.0.1"])
    async with Listener() as own:
        view = View()
        with capture_logs() as logs:
            run = await start(
                api, view, server=f"https://localhost:{own.endpoint.port}", own=[own.endpoint]
            )
            await wait_until(lambda: view.calls >= 5, within=2)
            assert run.events == []
            view.eps = [own.endpoint]  # even listed in the pool, lbproxy itself is skipped
            await asyncio.sleep(0.1)
            assert run.events == []
            view.eps = [own.endpoint, ep_of(api)]
            await run.until({"10.0.0.1:6443"})
        assert own.connections == 0
    assert [e["event"] for e in logs].count("kubernetes.waiting") == 1


async def test_wildcard_listener_blocks_the_fallback_on_its_port(
    api: FakeApiServer, start: Start
) -> None:
    api.set_apiservers(["10.0.0.1"])
    view = View()
    run = await start(api, view, own=[Endpoint("0.0.0.0", api.port)])
    await wait_until(lambda: view.calls >= 5, within=2)
    assert run.events == []
    assert api.requests == []


async def test_kubeconfig_server_is_used_while_the_pool_has_none_then_left(
    api: FakeApiServer, start: Start
) -> None:
    api.set_apiservers(["10.0.0.1"])
    async with FakeApiServer(ca=api.ca) as direct:
        direct.set_apiservers(["10.0.0.1"])
        view = View()
        run = await start(api, view)  # the kubeconfig names `api`
        await run.until({"10.0.0.1:6443"})
        assert api.requests
        view.eps = [ep_of(direct)]  # a healthy apiserver appears: move to it
        await direct.wait_for_watchers(1, within=3)
        direct.set_apiservers(["10.0.0.1", "10.0.0.9"])
        await run.until({"10.0.0.1:6443", "10.0.0.9:6443"})
        assert run.source._connected_to == str(ep_of(direct))


async def test_rotates_to_the_next_healthy_endpoint_on_failure(
    api: FakeApiServer, start: Start
) -> None:
    api.set_apiservers(["10.0.0.1"])
    dead = Endpoint("127.0.0.1", closed_port())
    with capture_logs() as logs:
        run = await start(api, View(dead, ep_of(api)))
        await run.until({"10.0.0.1:6443"})
    failed = [e for e in logs if e["event"] == "kubernetes.request_failed"]
    assert [e["server"] for e in failed] == [str(dead)]
    assert "refused" in failed[0]["error"].lower()


async def test_rotates_when_the_apiserver_goes_away_mid_watch(start: Start) -> None:
    async with FakeApiServer() as api1, FakeApiServer(ca=api1.ca) as api2:
        api1.set_apiservers(["10.0.0.1"])
        api2.set_apiservers(["10.0.0.1"])
        run = await start(api1, View(ep_of(api1), ep_of(api2)), server="https://127.0.0.1:1")
        await run.until({"10.0.0.1:6443"})
        await api1.wait_for_watchers(1)
        await api1.stop()  # ends the stream; the next dial is refused
        await api2.wait_for_watchers(1, within=3)
        api2.set_apiservers(["10.0.0.2"])
        await run.until({"10.0.0.2:6443"})
        assert not api2.requests[0].path_qs.startswith("/api/")


async def test_wrong_server_name_fails_verification(api: FakeApiServer, start: Start) -> None:
    api.set_apiservers(["10.0.0.1"])
    with capture_logs() as logs:
        run = await start(api, server_name="not-on-the-cert")
        await wait_until(
            lambda: any(e["event"] == "kubernetes.request_failed" for e in logs), within=3
        )
    assert run.events == []
    assert "TLS" in next(e["error"] for e in logs if e["event"] == "kubernetes.request_failed")


async def test_empty_server_name_verifies_the_host(api: FakeApiServer, start: Start) -> None:
    api.set_apiservers(["10.0.0.1"])
    run = await start(api, server_name="")  # 127.0.0.1 is on the fake's certificate
    await run.until({"10.0.0.1:6443"})


def test_is_own_address() -> None:
    own = [Endpoint("127.0.0.1", 6445), Endpoint("::1", 6446), Endpoint("0.0.0.0", 6447)]
    assert is_own_address("127.0.0.1", 6445, own)
    assert is_own_address("localhost", 6445, own)
    assert is_own_address("::1", 6446, own)
    assert is_own_address("10.1.2.3", 6447, own)  # wildcard: any host on that port
    assert not is_own_address("127.0.0.1", 6443, own)
    assert not is_own_address("127.0.0.2", 6445, own)
    assert not is_own_address("example.com", 6445, own)
    assert is_own_address("lb.local", 80, [Endpoint("lb.local", 80)])


# -- bad input ----------------------------------------------------------------------------------


async def test_bad_objects_are_logged_and_skipped_nothing_else_lost(
    api: FakeApiServer, start: Start
) -> None:
    label = {"kubernetes.io/service-name": "kubernetes"}
    api.set_slice("kubernetes", ["10.0.0.1"])
    api.put_raw_slice({"metadata": {"name": "fqdn", "labels": label}, "addressType": "FQDN",
                       "endpoints": [{"addresses": ["api.example.com"]}]})  # fmt: skip
    api.put_raw_slice({"metadata": {"name": "portless", "labels": label}, "addressType": "IPv4",
                       "endpoints": [{"addresses": ["10.0.0.8"]}]})  # fmt: skip
    api.put_raw_slice({"metadata": {"name": "mixed", "labels": label}, "addressType": "IPv4",
                       "endpoints": [{"addresses": ["10.0.0.2", "999.1.1.1", "fd00::1"]}],
                       "ports": [{"name": "https", "port": 6443}]})  # fmt: skip
    with capture_logs() as logs:
        run = await start(api)
        await run.until({"10.0.0.1:6443", "10.0.0.2:6443"})
        api.put_raw_slice({"metadata": {"name": "mixed", "labels": label}, "addressType": "IPv4",
                           "endpoints": "garbage"})  # fmt: skip
        api.set_slice("kubernetes", ["10.0.0.1", "10.0.0.3"])
        await run.until({"10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"})
    skipped = {(e["object"], e["error"]) for e in logs if e["event"] == "kubernetes.object_skipped"}
    assert skipped == {
        ("fqdn", "unsupported addressType 'FQDN'"),
        ("portless", "no ports"),
        ("mixed", "endpoints is a string, not a list"),
    }
    bad = {(e["object"], e["error"]) for e in logs if e["event"] == "kubernetes.endpoint_skipped"}
    assert bad == {
        ("mixed", "endpoints[0].addresses[1]: not an IP address: '999.1.1.1'"),
        ("mixed", "endpoints[0].addresses[2]: IPv6 address 'fd00::1' in an IPv4 slice"),
    }
    assert not run.task.done()


async def test_a_huge_set_is_capped(api: FakeApiServer, start: Start) -> None:
    addresses = [f"10.1.{i // 200}.{i % 200 + 1}" for i in range(300)]
    api.set_slice("kubernetes", addresses)
    with capture_logs() as logs:
        run = await start(api)
        await wait_until(lambda: bool(run.events), within=3)
    assert len(run.events[-1].endpoints) == 256
    [capped] = [e for e in logs if e["event"] == "kubernetes.endpoints_capped"]
    assert (capped["limit"], capped["dropped"], capped["total"]) == (256, 44, 300)


class Scripted:
    """A TLS server with the fake's certificate that answers from a script: for API
    answers no real apiserver gives (bad JSON, wrong shapes, odd lines)."""

    def __init__(
        self, api: FakeApiServer, lists: list[Any], watches: list[list[bytes]], *, hold: bool = True
    ) -> None:
        self.api = api
        self.lists = lists
        self.watch_lines = watches
        self.hold = hold  # keep the last scripted watch open until the server stops
        self.release = asyncio.Event()
        self.seen: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.path_qs)
        if "watch" in request.query:
            lines = self.watch_lines.pop(0) if self.watch_lines else []
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for line in lines:
                await resp.write(line)
            if not self.watch_lines and self.hold:
                await self.release.wait()
            await resp.write_eof()
            return resp
        body = self.lists.pop(0) if len(self.lists) > 1 else self.lists[0]
        if isinstance(body, bytes):
            return web.Response(body=body, content_type="application/json")
        return web.json_response(body)

    async def __aenter__(self) -> Scripted:
        application = web.Application()
        application.router.add_route("GET", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(
            application, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, "127.0.0.1", 0, ssl_context=self.api.certs.server_ssl_context()
        )
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        self.release.set()
        await self.runner.cleanup()


def _slice(name: str, *ips: str, rv: str = "5") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": rv},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip]} for ip in ips],
        "ports": [{"name": "https", "port": 6443}],
    }


def _line(etype: str, obj: Any) -> bytes:
    return json.dumps({"type": etype, "object": obj}).encode() + b"\n"


async def test_odd_api_answers_and_lines(api: FakeApiServer, start: Start) -> None:
    good_list = {"kind": "EndpointSliceList", "metadata": {"resourceVersion": "5"},
                 "items": [_slice("kubernetes", "10.0.0.1"), "not an object"]}  # fmt: skip
    lists_script: list[Any] = [b"<html>not json</html>", {"kind": "Status", "code": 500}, good_list]
    watch_script = [
        [
            b"this is not json\n",
            b"\n",
            b'{"type":"SNAPSHOT","object":{}}\n',
            b'{"type":"ADDED","object":[]}\n',
            _line("ADDED", _slice("kubernetes-2", "10.0.0.2", rv="6"))[:20],  # split line ...
            _line("ADDED", _slice("kubernetes-2", "10.0.0.2", rv="6"))[20:],  # ... joined
            _line("DELETED", {"metadata": {}}),
            _line("BOOKMARK", {"metadata": {"resourceVersion": "9"}}),
            b'{"type":"MODIFIED","object":{"metadata":{"name":"kubernetes","resourceVersion":"10"},'
            b'"addressType":"IPv4","endpoints":[{"addresses":["10.0.0.3"]}],"ports":[{"port":6443}]}}'
            b'\n{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"11"}}}\n',
        ],
    ]
    async with Scripted(api, lists_script, watch_script) as odd:
        with capture_logs() as logs:
            run = await start(api, View(Endpoint("127.0.0.1", odd.port)))
            await run.until({"10.0.0.2:6443", "10.0.0.3:6443"})
            await wait_until(lambda: run.source.resource_version == "11", within=2)
    failed = [e["error"] for e in logs if e["event"] == "kubernetes.request_failed"]
    assert failed[0].startswith("LIST endpointslices: not JSON")
    assert failed[1] == "LIST endpointslices: list answer without metadata.resourceVersion"
    skipped_lines = [e["error"] for e in logs if e["event"] == "kubernetes.line_skipped"]
    assert skipped_lines[0].startswith("not JSON")
    assert skipped_lines[1:] == [
        "unknown watch event type 'SNAPSHOT'",
        "watch event object is a list, not an object",
    ]
    objects = [e for e in logs if e["event"] == "kubernetes.object_skipped"]
    assert [o["error"] for o in objects] == [
        "EndpointSlice is a string, not an object",
        "DELETED without a name",
    ]
    assert [sorted(map(str, e.endpoints)) for e in run.events] == [
        ["10.0.0.1:6443"],
        ["10.0.0.1:6443", "10.0.0.2:6443"],
        ["10.0.0.2:6443", "10.0.0.3:6443"],
    ]
    assert URL(odd.seen[3]).query["resourceVersion"] == "5"


async def test_error_event_inside_the_stream_backs_off_and_relists(
    api: FakeApiServer, start: Start
) -> None:
    good_list = {"metadata": {"resourceVersion": "5"}, "items": [_slice("kubernetes", "10.0.0.1")]}
    error = {"kind": "Status", "status": "Failure", "message": "boom", "reason": "InternalError",
             "code": 500}  # fmt: skip
    async with Scripted(api, [good_list], [[_line("ERROR", error)], []]) as odd:
        with capture_logs() as logs:
            run = await start(api, View(Endpoint("127.0.0.1", odd.port)))
            await wait_until(lambda: len(odd.seen) >= 4, within=3)
    [failed] = [e for e in logs if e["event"] == "kubernetes.request_failed"]
    assert failed["error"] == "ERROR event 500: InternalError: boom"
    assert failed["relist"] is True
    assert failed["retry_in"] > 0
    assert ["watch" in URL(p).query for p in odd.seen] == [False, True, False, True]
    assert len(run.events) == 1


async def test_a_stream_that_ends_at_once_is_backed_off(api: FakeApiServer, start: Start) -> None:
    good_list = {"metadata": {"resourceVersion": "5"}, "items": [_slice("kubernetes", "10.0.0.1")]}
    async with Scripted(api, [good_list], [], hold=False) as odd:
        with capture_logs() as logs:
            run = await start(api, View(Endpoint("127.0.0.1", odd.port)))
            await run.until({"10.0.0.1:6443"})
            await wait_until(lambda: len(odd.seen) >= 5, within=3)
    failed = [e for e in logs if e["event"] == "kubernetes.request_failed"]
    assert failed
    assert all(e["error"].endswith("the stream ended at once") for e in failed)
    assert [e["retry_in"] > 0 for e in failed] == [True] * len(failed)


async def test_runtime_runs_the_source_end_to_end(api: FakeApiServer, tmp_path: Path) -> None:
    """Through build_runtime: the pool gets the discovered set from the source."""
    api.set_apiservers(["127.0.0.1"], port=api.port)
    kubeconfig = make_kubeconfig(api, tmp_path / "kc.json", inline=True)
    cfg = from_mapping(
        {
            "listen": ["127.0.0.1:6445"],
            "admin": "",
            "state_file": "",
            "servers": {"addresses": [api.address]},
            "probe": {"kind": "https", "interval": 0.2, "timeout": 1.0,
                      "ca_file": str(api.ca_pem_path), "cert_file": str(api.client_cert_path),
                      "key_file": str(api.client_key_path), "server_name": "kubernetes"},
            "discovery": {"kubernetes": {"kubeconfig": str(kubeconfig)}},
        }
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, listen=(Endpoint("127.0.0.1", 0),))
    runtime: Runtime = app.build_runtime(cfg)
    task = asyncio.create_task(runtime.run())
    try:
        await wait_until(
            lambda: (
                SOURCE_KUBERNETES in getattr(runtime.pool.records.get(ep_of(api)), "sources", ())
            ),
            within=5,
        )
    finally:
        runtime.request_stop()
        await asyncio.wait_for(task, 10)


async def test_cancelled_just_as_the_stream_fails_leaves_nothing_unretrieved(
    api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    path = make_kubeconfig(api, tmp_path / "kc.json", inline=True)
    source = KubernetesSource.from_config(KubernetesConfig(kubeconfig=str(path)), View())

    async def failing(session: Any, target: Any) -> None:
        raise k8s._Failure("boom", relist=False)

    monkeypatch.setattr(source, "_stream", failing)
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        target = k8s._Target(URL("https://127.0.0.1:1"), "kubernetes", None)
        task = asyncio.create_task(source._watch(None, target))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # _watch runs and starts the stream task
        await asyncio.sleep(0)  # the stream task fails
        task.cancel()  # ... and _watch is cancelled before it looks
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert seen == []
