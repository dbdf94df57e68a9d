"""Events fed into the pool by sources, the prober and the forwarder."""

from __future__ import annotations

from dataclasses import dataclass

from lbproxy.model import Endpoint
from lbproxy.pool.states import ProbeOutcome, State


@dataclass(frozen=True, slots=True)
class EndpointsDiscovered:
    """The complete current set one source knows; it replaces that source's previous set."""

    source: str
    endpoints: frozenset[Endpoint]


@dataclass(frozen=True, slots=True)
class KnownEndpoint:
    """What the state file keeps of one endpoint, written and read back."""

    endpoint: Endpoint
    sources: frozenset[str]
    state: State
    confirmed_apiserver: bool
    last_success_at: float | None  # on the pool's clock


@dataclass(frozen=True, slots=True)
class StateRestored:
    endpoints: tuple[KnownEndpoint, ...]


@dataclass(frozen=True, slots=True)
class ProbeCompleted:
    endpoint: Endpoint
    outcome: ProbeOutcome
    # True when the answer itself proves a kube-apiserver (an https probe's 200/401/403);
    # a bare TCP connect or TLS handshake proves only that something listens.
    confirms_apiserver: bool
    latency: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DialSucceeded:
    """The forwarder connected a client to this endpoint; counts one open connection."""

    endpoint: Endpoint
    # Pool.healthy_epoch when the candidates were taken; None if unknown. A dial that
    # started before a healthy apiserver appeared may land on a fallback after the pool
    # closed the fallbacks: the epoch tells the pool to close that one too.
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class DialFailed:
    endpoint: Endpoint
    error: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class UpstreamReset:
    """An established upstream connection was reset or timed out: probe it again soon."""

    endpoint: Endpoint
    error: str


Event = (
    EndpointsDiscovered
    | StateRestored
    | ProbeCompleted
    | DialSucceeded
    | DialFailed
    | ConnectionClosed
    | UpstreamReset
)
