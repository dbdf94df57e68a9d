"""The forwarder and runtime against real sockets: integrity, half-close, backpressure,
dial retry, frozen and resetting upstreams, a client leaving mid-dial, a busy listen
port, and running out of file descriptors."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
from pathlib import Path

import pytest
import trustme

from lbproxy.config import ProbeConfig, ProbeKind
from lbproxy.errors import LbproxyError
from lbproxy.health.checks import Checker
from lbproxy.model import SOURCE_STATIC, Endpoint
from lbproxy.pool.events import EndpointsDiscovered, ProbeCompleted
from lbproxy.pool.states import State
from lbproxy.runtime import Runtime
from tests.helpers import (
    TLS_ECHO_CHILD,
    Backends,
    Clients,
    Conn,
    GatedCheck,
    MiB,
    RuntimeHarness,
    blackhole,
    child_backend,
    closed_by_peer,
    confirming_tcp_check,
    echo,
    lbproxy_process,
    no_new_descriptors,
    pattern,
    reserved_port,
    reset_after,
    reset_client,
    roundtrip,
    sender,
    wait_until,
)

BOTH_LOOPS = True  # see pytest_asyncio_loop_factories in conftest.py


def buffered(runtime: Runtime) -> int:
    """Bytes waiting in the write buffers of every bridge transport, both directions."""
    total = 0
    for group in runtime.bridges.values():
        for bridge in group:
            for side in (bridge.client, bridge.upstream):
                if side is not None and side.transport is not None:
                    total += side.transport.get_write_buffer_size()
    return total


# --------------------------------------------------------------------------- 1
async def test_50mib_each_way_intact(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    backend = await backends.start(echo)
    await runtimes.start([backend.address])
    data = pattern(50 * MiB, seed=1)
    reader, writer = await clients.open(runtimes.port)
    received = hashlib.sha256()
    count = 0

    async def send() -> None:
        view = memoryview(data)
        for i in range(0, len(data), 256 * 1024):
            writer.write(view[i : i + 256 * 1024])
            await writer.drain()
        writer.write_eof()

    async def receive() -> None:
        nonlocal count
        while chunk := await reader.read(1 << 20):
            count += len(chunk)
            received.update(chunk)

    async with asyncio.timeout(60):
        await asyncio.gather(send(), receive())
    writer.close()

    sent = hashlib.sha256(data).hexdigest()
    [conn] = backend.served
    assert conn.received == len(data)
    assert conn.digest.hexdigest() == sent  # client -> backend
    assert count == len(data)
    assert received.hexdigest() == sent  # backend -> client
    await wait_until(lambda: not runtimes.running[0][0].open_bridges, what="bridge released")


# --------------------------------------------------------------------------- 2
async def test_half_close_from_client(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    reply = pattern(1 * MiB, seed=2)
    events: list[str] = []

    async def answer_after_eof(conn: Conn) -> None:
        await conn.read_to_eof()
        if conn.received == 0:
            return  # a health probe
        events.append("backend saw eof")
        await conn.write(reply)
        events.append("reply sent")

    backend = await backends.start(answer_after_eof, keep=True)
    runtime = await runtimes.start([backend.address])
    reader, writer = await clients.open(runtimes.port)
    writer.write(b"request body")
    await writer.drain()
    writer.write_eof()

    async with asyncio.timeout(20):
        got = await reader.read()  # to EOF
    assert got == reply
    assert events == ["backend saw eof", "reply sent"]
    [conn] = backend.served
    assert bytes(conn.data) == b"request body"
    await wait_until(lambda: not runtime.open_bridges, what="bridge closed after both EOFs")
    writer.close()


async def test_half_close_from_backend(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    greeting = pattern(300 * 1024, seed=3)
    request = pattern(700 * 1024, seed=4)

    async def shut_then_listen(conn: Conn) -> None:
        if not await conn.read(1):
            return  # a health probe
        await conn.write(greeting)
        conn.writer.write_eof()
        await conn.read_to_eof()  # the client may still send

    backend = await backends.start(shut_then_listen, keep=True)
    runtime = await runtimes.start([backend.address])
    reader, writer = await clients.open(runtimes.port)
    writer.write(b"!")
    async with asyncio.timeout(20):
        got = await reader.read()  # to the backend's EOF
    assert got == greeting
    assert not writer.is_closing()

    # The backend's write side is shut; the client's direction must still flow.
    writer.write(request)
    await writer.drain()
    writer.write_eof()
    [conn] = backend.served
    async with asyncio.timeout(20):
        await conn.done.wait()
    assert bytes(conn.data) == b"!" + request
    await wait_until(lambda: not runtime.open_bridges, what="bridge closed after both EOFs")
    writer.close()


# --------------------------------------------------------------------------- 3
async def test_backpressure_bounds_proxy_buffers(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    total = 200 * MiB
    block = pattern(1 * MiB, seed=5)
    sent_digest = hashlib.sha256()
    backend = await backends.start(sender(total, block, digest=sent_digest))
    runtime = await runtimes.start([backend.address])
    bound = 4 * runtime.cfg.forward.buffer_size
    samples: list[int] = []

    async def sample() -> None:
        while True:
            samples.append(buffered(runtime))
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    try:
        reader, writer = await clients.open(runtimes.port)
        writer.write(b"go")
        first = await reader.readexactly(1024)
        # Stall: the backend keeps sending, the proxy must stop reading from it.
        await asyncio.sleep(1.0)
        stalled = max(samples)
        digest = hashlib.sha256(first)
        count = len(first)
        async with asyncio.timeout(90):
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
                count += len(chunk)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    writer.close()

    assert count == total
    assert digest.hexdigest() == sent_digest.hexdigest()
    assert len(samples) > 100
    assert stalled > 0, "the sampler never saw buffered bytes: is it looking at the bridge?"
    assert max(samples) <= bound, f"proxy buffered {max(samples)} bytes (bound {bound})"


# --------------------------------------------------------------------------- 4
async def test_dial_retry_to_live_backend(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    one = await backends.start(echo)
    two = await backends.start(echo)
    check = GatedCheck(confirming_tcp_check(timeout=1.0))
    runtime = await runtimes.start(
        [one.address, two.address],
        check=check,
        probe={"interval": 60.0, "fall": 2},
        forward={"dial_timeout": 5.0},
    )
    pool = runtime.pool
    await wait_until(
        lambda: all(r.state is State.HEALTHY for r in pool.records.values()),
        what="both backends healthy",
    )
    check.closed = True  # from here on only dial results move the pool
    dead, live = (one, two) if pool.active == one.endpoint else (two, one)
    assert pool.active == dead.endpoint
    await dead.stop_listening()

    async def client(i: int) -> None:
        reader, writer = await clients.open(runtimes.port)
        payload = f"client {i}".encode()
        async with asyncio.timeout(20):
            assert await roundtrip(reader, writer, payload) == payload
        writer.close()

    for i in range(25):
        await client(i)
    rec = pool.records[dead.endpoint]
    assert rec.state is State.FAILED
    assert runtime.stats.dial_failures[str(dead.endpoint)] == runtime.cfg.probe.fall
    assert rec.last_error is not None
    assert rec.last_error.startswith("dial:")
    assert pool.active == live.endpoint

    await asyncio.gather(*(client(i) for i in range(25, 50)))
    assert len(live.served) == 50
    assert runtime.stats.dial_failures[str(dead.endpoint)] == runtime.cfg.probe.fall
    assert runtime.stats.rejected == 0


# --------------------------------------------------------------------------- 5
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """CA, server chain and key files; the server certificate is for 127.0.0.1."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    base = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(base / "ca.pem")
    leaf.private_key_pem.write_to_path(base / "key.pem")
    for i, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(base / "chain.pem", append=i > 0)
    return str(base / "ca.pem"), str(base / "chain.pem"), str(base / "key.pem")


