"""Runs the pool's due probes concurrently and feeds their results back as events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lbproxy.health.checks import Check
from lbproxy.model import Endpoint
from lbproxy.pool.events import Event
from lbproxy.pool.pool import Pool


class Prober:
    """The pool decides when each endpoint is due (interval, jitter, probe-soon);
    this task only sleeps until then and runs the checks side by side."""

    def __init__(self, pool: Pool, check: Check, report: Callable[[Event], None]) -> None:
        self._pool = pool
        self._check = check
        self._report = report
        self._wake = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                for ep in self._pool.due_probes(loop.time()):
                    task = loop.create_task(self._probe(ep))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                wake_at = self._pool.next_wakeup()
                delay = None if wake_at is None else max(0.0, wake_at - loop.time())
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for task in list(self._running):
                task.cancel()
            if self._running:
                await asyncio.gather(*self._running, return_exceptions=True)

    async def _probe(self, ep: Endpoint) -> None:
        result = await self._check(ep)
        self._report(result)
        # The pool has just scheduled this endpoint's next probe; when every probe was in
        # flight the loop above sleeps with no deadline and must look again.
        self._wake.set()
