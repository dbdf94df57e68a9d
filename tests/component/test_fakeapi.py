"""Tests for the fake kube-apiserver in tests/fakeapi (real sockets, real TLS, real kubectl)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakeapi import FakeApiServer, make_kubeconfig

SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
SELECTOR = "labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes"
ENDPOINTS = "/api/v1/namespaces/default/endpoints"

# Run every test on asyncio and on uvloop (see tests/component/conftest.py): suites that use
# the fake run on both.
BOTH_LOOPS = True

UNAUTHORIZED = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "Unauthorized",
    "reason": "Unauthorized",
    "code": 401,
}


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="s3cr3t", bookmark_interval=0.2) as server:
        yield server


def _session(ctx: ssl.SSLContext) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ctx),
        timeout=aiohttp.ClientTimeout(total=10),
    )


@pytest.fixture
async def client(api: FakeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with _session(api.client_ssl_context()) as session:
        yield session


@pytest.fixture
async def anon(api: FakeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with _session(api.client_ssl_context(client_cert=False)) as session:
        yield session


async def _read_events(
    resp: aiohttp.ClientResponse, n: int, within: float = 3.0
) -> list[dict[str, Any]]:
    """Read up to ``n`` newline-delimited watch events (fewer if the stream ends)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while len(events) < n:
            line = await resp.content.readline()
            if not line:
                break
            events.append(json.loads(line))
    return events


# -- authentication and simple endpoints --------------------------------------------------------


