"""Test helpers: small real TCP backends and clients on 127.0.0.1, child-process backends
that a test can freeze with SIGSTOP, an lbproxy child process, and polling utilities.

Everything here binds loopback only, and everything that starts a server or a process
hands back something the caller must (and the fixtures do) stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbproxy.config import ProbeConfig, ProbeKind, from_mapping
from lbproxy.health.checks import Check, Checker
from lbproxy.model import Endpoint
from lbproxy.pool.events import ProbeCompleted
from lbproxy.pool.states import ProbeOutcome
from lbproxy.runtime import Runtime

LOCALHOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * 1024
READ_SIZE = 256 * KiB


# --------------------------------------------------------------------------- polling
async def wait_until(
    predicate: Callable[[], object], *, within: float = 10.0, what: str = "condition"
) -> float:
    """Poll ``predicate`` until it is true; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not predicate():
        if loop.time() - started > within:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.005)
    return loop.time() - started


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible test data."""
    import random

    return random.Random(seed).randbytes(size)


# --------------------------------------------------------------------------- backends
@dataclass(eq=False)
class Conn:
    """One connection accepted by a Backend, with what went through it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: int = 0
    sent: int = 0
    digest: Any = field(default_factory=hashlib.sha256)  # of the bytes received
    data: bytearray = field(default_factory=bytearray)  # kept only if Backend(keep=True)
    keep: bool = False
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, n: int = READ_SIZE) -> bytes:
        chunk = await self.reader.read(n)
        if chunk:
            self.received += len(chunk)
            self.digest.update(chunk)
            if self.keep:
                self.data += chunk
        else:
            self.eof.set()
        return chunk

    async def read_to_eof(self) -> None:
        while await self.read():
            pass

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.sent += len(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with SO_LINGER 0, so that the peer gets a RST."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Conn], Awaitable[None]]


class Backend:
    """An asyncio TCP server on 127.0.0.1:0 running ``handler`` for each connection.

    ``conns`` lists every accepted connection, including the health probes' (which
    never send a byte); ``served`` lists only those that carried client data.
    """

    def __init__(self, handler: Handler, *, keep: bool = False) -> None:
        self.handler = handler
        self.keep = keep
        self.conns: list[Conn] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> Backend:
        self._server = await asyncio.start_server(self._on_connect, LOCALHOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(LOCALHOST, self.port)

    @property
    def served(self) -> list[Conn]:
        return [c for c in self.conns if c.received > 0]

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer, keep=self.keep)
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(conn)
        except OSError:  # peers vanish at any time: probes abort at once, tests reset
            pass
        except RuntimeError as exc:
            # uvloop's way of saying the same: "unable to perform operation on
            # <TCPTransport closed=True ...>; the handler is closed".
            if not writer.transport.is_closing():
                self.errors.append(exc)
        except asyncio.CancelledError:
            # Only close() cancels; ending quietly keeps Python 3.11's streams callback
            # (task.exception() on a cancelled task) from reporting an error.
            pass
        except Exception as exc:  # noqa: BLE001 - surfaced by close()
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            writer.close()
            conn.done.set()

    async def stop_listening(self) -> None:
        """Close the listening socket: the port now refuses connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def close(self) -> None:
        await self.stop_listening()
        for conn in self.conns:
            conn.writer.transport.abort()
        if self._tasks:  # handlers see their connection go; give them a moment to end
            await asyncio.wait(set(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports run connection_lost
        assert not self.errors, f"backend handler failed: {self.errors!r}"


# Handlers. Those that send first wait for one byte from the client, so that the health
# probes (which connect and leave at once) never start a transfer.
async def echo(conn: Conn) -> None:
    """Echo with flow control; after the client's EOF, flush and shut down too."""
    while chunk := await conn.read():
        await conn.write(chunk)
    if conn.writer.can_write_eof():
        conn.writer.write_eof()


def sender(total: int, block: bytes, *, digest: Any = None) -> Handler:
    """After the first byte from the client, send ``total`` bytes (``block`` repeated,
    each copy stamped with its index) as fast as flow control allows, then close."""

    async def handler(conn: Conn) -> None:
        if not await conn.read(1):
            return
        index = 0
        while conn.sent < total:
            chunk = stamped(block, index)[: total - conn.sent]
            if digest is not None:
                digest.update(chunk)
            await conn.write(chunk)
            index += 1
        conn.writer.write_eof()
        await conn.read_to_eof()

    return handler


def stamped(block: bytes, index: int) -> bytes:
    return index.to_bytes(8, "big") + block[8:]


async def sink(conn: Conn) -> None:
    await conn.read_to_eof()


def reset_after(nbytes: int) -> Handler:
    """After the first byte from the client, send ``nbytes`` and then reset (SO_LINGER 0)."""

    async def handler(conn: Conn) -> None:
        if not await conn.read(1):
            return
        # With a zero high-water mark, drain() returns once the buffer is empty.
        conn.writer.transport.set_write_buffer_limits(high=0)
        await conn.write(pattern(nbytes, seed=7))
        conn.reset()

    return handler


class Backends:
    """Starts Backend servers; the fixture stops every one of them at teardown."""

    def __init__(self) -> None:
        self.started: list[Backend] = []

    async def start(self, handler: Handler, *, keep: bool = False) -> Backend:
        backend = await Backend(handler, keep=keep).start()
        self.started.append(backend)
        return backend

    async def close_all(self) -> None:
        errors = []
        for backend in self.started:
            try:
                await backend.close()
            except AssertionError as exc:
                errors.append(exc)
        self.started.clear()
        if errors:
            raise errors[0]


# --------------------------------------------------------------------------- clients
class Clients:
    """Client connections a test opens; whatever is still open at teardown is aborted."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def open(
        self, port: int, host: str = LOCALHOST, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, port, **kwargs)
        self.writers.append(writer)
        return reader, writer

    async def close_all(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()
        await asyncio.sleep(0)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> bytes:
    """Send ``payload`` to an echo service and read the same number of bytes back."""
    writer.write(payload)
    await writer.drain()
    return await reader.readexactly(len(payload))


async def closed_by_peer(reader: asyncio.StreamReader, within: float = 10.0) -> bool:
    """Wait for EOF or a reset on a client connection; False on timeout."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(READ_SIZE):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def reset_client(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------- runtime
def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


class RuntimeHarness:
    """Starts Runtimes in tasks of the test's loop and stops them at teardown.

    It also records every context that reaches the loop's exception handler (the
    Runtime installs its own handler, which logs; we wrap it), and the fixture fails
    the test if any arrived.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[tuple[Runtime, asyncio.Task[None]]] = []
        self.loop_errors: list[dict[str, Any]] = []

    def config(self, servers: list[str], **overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "listen": ["127.0.0.1:0"],
            "admin": "",
            "state_file": str(self.tmp_path / f"state-{len(self.running)}.json"),
            "servers": {"addresses": servers},
            "probe": {"kind": "tcp", "interval": 0.2, "timeout": 0.2, "fall": 2},
            "drain_timeout": 1.0,
        }
        return merge(base, overrides)

    async def start(
        self, servers: list[str], *, check: Check | None = None, **overrides: Any
    ) -> Runtime:
        data = self.config(servers, **overrides)
        # Config validation rejects port 0, which tests need: bind the listeners here.
        listen = tuple(_any_port(text) for text in data.pop("listen"))
        runtime = Runtime(dataclasses.replace(from_mapping(data), listen=listen), check=check)
        task = asyncio.create_task(runtime.run())
        started = asyncio.create_task(runtime.started.wait())
        await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
            if task.done():
                task.result()  # raises what run() raised
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise AssertionError("runtime did not start within 30s")
        self.running.append((runtime, task))
        self._watch_loop()
        return runtime

    def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        inner = loop.get_exception_handler()
        if getattr(inner, "harness", None) is self:
            return

        def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            self.loop_errors.append(context)
            if inner is not None:
                inner(loop, context)
            else:
                loop.default_exception_handler(context)

        record.harness = self  # type: ignore[attr-defined]
        loop.set_exception_handler(record)

    @property
    def port(self) -> int:
        """The first listen port of the first runtime."""
        return self.running[0][0].listen_addresses[0][1]

    async def stop_all(self) -> None:
        for runtime, _ in self.running:
            runtime.request_stop()
        for runtime, task in self.running:
            async with asyncio.timeout(runtime.cfg.drain_timeout + 20):
                await task
        self.running.clear()
        asyncio.get_running_loop().set_exception_handler(None)


def endpoint_of(runtime: Runtime, writer: asyncio.StreamWriter) -> Endpoint | None:
    """The upstream endpoint a client connection is wired to (matched by its port)."""
    local = writer.get_extra_info("sockname")[:2]
    for ep, group in runtime.bridges.items():
        for bridge in group:
            tr = bridge.client.transport
            if tr is not None and tr.get_extra_info("peername")[:2] == local:
                return ep
    return None


def connections_by_endpoint(runtime: Runtime) -> dict[Endpoint, int]:
    return {ep: len(group) for ep, group in runtime.bridges.items()}


def _any_port(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(host.strip("[]"), int(port))


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A free port on 127.0.0.1 for a child process to listen on.

    The port stays bound (SO_REUSEADDR, not listening) until the block ends, so no other
    socket can take it meanwhile; Linux still lets another SO_REUSEADDR socket, such as
    lbproxy's listener, bind and listen on it.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOCALHOST, 0))
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------- probes
def confirming_tcp_check(timeout: float) -> Check:
    """A TCP connect probe whose success counts as a confirmed apiserver, as an HTTPS
    probe's 200 would: lets the pool's healthy-apiserver rules (sticky, least
    connections) apply to plain TCP backends."""
    inner = Checker(ProbeConfig(kind=ProbeKind.TCP, timeout=timeout))

    async def check(ep: Endpoint) -> ProbeCompleted:
        result = await inner(ep)
        if result.outcome is ProbeOutcome.OK:
            result = dataclasses.replace(result, confirms_apiserver=True)
        return result

    return check


class GatedCheck:
    """Wraps a check; once ``closed``, probes hang until cancelled, so that only the
    forwarder's dial results move the pool."""

    def __init__(self, inner: Check) -> None:
        self.inner = inner
        self.closed = False
        self.calls: dict[Endpoint, int] = {}

    async def __call__(self, ep: Endpoint) -> ProbeCompleted:
        self.calls[ep] = self.calls.get(ep, 0) + 1
        if self.closed:
            await asyncio.Event().wait()
        return await self.inner(ep)


@contextlib.asynccontextmanager
async def no_new_descriptors() -> AsyncIterator[None]:
    """Make every open(), socket() and accept() of this process fail with EMFILE.

    The soft RLIMIT_NOFILE drops to the lowest free descriptor number, and a task takes
    any descriptor freed meanwhile (a connection closing below the limit) before anyone
    else can reuse it. Descriptors already open stay usable.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))

    async def take_freed() -> None:
        while True:
            _take_free_descriptors(held)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(take_freed())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _take_free_descriptors(held: list[int]) -> None:
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return


# --------------------------------------------------------------------------- blackhole
@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose listen queue is full: SYNs are dropped, so connects hang (Linux)."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind((LOCALHOST, 0))
        listener.listen(0)  # room for one queued connection, never accepted
        port = listener.getsockname()[1]
        filler.connect((LOCALHOST, port))
        yield port
    finally:
        filler.close()
        listener.close()


# --------------------------------------------------------------------------- processes
# A threaded TLS echo server in a child process, so that SIGSTOP freezes it while the
# kernel still completes TCP handshakes from its listen backlog.
TLS_ECHO_CHILD = r"""
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(128)
print(srv.getsockname()[1], flush=True)

def serve(conn):
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            while data := tls.recv(65536):
                tls.sendall(data)
    except (OSError, ValueError):
        conn.close()

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@dataclass
class Child:
    proc: subprocess.Popen[str]
    port: int

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(LOCALHOST, self.port)

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGCONT (a stopped process cannot die of SIGKILL before it runs), SIGKILL, reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    proc.wait(timeout=30)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@contextlib.contextmanager
def child_backend(script: str, *args: str) -> Iterator[Child]:
    """Run ``script`` (which prints its port first) in a child Python; killed on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"child backend did not start (exit code {proc.poll()})")
        yield Child(proc, int(line))
    finally:
        stop_process(proc)


# Lowers RLIMIT_NOFILE and then becomes `python -m lbproxy ...`; doing this in the
# child's own code rather than a preexec_fn keeps the fork safe in a threaded parent.
_WITH_NOFILE = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'lbproxy', *sys.argv[2:]])\n"
)


@dataclass
class LbproxyProcess:
    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        out = []
        for line in self.stdout.read_bytes().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def started(self) -> dict[str, Any] | None:
        for doc in self.events():
            if doc.get("event") == "lbproxy.started":
                return doc
        return None

    async def wait_started(self, within: float = 30.0) -> dict[str, Any]:
        """The ``lbproxy.started`` log line (it names the bound addresses)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (doc := self.started()) is None:
            if self.proc.poll() is not None:
                tail = self.stderr.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"lbproxy exited with {self.proc.returncode}: {tail}")
            if loop.time() > deadline:
                raise RuntimeError(f"lbproxy did not start within {within:g}s")
            await asyncio.sleep(0.02)
        return doc

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def lbproxy_process(args: list[str], workdir: Path, *, nofile: int) -> Iterator[LbproxyProcess]:
    stdout, stderr = workdir / "lbproxy.out", workdir / "lbproxy.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WITH_NOFILE, str(nofile), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    handle = LbproxyProcess(proc, stdout, stderr)
    try:
        yield handle
    finally:
        stop_process(proc)
