"""End-to-end fixtures: the real CLI (``python -m lbproxy``) as a child process in its own
process group, threaded echo backends on loopback, and small blocking HTTP helpers.

Tests here are synchronous on purpose: the child process does the async work, and the
backends run in threads, so a test can block on a socket or on ``wait()`` freely.
Every process and socket a fixture starts is stopped at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LOCALHOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def free_port(host: str = LOCALHOST) -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment without proxy settings (the admin API is on loopback)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(extra)
    return env


def run_cli(*argv: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> Any:
    """Run one short CLI command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else child_env(),
        cwd=REPO_ROOT,
        check=False,
    )


# ---------------------------------------------------------------- HTTP


@dataclass
class HttpResult:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 10.0) -> HttpResult:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return HttpResult(resp.status, resp.read(), dict(resp.headers.items()))
    except urllib.error.HTTPError as exc:
        with exc:
            return HttpResult(exc.code, exc.read(), dict(exc.headers.items()))


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition"
) -> Any:
    """Poll until ``predicate()`` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------- echo backends


class EchoBackend:
    """A TCP echo server in a thread; EOF from the client closes the connection."""

    def __init__(self, host: str = LOCALHOST) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host = host
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self.echoed = 0  # bytes echoed back (probes send none)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not sel.select(0.05):
                    continue
                try:
                    conn, _ = self._listener.accept()
                except OSError:
                    continue
                conn.setblocking(True)
                conn.settimeout(0.05)
                with self._lock:
                    self.accepted += 1
                    self._conns.add(conn)
                t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
                self._threads.append(t)
                t.start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                with self._lock:  # counted before the echo, so a client sees it after
                    self.echoed += len(data)
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        """Stop listening (new connections are refused) and drop every connection."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        for t in self._threads:
            t.join(5)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


@pytest.fixture
def echo_backend() -> Iterator[Callable[..., EchoBackend]]:
    started: list[EchoBackend] = []

    def start(host: str = LOCALHOST) -> EchoBackend:
        backend = EchoBackend(host)
        started.append(backend)
        return backend

    try:
        yield start
    finally:
        for backend in started:
            backend.close()


# ---------------------------------------------------------------- lbproxy child process


class LbproxyProcess:
    """``python -m lbproxy run ...`` in its own session, output captured to files."""

    def __init__(
        self,
        argv: list[str],
        workdir: Path,
        *,
        listen: str,
        admin: str | None,
        state_file: Path | None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.listen = listen
        self.admin = admin
        self.state_file = state_file
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lbproxy", *argv],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                env=env if env is not None else child_env(),
                start_new_session=True,
            )
        self.pid = self.proc.pid

    # ------------------------------------------------------------ addresses
    @property
    def listen_addr(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    def admin_url(self, path: str) -> str:
        assert self.admin is not None
        return f"http://{self.admin}{path}"

    def get(self, path: str) -> HttpResult:
        return http_get(self.admin_url(path))

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(self.listen_addr, timeout=timeout)

    # ------------------------------------------------------------ output
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_event(
        self,
        event: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = 20.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if e.get("event") == event and predicate(e):
                    return e
            if self.proc.poll() is not None:
                # One last look: the event may have been written just before the exit.
                for e in self.events():
                    if e.get("event") == event and predicate(e):
                        return e
                raise AssertionError(
                    f"lbproxy exited ({self.proc.returncode}) before {event}\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} within {timeout:g}s\n{self.output()}")
            time.sleep(0.05)

    # ------------------------------------------------------------ lifecycle
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until the admin API answers /healthz (or the log says started, without admin)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"lbproxy exited ({self.proc.returncode}) while starting\n{self.output()}"
                )
            if self.admin is not None:
                with contextlib.suppress(OSError):
                    if self.get("/healthz").status == 200:
                        return
            elif self.find("lbproxy.started"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"lbproxy not ready within {timeout:g}s\n{self.output()}")
            time.sleep(0.05)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"lbproxy still running {timeout:g}s later\n{self.output()}"
            ) from None

    def stop(self) -> int | None:
        """SIGTERM the whole process group, then SIGKILL it if it does not go."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.proc.wait(15)


class LbproxyLauncher:
    """Starts lbproxy children with free listen/admin ports and a state file in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[LbproxyProcess] = []

    def config_file(self, text: str, name: str = "lbproxy.toml") -> Path:
        path = self.tmp_path / name
        path.write_text(text)
        return path

    def start(
        self,
        *args: str,
        listen: str | None = None,
        admin: str | None = "",
        state_file: Path | None = None,
        log_format: str = "json",
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> LbproxyProcess:
        """``admin=""`` picks a free admin port; ``admin=None`` disables the admin API."""
        auto_ports = listen is None or admin == ""
        attempts = 3 if auto_ports else 1
        for attempt in range(attempts):
            lis = listen or hostport(LOCALHOST, free_port())
            adm = hostport(LOCALHOST, free_port()) if admin == "" else admin
            state = state_file or self.tmp_path / "state" / "state.json"
            argv = ["run", "--listen", lis, "--admin", adm or "", "--state-file", str(state)]
            argv += ["--log-format", log_format, *args]
            workdir = self.tmp_path / f"lbproxy-{len(self.started)}"
            proc = LbproxyProcess(argv, workdir, listen=lis, admin=adm, state_file=state, env=env)
            self.started.append(proc)
            if not wait:
                return proc
            try:
                proc.wait_ready()
            except AssertionError:
                # Another process may have taken a port between free_port() and bind.
                if attempt + 1 < attempts and "cannot listen" in proc.stdout():
                    proc.stop()
                    continue
                raise
            return proc
        raise AssertionError("unreachable")

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()


@pytest.fixture
def lbproxy(tmp_path: Path) -> Iterator[LbproxyLauncher]:
    launcher = LbproxyLauncher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


# ---------------------------------------------------------------- helpers as fixtures
# (test modules take these as fixtures instead of importing this conftest by name)


@pytest.fixture
def cli() -> Callable[..., Any]:
    """``cli(*argv, env=None)``: run one short lbproxy command, return CompletedProcess."""
    return run_cli


@pytest.fixture
def http() -> Callable[..., HttpResult]:
    return http_get


@pytest.fixture
def port() -> Callable[..., int]:
    return free_port


@pytest.fixture
def poll() -> Callable[..., Any]:
    return wait_for


@pytest.fixture
def env() -> Callable[..., dict[str, str]]:
    return child_env


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