async def test_frozen_backend_is_failed_and_its_clients_closed(
    runtimes: RuntimeHarness, clients: Clients, tls_files: tuple[str, str, str]
) -> None:
    ca_file, chain, key = tls_files
    # A TCP connect succeeds against a stopped process (the kernel completes it from
    # the listen backlog), so the probe must need the process: a TLS handshake.
    with (
        child_backend(TLS_ECHO_CHILD, chain, key) as a,
        child_backend(TLS_ECHO_CHILD, chain, key) as b,
    ):
        runtime = await runtimes.start(
            [a.address, b.address],
            probe={"kind": "tls", "ca_file": ca_file, "interval": 0.2, "timeout": 0.2, "fall": 2},
        )
        pool = runtime.pool
        await wait_until(
            lambda: all(r.state is State.HEALTHY for r in pool.records.values()),
            what="both backends pass the TLS probe",
        )
        reader, writer = await clients.open(runtimes.port)
        await wait_until(lambda: runtime.bridges, what="the client is wired to an upstream")
        [(ep, _)] = runtime.bridges.items()
        frozen, live = (a, b) if ep == a.endpoint else (b, a)

        loop = asyncio.get_running_loop()
        frozen.freeze()
        t0 = loop.time()
        assert await closed_by_peer(reader, within=10)
        elapsed = loop.time() - t0
        writer.close()
        # The next probe starts within interval*(1+jitter) and each of the `fall` probes
        # times out after `timeout`: about 0.9 s here; 3 s leaves room for a busy host.
        print(f"client closed {elapsed:.2f}s after the freeze")
        assert elapsed < 3.0, f"client closed {elapsed:.2f}s after the freeze"
        assert pool.records[frozen.endpoint].state is State.FAILED

        for _ in range(3):
            _, w = await clients.open(runtimes.port)
            await wait_until(lambda: live.endpoint in runtime.bridges, what="wired to live")
            assert frozen.endpoint not in runtime.bridges
            w.close()
            await wait_until(lambda: not runtime.open_bridges, what="client released")


