"""Endpoint states and the probe-driven transitions between them, as data the pool applies."""

from __future__ import annotations

import enum
from typing import assert_never


class State(enum.Enum):
    """Where an endpoint stands. The value is what the admin API and metrics show."""

    UNCHECKED = "unchecked"  # discovered, not probed yet
    HEALTHY = "healthy"  # passed `rise` probes in a row
    RECOVERING = "recovering"  # was failed or unchecked, passing probes but below `rise`
    FAILED = "failed"  # failed `fall` probes or dials in a row
    NOT_APISERVER = "not-an-apiserver"  # answers, but is not a kube-apiserver (k3s etcd-only)


# Numbers for the Prometheus state gauge; ordered from worst to best like k3s's metric.
STATE_CODES: dict[State, int] = {
    State.NOT_APISERVER: 0,
    State.FAILED: 1,
    State.UNCHECKED: 2,
    State.RECOVERING: 3,
    State.HEALTHY: 4,
}


class ProbeOutcome(enum.Enum):
    """What one active probe concluded."""

    OK = "ok"  # 200 from /readyz, or a completed connect/handshake for tcp/tls probes
    UNAUTHORIZED = "unauthorized"  # 401/403: a live apiserver that rejects anonymous probes
    NOT_APISERVER = "not-an-apiserver"  # 503 "apiserver disabled": the k3s etcd-only supervisor
    FAILED = "failed"  # timeout, refused, TLS error, or any other status


def is_success(outcome: ProbeOutcome) -> bool:
    match outcome:
        case ProbeOutcome.OK | ProbeOutcome.UNAUTHORIZED:
            return True
        case ProbeOutcome.NOT_APISERVER | ProbeOutcome.FAILED:
            return False
        case _:
            assert_never(outcome)


def after_success(state: State, successes: int, rise: int) -> State:
    """The state after a success, given the run of consecutive successes including it."""
    match state:
        case State.HEALTHY:
            return State.HEALTHY
        case State.UNCHECKED | State.FAILED | State.RECOVERING | State.NOT_APISERVER:
            return State.HEALTHY if successes >= rise else State.RECOVERING
        case _:
            assert_never(state)


def after_failure(state: State, failures: int, fall: int) -> State:
    """The state after a failure, given the run of consecutive failures including it.

    A healthy endpoint is given `fall` chances; anything not yet proven falls at once,
    since it has no good record to lose.
    """
    match state:
        case State.HEALTHY:
            return State.FAILED if failures >= fall else State.HEALTHY
        case State.UNCHECKED | State.RECOVERING | State.FAILED:
            return State.FAILED
        case State.NOT_APISERVER:
            # The classification stands until an apiserver answer replaces it: a peer
            # known to be etcd-only stays last in line even while it is also down.
            return State.NOT_APISERVER
        case _:
            assert_never(state)
