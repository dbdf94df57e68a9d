"""Command line: run, check-config, status, --version. The only place that exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lbproxy import __version__
from lbproxy.config import DEFAULT_ADMIN, Config, from_mapping
from lbproxy.errors import ConfigError, LbproxyError

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbproxy",
        description="Node-local, health-probed TCP load balancer for the Kubernetes API.",
    )
    parser.add_argument("--version", action="version", version=f"lbproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", metavar="FILE", help="TOML config file")
    run.add_argument("--listen", action="append", metavar="HOST:PORT", help="repeatable")
    run.add_argument("--server", action="append", metavar="HOST:PORT", help="repeatable seed")
    run.add_argument("--admin", metavar="HOST:PORT", help='admin API address ("" disables)')
    run.add_argument("--state-file", metavar="PATH")
    run.add_argument("--probe", choices=("tcp", "tls", "https"))
    run.add_argument("--log-format", choices=("json", "console"))
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--loop", choices=("uvloop", "asyncio"))
    run.add_argument("--k3s", action="store_true", help='the k3s preset (preset = "k3s")')
    run.add_argument("--data-dir", metavar="DIR", help="k3s data directory for the preset")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")

    status = sub.add_parser("status", help="show the endpoint pool from the admin API")
    status.add_argument("--admin", default=DEFAULT_ADMIN, metavar="HOST:PORT")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    return parser


def _read_toml(path: str) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError.single("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError.single("config", f"{path}: invalid TOML: {exc}") from None


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    """The file's table for a flag to write into; a non-table is left for validation to
    report, and the flag then writes into a throwaway table."""
    table = data.setdefault(key, {})
    return table if isinstance(table, dict) else {}


def config_from_args(args: argparse.Namespace) -> Config:
    """The file's settings with the flags laid over them, validated together."""
    data = _read_toml(args.config) if args.config else {}
    if args.listen:
        data["listen"] = args.listen
    if args.server:
        _section(data, "servers")["addresses"] = args.server
    if args.admin is not None:
        data["admin"] = args.admin
    if args.state_file is not None:
        data["state_file"] = args.state_file
    if args.probe:
        _section(data, "probe")["kind"] = args.probe
    if args.log_format:
        data["log_format"] = args.log_format
    if args.log_level:
        data["log_level"] = args.log_level
    if args.loop:
        data["loop"] = args.loop
    if args.k3s:
        data["preset"] = "k3s"
    if args.data_dir:
        data["data_dir"] = args.data_dir
    return from_mapping(data)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from lbproxy import log as logsetup

    logsetup.configure(cfg.log_format, cfg.log_level)
    import structlog

    for note in cfg.notes:
        structlog.get_logger("lbproxy").warning("config.note", note=note)
    from lbproxy.app import build_runtime

    async def main() -> None:
        runtime = build_runtime(cfg)
        await runtime.run()

    try:
        if cfg.loop == "uvloop":
            try:
                import uvloop
            except ImportError:
                print("lbproxy: uvloop is not installed; using asyncio", file=sys.stderr)
            else:
                uvloop.run(main())
                return EXIT_OK
        asyncio.run(main())
    except ConfigError:
        raise  # a source that reads its own files (a kubeconfig) found a problem: exit 2
    except LbproxyError as exc:
        structlog.get_logger("lbproxy").error("lbproxy.failed", error=str(exc))
        return EXIT_RUNTIME
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from lbproxy.config import load

    load(args.file)
    print(f"{args.file}: ok")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.error  # only here: about 3 MB resident that `run` does not need
    import urllib.request

    from lbproxy.model import parse_hostport

    try:
        ep = parse_hostport(args.admin)
    except ValueError as exc:
        print(f"lbproxy status: --admin: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    url = f"http://{ep}/endpoints"
    # The admin API is node-local: an http_proxy from the environment must not apply.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as resp:
            doc = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"lbproxy status: cannot read {url}: {reason}", file=sys.stderr)
        return EXIT_RUNTIME
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(render_table(doc))
    return EXIT_OK


def render_table(doc: dict[str, Any]) -> str:
    header = ("ENDPOINT", "STATE", "ACTIVE", "CONNS", "LATENCY", "SOURCES", "LAST ERROR")
    rows = [header]
    for e in doc.get("endpoints", []):
        host = e["address"]
        name = f"[{host}]:{e['port']}" if ":" in host else f"{host}:{e['port']}"
        latency = e.get("probe_latency_ms")
        rows.append(
            (
                name,
                e["state"],
                "*" if e.get("active") else "",
                str(e["active_connections"]),
                "-" if latency is None else f"{latency:.1f}ms",
                ",".join(e["sources"]),
                e.get("last_error") or "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no endpoints)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        return cmd_status(args)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


def entry() -> None:
    sys.exit(main())
