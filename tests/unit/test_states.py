"""The probe-driven state transitions, checked for every State and ProbeOutcome."""

from __future__ import annotations

import pytest

from lbproxy.pool.states import (
    STATE_CODES,
    ProbeOutcome,
    State,
    after_failure,
    after_success,
    is_success,
)

ALL_STATES = list(State)


def test_state_values_are_what_the_admin_api_shows() -> None:
    assert {s.value for s in State} == {
        "unchecked",
        "healthy",
        "recovering",
        "failed",
        "not-an-apiserver",
    }


def test_state_codes_cover_every_state_worst_to_best() -> None:
    assert set(STATE_CODES) == set(State)
    ordered = sorted(STATE_CODES, key=STATE_CODES.__getitem__)
    assert ordered == [
        State.NOT_APISERVER,
        State.FAILED,
        State.UNCHECKED,
        State.RECOVERING,
        State.HEALTHY,
    ]
    assert sorted(STATE_CODES.values()) == list(range(len(State)))


@pytest.mark.parametrize(
    ("outcome", "success"),
    [
        (ProbeOutcome.OK, True),
        # a live apiserver that refuses anonymous probes is still a live apiserver
        (ProbeOutcome.UNAUTHORIZED, True),
        (ProbeOutcome.NOT_APISERVER, False),
        (ProbeOutcome.FAILED, False),
    ],
)
def test_is_success(outcome: ProbeOutcome, success: bool) -> None:
    assert is_success(outcome) is success


def test_is_success_covers_every_outcome() -> None:
    assert {o for o in ProbeOutcome if is_success(o)} == {
        ProbeOutcome.OK,
        ProbeOutcome.UNAUTHORIZED,
    }


# ------------------------------------------------------------------ after_success
# (state, consecutive successes including this one, rise) -> next state
SUCCESS_TABLE: list[tuple[State, int, int, State]] = [
    # healthy stays healthy whatever the counters say
    (State.HEALTHY, 1, 1, State.HEALTHY),
    (State.HEALTHY, 1, 3, State.HEALTHY),
    (State.HEALTHY, 5, 3, State.HEALTHY),
    # everything else climbs through recovering until `rise` successes in a row
    (State.UNCHECKED, 1, 1, State.HEALTHY),
    (State.UNCHECKED, 1, 2, State.RECOVERING),
    (State.UNCHECKED, 2, 2, State.HEALTHY),
    (State.FAILED, 1, 1, State.HEALTHY),
    (State.FAILED, 1, 3, State.RECOVERING),
    (State.FAILED, 3, 3, State.HEALTHY),
    (State.RECOVERING, 2, 3, State.RECOVERING),
    (State.RECOVERING, 3, 3, State.HEALTHY),
    (State.RECOVERING, 4, 3, State.HEALTHY),
    # an apiserver answer replaces the not-an-apiserver classification
    (State.NOT_APISERVER, 1, 1, State.HEALTHY),
    (State.NOT_APISERVER, 1, 2, State.RECOVERING),
    (State.NOT_APISERVER, 2, 2, State.HEALTHY),
]


@pytest.mark.parametrize(("state", "successes", "rise", "expected"), SUCCESS_TABLE)
def test_after_success(state: State, successes: int, rise: int, expected: State) -> None:
    assert after_success(state, successes, rise) is expected


def test_success_table_covers_every_state() -> None:
    assert {row[0] for row in SUCCESS_TABLE} == set(State)


@pytest.mark.parametrize("state", ALL_STATES)
@pytest.mark.parametrize("rise", [1, 2, 3])
def test_after_success_never_fails_and_reaches_healthy_at_rise(state: State, rise: int) -> None:
    below = [after_success(state, n, rise) for n in range(1, rise)]
    at_rise = after_success(state, rise, rise)
    assert at_rise is State.HEALTHY
    assert State.FAILED not in below
    assert State.NOT_APISERVER not in below
    if state is not State.HEALTHY:
        assert below == [State.RECOVERING] * (rise - 1)


# ------------------------------------------------------------------ after_failure
# (state, consecutive failures including this one, fall) -> next state
FAILURE_TABLE: list[tuple[State, int, int, State]] = [
    # a healthy endpoint gets `fall` chances
    (State.HEALTHY, 1, 1, State.FAILED),
    (State.HEALTHY, 1, 2, State.HEALTHY),
    (State.HEALTHY, 2, 2, State.FAILED),
    (State.HEALTHY, 2, 3, State.HEALTHY),
    (State.HEALTHY, 4, 3, State.FAILED),
    # anything not yet proven falls at once
    (State.UNCHECKED, 1, 3, State.FAILED),
    (State.RECOVERING, 1, 3, State.FAILED),
    (State.FAILED, 1, 3, State.FAILED),
    (State.FAILED, 7, 3, State.FAILED),
    # the classification survives the peer also being down
    (State.NOT_APISERVER, 1, 1, State.NOT_APISERVER),
    (State.NOT_APISERVER, 9, 2, State.NOT_APISERVER),
]


@pytest.mark.parametrize(("state", "failures", "fall", "expected"), FAILURE_TABLE)
def test_after_failure(state: State, failures: int, fall: int, expected: State) -> None:
    assert after_failure(state, failures, fall) is expected


def test_failure_table_covers_every_state() -> None:
    assert {row[0] for row in FAILURE_TABLE} == set(State)


@pytest.mark.parametrize("state", ALL_STATES)
@pytest.mark.parametrize("fall", [1, 2, 3])
def test_after_failure_never_promotes(state: State, fall: int) -> None:
    results = {after_failure(state, n, fall) for n in range(1, fall + 2)}
    assert State.RECOVERING not in results
    assert State.UNCHECKED not in results
    if state is not State.HEALTHY:
        assert State.HEALTHY not in results
    expected_final = State.NOT_APISERVER if state is State.NOT_APISERVER else State.FAILED
    assert after_failure(state, fall, fall) is expected_final


@pytest.mark.parametrize("bogus", ["healthy", None, 4])
def test_transitions_reject_values_that_are_not_states(bogus: object) -> None:
    # the assert_never guards: a new State must be handled, not silently fall through
    with pytest.raises(AssertionError):
        after_success(bogus, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        after_failure(bogus, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        is_success(bogus)  # type: ignore[arg-type]
