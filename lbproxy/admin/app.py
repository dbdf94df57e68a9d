"""The admin HTTP API (aiohttp): /healthz, /readyz, /endpoints and /metrics."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from lbproxy.runtime import Runtime

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")


def endpoints_view(rt: Runtime) -> list[dict[str, Any]]:
    offset = rt.wall_offset()
    out = []
    for ep, rec in sorted(rt.pool.records.items()):
        out.append(
            {
                "address": ep.host,
                "port": ep.port,
                "state": rec.state.value,
                "sources": sorted(rec.sources),
                "active": ep == rt.pool.active,
                "confirmed_apiserver": rec.confirmed_apiserver,
                "active_connections": len(rt.bridges.get(ep, ())),
                "last_probe_at": _iso(
                    None if rec.last_probe_at is None else rec.last_probe_at + offset
                ),
                "last_error": rec.last_error,
                "probe_latency_ms": (
                    None if rec.probe_latency is None else round(rec.probe_latency * 1000, 3)
                ),
            }
        )
    return out


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.pool.ready:
        return web.Response(text="ok\n")
    return web.Response(status=503, text="no healthy endpoint\n")


async def endpoints(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return web.json_response(
        {
            "generated_at": _iso(time.time()),
            "policy": rt.cfg.policy.value,
            "endpoints": endpoints_view(rt),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    body, content_type = rt.metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def make_app(rt: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = rt
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/endpoints", endpoints)
    app.router.add_get("/metrics", metrics)
    return app
