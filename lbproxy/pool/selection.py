"""Candidate ordering for new connections: which endpoints to dial, best first.

Tiers, each tried only after the one before it failed to dial:

1. healthy apiservers (state healthy and confirmed: an https probe answered like an
   apiserver, or an authoritative source such as etcd or the Kubernetes API lists it);
2. the unproven: recovering, healthy-but-unconfirmed (a seed behind a tcp/tls probe),
   unchecked; discovered endpoints before operator seeds;
3. failed endpoints, most recently successful first, seeds last;
4. not-an-apiserver endpoints, and only while no healthy apiserver exists.

So the pool is never empty while it knows any endpoint, and a k3s etcd-only peer is
never dialled while a real apiserver is up.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from lbproxy.model import AUTHORITATIVE_SOURCES, SOURCE_DNS, SOURCE_STATE, SOURCE_STATIC, Endpoint
from lbproxy.pool.states import State

# Sources an operator writes by hand (or DNS they publish): listing there proves nothing.
SEED_SOURCES = frozenset({SOURCE_STATIC, SOURCE_STATE, SOURCE_DNS})


class Policy(enum.Enum):
    STICKY = "sticky"
    LEAST_CONNECTIONS = "least-connections"


@dataclass(slots=True)
class Record:
    """Everything the pool knows about one endpoint. Times are on the pool's clock."""

    endpoint: Endpoint
    sources: set[str] = field(default_factory=set)
    state: State = State.UNCHECKED
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    probe_confirmed: bool = False  # an https probe answered like an apiserver
    connections: int = 0
    last_probe_at: float | None = None
    last_success_at: float | None = None
    last_error: str | None = None
    probe_latency: float | None = None
    next_probe_at: float = 0.0
    probe_in_flight: bool = False

    @property
    def confirmed_apiserver(self) -> bool:
        if self.state is State.NOT_APISERVER:
            return False
        return self.probe_confirmed or not AUTHORITATIVE_SOURCES.isdisjoint(self.sources)

    @property
    def is_seed(self) -> bool:
        """Known only from operator input, never from a source that proves an apiserver."""
        return self.sources <= SEED_SOURCES

    @property
    def healthy_apiserver(self) -> bool:
        return self.state is State.HEALTHY and self.confirmed_apiserver


def _latency_tier(latency: float | None) -> int:
    # Coarse buckets, so that noise of a few microseconds does not reorder endpoints.
    if latency is None:
        return 9
    for tier, bound in enumerate((0.0005, 0.002, 0.01, 0.05, 0.2, 1.0)):
        if latency < bound:
            return tier
    return 7


def preference_key(rec: Record) -> tuple[int, int, Endpoint]:
    """Among equally healthy endpoints: lowest latency tier, then fewest connections."""
    return (_latency_tier(rec.probe_latency), rec.connections, rec.endpoint)


def tiers(records: Iterable[Record]) -> tuple[list[Record], list[Record]]:
    """Split into (healthy apiservers, everything else in fallback order)."""
    healthy: list[Record] = []
    unproven: list[Record] = []
    failed: list[Record] = []
    not_api: list[Record] = []
    for rec in records:
        if rec.healthy_apiserver:
            healthy.append(rec)
        elif rec.state is State.NOT_APISERVER:
            not_api.append(rec)
        elif rec.state is State.FAILED:
            failed.append(rec)
        else:
            unproven.append(rec)
    healthy.sort(key=preference_key)
    unproven_rank = {State.RECOVERING: 0, State.HEALTHY: 1, State.UNCHECKED: 2}
    unproven.sort(key=lambda r: (r.is_seed, unproven_rank.get(r.state, 3), preference_key(r)))
    failed.sort(
        key=lambda r: (
            r.is_seed,
            -(r.last_success_at if r.last_success_at is not None else float("-inf")),
            r.endpoint,
        )
    )
    fallback = unproven + failed
    if not healthy:
        not_api.sort(key=lambda r: r.endpoint)
        fallback += not_api
    return healthy, fallback
