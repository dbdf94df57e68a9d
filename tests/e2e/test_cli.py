"""The real CLI in a child process: --version, check-config, run's startup errors and logs,
and status against a live lbproxy and against nothing."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lbproxy import __version__

Cli = Callable[..., Any]


def test_version(cli: Cli) -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"lbproxy {__version__}"


def test_no_command_is_a_usage_error(cli: Cli) -> None:
    result = cli()
    assert result.returncode == 2
    assert "usage: lbproxy" in result.stderr


# ---------------------------------------------------------------- check-config


def test_check_config_accepts_the_example(cli: Cli, repo_root: Path) -> None:
    example = repo_root / "config.example.toml"
    assert example.is_file(), "config.example.toml is missing at the repository root"
    result = cli("check-config", str(example))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{example}: ok"
    assert result.stderr == ""


def test_check_config_example_with_every_discovery_section_enabled(
    cli: Cli, repo_root: Path, tmp_path: Path
) -> None:
    # The commented-out sections show the defaults; uncommented they must still be valid
    # (the dns section needs a name, which the example leaves for the operator to fill).
    lines = []
    for line in (repo_root / "config.example.toml").read_text().splitlines():
        if line.startswith("# [discovery.") or (line.startswith("# ") and " = " in line):
            line = line[2:]
        lines.append(line)
    text = "\n".join(lines).replace("names = []", 'names = ["cp.example.com"]')
    path = tmp_path / "full.toml"
    path.write_text(text)
    result = cli("check-config", str(path))
    assert result.returncode == 0, result.stderr


def test_check_config_reports_every_problem_with_its_key_path(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(
        'polcy = "sticky"\n'
        'listen = ["::1:6445"]\n'
        "[probe]\n"
        "timeout = 0\n"
        'kind = "http"\n'
        "[discovery.etcd]\n"
        'endpoints = ["127.0.0.1:2379"]\n'
    )
    result = cli("check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert "probe.timeout: must be > 0" in lines
    assert "polcy: unknown key" in lines
    assert "probe.kind: must be one of tcp, tls, https; got 'http'" in lines
    assert "discovery.etcd.endpoints[0]: must be an http(s) URL: '127.0.0.1:2379'" in lines
    [listen] = [line for line in lines if line.startswith("listen[0]: ")]
    assert "[addr]:port" in listen
    assert len(lines) == 5
    assert "Traceback" not in result.stderr


def test_check_config_invalid_toml_names_the_file(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[probe\ntimeout = 1\n")
    result = cli("check-config", str(path))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"config: {path}: invalid TOML: ")


def test_check_config_missing_file(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = cli("check-config", str(path))
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"config: cannot read {path}: ")


# ---------------------------------------------------------------- run: startup


def test_run_with_the_listen_port_in_use_exits_1_naming_the_address(
    lbproxy: Any, port: Callable[..., int]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = lbproxy.start("--probe", "tcp", listen=busy, wait=False)
        rc = proc.wait(30)
    assert rc == 1, proc.output()
    [failed] = proc.find("lbproxy.failed")
    assert busy in failed["error"]
    assert "cannot listen" in failed["error"]
    assert "Traceback" not in proc.output()


def test_run_with_the_admin_port_in_use_exits_1_naming_the_address(lbproxy: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = lbproxy.start("--probe", "tcp", admin=busy, wait=False)
        rc = proc.wait(30)
    assert rc == 1, proc.output()
    [failed] = proc.find("lbproxy.failed")
    assert busy in failed["error"]
    assert "admin" in failed["error"]


def test_run_with_a_broken_kubeconfig_exits_2_naming_path_and_field(
    cli: Cli, tmp_path: Path, port: Callable[..., int]
) -> None:
    kubeconfig = tmp_path / "kc.json"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"client-certificate": "/nonexistent.crt"}}],
            }
        )
    )
    config = tmp_path / "lbproxy.toml"
    config.write_text(
        f'listen = ["127.0.0.1:{port()}"]\nadmin = ""\nstate_file = ""\n'
        f'[discovery.kubernetes]\nkubeconfig = "{kubeconfig}"\n'
    )
    result = cli("run", "--config", str(config))
    assert result.returncode == 2, result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("discovery.kubernetes")]
    assert str(kubeconfig) in line
    assert "users[0].user.client-certificate" in line


def test_run_with_a_bad_flag_exits_2(cli: Cli) -> None:
    result = cli("run", "--listen", "127.0.0.1", "--admin", "")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["listen[0]: missing port in '127.0.0.1'"]


def test_unresolvable_seed_is_logged_and_the_process_keeps_running(
    lbproxy: Any, tmp_path: Path
) -> None:
    # A generous probe timeout, so a slow resolver still answers within the probe.
    config = lbproxy.config_file("[probe]\ntimeout = 10\n")
    proc = lbproxy.start(
        "--config", str(config), "--server", "nonexistent.invalid:6443", "--probe", "tcp"
    )
    changed = proc.wait_event(
        "endpoint.state_changed",
        lambda e: e.get("endpoint") == "nonexistent.invalid:6443",
    )
    assert changed["new"] == "failed"
    assert "cannot resolve" in changed["reason"], changed
    assert proc.running()
    assert proc.get("/healthz").status == 200
    assert proc.get("/readyz").status == 503
    [endpoint] = proc.get("/endpoints").json()["endpoints"]
    assert endpoint["address"] == "nonexistent.invalid"
    assert "cannot resolve" in endpoint["last_error"]
    assert proc.running()


def test_json_log_format_is_one_object_per_line(lbproxy: Any, echo_backend: Any) -> None:
    backend = echo_backend()
    proc = lbproxy.start("--server", backend.address, "--probe", "tcp", log_format="json")
    proc.wait_event("endpoint.state_changed", lambda e: e.get("new") == "healthy")
    with proc.connect() as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    lines = proc.stdout().splitlines()
    assert lines
    events = []
    for line in lines:
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        assert isinstance(obj.get("event"), str), line
        assert obj["level"] in ("debug", "info", "warning", "error", "critical"), line
        assert "timestamp" in obj, line
        events.append(obj["event"])
    for name in ("lbproxy.started", "endpoint.added", "lbproxy.drained", "lbproxy.stopped"):
        assert name in events
    assert events[-1] == "lbproxy.stopped"


def test_console_log_format_is_not_json(lbproxy: Any) -> None:
    proc = lbproxy.start("--probe", "tcp", log_format="console")
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    out = proc.stdout()
    assert "lbproxy.started" in out
    first = out.splitlines()[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)


# ---------------------------------------------------------------- status


def test_status_prints_the_pool(lbproxy: Any, echo_backend: Any, cli: Cli) -> None:
    backend = echo_backend()
    proc = lbproxy.start("--server", backend.address, "--probe", "tcp")
    proc.wait_event("endpoint.state_changed", lambda e: e.get("new") == "healthy")
    result = cli("status", "--admin", proc.admin)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "ENDPOINT", "STATE", "ACTIVE", "CONNS", "LATENCY", "SOURCES", "LAST", "ERROR"
    ]  # fmt: skip
    [row] = rows
    cells = row.split()
    assert cells[0] == backend.address
    assert cells[1] == "healthy"
    assert cells[2] == "*"
    assert cells[3] == "0"
    assert cells[4].endswith("ms")
    assert cells[5] == "static"

    result = cli("status", "--admin", proc.admin, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    [endpoint] = doc["endpoints"]
    assert (endpoint["address"], endpoint["port"]) == ("127.0.0.1", backend.port)


def test_status_ignores_http_proxy_settings(
    lbproxy: Any, echo_backend: Any, cli: Cli, env: Any, port: Callable[..., int]
) -> None:
    # A node with http_proxy set (and no no_proxy) must still reach its own admin API.
    backend = echo_backend()
    proc = lbproxy.start("--server", backend.address, "--probe", "tcp")
    dead_proxy = f"http://127.0.0.1:{port()}"
    result = cli(
        "status",
        "--admin",
        proc.admin,
        env=env(http_proxy=dead_proxy, HTTP_PROXY=dead_proxy, all_proxy=dead_proxy),
    )
    assert result.returncode == 0, result.stderr
    assert backend.address in result.stdout


def test_status_against_nothing_exits_1(cli: Cli, port: Callable[..., int]) -> None:
    admin = f"127.0.0.1:{port()}"
    result = cli("status", "--admin", admin)
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"lbproxy status: cannot read http://{admin}/endpoints: ")
    assert "refused" in line.lower()


def test_status_with_a_bad_admin_address_exits_2(cli: Cli) -> None:
    result = cli("status", "--admin", "nohost")
    assert result.returncode == 2
    assert result.stderr.startswith("lbproxy status: --admin: ")
