"""The endpoint pool as a playbook: events in, actions out, no clock and no sockets.

Each test names the rule it pins down. Helpers build events tersely (``ok(A)``,
``fail(A)``, ``discover(K8S, A, B)``) and pick actions out of what ``handle`` returns
(``closed(actions)``, ``changes(actions)``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TypeVar

import pytest

from lbproxy.model import (
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
    DialSucceeded,
    EndpointsDiscovered,
    Event,
    KnownEndpoint,
    ProbeCompleted,
    StateRestored,
    UpstreamReset,
)
from lbproxy.pool.pool import Pool, PoolSettings
from lbproxy.pool.selection import Policy, Record, preference_key, tiers
from lbproxy.pool.states import ProbeOutcome, State

A = Endpoint("10.0.0.1", 6443)
B = Endpoint("10.0.0.2", 6443)
C = Endpoint("10.0.0.3", 6443)
D = Endpoint("10.0.0.4", 6443)
E = Endpoint("10.0.0.5", 6443)
F = Endpoint("10.0.0.6", 6443)
G = Endpoint("10.0.0.7", 6443)
H = Endpoint("10.0.0.8", 6443)
N = Endpoint("10.0.0.9", 6443)  # by convention the k3s etcd-only peer: not an apiserver
SEED = Endpoint("seed.example", 6443)

K8S = SOURCE_KUBERNETES
LEASES = SOURCE_ETCD_MASTERLEASES
APIADDR = SOURCE_ETCD_APIADDRESSES
STATIC = SOURCE_STATIC
STATE = SOURCE_STATE
DNS = SOURCE_DNS

T = TypeVar("T")


# ------------------------------------------------------------------ helpers
def discover(source: str, *eps: Endpoint) -> EndpointsDiscovered:
    return EndpointsDiscovered(source, frozenset(eps))


def ok(ep: Endpoint, *, confirms: bool = True, latency: float | None = None) -> ProbeCompleted:
    return ProbeCompleted(ep, ProbeOutcome.OK, confirms_apiserver=confirms, latency=latency)


def fail(ep: Endpoint, error: str | None = "connection refused") -> ProbeCompleted:
    return ProbeCompleted(ep, ProbeOutcome.FAILED, confirms_apiserver=False, error=error)


def not_api(ep: Endpoint) -> ProbeCompleted:
    return ProbeCompleted(ep, ProbeOutcome.NOT_APISERVER, confirms_apiserver=False)


def closed(actions: Iterable[Action]) -> set[Endpoint]:
    return {a.endpoint for a in actions if isinstance(a, CloseConnections)}


def changes(actions: Iterable[Action]) -> list[tuple[Endpoint, State, State]]:
    return [(a.endpoint, a.old, a.new) for a in actions if isinstance(a, StateChanged)]


def of_type(actions: Iterable[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


def known(
    ep: Endpoint,
    state: State = State.HEALTHY,
    *,
    confirmed: bool = True,
    last_success_at: float | None = 50.0,
    sources: frozenset[str] = frozenset({K8S}),
) -> KnownEndpoint:
    return KnownEndpoint(ep, sources, state, confirmed, last_success_at)


class Playbook:
    """A pool and a clock; ``play`` feeds events at the current time and returns all actions."""

    def __init__(self, **settings: object) -> None:
        self.now = 100.0
        self.pool = Pool(PoolSettings(**settings), rng=random.Random(1))  # type: ignore[arg-type]

    def play(self, *events: Event) -> list[Action]:
        actions: list[Action] = []
        for event in events:
            actions += self.pool.handle(event, self.now)
        return actions

    def state(self, ep: Endpoint) -> State:
        return self.pool.records[ep].state

    def healthy_apiservers(self, *eps: Endpoint, source: str = K8S) -> list[Action]:
        """Discover `eps` from `source` and pass one confirming probe each."""
        return self.play(discover(source, *eps), *(ok(ep) for ep in eps))

    def connect(self, ep: Endpoint, n: int = 1) -> None:
        for _ in range(n):
            assert self.play(DialSucceeded(ep)) == []


# ================================================================== states
def test_discovered_endpoint_starts_unchecked_and_is_due_for_a_probe_at_once() -> None:
    pb = Playbook()
    actions = pb.play(discover(K8S, A))
    assert actions == [
        EndpointAdded(A, frozenset({K8S})),
        ProbeScheduleChanged(),
        PersistState(),
        ActiveChanged(None, A),
    ]
    assert pb.state(A) is State.UNCHECKED
    assert pb.pool.next_wakeup() == pb.now
    assert pb.pool.due_probes(pb.now) == [A]


def test_rise_threshold_climbs_through_recovering() -> None:
    pb = Playbook(rise=3)
    pb.play(discover(K8S, A))
    assert changes(pb.play(ok(A))) == [(A, State.UNCHECKED, State.RECOVERING)]
    assert changes(pb.play(ok(A))) == []
    assert pb.state(A) is State.RECOVERING
    assert not pb.pool.ready
    assert changes(pb.play(ok(A))) == [(A, State.RECOVERING, State.HEALTHY)]
    assert pb.pool.ready
    assert pb.pool.has_healthy_apiserver


def test_a_failure_restarts_the_rise_count() -> None:
    pb = Playbook(rise=2)
    pb.play(discover(K8S, A), ok(A))
    assert pb.state(A) is State.RECOVERING
    actions = pb.play(fail(A))
    # not yet proven: falls at once, and its connections go
    assert changes(actions) == [(A, State.RECOVERING, State.FAILED)]
    assert closed(actions) == {A}
    pb.play(ok(A))
    assert pb.state(A) is State.RECOVERING
    pb.play(ok(A))
    assert pb.state(A) is State.HEALTHY


def test_fall_threshold_gives_a_healthy_endpoint_fall_chances() -> None:
    pb = Playbook(fall=3)
    pb.healthy_apiservers(A)
    for _ in range(2):
        actions = pb.play(fail(A))
        assert changes(actions) == []
        assert closed(actions) == set()
        assert pb.state(A) is State.HEALTHY
    actions = pb.play(fail(A, error="timeout"))
    assert changes(actions) == [(A, State.HEALTHY, State.FAILED)]
    assert closed(actions) == {A}
    assert pb.pool.records[A].last_error == "probe: timeout"
    assert not pb.pool.ready


def test_a_success_resets_the_fall_count() -> None:
    pb = Playbook(fall=2)
    pb.healthy_apiservers(A)
    pb.play(fail(A), ok(A), fail(A))
    assert pb.state(A) is State.HEALTHY
    pb.play(fail(A))
    assert pb.state(A) is State.FAILED


def test_unchecked_endpoint_falls_on_its_first_failure() -> None:
    pb = Playbook(fall=3)
    pb.play(discover(K8S, A))
    actions = pb.play(fail(A, error=None))
    assert changes(actions) == [(A, State.UNCHECKED, State.FAILED)]
    assert closed(actions) == {A}
    assert pb.pool.records[A].last_error == "probe: failed"


def test_unauthorized_probe_counts_as_a_live_apiserver() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, A))
    pb.play(ProbeCompleted(A, ProbeOutcome.UNAUTHORIZED, confirms_apiserver=True, latency=0.01))
    rec = pb.pool.records[A]
    assert rec.state is State.HEALTHY
    assert rec.healthy_apiserver
    assert rec.last_success_at == pb.now
    assert rec.probe_latency == 0.01


def test_not_apiserver_probe_classifies_and_closes_connections() -> None:
    pb = Playbook()
    pb.play(discover(APIADDR, N))
    pb.connect(N)
    actions = pb.play(not_api(N))
    assert changes(actions) == [(N, State.UNCHECKED, State.NOT_APISERVER)]
    assert closed(actions) == {N}
    assert PersistState() in actions
    rec = pb.pool.records[N]
    # listed by an authoritative source, yet not an apiserver: the probe answer wins
    assert not rec.confirmed_apiserver
    assert rec.last_error == "not an apiserver"


def test_not_apiserver_classification_survives_failures() -> None:
    pb = Playbook(fall=1)
    pb.play(discover(STATIC, N), not_api(N))
    actions = pb.play(fail(N), DialFailed(N, "refused"))
    assert changes(actions) == []
    assert pb.state(N) is State.NOT_APISERVER


def test_apiserver_answer_replaces_not_apiserver_classification() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, N), not_api(N))
    actions = pb.play(ok(N))
    assert changes(actions) == [(N, State.NOT_APISERVER, State.HEALTHY)]
    assert pb.pool.has_healthy_apiserver
    assert pb.pool.candidates() == [N]


def test_probe_result_for_unknown_endpoint_is_ignored() -> None:
    pb = Playbook()
    pb.play(discover(K8S, A))
    assert pb.play(ok(B), fail(B), not_api(B)) == []
    assert set(pb.pool.records) == {A}


# ================================================================== ready
def test_ready_and_has_healthy_apiserver_start_false() -> None:
    pb = Playbook()
    assert not pb.pool.ready
    assert not pb.pool.has_healthy_apiserver
    pb.play(discover(K8S, A))
    assert not pb.pool.ready
    assert not pb.pool.has_healthy_apiserver


def test_ready_counts_any_healthy_endpoint_but_only_confirmed_ones_are_apiservers() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, SEED), ok(SEED, confirms=False))
    # a TCP connect proves only that something listens: ready, but not an apiserver
    assert pb.pool.ready
    assert not pb.pool.has_healthy_apiserver
    pb.play(discover(K8S, A), ok(A, confirms=False))
    # an authoritative listing is itself the proof
    assert pb.pool.has_healthy_apiserver


# ================================================================== sticky policy
def test_sticky_sends_every_new_connection_to_one_active_endpoint() -> None:
    pb = Playbook()
    pb.healthy_apiservers(A, B, C)
    first = pb.pool.candidates()[0]
    assert pb.pool.active == first
    for i in range(10):
        pb.connect(first)
        # a latency change that would reorder the healthy tier does not move the target
        pb.play(*(ok(ep, latency=0.5 if ep == first else 0.0001) for ep in (A, B, C)))
        pb.now += 1 + i
        assert pb.pool.candidates()[0] == first
    assert pb.pool.records[first].connections == 10


def test_sticky_switches_when_the_active_endpoint_fails() -> None:
    pb = Playbook(fall=1)
    pb.healthy_apiservers(A, B)
    assert pb.pool.active == A
    pb.connect(A, 3)
    actions = pb.play(fail(A))
    assert ActiveChanged(A, B) in actions
    assert closed(actions) == {A}
    assert pb.pool.candidates()[0] == B


def test_sticky_does_not_flap_back_when_the_old_active_recovers() -> None:
    pb = Playbook(fall=1)
    pb.healthy_apiservers(A, B)
    pb.play(fail(A))
    assert pb.pool.active == B
    actions = pb.play(ok(A))
    assert of_type(actions, ActiveChanged) == []
    assert pb.pool.candidates() == [B, A]


def test_sticky_moves_from_a_fallback_to_a_returning_healthy_apiserver() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, SEED), ok(SEED, confirms=False))
    assert pb.pool.active == SEED
    pb.connect(SEED)
    pb.play(discover(K8S, A))
    # A is discovered but not yet probed: the seed that passes its probes stays active
    assert pb.pool.candidates() == [SEED, A]
    actions = pb.play(ok(A))
    assert pb.pool.active == A
    assert of_type(actions, ActiveChanged) == [ActiveChanged(SEED, A)]
    assert closed(actions) == {SEED}


def test_sticky_moves_on_when_the_active_endpoint_is_removed() -> None:
    pb = Playbook()
    pb.play(discover(K8S, A))
    pb.play(discover(STATIC, B))
    # K8S gives up on A, which is still listed nowhere else, but B keeps the pool alive
    actions = pb.play(discover(K8S))
    assert ActiveChanged(A, B) in actions
    assert pb.pool.candidates() == [B]


# ================================================================== least-connections
def test_least_connections_picks_the_healthy_apiserver_with_fewest_connections() -> None:
    pb = Playbook(policy=Policy.LEAST_CONNECTIONS)
    pb.healthy_apiservers(A, B, C)
    pb.connect(A, 3)
    pb.connect(B, 1)
    pb.connect(C, 2)
    for _ in range(4):
        cands = pb.pool.candidates()
        assert cands[0] == B
        assert sorted(cands) == [A, B, C]


def test_least_connections_spreads_a_burst_evenly() -> None:
    pb = Playbook(policy=Policy.LEAST_CONNECTIONS)
    pb.healthy_apiservers(A, B, C)
    for _ in range(9):
        pb.connect(pb.pool.candidates()[0])
    assert [pb.pool.records[ep].connections for ep in (A, B, C)] == [3, 3, 3]


def test_least_connections_rotates_ties() -> None:
    pb = Playbook(policy=Policy.LEAST_CONNECTIONS)
    pb.healthy_apiservers(A, B, C)
    firsts = [pb.pool.candidates()[0] for _ in range(6)]
    assert set(firsts[:3]) == {A, B, C}
    assert firsts[3:] == firsts[:3]


def test_least_connections_follows_closed_connections() -> None:
    pb = Playbook(policy=Policy.LEAST_CONNECTIONS)
    pb.healthy_apiservers(A, B)
    pb.connect(A, 2)
    pb.connect(B, 3)
    assert pb.pool.candidates()[0] == A
    assert pb.play(ConnectionClosed(B), ConnectionClosed(B)) == []
    assert pb.pool.candidates()[0] == B


def test_least_connections_never_picks_a_fallback_over_a_healthy_apiserver() -> None:
    pb = Playbook(policy=Policy.LEAST_CONNECTIONS)
    pb.play(discover(STATIC, SEED), ok(SEED, confirms=False))
    pb.healthy_apiservers(A, B)
    pb.connect(A, 5)
    pb.connect(B, 5)
    cands = pb.pool.candidates()
    assert cands[0] in {A, B}
    assert cands[-1] == SEED
    assert len(cands) == len(set(cands)) == 3


def test_least_connections_with_one_healthy_apiserver_uses_the_plain_order() -> None:
    pb = Playbook(policy=Policy.LEAST_CONNECTIONS)
    pb.play(discover(STATIC, SEED))
    pb.healthy_apiservers(A)
    pb.connect(A, 5)
    assert pb.pool.candidates() == [A, SEED]


# ================================================================== closing connections
def test_failed_endpoint_has_its_connections_closed() -> None:
    pb = Playbook(fall=1)
    pb.healthy_apiservers(A, B)
    pb.connect(B, 2)
    actions = pb.play(fail(B))
    assert of_type(actions, CloseConnections) == [
        CloseConnections(B, "failed: probe: connection refused")
    ]


def test_removed_endpoint_has_its_connections_closed() -> None:
    pb = Playbook()
    pb.healthy_apiservers(A, B)
    pb.connect(B)
    actions = pb.play(discover(K8S, A))
    assert CloseConnections(B, "no longer listed by kubernetes") in actions
    assert EndpointRemoved(B, "no longer listed by kubernetes") in actions
    assert PersistState() in actions
    assert B not in pb.pool.records
    assert B not in pb.pool.candidates()


def test_healthy_apiserver_appearing_closes_fallback_connections() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, SEED), discover(K8S, A, B))
    pb.play(fail(A), fail(B))
    # nothing healthy: the seed and the failed endpoints all carry clients
    pb.connect(SEED)
    pb.connect(B)
    actions = pb.play(ok(A))
    assert pb.pool.has_healthy_apiserver
    assert closed(actions) == {SEED, B}
    assert all(
        a.reason == "fallback: a healthy apiserver is available"
        for a in actions
        if isinstance(a, CloseConnections)
    )


def test_healthy_apiserver_appearing_closes_not_apiserver_used_as_last_resort() -> None:
    # With nothing else answering, the etcd-only peer is dialled as a last resort; when a
    # real apiserver comes up, those clients must move to it rather than stay stuck.
    pb = Playbook()
    pb.play(discover(STATIC, A, N), not_api(N), fail(A))
    assert pb.pool.candidates() == [A, N]
    pb.connect(N)
    actions = pb.play(ok(A))
    assert pb.pool.has_healthy_apiserver
    assert N in closed(actions)
    assert pb.pool.candidates() == [A]


def test_unconfirmed_seed_is_a_fallback_even_when_healthy() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, SEED), ok(SEED, confirms=False))
    pb.connect(SEED, 2)
    pb.play(discover(LEASES, A))
    actions = pb.play(ok(A, confirms=False))
    assert closed(actions) == {SEED}
    assert pb.pool.candidates() == [A, SEED]


def test_endpoint_demoted_from_healthy_apiserver_has_connections_closed() -> None:
    # B drops out of the Kubernetes endpoints but stays listed as a static seed and still
    # accepts TCP: it is now an unconfirmed seed, a fallback, while A is a healthy
    # apiserver, so its clients must move over.
    pb = Playbook()
    pb.play(discover(STATIC, A, B), discover(K8S, A, B))
    pb.play(ok(A, confirms=False), ok(B, confirms=False))
    pb.connect(B, 2)
    actions = pb.play(discover(K8S, A))
    assert B in pb.pool.records
    assert pb.state(B) is State.HEALTHY
    assert not pb.pool.records[B].healthy_apiserver
    assert closed(actions) == {B}
    assert pb.pool.candidates() == [A, B]


def test_losing_the_only_healthy_apiserver_keeps_its_connections() -> None:
    # Demoted, but nothing better exists: it is the best fallback, so leave clients be.
    pb = Playbook()
    pb.play(discover(STATIC, A), discover(K8S, A), ok(A, confirms=False))
    pb.connect(A)
    actions = pb.play(discover(K8S))
    assert closed(actions) == set()
    assert not pb.pool.has_healthy_apiserver
    assert pb.pool.candidates() == [A]


def test_a_second_healthy_apiserver_does_not_close_anything() -> None:
    pb = Playbook()
    pb.healthy_apiservers(A)
    pb.connect(A)
    actions = pb.healthy_apiservers(B, source=APIADDR)
    assert closed(actions) == set()
    assert pb.pool.candidates() == [A, B]


def test_dial_succeeded_to_removed_endpoint_is_closed() -> None:
    # the forwarder dialled B from an older candidates() list; B left while it dialled
    pb = Playbook()
    pb.play(discover(K8S, A, B))
    pb.play(discover(K8S, A))
    actions = pb.play(DialSucceeded(B))
    assert actions == [CloseConnections(B, "endpoint removed while dialling")]
    assert B not in pb.pool.records


def test_dial_succeeded_to_not_apiserver_while_healthy_exists_is_closed() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, N), not_api(N))
    pb.healthy_apiservers(A)
    actions = pb.play(DialSucceeded(N))
    assert actions == [CloseConnections(N, "not an apiserver and a healthy one exists")]


def test_dial_succeeded_to_not_apiserver_as_last_resort_is_kept() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, N), not_api(N))
    assert pb.play(DialSucceeded(N)) == []
    assert pb.pool.records[N].connections == 1


def test_connection_counts_follow_dials_and_closes_and_never_go_negative() -> None:
    pb = Playbook()
    pb.healthy_apiservers(A)
    pb.connect(A, 2)
    assert pb.play(ConnectionClosed(A), ConnectionClosed(A), ConnectionClosed(A)) == []
    assert pb.pool.records[A].connections == 0
    assert pb.play(ConnectionClosed(B)) == []  # unknown endpoint: ignored


# ================================================================== never empty
def test_candidates_are_empty_only_when_nothing_is_known() -> None:
    pb = Playbook()
    assert pb.pool.candidates() == []
    assert pb.pool.active is None
    pb.play(discover(DNS, SEED))
    assert pb.pool.candidates() == [SEED]


def test_with_nothing_healthy_every_known_endpoint_is_a_candidate_in_fallback_order() -> None:
    pb = Playbook(rise=2)
    seed_b = Endpoint("seed-b.example", 6443)
    seed_c = Endpoint("seed-c.example", 6443)
    pb.play(discover(K8S, A, B, C, D, E), discover(STATIC, SEED, seed_b, seed_c, N))
    pb.play(ok(A))  # recovering
    # failed, with successes at different times
    pb.now = 110.0
    pb.play(ok(B), fail(B))
    pb.now = 120.0
    pb.play(ok(C), fail(C))
    pb.play(fail(D))  # failed, never succeeded
    pb.now = 130.0
    pb.play(ok(seed_b), fail(seed_b))  # a failed seed, most recent success of all
    pb.play(ok(seed_c, confirms=False), ok(seed_c, confirms=False))  # healthy, unconfirmed
    pb.play(not_api(N))
    assert not pb.pool.has_healthy_apiserver
    assert pb.pool.candidates() == [
        seed_c,  # passes its probes (unconfirmed): the sticky pick while nothing is proven
        A,  # recovering, discovered
        E,  # unchecked, discovered
        SEED,  # seeds after discovered
        C,  # failed: most recent success first
        B,
        D,  # never succeeded
        seed_b,  # failed seed last among the failed
        N,  # not an apiserver: the very last resort
    ]
    assert pb.pool.active == seed_c


def test_failed_endpoint_that_accepts_a_dial_moves_up_the_failed_tier() -> None:
    pb = Playbook(fall=1)
    pb.play(discover(K8S, A, B))
    pb.now = 101.0
    pb.play(ok(A), fail(A))
    pb.now = 102.0
    pb.play(ok(B), fail(B))
    assert pb.pool.candidates() == [B, A]
    pb.now = 103.0
    actions = pb.play(DialSucceeded(A))
    assert actions == [ActiveChanged(B, A)]
    assert pb.pool.candidates() == [A, B]
    assert pb.pool.records[A].last_success_at == 103.0
    assert pb.state(A) is State.FAILED  # a dial proves a listener, not a healthy apiserver


def test_not_apiserver_is_never_a_candidate_while_a_healthy_apiserver_exists() -> None:
    pb = Playbook(fall=1, policy=Policy.STICKY)
    pb.play(discover(APIADDR, A, N), not_api(N))
    assert pb.pool.candidates() == [A, N]
    pb.play(ok(A))
    assert pb.pool.candidates() == [A]
    pb.play(fail(A))
    # no healthy apiserver: N is back, last
    assert pb.pool.candidates() == [A, N]


def test_not_apiserver_is_never_a_candidate_under_least_connections() -> None:
    pb = Playbook(policy=Policy.LEAST_CONNECTIONS)
    pb.play(discover(STATIC, N), not_api(N))
    pb.healthy_apiservers(A, B)
    for _ in range(3):
        assert N not in pb.pool.candidates()


# ================================================================== provenance
def test_endpoint_carries_every_source_that_lists_it() -> None:
    pb = Playbook()
    actions = pb.play(discover(STATIC, A))
    assert EndpointAdded(A, frozenset({STATIC})) in actions
    actions = pb.play(discover(K8S, A), discover(DNS, A))
    assert of_type(actions, EndpointAdded) == []
    assert actions.count(PersistState()) == 2
    assert pb.pool.records[A].sources == {STATIC, K8S, DNS}
    assert pb.pool.snapshot()[0].sources == frozenset({STATIC, K8S, DNS})


def test_endpoint_leaves_only_when_no_source_lists_it() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, A, B), discover(K8S, A))
    actions = pb.play(discover(K8S, B))
    assert closed(actions) == set()
    assert pb.pool.records[A].sources == {STATIC}
    actions = pb.play(discover(STATIC, B))
    assert of_type(actions, EndpointRemoved) == [EndpointRemoved(A, "no longer listed by static")]
    assert closed(actions) == {A}
    assert set(pb.pool.records) == {B}


def test_unchanged_report_changes_nothing() -> None:
    pb = Playbook()
    pb.play(discover(K8S, A, B))
    assert pb.play(discover(K8S, A, B)) == []


def test_report_that_would_empty_the_pool_keeps_the_last_known_set() -> None:
    pb = Playbook()
    pb.healthy_apiservers(A, B)
    pb.connect(A)
    actions = pb.play(discover(K8S))
    assert actions == [KeptLastKnown(K8S, frozenset({A, B})), PersistState()]
    assert set(pb.pool.records) == {A, B}
    assert pb.pool.records[A].sources == {STATE}
    # still probe-confirmed apiservers, so nothing changes for clients
    assert pb.pool.has_healthy_apiserver
    assert pb.pool.candidates()[0] == A


def test_kept_last_known_set_gives_way_when_a_source_names_something_again() -> None:
    pb = Playbook()
    pb.play(discover(K8S, A, B), discover(K8S))
    actions = pb.play(discover(K8S, C))
    assert {a.endpoint for a in of_type(actions, EndpointRemoved)} == {A, B}
    assert set(pb.pool.records) == {C}


def test_empty_report_from_a_source_that_listed_nothing_is_a_no_op() -> None:
    pb = Playbook()
    assert pb.play(discover(K8S)) == []
    pb.play(discover(STATIC, A))
    assert pb.play(discover(DNS)) == []
    assert pb.pool.records[A].sources == {STATIC}


def test_masterlease_removed_but_listed_elsewhere_is_failed_at_once_and_probed_soon() -> None:
    pb = Playbook(fall=3)
    pb.play(discover(STATIC, A, B), discover(LEASES, A, B))
    pb.play(ok(A), ok(B))
    pb.connect(A, 2)
    assert pb.pool.next_wakeup() is not None
    assert pb.pool.next_wakeup() > pb.now  # type: ignore[operator]
    actions = pb.play(discover(LEASES, B))
    assert changes(actions) == [(A, State.HEALTHY, State.FAILED)]
    assert closed(actions) == {A}
    assert ProbeScheduleChanged() in actions
    assert ActiveChanged(A, B) in actions
    assert pb.pool.records[A].sources == {STATIC}
    assert pb.pool.records[A].last_error == "etcd:masterleases entry disappeared"
    assert pb.pool.due_probes(pb.now) == [A]
    # one good probe brings it back (it needs only `rise` successes, not `fall`)
    pb.play(ok(A))
    assert pb.state(A) is State.HEALTHY


def test_masterlease_removal_does_not_reissue_a_probe_in_flight() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, A), discover(LEASES, A, B), ok(A), ok(B))
    pb.now += 10
    assert set(pb.pool.due_probes(pb.now)) == {A, B}
    actions = pb.play(discover(LEASES, B))
    assert pb.state(A) is State.FAILED
    assert ProbeScheduleChanged() not in actions
    assert pb.pool.due_probes(pb.now) == []


def test_masterlease_removal_keeps_not_apiserver_classification() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, N), discover(LEASES, N, A), not_api(N))
    actions = pb.play(discover(LEASES, A))
    assert changes(actions) == []
    assert pb.state(N) is State.NOT_APISERVER


def test_removal_from_a_non_liveness_source_does_not_fail_the_endpoint() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, A, B), discover(APIADDR, A, B), ok(A), ok(B))
    actions = pb.play(discover(APIADDR, B))
    assert changes(actions) == []
    assert pb.state(A) is State.HEALTHY


def test_liveness_sources_are_configurable() -> None:
    pb = Playbook(liveness_sources=frozenset({K8S}))
    pb.play(discover(STATIC, A, B), discover(K8S, A, B), ok(A), ok(B))
    actions = pb.play(discover(K8S, B))
    assert changes(actions) == [(A, State.HEALTHY, State.FAILED)]
    assert pb.pool.records[A].last_error == "kubernetes entry disappeared"


@pytest.mark.parametrize("source", [K8S, LEASES, APIADDR])
def test_authoritative_source_supersedes_state_only_endpoints(source: str) -> None:
    pb = Playbook()
    pb.play(StateRestored((known(A), known(B))))
    pb.connect(B)
    actions = pb.play(discover(source, A))
    assert of_type(actions, EndpointRemoved) == [EndpointRemoved(B, f"superseded by {source}")]
    assert closed(actions) == {B}
    assert pb.pool.records[A].sources == {source}


def test_supersede_alone_persists_the_state() -> None:
    # A restore that arrives after Kubernetes spoke leaves B state-only; the next report,
    # even an unchanged one, drops B, and that change must reach the state file.
    pb = Playbook()
    pb.play(discover(K8S, A), StateRestored((known(A), known(B))))
    actions = pb.play(discover(K8S, A))
    assert of_type(actions, EndpointRemoved) == [EndpointRemoved(B, "superseded by kubernetes")]
    assert PersistState() in actions
    assert pb.pool.records[A].sources == {K8S}


@pytest.mark.parametrize("source", [STATIC, DNS])
def test_seed_sources_do_not_supersede_state_endpoints(source: str) -> None:
    pb = Playbook()
    pb.play(StateRestored((known(A),)))
    actions = pb.play(discover(source, B))
    assert of_type(actions, EndpointRemoved) == []
    assert set(pb.pool.records) == {A, B}


def test_empty_authoritative_report_does_not_supersede_state_endpoints() -> None:
    pb = Playbook()
    pb.play(StateRestored((known(A),)))
    assert pb.play(discover(K8S)) == []
    assert set(pb.pool.records) == {A}


# ================================================================== state file
def test_restore_keeps_not_apiserver_classification() -> None:
    pb = Playbook()
    actions = pb.play(StateRestored((known(N, State.NOT_APISERVER, confirmed=False),)))
    assert EndpointAdded(N, frozenset({STATE})) in actions
    assert changes(actions) == [(N, State.UNCHECKED, State.NOT_APISERVER)]
    assert closed(actions) == {N}
    pb.play(discover(STATIC, A), ok(A))
    assert pb.pool.candidates() == [A]


def test_restore_keeps_not_apiserver_classification_of_a_discovered_endpoint() -> None:
    pb = Playbook()
    pb.play(discover(APIADDR, A, N))
    pb.play(StateRestored((known(N, State.NOT_APISERVER, confirmed=False),)))
    assert pb.state(N) is State.NOT_APISERVER
    assert pb.pool.records[N].sources == {APIADDR, STATE}
    pb.play(ok(A))
    assert pb.pool.candidates() == [A]


def test_restore_keeps_confirmation_and_last_success() -> None:
    pb = Playbook()
    pb.play(StateRestored((known(A, last_success_at=42.0), known(B, confirmed=False))))
    # restored endpoints start unchecked: only a probe makes them healthy
    assert pb.state(A) is State.UNCHECKED
    assert pb.pool.records[A].last_success_at == 42.0
    pb.play(ok(A, confirms=False), ok(B, confirms=False))
    assert pb.pool.records[A].healthy_apiserver
    assert not pb.pool.records[B].healthy_apiserver


def test_restore_does_not_override_what_probes_already_found() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, A), ok(A, confirms=False))
    pb.now = 200.0
    pb.play(ok(A, confirms=False))
    actions = pb.play(
        StateRestored(
            (
                known(A, State.NOT_APISERVER, confirmed=False, last_success_at=1.0),
                known(A, State.HEALTHY, confirmed=True, last_success_at=1.0),
            )
        )
    )
    assert changes(actions) == []
    assert of_type(actions, EndpointAdded) == []
    rec = pb.pool.records[A]
    assert rec.state is State.HEALTHY
    assert rec.last_success_at == 200.0
    assert not rec.probe_confirmed  # a restored confirmation only seeds unchecked endpoints
    assert rec.sources == {STATIC, STATE}


def test_snapshot_round_trips_through_state_restored() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, SEED, N), discover(K8S, A, B), discover(DNS, C))
    pb.play(ok(A), ok(SEED, confirms=True), not_api(N), ok(C, confirms=False))
    pb.now = 150.0
    pb.play(ok(B), fail(B), fail(B))
    snap = pb.pool.snapshot()
    assert [k.endpoint for k in snap] == sorted([A, B, C, N, SEED])
    by_ep = {k.endpoint: k for k in snap}
    assert by_ep[A] == KnownEndpoint(A, frozenset({K8S}), State.HEALTHY, True, 100.0)
    assert by_ep[N].state is State.NOT_APISERVER
    assert not by_ep[N].confirmed_apiserver
    assert by_ep[B].state is State.FAILED
    assert by_ep[C].confirmed_apiserver is False

    fresh = Pool(PoolSettings())
    fresh.handle(StateRestored(snap), 0.0)
    again = {k.endpoint: k for k in fresh.snapshot()}
    assert set(again) == set(by_ep)
    for ep, item in by_ep.items():
        restored = again[ep]
        assert restored.sources == frozenset({STATE})
        assert restored.confirmed_apiserver == item.confirmed_apiserver
        assert restored.last_success_at == item.last_success_at
        assert restored.state is (
            State.NOT_APISERVER if item.state is State.NOT_APISERVER else State.UNCHECKED
        )
    # the restored pool serves at once, from the best of what it knew
    assert N not in fresh.candidates()[:4]
    assert fresh.candidates()[-1] == N


# ================================================================== probe scheduling
def test_due_probes_marks_endpoints_in_flight_and_never_reissues_them() -> None:
    pb = Playbook()
    pb.play(discover(K8S, A, B))
    assert sorted(pb.pool.due_probes(pb.now)) == [A, B]
    assert pb.pool.due_probes(pb.now) == []
    assert pb.pool.due_probes(pb.now + 1000) == []
    assert pb.pool.next_wakeup() is None
    pb.play(ok(A))
    wake = pb.pool.next_wakeup()
    assert wake is not None
    assert wake > pb.now
    assert pb.pool.due_probes(wake - 0.001) == []
    assert pb.pool.due_probes(wake) == [A]


def test_next_wakeup_is_none_for_an_empty_pool() -> None:
    assert Pool().next_wakeup() is None
    assert Pool().due_probes(0.0) == []


def test_next_probe_is_one_jittered_interval_after_the_last() -> None:
    pb = Playbook(probe_interval=2.0, probe_jitter=0.1)
    pb.pool = Pool(pb.pool.settings, rng=random.Random(7))
    expected_rng = random.Random(7)
    pb.play(discover(K8S, A))
    seen = []
    for _ in range(200):
        pb.pool.due_probes(pb.now)
        pb.play(ok(A))
        delay = pb.pool.records[A].next_probe_at - pb.now
        assert delay == pytest.approx(2.0 * (1.0 + expected_rng.uniform(-0.1, 0.1)))
        assert 1.8 <= delay <= 2.2
        seen.append(delay)
        pb.now += delay
    # jitter actually spreads the probes out
    assert max(seen) - min(seen) > 0.2


def test_zero_jitter_probes_on_the_exact_interval() -> None:
    pb = Playbook(probe_interval=3.0, probe_jitter=0.0)
    pb.play(discover(K8S, A), fail(A))
    assert pb.pool.next_wakeup() == pb.now + 3.0
    assert pb.pool.records[A].last_probe_at == pb.now


def test_dial_failed_counts_as_a_failure_and_schedules_an_immediate_probe() -> None:
    pb = Playbook(fall=2)
    pb.healthy_apiservers(A, B)
    pb.now += 0.5
    actions = pb.play(DialFailed(A, "connection refused"))
    assert actions == [ProbeScheduleChanged()]
    assert pb.pool.records[A].last_error == "dial: connection refused"
    assert pb.pool.due_probes(pb.now) == [A]
    actions = pb.play(DialFailed(A, "connection refused"))
    assert changes(actions) == [(A, State.HEALTHY, State.FAILED)]
    assert closed(actions) == {A}
    assert ProbeScheduleChanged() not in actions  # its probe is already in flight


def test_dial_failed_for_unknown_endpoint_is_ignored() -> None:
    pb = Playbook()
    pb.healthy_apiservers(A)
    assert pb.play(DialFailed(B, "refused")) == []


def test_upstream_reset_schedules_an_immediate_probe_without_changing_state() -> None:
    pb = Playbook(fall=1)
    pb.healthy_apiservers(A)
    pb.now += 0.5
    assert pb.play(UpstreamReset(A, "reset by peer")) == [ProbeScheduleChanged()]
    assert pb.state(A) is State.HEALTHY
    assert pb.pool.due_probes(pb.now) == [A]
    # already in flight, already due, or unknown: nothing to wake
    assert pb.play(UpstreamReset(A, "reset by peer")) == []
    assert pb.play(UpstreamReset(B, "reset by peer")) == []


def test_upstream_reset_of_an_endpoint_already_due_wakes_nobody() -> None:
    pb = Playbook()
    pb.play(discover(K8S, A))
    assert pb.play(UpstreamReset(A, "timeout")) == []
    assert pb.pool.due_probes(pb.now) == [A]


def test_removed_endpoint_stops_being_probed() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, A), discover(K8S, B))
    pb.play(discover(STATIC))
    assert pb.pool.due_probes(pb.now) == [B]


# ================================================================== selection details
def test_healthy_tier_prefers_lower_latency_then_fewer_connections() -> None:
    def rec(ep: Endpoint, latency: float | None, connections: int = 0) -> Record:
        return Record(
            ep,
            sources={K8S},
            state=State.HEALTHY,
            probe_latency=latency,
            connections=connections,
        )

    records = [
        rec(A, None),
        rec(B, 3.0),  # slower than every bucket
        rec(C, 0.3),
        rec(D, 0.0001),
        rec(E, 0.0004, connections=2),
        rec(F, 0.0003, connections=1),
        rec(G, 0.001),
        rec(H, 0.005),
        rec(N, 0.02),
        rec(SEED, 0.1),
    ]
    healthy, fallback = tiers(records)
    assert fallback == []
    assert [r.endpoint for r in healthy] == [D, F, E, G, H, N, SEED, C, B, A]
    assert preference_key(records[0]) == (9, 0, A)
    assert preference_key(records[1])[0] == 7


def test_unknown_event_is_rejected() -> None:
    pool = Pool()
    with pytest.raises(AssertionError):
        pool.handle(object(), 0.0)  # type: ignore[arg-type]


def test_unknown_probe_outcome_is_rejected() -> None:
    pb = Playbook()
    pb.play(discover(K8S, A))
    with pytest.raises(AssertionError):
        pb.play(ProbeCompleted(A, "ok", confirms_apiserver=True))  # type: ignore[arg-type]


# ================================================================== dial races
def test_fallback_dial_that_started_before_a_healthy_apiserver_appeared_is_closed() -> None:
    pb = Playbook()
    pb.play(discover(STATIC, SEED), discover(K8S, A))
    epoch = pb.pool.healthy_epoch  # the forwarder takes candidates now: nothing healthy
    pb.play(ok(A))  # while the dial to SEED is in flight, A becomes a healthy apiserver
    assert pb.pool.healthy_epoch != epoch
    assert closed(pb.play(DialSucceeded(SEED, epoch))) == {SEED}


def test_fallback_dial_chosen_while_a_healthy_apiserver_existed_is_kept() -> None:
    """The healthy one failed to dial, so the client fell back on purpose: keep it."""
    pb = Playbook()
    pb.play(discover(STATIC, SEED))
    pb.healthy_apiservers(A)
    epoch = pb.pool.healthy_epoch
    assert pb.play(DialFailed(A, "refused"), DialSucceeded(SEED, epoch)) != []
    assert SEED not in closed(pb.play(DialSucceeded(SEED, epoch)))


def test_dial_to_a_healthy_apiserver_is_kept_whatever_the_epoch() -> None:
    pb = Playbook()
    pb.healthy_apiservers(A)
    assert closed(pb.play(DialSucceeded(A, pb.pool.healthy_epoch - 1))) == set()


def test_sticky_holds_among_seeds_behind_a_tcp_probe() -> None:
    """A tcp/tls probe never confirms an apiserver; the policy still keeps one target
    instead of re-choosing by probe latency after every probe."""
    pb = Playbook()
    pb.play(discover(STATIC, A, B))
    pb.play(ok(A, confirms=False, latency=0.05), ok(B, confirms=False, latency=0.0001))
    first = pb.pool.active
    assert first in (A, B)
    for latency_a, latency_b in ((0.0001, 0.05), (0.05, 0.0001), (0.0001, 0.05)):
        actions = pb.play(
            ok(A, confirms=False, latency=latency_a), ok(B, confirms=False, latency=latency_b)
        )
        assert of_type(actions, ActiveChanged) == []
        assert pb.pool.candidates()[0] == first


def test_least_connections_spreads_over_seeds_behind_a_tcp_probe() -> None:
    pb = Playbook(policy=Policy.LEAST_CONNECTIONS)
    pb.play(discover(STATIC, A, B), ok(A, confirms=False), ok(B, confirms=False))
    picks = []
    for _ in range(4):
        first = pb.pool.candidates()[0]
        picks.append(first)
        pb.connect(first)
    assert sorted(picks) == [A, A, B, B]
