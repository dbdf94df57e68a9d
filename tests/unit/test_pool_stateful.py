"""The pool's invariants under random event sequences (Hypothesis rule-based state machine).

Each rule feeds one event (or calls due_probes) and checks what must hold about that
step's actions; the invariants check what must hold of the pool at every moment.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lbproxy.model import (
    AUTHORITATIVE_SOURCES,
    SOURCE_DNS,
    SOURCE_ETCD_APIADDRESSES,
    SOURCE_ETCD_MASTERLEASES,
    SOURCE_KUBERNETES,
    SOURCE_STATE,
    SOURCE_STATIC,
    Endpoint,
)
from lbproxy.pool.actions import (
    Action,
    ActiveChanged,
    CloseConnections,
    EndpointRemoved,
    KeptLastKnown,
)
from lbproxy.pool.events import (
    ConnectionClosed,
    DialFailed,
    DialSucceeded,
    EndpointsDiscovered,
    Event,
    KnownEndpoint,
    ProbeCompleted,
    StateRestored,
    UpstreamReset,
)
from lbproxy.pool.pool import Pool, PoolSettings
from lbproxy.pool.selection import Policy, Record
from lbproxy.pool.states import ProbeOutcome, State

ENDPOINTS = [
    Endpoint("10.0.0.1", 6443),
    Endpoint("10.0.0.2", 6443),
    Endpoint("fd00::3", 6443),
    Endpoint("api.example", 6443),
]
SOURCES = [
    SOURCE_STATIC,
    SOURCE_STATE,
    SOURCE_ETCD_APIADDRESSES,
    SOURCE_ETCD_MASTERLEASES,
    SOURCE_KUBERNETES,
    SOURCE_DNS,
]
UNUSABLE = {State.FAILED, State.NOT_APISERVER}

endpoints = st.sampled_from(ENDPOINTS)
endpoint_sets = st.frozensets(endpoints, max_size=len(ENDPOINTS))
# Mostly tcp/tls-style probes, which leave an authoritative listing as the only proof.
confirmations = st.sampled_from([False, False, False, True])
# Mostly successes, so that endpoints reach healthy often enough to lose it again.
outcomes = st.sampled_from(
    [ProbeOutcome.OK, ProbeOutcome.OK, ProbeOutcome.UNAUTHORIZED, *ProbeOutcome]
)
latencies = st.none() | st.sampled_from([0.0001, 0.001, 0.03, 0.3, 2.0])


@dataclass(frozen=True)
class View:
    """What the pool looked like just before a step."""

    records: dict[Endpoint, tuple[State, bool, int]]  # state, healthy apiserver, connections
    has_healthy: bool
    active: Endpoint | None
    first: Endpoint | None


def fallback_rank(rec: Record) -> int:
    """The candidate tier an endpoint belongs to, best first (see selection.py)."""
    if rec.healthy_apiserver:
        return 0
    if rec.state is State.NOT_APISERVER:
        return 5
    if rec.state is State.FAILED:
        return 4 if rec.is_seed else 3
    return 2 if rec.is_seed else 1


class PoolMachine(RuleBasedStateMachine):
    policy = Policy.STICKY

    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool()
        self.now = 0.0
        self.connections: dict[Endpoint, int] = {}
        self.in_flight: set[Endpoint] = set()
        self.reported: dict[str, frozenset[Endpoint]] = {}
        self.ever_known = False

    @initialize(
        rise=st.integers(1, 3),
        fall=st.integers(1, 3),
        jitter=st.sampled_from([0.0, 0.1, 0.5]),
        seed=st.integers(0, 2**32 - 1),
        startup=st.lists(st.tuples(st.sampled_from(SOURCES), endpoint_sets), max_size=4),
    )
    def configure(
        self,
        rise: int,
        fall: int,
        jitter: float,
        seed: int,
        startup: list[tuple[str, frozenset[Endpoint]]],
    ) -> None:
        self.pool = Pool(
            PoolSettings(policy=self.policy, rise=rise, fall=fall, probe_jitter=jitter),
            rng=random.Random(seed),
        )
        # the sources' first reports, as at start-up
        for source, eps in startup:
            self.discover(source, eps)

    # ------------------------------------------------------------ stepping
    def view(self) -> View:
        records = {
            ep: (rec.state, rec.healthy_apiserver, rec.connections)
            for ep, rec in self.pool.records.items()
        }
        order = self.pool.candidates() if self.policy is Policy.STICKY else []
        return View(
            records, self.pool.has_healthy_apiserver, self.pool.active, order[0] if order else None
        )

    def step(self, event: Event) -> list[Action]:
        before = self.view()
        actions = self.pool.handle(event, self.now)
        self.check_step(before, event, actions)
        return actions

    def check_step(self, before: View, event: Event, actions: list[Action]) -> None:
        records = self.pool.records
        closed = {a.endpoint for a in actions if isinstance(a, CloseConnections)}

        # Unusable (failed, not-an-apiserver, removed) -> its connections are closed.
        for ep, (old_state, _, _) in before.records.items():
            rec = records.get(ep)
            if rec is None:
                assert ep in closed, f"{ep} removed without CloseConnections"
                assert any(isinstance(a, EndpointRemoved) and a.endpoint == ep for a in actions)
            elif rec.state in UNUSABLE and rec.state is not old_state:
                assert ep in closed, f"{ep} became {rec.state} without CloseConnections"

        # A healthy apiserver appeared: every fallback with clients is closed.
        if self.pool.has_healthy_apiserver and not before.has_healthy:
            for ep, rec in records.items():
                if rec.connections and not rec.healthy_apiserver:
                    assert ep in closed, f"fallback {ep} kept its clients"
        # An endpoint left the healthy tier while another healthy apiserver exists.
        if self.pool.has_healthy_apiserver:
            for ep, (_, was_healthy_api, _) in before.records.items():
                rec = records.get(ep)
                if was_healthy_api and rec and rec.connections and not rec.healthy_apiserver:
                    assert ep in closed, f"demoted {ep} kept its clients"

        # The sticky target: ActiveChanged reports every change, and nothing else moves it.
        changes = [a for a in actions if isinstance(a, ActiveChanged)]
        assert len(changes) <= 1
        if changes:
            assert changes[0].old == before.active
            assert changes[0].new == self.pool.active
            assert changes[0].old != changes[0].new
        else:
            assert self.pool.active == before.active
        if self.policy is Policy.STICKY and before.first is not None:
            old = before.records[before.first]
            rec = records.get(before.first)
            if old[1] and rec is not None and rec.healthy_apiserver:
                assert not changes, "sticky target moved while still a healthy apiserver"
                assert self.pool.candidates()[0] == before.first

        # Connection accounting: dials add, closes subtract, removal forgets.
        match event:
            case DialSucceeded(endpoint=ep) if ep in records:
                self.connections[ep] = self.connections.get(ep, 0) + 1
            case ConnectionClosed(endpoint=ep) if self.connections.get(ep, 0) > 0:
                self.connections[ep] -= 1
            case ProbeCompleted(endpoint=ep):
                self.in_flight.discard(ep)
            case _:
                pass
        for ep in list(self.connections):
            if ep not in records:
                del self.connections[ep]
        self.in_flight &= set(records)
        for ep, rec in records.items():
            assert rec.connections >= 0
            assert rec.connections == self.connections.get(ep, 0)
        assert self.in_flight == {ep for ep, rec in records.items() if rec.probe_in_flight}

    # ------------------------------------------------------------ rules
    @rule(source=st.sampled_from(SOURCES), eps=endpoint_sets)
    def discover(self, source: str, eps: frozenset[Endpoint]) -> None:
        previous = frozenset(ep for ep, rec in self.pool.records.items() if source in rec.sources)
        before_states = {ep: rec.state for ep, rec in self.pool.records.items()}
        actions = self.step(EndpointsDiscovered(source, eps))
        kept = [a for a in actions if isinstance(a, KeptLastKnown)]
        records = self.pool.records

        # Provenance: a source's listing is exactly its last report (a kept set moves to
        # `state`); every endpoint is listed somewhere; a known pool never empties.
        self.reported[source] = eps
        if kept:
            assert not eps
            assert kept[0].endpoints == previous
            assert kept[0].source == source
            assert set(records) == set(before_states)
        for src, listed in self.reported.items():
            if src != SOURCE_STATE:
                assert {ep for ep, rec in records.items() if src in rec.sources} == listed
        if eps and source in AUTHORITATIVE_SOURCES:
            assert all(SOURCE_STATE not in rec.sources for rec in records.values())
        assert eps <= set(records)

        # A masterlease that disappears while another source still lists the endpoint.
        if source == SOURCE_ETCD_MASTERLEASES and not kept:
            for ep in previous - eps:
                rec = records.get(ep)
                if rec is None or before_states[ep] is State.NOT_APISERVER:
                    continue
                assert rec.state is State.FAILED
                assert rec.probe_in_flight or rec.next_probe_at <= self.now

    @rule(source=st.sampled_from(SOURCES), ep=endpoints, listed=st.booleans())
    def relist(self, source: str, ep: Endpoint, listed: bool) -> None:
        """One endpoint joins or leaves one source's listing, the common case in practice."""
        current = frozenset(e for e, rec in self.pool.records.items() if source in rec.sources)
        self.discover(source, current | {ep} if listed else current - {ep})

    @rule(ep=endpoints)
    def apiserver_disabled(self, ep: Endpoint) -> None:
        """A server turns etcd-only: the apiserver listings drop it, its port still answers.

        It stays an operator seed (static), as every server usually is.
        """
        self.relist(SOURCE_STATIC, ep, listed=True)
        for source in (SOURCE_KUBERNETES, SOURCE_ETCD_APIADDRESSES):
            self.relist(source, ep, listed=False)
        self.probe(ep, ProbeOutcome.OK, confirms=False, latency=None)

    @rule(
        items=st.lists(
            st.tuples(endpoints, st.sampled_from(list(State)), st.booleans()), max_size=3
        )
    )
    def restore(self, items: list[tuple[Endpoint, State, bool]]) -> None:
        unchecked_before = {
            ep for ep, rec in self.pool.records.items() if rec.state is State.UNCHECKED
        } | (set(ENDPOINTS) - set(self.pool.records))
        known = tuple(
            KnownEndpoint(ep, frozenset({SOURCE_KUBERNETES}), state, confirmed, self.now)
            for ep, state, confirmed in items
        )
        self.step(StateRestored(known))
        for ep, state, _ in items:
            rec = self.pool.records[ep]
            assert SOURCE_STATE in rec.sources
            if state is State.NOT_APISERVER and ep in unchecked_before:
                assert rec.state is State.NOT_APISERVER

    @rule(
        ep=endpoints,
        outcome=outcomes,
        confirms=confirmations,
        latency=latencies,
    )
    def probe(
        self, ep: Endpoint, outcome: ProbeOutcome, confirms: bool, latency: float | None
    ) -> None:
        self.step(ProbeCompleted(ep, outcome, confirms, latency=latency))
        rec = self.pool.records.get(ep)
        if rec is not None:
            assert not rec.probe_in_flight
            assert rec.next_probe_at > self.now
            if outcome is ProbeOutcome.NOT_APISERVER:
                assert rec.state is State.NOT_APISERVER

    @rule(ep=endpoints, confirms=confirmations)
    def probe_ok(self, ep: Endpoint, confirms: bool) -> None:
        # a second way to pass a probe: endpoints must climb to healthy to be tested falling
        self.probe(ep, ProbeOutcome.OK, confirms, 0.001)

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data(), outcome=outcomes, confirms=confirmations)
    def complete_probe(self, data: st.DataObject, outcome: ProbeOutcome, confirms: bool) -> None:
        ep = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.probe(ep, outcome, confirms, None)

    @rule()
    def run_due_probes(self) -> None:
        due = self.pool.due_probes(self.now)
        assert len(due) == len(set(due))
        assert not set(due) & self.in_flight, "a probe in flight was issued again"
        self.in_flight |= set(due)
        wake = self.pool.next_wakeup()
        assert wake is None or wake > self.now
        assert self.pool.due_probes(self.now) == []

    @rule(ep=endpoints)
    def dial_ok(self, ep: Endpoint) -> None:
        self.step(DialSucceeded(ep))

    @precondition(lambda self: bool(self.pool.records))
    @rule()
    def dial_first_candidate(self) -> None:
        self.step(DialSucceeded(self.pool.candidates()[0]))

    @rule(ep=endpoints)
    def dial_failed(self, ep: Endpoint) -> None:
        self.step(DialFailed(ep, "refused"))
        self.check_probe_soon(ep)

    @rule(ep=endpoints)
    def connection_closed(self, ep: Endpoint) -> None:
        assert self.step(ConnectionClosed(ep)) == []

    @rule(ep=endpoints)
    def upstream_reset(self, ep: Endpoint) -> None:
        before = {e: r.state for e, r in self.pool.records.items()}
        self.step(UpstreamReset(ep, "reset"))
        assert {e: r.state for e, r in self.pool.records.items()} == before
        self.check_probe_soon(ep)

    @rule(dt=st.sampled_from([0.1, 0.5, 1.0, 2.5, 10.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    def check_probe_soon(self, ep: Endpoint) -> None:
        rec = self.pool.records.get(ep)
        if rec is not None:
            assert rec.probe_in_flight or rec.next_probe_at <= self.now

    # ------------------------------------------------------------ invariants
    @invariant()
    def candidates_cover_the_pool(self) -> None:
        records = self.pool.records
        cands = self.pool.candidates()
        healthy = {ep for ep, rec in records.items() if rec.healthy_apiserver}
        not_api = {ep for ep, rec in records.items() if rec.state is State.NOT_APISERVER}
        self.ever_known = self.ever_known or bool(records)
        if self.ever_known:
            assert records, "the pool emptied"
        assert len(cands) == len(set(cands)), "duplicate candidates"
        assert bool(cands) == bool(records)
        assert self.pool.has_healthy_apiserver == bool(healthy)
        assert self.pool.ready == any(rec.state is State.HEALTHY for rec in records.values())
        if healthy:
            assert not set(cands) & not_api, "not-an-apiserver offered while a healthy one exists"
            assert set(cands) == set(records) - not_api
            assert cands[0] in healthy
        else:
            assert set(cands) == set(records)
        if self.policy is Policy.STICKY and cands:
            assert cands[0] == self.pool.active

    @invariant()
    def candidates_follow_the_fallback_order(self) -> None:
        records = self.pool.records
        cands = self.pool.candidates()
        # With no healthy apiserver the policy picks among the endpoints that pass probes
        # without proving an apiserver (a tcp/tls probe): that pick leads, and the rest
        # keep the tier order.
        if (
            cands
            and not self.pool.has_healthy_apiserver
            and records[cands[0]].state is State.HEALTHY
        ):
            cands = cands[1:]
        ranks = [fallback_rank(records[ep]) for ep in cands]
        assert ranks == sorted(ranks)
        for tier in (3, 4):  # failed: most recent success first
            times = [
                records[ep].last_success_at
                for ep, rank in zip(cands, ranks, strict=True)
                if rank == tier
            ]
            keys = [float("-inf") if t is None else t for t in times]
            assert keys == sorted(keys, reverse=True)

    @invariant()
    def least_connections_picks_the_least_loaded(self) -> None:
        if self.policy is not Policy.LEAST_CONNECTIONS:
            return
        healthy = [rec for rec in self.pool.records.values() if rec.healthy_apiserver]
        if len(healthy) >= 2:
            first = self.pool.records[self.pool.candidates()[0]]
            assert first.healthy_apiserver
            assert first.connections == min(rec.connections for rec in healthy)

    @invariant()
    def every_endpoint_is_listed_by_some_source(self) -> None:
        for rec in self.pool.records.values():
            assert rec.sources
            assert rec.sources <= set(SOURCES)


class LeastConnectionsMachine(PoolMachine):
    policy = Policy.LEAST_CONNECTIONS


_settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStickyPool = PoolMachine.TestCase
TestStickyPool.settings = _settings
TestLeastConnectionsPool = LeastConnectionsMachine.TestCase
TestLeastConnectionsPool.settings = settings(_settings, max_examples=50)
