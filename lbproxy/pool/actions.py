"""Actions the pool asks the runtime to carry out; the pool itself never does I/O."""

from __future__ import annotations

from dataclasses import dataclass

from lbproxy.model import Endpoint
from lbproxy.pool.states import State


@dataclass(frozen=True, slots=True)
class CloseConnections:
    """Close every client connection forwarded to this endpoint, so the clients reconnect."""

    endpoint: Endpoint
    reason: str


@dataclass(frozen=True, slots=True)
class StateChanged:
    endpoint: Endpoint
    old: State
    new: State
    reason: str


@dataclass(frozen=True, slots=True)
class EndpointAdded:
    endpoint: Endpoint
    sources: frozenset[str]


@dataclass(frozen=True, slots=True)
class EndpointRemoved:
    endpoint: Endpoint
    reason: str


@dataclass(frozen=True, slots=True)
class ActiveChanged:
    """The sticky target changed; `new` is None when the pool has no endpoint at all."""

    old: Endpoint | None
    new: Endpoint | None


@dataclass(frozen=True, slots=True)
class KeptLastKnown:
    """A source reported a set that would have emptied the pool; the last known set stays."""

    source: str
    endpoints: frozenset[Endpoint]


@dataclass(frozen=True, slots=True)
class PersistState:
    """The persisted view (endpoints, sources, states) changed: write the state file."""


@dataclass(frozen=True, slots=True)
class ProbeScheduleChanged:
    """An endpoint is due for a probe sooner than the prober planned: wake it."""


Action = (
    CloseConnections
    | StateChanged
    | EndpointAdded
    | EndpointRemoved
    | ActiveChanged
    | KeptLastKnown
    | PersistState
    | ProbeScheduleChanged
)
