"""render_table: the `lbproxy status` table from an /endpoints document."""

from __future__ import annotations

from typing import Any

from lbproxy.cli import render_table


def entry(address: str, port: int = 6443, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "address": address,
        "port": port,
        "state": "healthy",
        "sources": ["static"],
        "active": False,
        "confirmed_apiserver": True,
        "active_connections": 0,
        "last_probe_at": "2026-01-01T00:00:00.000+00:00",
        "last_error": None,
        "probe_latency_ms": 0.912,
    }
    base.update(fields)
    return base


SAMPLE = {
    "generated_at": "2026-01-01T00:00:01.000+00:00",
    "policy": "sticky",
    "endpoints": [
        entry("10.0.0.1", active=True, active_connections=14),
        entry("fd00::2", 7443, probe_latency_ms=1.06, sources=["etcd:masterleases", "state"]),
        entry(
            "api.example",
            state="not-an-apiserver",
            confirmed_apiserver=False,
            sources=["state"],
            probe_latency_ms=None,
            last_error="HTTP 503: apiserver disabled",
        ),
        entry(
            "10.0.0.4",
            state="failed",
            sources=[],
            probe_latency_ms=None,
            last_error="probe: Connection refused",
        ),
    ],
}


def test_render_sample() -> None:
    assert render_table(SAMPLE).splitlines() == [
        "ENDPOINT          STATE             ACTIVE  CONNS  LATENCY  SOURCES                  LAST ERROR",  # noqa: E501
        "10.0.0.1:6443     healthy           *       14     0.9ms    static",
        "[fd00::2]:7443    healthy                   0      1.1ms    etcd:masterleases,state",
        "api.example:6443  not-an-apiserver          0      -        state                    HTTP 503: apiserver disabled",  # noqa: E501
        "10.0.0.4:6443     failed                    0      -                                 probe: Connection refused",  # noqa: E501
    ]  # fmt: skip


def test_columns_line_up() -> None:
    lines = render_table(SAMPLE).splitlines()
    header = lines[0]
    for title in ("STATE", "ACTIVE", "CONNS", "LATENCY", "SOURCES", "LAST ERROR"):
        column = header.index(title)
        for line in lines[1:]:
            # Each cell starts at its header's column, after at least two spaces.
            if len(line) > column and line[column] != " ":
                assert line[column - 2 : column] == "  "
    assert all(line == line.rstrip() for line in lines)


def test_ipv6_addresses_are_bracketed() -> None:
    text = render_table({"endpoints": [entry("::1", 6445), entry("fe80::1%eth0", 1)]})
    assert "[::1]:6445" in text
    assert "[fe80::1%eth0]:1" in text
    assert "::1:6445" not in text.replace("[::1]:6445", "")


def test_render_empty() -> None:
    expected = [
        "ENDPOINT  STATE  ACTIVE  CONNS  LATENCY  SOURCES  LAST ERROR",
        "(no endpoints)",
    ]
    assert render_table({"endpoints": []}).splitlines() == expected
    assert render_table({}).splitlines() == expected


def test_render_tolerates_missing_optional_fields() -> None:
    minimal = {
        "address": "10.0.0.1",
        "port": 6443,
        "state": "unchecked",
        "sources": ["static"],
        "active_connections": 0,
    }
    assert render_table({"endpoints": [minimal]}).splitlines() == [
        "ENDPOINT       STATE      ACTIVE  CONNS  LATENCY  SOURCES  LAST ERROR",
        "10.0.0.1:6443  unchecked          0      -        static",
    ]
