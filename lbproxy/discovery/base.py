"""What every discovery source looks like to the runtime."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from lbproxy.model import Endpoint
from lbproxy.pool.events import EndpointsDiscovered

Emit = Callable[[EndpointsDiscovered], None]


class Source(Protocol):
    """A long-running discoverer. ``run`` never returns while it can still retry; it
    reports each complete set it learns through ``emit`` and logs what it skips."""

    name: str

    async def run(self, emit: Emit) -> None: ...


class PoolView(Protocol):
    """Read-only access to the pool for sources that must talk to a live apiserver."""

    def healthy_apiservers(self) -> list[Endpoint]: ...