# --------------------------------------------------------------------------- 6
async def test_client_leaving_mid_dial(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    with blackhole() as port:
        # Make sure the port really swallows SYNs here, or the test proves nothing.
        probe = socket.socket()
        probe.setblocking(False)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await asyncio.get_running_loop().sock_connect(probe, ("127.0.0.1", port))
        finally:
            probe.close()

        address = f"127.0.0.1:{port}"
        runtime = await runtimes.start([address], forward={"dial_timeout": 1.5})
        _, w_reset = await clients.open(runtimes.port)
        _, w_fin = await clients.open(runtimes.port)
        await wait_until(lambda: len(runtime.open_bridges) == 2, what="both clients dialling")
        assert all(b.endpoint is None for b in runtime.open_bridges)
        reset_client(w_reset)
        w_fin.close()

        await wait_until(lambda: not runtime.open_bridges, within=15, what="bridges released")
        assert not runtime.bridges
        assert runtime.stats.accepted == 0  # nothing was ever wired
        # asyncio sees neither departure while reading is paused, so both dials run to
        # their timeout and are rejected; uvloop may notice one and cancel its dial.
        assert 1 <= runtime.stats.rejected <= 2
        assert runtimes.loop_errors == []

        live = await backends.start(echo)
        known = set(runtime.pool.records)
        runtime.report(EndpointsDiscovered(SOURCE_STATIC, frozenset({*known, live.endpoint})))
        await wait_until(
            lambda: runtime.candidates()[0] == live.endpoint, what="live backend preferred"
        )
        reader, writer = await clients.open(runtimes.port)
        async with asyncio.timeout(20):
            assert await roundtrip(reader, writer, b"still serving") == b"still serving"
        writer.close()


# --------------------------------------------------------------------------- 7
async def test_upstream_reset_mid_stream(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    backend = await backends.start(reset_after(512 * 1024))
    runtime = await runtimes.start([backend.address], probe={"interval": 60.0})
    ep = backend.endpoint
    probes = runtime.stats.probe_results
    await wait_until(lambda: probes[(str(ep), "ok")] == 1, what="first probe")

    reader, writer = await clients.open(runtimes.port)
    writer.write(b"go")
    assert await closed_by_peer(reader, within=20)
    writer.close()
    # An UpstreamReset schedules a probe at once; the next regular one is 60 s away.
    await wait_until(lambda: probes[(str(ep), "ok")] == 2, what="probe after the reset")
    await wait_until(lambda: not runtime.open_bridges, what="bridge released")

    # Still serving (and the endpoint still usable).
    assert runtime.pool.records[ep].state is State.HEALTHY
    reader, writer = await clients.open(runtimes.port)
    writer.write(b"go")
    assert await closed_by_peer(reader, within=20)
    writer.close()
    assert len(backend.served) == 2
    await wait_until(lambda: probes[(str(ep), "ok")] == 3, what="probe after the second reset")


# --------------------------------------------------------------------------- 8
async def test_listen_address_in_use(runtimes: RuntimeHarness) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LbproxyError, match=rf"127\.0\.0\.1:{port}\b"):
            await runtimes.start([], listen=["127.0.0.1:0", f"127.0.0.1:{port}"])


# --------------------------------------------------------------------------- 9
async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> str:
    """ok (echoed), closed (by the proxy) or stalled (never accepted, or no answer)."""
    try:
        async with asyncio.timeout(3):
            got = await roundtrip(reader, writer, payload)
    except TimeoutError:
        return "stalled"
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    return "ok" if got == payload else "garbled"


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the proxy's loop is the parameter
@pytest.mark.parametrize("proxy_loop", ["asyncio", "uvloop"])
async def test_survives_fd_exhaustion(
    proxy_loop: str, backends: Backends, clients: Clients, tmp_path: Path
) -> None:
    backend = await backends.start(echo)
    config = tmp_path / "lbproxy.toml"
    config.write_text("[probe]\ninterval = 0.3\ntimeout = 0.5\n")
    with reserved_port() as port, reserved_port() as admin:
        args = ["run", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
        args += ["--admin", f"127.0.0.1:{admin}", "--server", backend.address, "--probe", "tcp"]
        args += ["--state-file", str(tmp_path / "state.json"), "--log-format", "json"]
        args += ["--loop", proxy_loop]
        with lbproxy_process(args, tmp_path, nofile=64) as proxy:
            await proxy.wait_started()

            def healthy() -> bool:
                return any(e.get("new") == "healthy" for e in proxy.events())

            await wait_until(healthy, within=20, what="backend healthy")

            # 100 clients against 64 descriptors: some are served, the rest are refused
            # or wait in the listen backlog.
            conns = [await clients.open(port) for _ in range(100)]
            outcomes = await asyncio.gather(
                *(_exchange(r, w, b"hello %d" % i) for i, (r, w) in enumerate(conns))
            )
            served = [c for c, o in zip(conns, outcomes, strict=True) if o == "ok"]
            assert served, f"nothing served: {sorted(outcomes)}"
            assert "garbled" not in outcomes

            cpu = proxy.cpu_seconds()
            await asyncio.sleep(2.0)  # hold everything while out of descriptors
            cpu = proxy.cpu_seconds() - cpu
            assert proxy.proc.poll() is None, "lbproxy died while out of descriptors"
            # Exhaustion is local: the served clients' upstream is fine, keep them.
            for i, (r, w) in enumerate(served):
                assert await _exchange(r, w, b"again %d" % i) == "ok"

            await clients.close_all()

            async def fresh_client_served() -> None:
                while True:
                    r, w = await clients.open(port)
                    if await _exchange(r, w, b"fresh") == "ok":
                        w.close()
                        return
                    w.transport.abort()

            async with asyncio.timeout(20):
                await fresh_client_served()
            assert proxy.proc.poll() is None

            events = proxy.events()
            loop_errors = [
                e for e in events if e.get("event") in ("loop.exception", "listener.accept_failed")
            ]
            blamed = [
                e
                for e in events
                if e.get("event") in ("endpoint.state_changed", "endpoint.connections_closed")
                and "Too many open files" in str(e.get("reason"))
            ]
            local_dial_errors = sum(e.get("event") == "client.dial_local_error" for e in events)
            counts: dict[str, int] = {}
            for o in outcomes:
                counts[o] = counts.get(o, 0) + 1
            print(  # what each loop does, for the record (-rA or -s shows it)
                f"{proxy_loop}: outcomes={counts} cpu_during_hold={cpu:.2f}s "
                f"loop.exception={len(loop_errors)} "
                f"messages={sorted({str(e.get('message')) for e in loop_errors})} "
                f"local_dial_errors={local_dial_errors}"
            )
            assert not blamed, f"the endpoint was blamed for local exhaustion: {blamed[:3]}"
            # No log storm and no busy loop while the listener cannot accept.
            assert len(loop_errors) < 100, f"{len(loop_errors)} loop.exception lines"
            assert cpu < 1.0, f"lbproxy used {cpu:.2f}s of CPU in 2s while idle"


async def test_probe_out_of_descriptors_does_not_fail_the_endpoint(
    runtimes: RuntimeHarness, backends: Backends, clients: Clients
) -> None:
    backend = await backends.start(echo)
    inner = Checker(ProbeConfig(kind=ProbeKind.TCP, timeout=1.0))
    results: list[ProbeCompleted] = []
    local_errors: list[OSError] = []

    async def check(ep: Endpoint) -> ProbeCompleted:
        try:
            results.append(await inner(ep))
        except OSError as exc:  # the checker gives no verdict when this host is out of fds
            local_errors.append(exc)
            raise
        return results[-1]

    runtime = await runtimes.start(
        [backend.address], check=check, probe={"interval": 0.1, "fall": 1}
    )
    ep = backend.endpoint
    await wait_until(lambda: runtime.pool.records[ep].state is State.HEALTHY, what="healthy")
    reader, writer = await clients.open(runtimes.port)
    assert await roundtrip(reader, writer, b"before") == b"before"

    async with no_new_descriptors():
        await asyncio.sleep(1.0)  # ten probe rounds that cannot open a socket

    assert any(e.errno == errno.EMFILE for e in local_errors), "no probe ran out of descriptors"
    # A local shortage says nothing about the endpoint: with fall = 1 a single blamed
    # probe would have failed it and closed the client's connection.
    assert runtime.pool.records[ep].state is State.HEALTHY
    assert runtime.stats.probe_results[(str(ep), "failed")] == 0
    assert await roundtrip(reader, writer, b"after") == b"after"
    done = len(results)
    await wait_until(lambda: len(results) > done + 1, what="probing resumed")
    assert results[-1].error is None
    writer.close()