async def test_anonymous_request_gets_401_status(
    api: FakeApiServer, anon: aiohttp.ClientSession
) -> None:
    for path in ("/readyz", "/version", "/api", SLICES):
        async with anon.get(api.url + path) as resp:
            assert resp.status == 401
            assert resp.content_type == "application/json"
            assert await resp.json() == UNAUTHORIZED
    async with anon.get(api.url + "/readyz", headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    assert api.requests[0] == ("GET", "/readyz", None)


async def test_readyz_with_client_cert_and_with_token(
    api: FakeApiServer, client: aiohttp.ClientSession, anon: aiohttp.ClientSession
) -> None:
    async with client.get(api.url + "/readyz") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        assert await resp.text() == "ok"
    async with anon.get(api.url + "/livez", headers={"Authorization": "Bearer s3cr3t"}) as resp:
        assert resp.status == 200
        assert await resp.text() == "ok"
    assert api.requests == [("GET", "/readyz", "system:admin"), ("GET", "/livez", "token")]

    api.ready = False
    async with client.get(api.url + "/readyz") as resp:
        assert resp.status == 500
        assert "[-]etcd failed" in await resp.text()


async def test_version_and_discovery_documents(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(api.url + "/version") as resp:
        version = await resp.json()
    assert set(version) == {
        "major",
        "minor",
        "gitVersion",
        "gitCommit",
        "gitTreeState",
        "buildDate",
        "goVersion",
        "compiler",
        "platform",
    }
    assert version["gitVersion"] == "v1.31.4+k3s1"
    assert (version["major"], version["minor"]) == ("1", "31")
    async with client.get(api.url + "/apis") as resp:
        groups = await resp.json()
    assert [g["name"] for g in groups["groups"]] == ["discovery.k8s.io"]
    async with client.get(api.url + "/apis/discovery.k8s.io/v1") as resp:
        resources = (await resp.json())["resources"]
    assert resources[0]["name"] == "endpointslices"
    assert resources[0]["namespaced"] is True
    assert {"get", "list", "watch"} <= set(resources[0]["verbs"])


async def test_server_certificate_names(api: FakeApiServer) -> None:
    ctx = api.client_ssl_context()
    for name in ("kubernetes", "kubernetes.default", "localhost"):
        reader, writer = await asyncio.open_connection(
            api.host, api.port, ssl=ctx, server_hostname=name
        )
        writer.close()
        await writer.wait_closed()
        del reader


async def test_shared_ca_between_fakes(api: FakeApiServer, client: aiohttp.ClientSession) -> None:
    async with FakeApiServer(ca=api.ca) as other:
        assert other.port != api.port
        async with client.get(other.url + "/readyz") as resp:
            assert resp.status == 200
        assert other.requests == [("GET", "/readyz", "system:admin")]


# -- list and watch -----------------------------------------------------------------------------


async def test_list_shapes_and_selectors(api: FakeApiServer, client: aiohttp.ClientSession) -> None:
    api.set_apiservers(["10.0.0.1", "10.0.0.2"])
    api.set_slice("other", ["10.9.9.9"], labels={"kubernetes.io/service-name": "other"})
    async with client.get(f"{api.url}{SLICES}?{SELECTOR}") as resp:
        body = await resp.json()
    assert body["kind"] == "EndpointSliceList"
    assert body["apiVersion"] == "discovery.k8s.io/v1"
    assert body["metadata"]["resourceVersion"] == str(api.resource_version)
    [item] = body["items"]
    assert "kind" not in item
    meta = item["metadata"]
    assert (meta["name"], meta["namespace"]) == ("kubernetes", "default")
    assert {"uid", "resourceVersion", "creationTimestamp", "labels"} <= set(meta)
    assert item["addressType"] == "IPv4"
    assert [e["addresses"] for e in item["endpoints"]] == [["10.0.0.1"], ["10.0.0.2"]]
    assert item["endpoints"][0]["conditions"] == {"ready": True}
    assert item["ports"] == [{"name": "https", "protocol": "TCP", "port": 6443}]

    query = "fieldSelector=metadata.name%3Dkubernetes"
    async with client.get(f"{api.url}{ENDPOINTS}?{query}") as resp:
        eps = await resp.json()
    assert eps["kind"] == "EndpointsList"
    [ep] = eps["items"]
    assert ep["subsets"] == [
        {
            "addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        }
    ]
    async with client.get(f"{api.url}{ENDPOINTS}/kubernetes") as resp:
        single = await resp.json()
    assert (single["kind"], single["apiVersion"]) == ("Endpoints", "v1")
    async with client.get(f"{api.url}{ENDPOINTS}/missing") as resp:
        assert resp.status == 404
        assert (await resp.json())["reason"] == "NotFound"


async def test_watch_sees_added_modified_deleted_in_order(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    api.set_apiservers(["10.0.0.1"])
    async with client.get(f"{api.url}{SLICES}?{SELECTOR}") as resp:
        list_rv = (await resp.json())["metadata"]["resourceVersion"]
    url = f"{api.url}{SLICES}?{SELECTOR}&watch=1&resourceVersion={list_rv}&timeoutSeconds=30"
    async with client.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        await api.wait_for_watchers(1)
        api.set_slice("kubernetes-v6", ["fd00::1"], address_type="IPv6")
        api.set_slice("unrelated", ["10.1.1.1"], labels={"app": "x"})  # filtered out
        api.set_apiservers(["10.0.0.1", "10.0.0.2"])
        api.set_apiservers(["10.0.0.1", "10.0.0.2"])  # unchanged: no event
        api.delete_slice("kubernetes-v6")
        events = await _read_events(resp, 3)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "kubernetes-v6"),
        ("MODIFIED", "kubernetes"),
        ("DELETED", "kubernetes-v6"),
    ]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert int(list_rv) < rvs[0] < rvs[1] < rvs[2] == api.resource_version
    assert events[1]["object"]["kind"] == "EndpointSlice"
    assert len(events[1]["object"]["endpoints"]) == 2


async def test_watch_replays_history_and_initial_state(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    first = int(api.set_endpoints("kubernetes", ["10.0.0.1"]))
    api.set_endpoints("kubernetes", ["10.0.0.1", "10.0.0.2"], not_ready=["10.0.0.3"])
    field = "fieldSelector=metadata.name%3Dkubernetes"
    async with client.get(f"{api.url}{ENDPOINTS}?{field}&watch=true&resourceVersion={first}") as r:
        [replayed] = await _read_events(r, 1)
    assert replayed["type"] == "MODIFIED"
    assert replayed["object"]["subsets"][0]["notReadyAddresses"] == [{"ip": "10.0.0.3"}]
    async with client.get(f"{api.url}{ENDPOINTS}?{field}&watch=true") as r:
        [initial] = await _read_events(r, 1)
    assert initial["type"] == "ADDED"
    assert initial["object"]["metadata"]["resourceVersion"] == str(api.resource_version)


async def test_label_change_turns_into_deleted_for_the_watcher(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    api.set_apiservers(["10.0.0.1"])
    url = f"{api.url}{SLICES}?{SELECTOR}&watch=1&resourceVersion={api.resource_version}"
    async with client.get(url) as resp:
        await api.wait_for_watchers(1)
        api.set_slice("kubernetes", ["10.0.0.1"], labels={"kubernetes.io/service-name": "nope"})
        [event] = await _read_events(resp, 1)
    assert event["type"] == "DELETED"
    assert event["object"]["metadata"]["resourceVersion"] == str(api.resource_version)


async def test_bookmarks_periodic_and_on_demand(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    api.set_apiservers(["10.0.0.1"])
    rv = api.resource_version
    url = f"{api.url}{SLICES}?{SELECTOR}&watch=1&resourceVersion={rv}&allowWatchBookmarks=true"
    async with client.get(url) as resp:
        [periodic] = await _read_events(resp, 1, within=2.0)
        api.bookmark_interval = 0  # no more periodic ones: only on demand
        api.set_slice("elsewhere", ["10.5.5.5"], labels={"app": "x"})  # not selected
        with pytest.raises(TimeoutError):
            await _read_events(resp, 1, within=0.5)
        assert api.send_bookmark() == 1
        [on_demand] = await _read_events(resp, 1)
    assert periodic == {
        "type": "BOOKMARK",
        "object": {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(rv)},
        },
    }
    assert on_demand["type"] == "BOOKMARK"
    assert on_demand["object"]["metadata"] == {"resourceVersion": str(api.resource_version)}


async def test_no_bookmarks_unless_allowed(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    url = f"{api.url}{SLICES}?watch=1&resourceVersion={api.resource_version}&timeoutSeconds=1"
    async with client.get(url) as resp:
        assert api.send_bookmark() == 0
        assert await _read_events(resp, 5) == []


async def test_expired_resource_version_inside_the_stream(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    old = int(api.set_apiservers(["10.0.0.1"])[0])
    api.set_apiservers(["10.0.0.2"])
    compacted = api.compact()
    async with client.get(f"{api.url}{SLICES}?watch=1&resourceVersion={old}") as resp:
        assert resp.status == 200
        events = await _read_events(resp, 5)
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {old} ({compacted})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]


async def test_expire_open_watches_and_history_overflow() -> None:
    async with (
        FakeApiServer(history_size=2) as small,
        _session(small.client_ssl_context()) as session,
    ):
        start = small.resource_version
        for i in range(3):
            small.set_slice("kubernetes", [f"10.0.0.{i + 1}"])
        async with session.get(f"{small.url}{SLICES}?watch=1&resourceVersion={start}") as r:
            [event] = await _read_events(r, 5)
        assert event["object"]["code"] == 410
        url = f"{small.url}{SLICES}?watch=1&resourceVersion={small.resource_version}"
        async with session.get(url) as r:
            await small.wait_for_watchers(1)
            assert small.expire_watches() == 1
            [event] = await _read_events(r, 5)
        assert event["type"] == "ERROR"
        assert event["object"]["reason"] == "Expired"


async def test_timeout_seconds_ends_the_stream(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(f"{api.url}{SLICES}?watch=1&timeoutSeconds=1") as resp:
        assert await resp.read() == b""  # ends with the terminating chunk, no error
    assert 0.9 <= loop.time() - started < 3.0
    assert api.watch_count == 0


# -- fault switches -----------------------------------------------------------------------------


async def test_injected_failures_and_unserved_slices(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    api.fail_next_requests(2, status=500)
    for _ in range(2):
        async with client.get(f"{api.url}{SLICES}") as resp:
            assert resp.status == 500
            assert (await resp.json())["reason"] == "InternalError"
    async with client.get(f"{api.url}{SLICES}") as resp:
        assert resp.status == 200

    api.fail_next_list(410)
    async with client.get(f"{api.url}{SLICES}?resourceVersion=1") as resp:
        assert resp.status == 410
        assert (await resp.json())["reason"] == "Expired"

    api.serve_slices = False
    async with client.get(f"{api.url}{SLICES}") as resp:
        assert resp.status == 404
        assert (await resp.json())["reason"] == "NotFound"
    async with client.get(f"{api.url}/apis") as resp:
        assert (await resp.json())["groups"] == []
    async with client.get(f"{api.url}{ENDPOINTS}") as resp:
        assert resp.status == 200

    # status=0: reset without an answer (twice: aiohttp retries once on a reused connection)
    api.fail_next_requests(2, status=0)
    with pytest.raises(aiohttp.ClientError):
        async with client.get(f"{api.url}{ENDPOINTS}") as resp:
            await resp.read()
    async with client.get(f"{api.url}{ENDPOINTS}") as resp:
        assert resp.status == 200


async def test_cut_watch_stream_mid_line(api: FakeApiServer, client: aiohttp.ClientSession) -> None:
    received = bytearray()

    async def drain(resp: aiohttp.ClientResponse) -> None:
        async for chunk in resp.content.iter_any():
            received.extend(chunk)

    async with client.get(f"{api.url}{SLICES}?watch=1&resourceVersion=1000") as resp:
        await api.wait_for_watchers(1)
        assert api.cut_watch_streams(mid_line=True) == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await drain(resp)
    assert received.startswith(b'{"type":"BOOKMARK"')
    assert not received.endswith(b"\n")
    assert api.watch_count == 0


async def test_freeze_holds_requests_until_unfrozen(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    api.freeze()
    pending = asyncio.ensure_future(client.get(api.url + "/readyz"))
    await api.wait_for_requests(lambda r: r.path_qs == "/readyz")
    await asyncio.sleep(0.2)
    assert not pending.done()
    api.unfreeze()
    resp = await asyncio.wait_for(pending, 2)
    async with resp:
        assert resp.status == 200

    api.set_latency(0.3, path_prefix="/livez")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(api.url + "/livez") as resp:
        assert resp.status == 200
    assert loop.time() - started >= 0.3


async def test_freeze_stalls_watch_streams_but_cut_still_works(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    url = f"{api.url}{SLICES}?watch=1&resourceVersion={api.resource_version}"
    async with client.get(url) as resp:
        await api.wait_for_watchers(1)
        api.freeze()
        api.set_apiservers(["10.0.0.1"])
        with pytest.raises(TimeoutError):
            await _read_events(resp, 1, within=0.3)
        api.unfreeze()
        [event] = await _read_events(resp, 1)
        assert event["type"] == "ADDED"
        api.freeze()
        api.cut_watch_streams(mid_line=False)
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_etcd_only_mode(api: FakeApiServer, anon: aiohttp.ClientSession) -> None:
    api.mode = "etcd-only"
    async with anon.get(api.url + "/readyz") as resp:
        assert resp.status == 503
        assert resp.content_type == "text/plain"
        assert await resp.text() == "apiserver disabled"
    async with anon.get(api.url + SLICES) as resp:
        assert resp.status == 503
    async with anon.get(api.url + "/ping") as resp:
        assert resp.status == 200
        assert await resp.text() == "pong"
    async with anon.get(api.url + "/cacerts") as resp:
        assert (await resp.read()) == api.ca_pem
    api.etcd_only_json_errors = True  # newer k3s: the same answer as a JSON Status
    async with anon.get(api.url + "/version") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert (body["message"], body["reason"]) == ("apiserver disabled", "ServiceUnavailable")
    api.mode = "apiserver"
    async with anon.get(api.url + "/readyz") as resp:
        assert resp.status == 401


async def test_anonymous_allowed_when_client_cert_not_required(
    api: FakeApiServer, anon: aiohttp.ClientSession
) -> None:
    async with FakeApiServer(ca=api.ca, require_client_cert=False) as open_api:
        async with anon.get(open_api.url + "/readyz") as resp:
            assert resp.status == 200
        assert open_api.requests == [("GET", "/readyz", None)]


async def test_raw_malformed_slices_are_served_as_given(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    api.put_raw_slice(
        {
            "metadata": {"name": "weird", "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["api.example.com"]}],
        }
    )
    async with client.get(f"{api.url}{SLICES}?{SELECTOR}") as resp:
        [item] = (await resp.json())["items"]
    assert item["addressType"] == "FQDN"
    assert "ports" not in item
    assert "conditions" not in item["endpoints"][0]


async def test_restart_keeps_port_and_state(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    api.set_apiservers(["10.0.0.1"])
    port, rv = api.port, api.resource_version
    await api.restart()
    assert api.port == port
    async with client.get(f"{api.url}{SLICES}") as resp:
        body = await resp.json()
    assert body["metadata"]["resourceVersion"] == str(rv)
    assert len(body["items"]) == 1


async def test_close_ends_watches_and_frees_the_port(
    api: FakeApiServer, client: aiohttp.ClientSession
) -> None:
    server = FakeApiServer(ca=api.ca)
    await server.start()
    port = server.port
    async with client.get(f"{server.url}{SLICES}?watch=1") as resp:
        await server.wait_for_watchers(1)
        server.freeze()
        held = asyncio.ensure_future(client.get(server.url + "/readyz"))
        await server.wait_for_requests(lambda r: r.path_qs == "/readyz")
        await asyncio.wait_for(server.close(), 3)
        assert await resp.read() == b""
    async with await asyncio.wait_for(held, 3) as answer:
        await answer.read()  # released by the shutdown, not left hanging
    with socket.socket() as sock:  # listening socket gone (TIME_WAIT pairs may remain)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


# -- the real kubectl ---------------------------------------------------------------------------


async def _kubectl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl binary not found on PATH"
)


@needs_kubectl
@pytest.mark.parametrize("inline", [True, False])
async def test_kubectl_get_raw_version(api: FakeApiServer, tmp_path: Path, inline: bool) -> None:
    kubeconfig = make_kubeconfig(api, tmp_path / "kubeconfig.json", inline=inline)
    rc, out, err = await _kubectl(
        "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp_path / "cache"),
        "get", "--raw", "/version",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)["gitVersion"] == "v1.31.4+k3s1"
    assert ("GET", "/version", "system:admin") in api.requests


@needs_kubectl
async def test_kubectl_get_endpointslices_and_endpoints(api: FakeApiServer, tmp_path: Path) -> None:
    api.set_apiservers(["10.0.0.1", "10.0.0.2"])
    kubeconfig = make_kubeconfig(api, tmp_path / "kubeconfig.json", inline=True, token="s3cr3t")
    common = ["--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp_path / "cache")]
    rc, out, err = await _kubectl(*common, "get", "endpointslices", "-n", "default")
    assert rc == 0, err
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    assert row.split()[:4] == ["kubernetes", "IPv4", "6443", "10.0.0.1,10.0.0.2"]
    rc, out, err = await _kubectl(*common, "get", "endpoints", "kubernetes", "-n", "default")
    assert rc == 0, err
    assert "10.0.0.1:6443,10.0.0.2:6443" in out
    assert all(r.authenticated_as == "token" for r in api.requests)
