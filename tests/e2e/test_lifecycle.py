"""lbproxy as a process: SIGTERM drain, the state file across a restart, the admin API."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

DRAIN_GRACE = 3.0  # what the drain bound may overrun by: signal delivery, exit, slow CI


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def roundtrip(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the peer closed (EOF or reset); False if it is still open."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def refused(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def healthy(proc: Any, address: str) -> Callable[[], bool]:
    def check() -> bool:
        for e in proc.get("/endpoints").json()["endpoints"]:
            name = f"{e['address']}:{e['port']}"
            if name == address and e["state"] == "healthy":
                return True
        return False

    return check


# ---------------------------------------------------------------- (a) SIGTERM drain


def test_sigterm_drains_open_connections_then_exits_0(
    lbproxy: Any, echo_backend: Any, poll: Any
) -> None:
    backend = echo_backend()
    config = lbproxy.config_file("drain_timeout = 60\n")
    proc = lbproxy.start("--config", str(config), "--server", backend.address, "--probe", "tcp")
    poll(lambda: proc.get("/readyz").status == 200, what="/readyz 200")
    with proc.connect() as client:
        roundtrip(client, b"before SIGTERM")
        proc.signal(signal.SIGTERM)
        draining = proc.wait_event("lbproxy.draining")
        assert draining["connections"] == 1
        # The open connection still carries bytes both ways...
        roundtrip(client, b"after SIGTERM")
        roundtrip(client, os.urandom(256 * 1024))
        # ...while new connections are refused.
        assert refused(proc.listen_addr)
        assert proc.running()
        roundtrip(client, b"still open")
    # The client is gone: the process finishes well before the 60 s drain timeout.
    assert proc.wait(20) == 0, proc.output()
    [drained] = proc.find("lbproxy.drained")
    assert drained["closed_at_deadline"] == 0
    assert proc.find("lbproxy.stopped")
    assert "Traceback" not in proc.output()


def test_sigterm_with_a_held_connection_exits_after_drain_timeout(
    lbproxy: Any, echo_backend: Any, poll: Any
) -> None:
    backend = echo_backend()
    config = lbproxy.config_file("drain_timeout = 1\n")
    proc = lbproxy.start("--config", str(config), "--server", backend.address, "--probe", "tcp")
    poll(lambda: proc.get("/readyz").status == 200, what="/readyz 200")
    with proc.connect() as client:
        roundtrip(client, b"held open")
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        rc = proc.wait(1 + DRAIN_GRACE)
        elapsed = time.monotonic() - started
        assert rc == 0, proc.output()
        assert elapsed <= 1 + DRAIN_GRACE
        # The held connection was closed at the deadline.
        assert closed_by_peer(client)
    [drained] = proc.find("lbproxy.drained")
    assert drained["closed_at_deadline"] == 1
    assert proc.find("lbproxy.stopped")


def test_sigint_stops_like_sigterm(lbproxy: Any) -> None:
    proc = lbproxy.start("--probe", "tcp")
    proc.signal(signal.SIGINT)
    assert proc.wait(20) == 0, proc.output()
    assert proc.find("lbproxy.stopped")
    assert "Traceback" not in proc.output()


def test_sigterm_with_no_connections_exits_0(lbproxy: Any, echo_backend: Any) -> None:
    backend = echo_backend()
    proc = lbproxy.start("--server", backend.address, "--probe", "tcp")
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0, proc.output()
    [drained] = proc.find("lbproxy.drained")
    assert drained["closed_at_deadline"] == 0
    assert not proc.find("lbproxy.draining")


# ---------------------------------------------------------------- (b) state file


def test_state_file_brings_back_an_endpoint_when_the_seed_is_down(
    lbproxy: Any, echo_backend: Any, poll: Any, tmp_path: Path
) -> None:
    a = echo_backend()
    b = echo_backend()
    state = tmp_path / "var" / "state.json"
    first = lbproxy.start(
        "--server", a.address, "--server", b.address, "--probe", "tcp", state_file=state
    )
    poll(healthy(first, a.address), what="A healthy")
    poll(healthy(first, b.address), what="B healthy")
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0, first.output()

    # Written atomically with mode 0600, and it lists both.
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert os.listdir(state.parent) == ["state.json"]
    saved = json.loads(state.read_bytes())
    assert saved["version"] == 1
    listed = {(e["address"], e["port"]): e for e in saved["endpoints"]}
    assert set(listed) == {("127.0.0.1", a.port), ("127.0.0.1", b.port)}
    assert all(e["state"] == "healthy" for e in listed.values())

    # A goes down; the next run knows only A from its flags.
    a.close()
    second = lbproxy.start("--server", a.address, "--probe", "tcp", state_file=state)
    assert second.find("state.loaded")
    view = {f"{e['address']}:{e['port']}": e for e in second.get("/endpoints").json()["endpoints"]}
    assert set(view) == {a.address, b.address}
    assert "state" in view[b.address]["sources"]
    assert "static" in view[a.address]["sources"]
    echoed_before = b.echoed
    with second.connect() as client:
        roundtrip(client, b"through B")  # A refuses connections: only B can answer
    assert b.echoed == echoed_before + len(b"through B")
    poll(healthy(second, b.address), what="B healthy in the second run")
    poll(lambda: second.get("/readyz").status == 200, what="/readyz 200")
    with second.connect() as client:
        roundtrip(client, b"through B again")


def test_corrupt_state_file_is_logged_and_ignored(
    lbproxy: Any, echo_backend: Any, poll: Any, tmp_path: Path
) -> None:
    backend = echo_backend()
    state = tmp_path / "state.json"
    state.write_bytes(b'{"version": 1, "endpoints": [{"address": ')
    proc = lbproxy.start("--server", backend.address, "--probe", "tcp", state_file=state)
    [unreadable] = proc.find("state.unreadable")
    assert unreadable["path"] == str(state)
    assert unreadable["level"] == "warning"
    with proc.connect() as client:
        roundtrip(client, b"served anyway")
    poll(lambda: proc.get("/readyz").status == 200, what="/readyz 200")
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0, proc.output()
    # The next write replaced the corrupt file with a good one.
    saved = json.loads(state.read_bytes())
    assert [(e["address"], e["port"]) for e in saved["endpoints"]] == [("127.0.0.1", backend.port)]
    assert stat.S_IMODE(state.stat().st_mode) == 0o600


def test_state_file_with_a_bad_entry_keeps_the_rest(
    lbproxy: Any, echo_backend: Any, tmp_path: Path
) -> None:
    backend = echo_backend()
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            {
                "version": 1,
                "endpoints": [
                    {"address": "bad host", "port": 1},
                    {"address": "127.0.0.1", "port": backend.port, "state": "healthy"},
                ],
            }
        )
    )
    proc = lbproxy.start("--probe", "tcp", state_file=state)
    [skipped] = proc.find("state.entry_skipped")
    assert "endpoints[0]" in skipped["error"]
    assert proc.find("state.loaded")
    with proc.connect() as client:
        roundtrip(client, b"from the state file alone")


# ---------------------------------------------------------------- (c) admin API

ENDPOINT_FIELDS = {
    "address",
    "port",
    "state",
    "sources",
    "active_connections",
    "last_probe_at",
    "last_error",
    "probe_latency_ms",
}

METRICS = (
    "lbproxy_endpoint_connections",
    "lbproxy_endpoint_state",
    "lbproxy_dial_duration_seconds",
    "lbproxy_dial_failures_total",
    "lbproxy_probe_results_total",
    "lbproxy_bytes_forwarded_total",
)


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_admin_api(lbproxy: Any, echo_backend: Any, poll: Any) -> None:
    backend = echo_backend()
    proc = lbproxy.start("--server", backend.address, "--probe", "tcp")
    health = proc.get("/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    poll(lambda: proc.get("/readyz").status == 200, what="/readyz 200")
    payload = os.urandom(10_000)
    with proc.connect() as client:
        roundtrip(client, payload)
        doc = proc.get("/endpoints").json()
        assert doc["policy"] == "sticky"
        [endpoint] = doc["endpoints"]
        assert set(endpoint) >= ENDPOINT_FIELDS
        assert endpoint["address"] == "127.0.0.1"
        assert endpoint["port"] == backend.port
        assert endpoint["state"] == "healthy"
        assert endpoint["sources"] == ["static"]
        assert endpoint["active_connections"] == 1
        assert endpoint["last_error"] is None
        assert isinstance(endpoint["probe_latency_ms"], int | float)
        assert endpoint["probe_latency_ms"] >= 0
        assert datetime.fromisoformat(endpoint["last_probe_at"]).tzinfo is not None

        metrics = proc.get("/metrics")
        assert metrics.status == 200
        assert metrics.headers["Content-Type"].startswith("text/plain")
        text = metrics.body.decode()
        for name in METRICS:
            assert name in text, name
        values = samples(text)
        ep = f'endpoint="{backend.address}"'
        assert values[f"lbproxy_endpoint_connections{{{ep}}}"] == 1
        assert values[f'lbproxy_endpoint_state{{{ep},state="healthy"}}'] == 1
        assert values[f'lbproxy_endpoint_state{{{ep},state="failed"}}'] == 0
        assert values['lbproxy_dial_duration_seconds_count{result="ok"}'] >= 1
        assert values[f'lbproxy_probe_results_total{{{ep},outcome="ok"}}'] >= 1
        up = values['lbproxy_bytes_forwarded_total{direction="client_to_upstream"}']
        down = values['lbproxy_bytes_forwarded_total{direction="upstream_to_client"}']
        assert up >= len(payload)
        assert down >= len(payload)
    # Closed connections keep counting.
    poll(
        lambda: proc.get("/endpoints").json()["endpoints"][0]["active_connections"] == 0,
        what="connection released",
    )
    values = samples(proc.get("/metrics").body.decode())
    assert values['lbproxy_bytes_forwarded_total{direction="client_to_upstream"}'] >= len(payload)

    # The backend goes away: /readyz turns 503, /healthz stays 200.
    backend.close()
    poll(lambda: proc.get("/readyz").status == 503, timeout=30, what="/readyz 503")
    assert proc.get("/healthz").status == 200
    poll(failed_with_error(proc), what="endpoint failed")


def failed_with_error(proc: Any) -> Callable[[], bool]:
    def check() -> bool:
        [e] = proc.get("/endpoints").json()["endpoints"]
        return bool(e["state"] == "failed" and e["last_error"])

    return check


def test_readyz_503_and_dial_failures_with_no_live_backend(
    lbproxy: Any, poll: Any, port: Callable[..., int]
) -> None:
    down = f"127.0.0.1:{port()}"
    proc = lbproxy.start("--server", down, "--probe", "tcp")
    readyz = proc.get("/readyz")
    assert readyz.status == 503
    assert proc.get("/healthz").status == 200
    # A client is accepted, every candidate fails to dial, and the client is closed.
    with proc.connect() as client:
        assert closed_by_peer(client)
    values = samples(proc.get("/metrics").body.decode())
    assert values[f'lbproxy_dial_failures_total{{endpoint="{down}"}}'] >= 1
    assert values["lbproxy_connections_rejected_total"] >= 1
    assert values['lbproxy_dial_duration_seconds_count{result="error"}'] >= 1
    poll(
        lambda: proc.get("/endpoints").json()["endpoints"][0]["state"] == "failed",
        what="seed failed",
    )
    assert proc.get("/readyz").status == 503


def test_unknown_admin_path_is_404(lbproxy: Any) -> None:
    proc = lbproxy.start("--probe", "tcp")
    assert proc.get("/nope").status == 404


def test_admin_disabled(lbproxy: Any, echo_backend: Any) -> None:
    backend = echo_backend()
    proc = lbproxy.start("--server", backend.address, "--probe", "tcp", admin=None)
    started = proc.wait_event("lbproxy.started")
    assert started["admin"] is None
    with proc.connect() as client:
        roundtrip(client, b"no admin needed")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_listen_admin_and_backend(
    lbproxy: Any, echo_backend: Any, poll: Any, port: Callable[..., int], http: Any
) -> None:
    backend = echo_backend("::1")
    assert backend.address.startswith("[::1]:")
    proc = lbproxy.start(
        "--server",
        backend.address,
        "--probe",
        "tcp",
        listen=f"[::1]:{port('::1')}",
        admin=f"[::1]:{port('::1')}",
    )
    poll(lambda: proc.get("/readyz").status == 200, what="/readyz 200 over IPv6")
    with proc.connect() as client:
        roundtrip(client, b"over ::1")
    [endpoint] = proc.get("/endpoints").json()["endpoints"]
    assert (endpoint["address"], endpoint["port"]) == ("::1", backend.port)


def test_largest_accepted_socket_options_still_forward(
    lbproxy: Any, echo_backend: Any, cli: Any
) -> None:
    # Values past these limits used to pass check-config and then hang every client:
    # setsockopt raised inside the dial task and the connection was never wired.
    too_big = lbproxy.config_file("[forward]\nuser_timeout = 10000000\n", name="too-big.toml")
    result = cli("check-config", str(too_big))
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["forward.user_timeout: must be <= 2147483"]

    backend = echo_backend()
    config = lbproxy.config_file(
        "[forward]\nkeepalive_idle = 32767\nkeepalive_interval = 32767\nuser_timeout = 2147483\n"
    )
    proc = lbproxy.start("--config", str(config), "--server", backend.address, "--probe", "tcp")
    with proc.connect() as client:
        roundtrip(client, b"tuned to the limit")
