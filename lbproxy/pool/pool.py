"""The endpoint pool: a deterministic state machine from events to actions.

Theory of operation
-------------------
Every endpoint carries the set of sources that list it. A source's report replaces
that source's previous set; an endpoint leaves the pool only when no source lists it
(and never when that would leave the pool empty: the last known set stays, tagged
``state``). Probes, dials and resets move endpoints between the states in
``states.py``; ``selection.py`` orders them for new connections.

The rules that fix the k3s etcd-only failure family:

* An endpoint that stops being usable (failed, removed, not-an-apiserver) has all its
  client connections closed, so clients reconnect to a live apiserver.
* When a healthy apiserver appears while none was, the connections of every other
  endpoint (fallbacks: unconfirmed seeds, or endpoints used only because nothing was
  healthy) are closed, so clients move over instead of sticking to a fixed peer. So are
  those of an endpoint that drops out of the healthy tier while another healthy
  apiserver remains (say, no longer listed by an authoritative source).
* Never empty: with nothing healthy, every known endpoint is still a candidate.
* A not-an-apiserver endpoint is never a candidate while a healthy apiserver exists.
* A masterlease that disappears marks its endpoint failed at once; the probe that the
  pool schedules straight away brings it back if it still answers.

The pool never reads the clock: every call takes ``now`` (seconds, monotonic), and
``next_wakeup`` says when the prober should call ``due_probes`` again.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import assert_never

from lbproxy.model import (
    AUTHORITATIVE_SOURCES,
    SOURCE_ETCD_MASTERLEASES,
    SOURCE_STATE,
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
from lbproxy.pool.selection import Policy, Record, tiers
from lbproxy.pool.states import ProbeOutcome, State, after_failure, after_success

UNUSABLE = frozenset({State.FAILED, State.NOT_APISERVER})


@dataclass(frozen=True, slots=True)
class PoolSettings:
    policy: Policy = Policy.STICKY
    rise: int = 1
    fall: int = 2
    probe_interval: float = 2.0
    # Each probe interval is scaled by a factor drawn from [1 - jitter, 1 + jitter], so
    # that probes of many endpoints (and many nodes) do not line up.
    probe_jitter: float = 0.1
    # Sources whose removal of an endpoint means "this apiserver just died".
    liveness_sources: frozenset[str] = frozenset({SOURCE_ETCD_MASTERLEASES})


class Pool:
    def __init__(self, settings: PoolSettings | None = None, rng: random.Random | None = None):
        self.settings = settings or PoolSettings()
        self._rng = rng or random.Random()
        self._records: dict[Endpoint, Record] = {}
        self._active: Endpoint | None = None
        self._healthy: list[Record] = []
        self._fallback: list[Record] = []
        # Where sticky and least-connections choose: the healthy apiservers, or while
        # there are none, the endpoints that pass probes without proving an apiserver
        # (seeds behind a tcp/tls probe). Kept separate so policies work with any probe.
        self._primary: list[Record] = []
        self._order: list[Endpoint] = []
        self._rr = 0
        self._healthy_epoch = 0  # bumped each time a healthy apiserver appears after none

    # ----------------------------------------------------------------- queries
    @property
    def records(self) -> Mapping[Endpoint, Record]:
        return self._records

    @property
    def active(self) -> Endpoint | None:
        return self._active

    @property
    def ready(self) -> bool:
        """At least one endpoint is healthy (what the admin /readyz reports)."""
        return any(rec.state is State.HEALTHY for rec in self._records.values())

    @property
    def has_healthy_apiserver(self) -> bool:
        return bool(self._healthy)

    @property
    def healthy_epoch(self) -> int:
        """Changes whenever a healthy apiserver appears while there was none."""
        return self._healthy_epoch

    def candidates(self) -> list[Endpoint]:
        """Endpoints to dial for a new client connection, best first; empty only if none known."""
        if self.settings.policy is Policy.STICKY or len(self._primary) < 2:
            return self._order
        # least-connections: fewest open connections among the primary endpoints, ties
        # rotated so that a burst of new connections spreads before counts catch up.
        healthy = self._primary
        n = len(healthy)
        self._rr = (self._rr + 1) % n
        best = min(range(n), key=lambda i: (healthy[i].connections, (i - self._rr) % n))
        first = healthy[best].endpoint
        return [first, *(ep for ep in self._order if ep != first)]

    def snapshot(self) -> tuple[KnownEndpoint, ...]:
        return tuple(
            KnownEndpoint(
                endpoint=rec.endpoint,
                sources=frozenset(rec.sources),
                state=rec.state,
                confirmed_apiserver=rec.confirmed_apiserver,
                last_success_at=rec.last_success_at,
            )
            for rec in sorted(self._records.values(), key=lambda r: r.endpoint)
        )

    # ------------------------------------------------------------ probe timing
    def due_probes(self, now: float) -> list[Endpoint]:
        """Endpoints whose probe is due; they count as in flight until ProbeCompleted."""
        due = []
        for rec in self._records.values():
            if not rec.probe_in_flight and rec.next_probe_at <= now:
                rec.probe_in_flight = True
                due.append(rec.endpoint)
        return due

    def next_wakeup(self) -> float | None:
        times = [r.next_probe_at for r in self._records.values() if not r.probe_in_flight]
        return min(times) if times else None

    # ------------------------------------------------------------------ events
    def handle(self, event: Event, now: float) -> list[Action]:
        actions: list[Action] = []
        changed = True
        match event:
            case EndpointsDiscovered():
                self._discovered(event, now, actions)
            case StateRestored():
                self._restored(event.endpoints, now, actions)
            case ProbeCompleted():
                self._probe_completed(event, now, actions)
            case DialSucceeded():
                changed = self._dial_succeeded(event, now, actions)
            case DialFailed():
                self._failure(event.endpoint, f"dial: {event.error}", now, actions)
                self._probe_soon(event.endpoint, now, actions)
            case ConnectionClosed():
                rec = self._records.get(event.endpoint)
                if rec is not None and rec.connections > 0:
                    rec.connections -= 1
                changed = False
            case UpstreamReset():
                self._probe_soon(event.endpoint, now, actions)
                changed = False
            case _:
                assert_never(event)
        if changed:
            self._reconcile(actions)
        return actions

    # --------------------------------------------------------------- handlers
    def _discovered(self, event: EndpointsDiscovered, now: float, actions: list[Action]) -> None:
        source, new = event.source, event.endpoints
        old = {ep for ep, rec in self._records.items() if source in rec.sources}
        removed = old - new
        added = new - old
        would_remain = {
            ep for ep, rec in self._records.items() if ep not in removed or len(rec.sources) > 1
        } | added
        if not would_remain and removed:
            # Never publish an empty pool: keep the last known set until a source
            # names something again.
            for ep in removed:
                self._records[ep].sources = {SOURCE_STATE}
            actions.append(KeptLastKnown(source, frozenset(removed)))
            actions.append(PersistState())
            return
        for ep in sorted(removed):
            rec = self._records[ep]
            rec.sources.discard(source)
            if not rec.sources:
                self._remove(rec, f"no longer listed by {source}", actions)
            elif source in self.settings.liveness_sources:
                self._mark_failed(rec, f"{source} entry disappeared", actions)
                self._probe_soon(ep, now, actions)
        for ep in sorted(added):
            self._add(ep, source, now, actions)
        superseded = False
        if new and source in AUTHORITATIVE_SOURCES:
            # A live source now speaks for the cluster: drop what only the state file knew.
            for rec in list(self._records.values()):
                if SOURCE_STATE in rec.sources:
                    superseded = True
                    rec.sources.discard(SOURCE_STATE)
                    if not rec.sources:
                        self._remove(rec, f"superseded by {source}", actions)
        if removed or added or superseded:
            actions.append(PersistState())

    def _restored(self, known: Iterable[KnownEndpoint], now: float, actions: list[Action]) -> None:
        for item in known:
            rec = self._records.get(item.endpoint)
            if rec is None:
                rec = self._add(item.endpoint, SOURCE_STATE, now, actions)
            else:
                rec.sources.add(SOURCE_STATE)
            if rec.state is State.UNCHECKED:
                if item.state is State.NOT_APISERVER:
                    self._set_state(rec, State.NOT_APISERVER, "restored from state file", actions)
                else:
                    rec.probe_confirmed = rec.probe_confirmed or item.confirmed_apiserver
            if rec.last_success_at is None:
                rec.last_success_at = item.last_success_at

    def _probe_completed(self, event: ProbeCompleted, now: float, actions: list[Action]) -> None:
        rec = self._records.get(event.endpoint)
        if rec is None:
            return  # removed while the probe ran
        rec.probe_in_flight = False
        rec.last_probe_at = now
        rec.probe_latency = event.latency
        jitter = self.settings.probe_jitter
        factor = 1.0 + self._rng.uniform(-jitter, jitter) if jitter else 1.0
        rec.next_probe_at = now + self.settings.probe_interval * factor
        match event.outcome:
            case ProbeOutcome.OK | ProbeOutcome.UNAUTHORIZED:
                rec.successes += 1
                rec.failures = 0
                rec.last_success_at = now
                rec.last_error = None
                if event.confirms_apiserver:
                    rec.probe_confirmed = True
                new = after_success(rec.state, rec.successes, self.settings.rise)
                self._set_state(rec, new, f"probe {event.outcome.value}", actions)
            case ProbeOutcome.NOT_APISERVER:
                rec.successes = 0
                rec.failures = 0
                rec.probe_confirmed = False
                rec.last_error = event.error or "not an apiserver"
                self._set_state(rec, State.NOT_APISERVER, "probe: not an apiserver", actions)
            case ProbeOutcome.FAILED:
                self._failure(rec.endpoint, f"probe: {event.error or 'failed'}", now, actions)
            case _:
                assert_never(event.outcome)

    def _dial_succeeded(self, event: DialSucceeded, now: float, actions: list[Action]) -> bool:
        ep = event.endpoint
        rec = self._records.get(ep)
        if rec is None:
            actions.append(CloseConnections(ep, "endpoint removed while dialling"))
            return False
        rec.connections += 1
        if rec.state is State.NOT_APISERVER and self._healthy:
            actions.append(CloseConnections(ep, "not an apiserver and a healthy one exists"))
        elif (
            self._healthy
            and event.epoch is not None
            and event.epoch != self._healthy_epoch
            and not rec.healthy_apiserver
        ):
            actions.append(
                CloseConnections(ep, "fallback dialled before a healthy apiserver appeared")
            )
        if rec.state is State.FAILED:
            rec.last_success_at = now
            return True  # reorders the failed tier
        return False

    def _failure(self, ep: Endpoint, error: str, now: float, actions: list[Action]) -> None:
        rec = self._records.get(ep)
        if rec is None:
            return
        rec.failures += 1
        rec.successes = 0
        rec.last_error = error
        new = after_failure(rec.state, rec.failures, self.settings.fall)
        self._set_state(rec, new, error, actions)

    # ---------------------------------------------------------------- helpers
    def _add(self, ep: Endpoint, source: str, now: float, actions: list[Action]) -> Record:
        rec = self._records.get(ep)
        if rec is not None:
            rec.sources.add(source)
            return rec
        rec = Record(endpoint=ep, sources={source}, next_probe_at=now)
        self._records[ep] = rec
        actions.append(EndpointAdded(ep, frozenset(rec.sources)))
        actions.append(ProbeScheduleChanged())
        return rec

    def _remove(self, rec: Record, reason: str, actions: list[Action]) -> None:
        del self._records[rec.endpoint]
        actions.append(CloseConnections(rec.endpoint, reason))
        actions.append(EndpointRemoved(rec.endpoint, reason))

    def _mark_failed(self, rec: Record, reason: str, actions: list[Action]) -> None:
        if rec.state is State.NOT_APISERVER:
            return
        rec.successes = 0
        rec.failures = max(rec.failures, self.settings.fall)
        rec.last_error = reason
        self._set_state(rec, State.FAILED, reason, actions)

    def _set_state(self, rec: Record, new: State, reason: str, actions: list[Action]) -> None:
        old = rec.state
        if new is old:
            return
        rec.state = new
        actions.append(StateChanged(rec.endpoint, old, new, reason))
        actions.append(PersistState())
        if new in UNUSABLE:
            actions.append(CloseConnections(rec.endpoint, f"{new.value}: {reason}"))

    def _probe_soon(self, ep: Endpoint, now: float, actions: list[Action]) -> None:
        rec = self._records.get(ep)
        if rec is not None and not rec.probe_in_flight and rec.next_probe_at > now:
            rec.next_probe_at = now
            actions.append(ProbeScheduleChanged())

    def _reconcile(self, actions: list[Action]) -> None:
        """Recompute the order and the sticky target after anything that may change them.

        ``self._healthy`` still holds the tier from before the event: it changes only here.
        """
        was_healthy = {rec.endpoint for rec in self._healthy}
        had_healthy = bool(was_healthy)
        self._healthy, self._fallback = tiers(self._records.values())
        if self._healthy and not had_healthy:
            self._healthy_epoch += 1
        if self._healthy:
            # Fallbacks lose their clients once a healthy apiserver exists: on the edge every
            # other endpoint (not-an-apiserver ones too, though they left the order), and
            # later any endpoint demoted from the healthy tier without becoming unusable
            # (e.g. no longer confirmed: unusable ones were closed by _set_state already).
            for rec in self._records.values():
                demoted = rec.endpoint in was_healthy and rec.state not in UNUSABLE
                if not rec.healthy_apiserver and (not had_healthy or demoted):
                    actions.append(
                        CloseConnections(rec.endpoint, "fallback: a healthy apiserver is available")
                    )
        old = self._active
        self._primary = self._healthy or [r for r in self._fallback if r.state is State.HEALTHY]
        primary_eps = [r.endpoint for r in self._primary]
        new: Endpoint | None
        if primary_eps:
            new = old if old in primary_eps else primary_eps[0]
        else:
            new = self._fallback[0].endpoint if self._fallback else None
        order = [r.endpoint for r in self._healthy] + [r.endpoint for r in self._fallback]
        if new is not None and self.settings.policy is Policy.STICKY:
            order.remove(new)
            order.insert(0, new)
        self._order = order
        if new != old:
            self._active = new
            actions.append(ActiveChanged(old, new))
