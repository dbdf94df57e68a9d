"""The real kubectl talks to the fake kube-apiserver through an in-process lbproxy."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lbproxy import app
from lbproxy.config import from_mapping
from lbproxy.model import SOURCE_KUBERNETES, Endpoint
from lbproxy.runtime import Runtime
from tests.fakeapi import FakeApiServer, make_kubeconfig
from tests.helpers import RuntimeHarness, reserved_port, wait_until

BOTH_LOOPS = True

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl binary not found on PATH"
)


async def kubectl(kubeconfig: Path, *args: str) -> tuple[int, str, str]:
    # A subprocess of the loop: the in-process proxy keeps serving while kubectl runs.
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        "--kubeconfig", str(kubeconfig),
        "--cache-dir", str(kubeconfig.parent / "kube-cache"),
        "--request-timeout", "10s",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def https_probe(api: FakeApiServer) -> dict[str, Any]:
    return {
        "kind": "https",
        "interval": 0.2,
        "timeout": 1.0,
        "ca_file": str(api.ca_pem_path),
        "cert_file": str(api.client_cert_path),
        "key_file": str(api.client_key_path),
        "server_name": "kubernetes",
    }


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(bookmark_interval=0) as server:
        yield server


async def test_kubectl_through_lbproxy(
    api: FakeApiServer, runtimes: RuntimeHarness, tmp_path: Path
) -> None:
    api.set_apiservers(["10.0.0.1", "10.0.0.2"])
    runtime = await runtimes.start([api.address], probe=https_probe(api))
    await wait_until(lambda: runtime.healthy_apiservers() == [Endpoint(api.host, api.port)])
    port = runtimes.port
    kubeconfig = make_kubeconfig(
        api,
        tmp_path / "kubeconfig.json",
        inline=True,
        server=f"https://127.0.0.1:{port}",
        tls_server_name="kubernetes",
    )
    rc, out, err = await kubectl(kubeconfig, "get", "--raw", "/version")
    assert rc == 0, err
    assert json.loads(out)["gitVersion"] == "v1.31.4+k3s1"

    rc, out, err = await kubectl(kubeconfig, "get", "endpointslices", "-n", "default")
    assert rc == 0, err
    header, row = out.strip().splitlines()
    assert header.split() == ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]
    assert row.split()[:4] == ["kubernetes", "IPv4", "6443", "10.0.0.1,10.0.0.2"]
    # The requests reached the fake through lbproxy, as the kubeconfig's user.
    assert any(
        r.path_qs.startswith("/version") and r.authenticated_as == "system:admin"
        for r in api.requests
    )
    assert runtime.stats.accepted >= 2


async def test_kubectl_and_discovery_on_an_etcd_only_node(
    api: FakeApiServer, runtimes: RuntimeHarness, tmp_path: Path
) -> None:
    """The k3s etcd-only layout: one kubeconfig whose server is lbproxy's own listener,
    used by kubectl and by lbproxy's Kubernetes source. The source must not discover
    through lbproxy itself; it dials the apiserver the https probe confirmed."""
    api.set_apiservers(["127.0.0.1"], port=api.port)
    with reserved_port() as port:
        kubeconfig = make_kubeconfig(
            api, tmp_path / "k3scontroller.kubeconfig", inline=False,
            server=f"https://127.0.0.1:{port}", tls_server_name="kubernetes",
        )  # fmt: skip
        data = runtimes.config(
            [api.address],
            probe=https_probe(api),
            discovery={"kubernetes": {"kubeconfig": str(kubeconfig), "watch_timeout": 30}},
        )
        data.pop("listen")
        cfg = dataclasses.replace(from_mapping(data), listen=(Endpoint("127.0.0.1", port),))
        runtime: Runtime = app.build_runtime(cfg)
        task = asyncio.create_task(runtime.run())
        runtimes.running.append((runtime, task))
        await asyncio.wait_for(runtime.started.wait(), 30)

    fake = Endpoint(api.host, api.port)
    await wait_until(
        lambda: (
            fake in runtime.pool.records and SOURCE_KUBERNETES in runtime.pool.records[fake].sources
        ),
        within=10,
    )
    await api.wait_for_watchers(1)
    # The source listed and is watching, straight at the apiserver the probe confirmed:
    # not one connection went through lbproxy's listener (the kubeconfig's server).
    assert runtime.stats.accepted == 0

    rc, out, err = await kubectl(kubeconfig, "get", "endpointslices", "-n", "default", "-o", "json")
    assert rc == 0, err
    [item] = json.loads(out)["items"]
    assert item["endpoints"][0]["addresses"] == ["127.0.0.1"]
    assert runtime.stats.accepted >= 1  # kubectl's, through lbproxy
