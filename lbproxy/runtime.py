"""The composition root: builds the pool, listeners, prober, sources and admin server,
runs them on one event loop, and is the one place that carries out the pool's actions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, assert_never

import structlog

from lbproxy.admin.metrics import Metrics, Stats
from lbproxy.config import Config
from lbproxy.discovery import statefile
from lbproxy.discovery.base import Source
from lbproxy.discovery.static import seeds
from lbproxy.errors import DiscoveryError, LbproxyError, describe, is_local_error
from lbproxy.forward.protocol import Bridge
from lbproxy.health.checks import Check, Checker
from lbproxy.health.prober import Prober
from lbproxy.model import Endpoint, names
from lbproxy.pool.actions import (
    Action,
    ActiveChanged,
    CloseConnections,
    EndpointAdded,
    EndpointRemoved,
    KeptLastKnown,
    PersistState,
    ProbeScheduleChanged,
    StateChanged,
)
from lbproxy.pool.events import (
    ConnectionClosed,
    DialFailed,
    Event,
    ProbeCompleted,
    StateRestored,
)
from lbproxy.pool.pool import Pool, PoolSettings
from lbproxy.pool.states import ProbeOutcome, State

log = structlog.get_logger("lbproxy")

PERSIST_DEBOUNCE = 0.5
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 100  # asyncio's default backlog
# asyncio reports "out of descriptors" at accept() once per pass of its accept loop, up
# to `backlog` (4096) times per wakeup, every second while it lasts; one line per this
# many seconds is enough.
ACCEPT_ERROR_LOG_INTERVAL = 5.0
ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"
LOCAL_ERROR_RETRY = 1.0


class Runtime:
    def __init__(
        self,
        cfg: Config,
        *,
        sources: list[Source] | None = None,
        source_factory: Callable[[Runtime], list[Source]] | None = None,
        check: Check | None = None,
    ) -> None:
        self.cfg = cfg
        # Sources are built once the listeners are bound: their modules (aiohttp,
        # dnspython) take longer to import than the data path needs to start serving.
        self._source_factory = source_factory
        self.pool = Pool(
            PoolSettings(
                policy=cfg.policy,
                rise=cfg.probe.rise,
                fall=cfg.probe.fall,
                probe_interval=cfg.probe.interval,
                probe_jitter=cfg.probe.jitter,
            )
        )
        self.dial = cfg.forward
        self.check: Check = check or Checker(cfg.probe)
        self.sources = sources if sources is not None else []
        self.stats = Stats()
        self.metrics = Metrics(self)
        self.bridges: dict[Endpoint, set[Bridge]] = {}
        self.open_bridges: set[Bridge] = set()
        self.listen_addresses: list[tuple[str, int]] = []
        self.admin_address: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prober: Prober | None = None
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._persist = asyncio.Event()
        self._accept_errors = 0
        self._accept_error_logged_at: float | None = None
        self.started = asyncio.Event()

    # ------------------------------------------------------------ clock
    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def wall_offset(self) -> float:
        """Add to a pool time to get Unix time."""
        return time.time() - self.now()

    # ------------------------------------------------------------ Hub
    def candidates(self) -> list[Endpoint]:
        return self.pool.candidates()

    def healthy_epoch(self) -> int:
        return self.pool.healthy_epoch

    def healthy_apiservers(self) -> list[Endpoint]:
        return [ep for ep, rec in self.pool.records.items() if rec.healthy_apiserver]

    def report(self, event: Event) -> None:
        if isinstance(event, ProbeCompleted):
            self.stats.probe_results[(str(event.endpoint), event.outcome.value)] += 1
            log.debug(
                "probe.completed",
                endpoint=str(event.endpoint),
                outcome=event.outcome.value,
                error=event.error,
                latency_ms=None if event.latency is None else round(event.latency * 1000, 3),
            )
        elif isinstance(event, DialFailed):
            self.stats.dial_failures[str(event.endpoint)] += 1
        self.apply(self.pool.handle(event, self.now()))

    def observe_dial(self, seconds: float, ok: bool) -> None:
        self.metrics.observe_dial(seconds, ok)

    def track(self, bridge: Bridge) -> None:
        self.open_bridges.add(bridge)
        self._idle.clear()

    def attach(self, bridge: Bridge) -> None:
        assert bridge.endpoint is not None
        self.bridges.setdefault(bridge.endpoint, set()).add(bridge)
        self.stats.accepted += 1

    def release(self, bridge: Bridge) -> None:
        self.open_bridges.discard(bridge)
        if not self.open_bridges:
            self._idle.set()
        ep = bridge.endpoint
        if ep is None:
            return
        group = self.bridges.get(ep)
        if group is not None:
            group.discard(bridge)
            if not group:
                del self.bridges[ep]
        self.stats.bytes_up_closed += bridge.bytes_up
        self.stats.bytes_down_closed += bridge.bytes_down
        self.report(ConnectionClosed(ep))

    def rejected(self, tried: int) -> None:
        self.stats.rejected += 1
        log.warning("client.rejected", reason="every candidate failed", tried=tried)

    # ------------------------------------------------------------ actions
    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case CloseConnections(endpoint=ep, reason=reason):
                    group = self.bridges.get(ep)
                    if group:
                        log.info(
                            "endpoint.connections_closed",
                            endpoint=str(ep),
                            count=len(group),
                            reason=reason,
                        )
                        for bridge in list(group):
                            bridge.abort()
                case StateChanged(endpoint=ep, old=old, new=new, reason=reason):
                    level = log.warning if new in (State.FAILED, State.NOT_APISERVER) else log.info
                    level(
                        "endpoint.state_changed",
                        endpoint=str(ep),
                        old=old.value,
                        new=new.value,
                        reason=reason,
                    )
                case EndpointAdded(endpoint=ep, sources=sources):
                    log.info("endpoint.added", endpoint=str(ep), sources=sorted(sources))
                case EndpointRemoved(endpoint=ep, reason=reason):
                    log.info("endpoint.removed", endpoint=str(ep), reason=reason)
                case ActiveChanged(old=old_ep, new=new_ep):
                    log.info(
                        "pool.active_changed",
                        old=None if old_ep is None else str(old_ep),
                        new=None if new_ep is None else str(new_ep),
                    )
                case KeptLastKnown(source=source, endpoints=eps):
                    log.warning(
                        "pool.kept_last_known",
                        source=source,
                        endpoints=names(eps),
                        reason="the source's set would have emptied the pool",
                    )
                case PersistState():
                    self._persist.set()
                case ProbeScheduleChanged():
                    if self._prober is not None:
                        self._prober.wake()
                case _:
                    assert_never(action)

    # ------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("lbproxy.stop_requested")
        self._stop.set()

    async def run(self) -> None:
        """Serve until request_stop(); raises LbproxyError if a listener cannot start."""
        loop = self._loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        self._prober = Prober(self.pool, self._safe_check, self.report)
        self._restore_state()
        if self.cfg.servers:
            self.report(seeds(self.cfg.servers, self.cfg.default_port))
        servers: list[asyncio.base_events.Server] = []
        admin_runner: Any = None
        try:
            for ep in self.cfg.listen:
                servers.append(await self._listen(ep))
            if self._source_factory is not None:
                self.sources.extend(self._source_factory(self))  # may raise ConfigError
            if self.cfg.admin is not None:
                admin_runner = await self._start_admin(self.cfg.admin)
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.request_stop)
            log.info(
                "lbproxy.started",
                listen=[_hostport(a) for a in self.listen_addresses],
                admin=None if self.admin_address is None else _hostport(self.admin_address),
                endpoints=names(self.pool.records),
                policy=self.cfg.policy.value,
                probe=self.cfg.probe.kind.value,
            )
            if not self.pool.records and not self.sources:
                log.warning("pool.empty", reason="no servers, state file or discovery configured")
            self.started.set()
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._prober.run()),
                    tg.create_task(self._persist_loop()),
                ]
                tasks += [tg.create_task(self._supervise(src)) for src in self.sources]
                await self._stop.wait()
                for server in servers:
                    server.close()
                await self._drain()
                for task in tasks:
                    task.cancel()
        finally:
            for server in servers:
                server.close()
            for bridge in list(self.open_bridges):
                bridge.abort()
            if admin_runner is not None:
                await admin_runner.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
        await self._write_state()
        log.info("lbproxy.stopped")

    async def _listen(self, ep: Endpoint) -> asyncio.base_events.Server:
        assert self._loop is not None
        # asyncio's own loop calls accept() up to `backlog` times per wakeup and, when out
        # of descriptors, reports and schedules a retry for every one of those calls: with
        # a 4096 backlog the retries feed each other into a busy loop. Give it a small
        # batch, then raise the kernel's queue to LISTEN_BACKLOG on the same socket.
        selector = isinstance(self._loop, asyncio.selector_events.BaseSelectorEventLoop)
        try:
            server = await self._loop.create_server(
                Bridge.factory(self),
                ep.host,
                ep.port,
                backlog=ACCEPT_BATCH if selector else LISTEN_BACKLOG,
                reuse_address=True,
            )
        except OSError as exc:
            raise LbproxyError(f"cannot listen on {ep}: {exc.strerror or exc}") from None
        for sock in server.sockets:
            addr = sock.getsockname()
            self.listen_addresses.append((addr[0], addr[1]))
            if selector:
                # A duplicate descriptor of the same socket: asyncio keeps the original.
                with socket.socket(fileno=os.dup(sock.fileno())) as dup:
                    dup.listen(LISTEN_BACKLOG)
        return server

    async def _start_admin(self, ep: Endpoint) -> Any:
        from aiohttp import web

        from lbproxy.admin.app import make_app

        runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, ep.host, ep.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise LbproxyError(f"cannot listen on {ep} (admin): {exc.strerror or exc}") from None
        server = site._server  # aiohttp keeps the bound socket here
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            addr = sockets[0].getsockname()
            self.admin_address = (addr[0], addr[1])
        return runner

    async def _drain(self) -> None:
        if self.open_bridges:
            log.info(
                "lbproxy.draining",
                connections=len(self.open_bridges),
                timeout=self.cfg.drain_timeout,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.drain_timeout):
                    await self._idle.wait()
        left = len(self.open_bridges)
        for bridge in list(self.open_bridges):
            bridge.abort()
        log.info("lbproxy.drained", closed_at_deadline=left)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_ERROR_MESSAGE:
            _loop_exception(loop, context)
            return
        self._accept_errors += 1
        now = loop.time()
        last = self._accept_error_logged_at
        if last is not None and now - last < ACCEPT_ERROR_LOG_INTERVAL:
            return
        exc = context.get("exception")
        log.error(
            "listener.accept_failed",
            error=describe(exc) if isinstance(exc, OSError) else repr(exc),
            count=self._accept_errors,
            interval=ACCEPT_ERROR_LOG_INTERVAL,
        )
        self._accept_errors = 0
        self._accept_error_logged_at = now

    async def _safe_check(self, ep: Endpoint) -> ProbeCompleted:
        while True:
            try:
                return await self.check(ep)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if not is_local_error(exc):
                    return ProbeCompleted(ep, ProbeOutcome.FAILED, False, None, describe(exc))
                # This process is out of descriptors or memory: the probe never reached
                # the endpoint, and failing it would close every connection it carries.
                # Keep the probe in flight (the endpoint keeps its state) and retry.
                log.info("probe.local_error", endpoint=str(ep), error=describe(exc))
                await asyncio.sleep(LOCAL_ERROR_RETRY)
            except Exception as exc:  # noqa: BLE001 - a probe bug must not stop probing
                log.error("probe.crashed", endpoint=str(ep), error=repr(exc))
                return ProbeCompleted(ep, ProbeOutcome.FAILED, False, None, f"probe error: {exc!r}")

    async def _supervise(self, source: Source) -> None:
        """Keep a source running; an unexpected crash is logged and the source restarted."""
        backoff = 1.0
        while True:
            try:
                await source.run(self.report)
                log.warning("source.exited", source=source.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("source.crashed", source=source.name, error=repr(exc))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    # ------------------------------------------------------------ state file
    def _restore_state(self) -> None:
        if not self.cfg.state_file:
            return
        path = Path(self.cfg.state_file)
        try:
            known, problems = statefile.read(path, wall_offset=self.wall_offset())
        except DiscoveryError as exc:
            log.warning("state.unreadable", path=str(path), error=str(exc), action="ignored")
            return
        for problem in problems:
            log.warning("state.entry_skipped", path=str(path), error=problem)
        if known:
            log.info("state.loaded", path=str(path), endpoints=len(known))
            self.report(StateRestored(known))

    async def _persist_loop(self) -> None:
        while True:
            await self._persist.wait()
            self._persist.clear()
            await self._write_state()
            await asyncio.sleep(PERSIST_DEBOUNCE)

    async def _write_state(self) -> None:
        if not self.cfg.state_file or not self.pool.records:
            return
        data = statefile.encode(self.pool.snapshot(), wall_offset=self.wall_offset())
        path = Path(self.cfg.state_file)
        try:
            await asyncio.to_thread(statefile.write_atomic, path, data)
        except OSError as exc:
            log.warning("state.write_failed", path=str(path), error=exc.strerror or str(exc))


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    log.error(
        "loop.exception",
        message=context.get("message"),
        error=None if exc is None else repr(exc),
    )


def _hostport(addr: tuple[str, int]) -> str:
    return str(Endpoint(addr[0], addr[1]))
