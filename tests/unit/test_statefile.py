"""The state file: encode/decode round trip, every broken document and entry, atomic writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.discovery import statefile
from lbproxy.discovery.statefile import FORMAT_VERSION, decode, encode, read, write_atomic
from lbproxy.errors import DiscoveryError
from lbproxy.model import Endpoint
from lbproxy.pool.events import KnownEndpoint
from lbproxy.pool.states import State

WALL = 1_700_000_000.0

KNOWN = (
    KnownEndpoint(Endpoint("10.0.0.1", 6443), frozenset({"static"}), State.HEALTHY, True, 12.5),
    KnownEndpoint(
        Endpoint("fd00::2", 7443),
        frozenset({"etcd:masterleases", "state"}),
        State.FAILED,
        False,
        None,
    ),
    KnownEndpoint(Endpoint("api.example", 6443), frozenset(), State.NOT_APISERVER, False, -3.25),
    KnownEndpoint(Endpoint("127.0.0.1", 1), frozenset({"dns"}), State.UNCHECKED, False, 0.0),
    KnownEndpoint(
        Endpoint("10.0.0.9", 65535), frozenset({"kubernetes"}), State.RECOVERING, True, 1
    ),
)


def doc(*entries: Any, version: Any = FORMAT_VERSION) -> bytes:
    return json.dumps({"version": version, "endpoints": list(entries)}).encode()


GOOD = {"address": "10.0.0.1", "port": 6443}


# ---------------------------------------------------------------- round trip


def test_round_trip() -> None:
    raw = encode(KNOWN, wall_offset=WALL)
    known, problems = decode(raw, wall_offset=WALL)
    assert problems == []
    assert known == KNOWN


def test_encoded_document_is_readable_json_with_wall_clock_times() -> None:
    raw = encode(KNOWN[:2], wall_offset=WALL)
    assert raw.endswith(b"\n")
    data = json.loads(raw)
    assert data == {
        "version": 1,
        "endpoints": [
            {
                "address": "10.0.0.1",
                "port": 6443,
                "sources": ["static"],
                "state": "healthy",
                "confirmed_apiserver": True,
                "last_success": WALL + 12.5,
            },
            {
                "address": "fd00::2",
                "port": 7443,
                "sources": ["etcd:masterleases", "state"],
                "state": "failed",
                "confirmed_apiserver": False,
                "last_success": None,
            },
        ],
    }


def test_times_move_to_the_new_clock() -> None:
    # Written by one process (pool clock + WALL), read by the next (a different offset).
    raw = encode(KNOWN[:1], wall_offset=WALL)
    (known,), _ = decode(raw, wall_offset=WALL + 100)
    assert known.last_success_at == pytest.approx(12.5 - 100)


def test_empty_round_trip() -> None:
    assert decode(encode((), wall_offset=WALL), wall_offset=WALL) == ((), [])


def test_minimal_entry_gets_defaults() -> None:
    (known,), problems = decode(doc(GOOD), wall_offset=0)
    assert problems == []
    assert known == KnownEndpoint(
        Endpoint("10.0.0.1", 6443), frozenset(), State.UNCHECKED, False, None
    )


def test_addresses_are_normalised() -> None:
    raw = doc(
        {"address": "FD00:0::1", "port": 1},
        {"address": "API.Example.", "port": 2},
        {"address": " 10.0.0.1 ", "port": 3},
    )
    known, problems = decode(raw, wall_offset=0)
    assert problems == []
    assert [k.endpoint for k in known] == [
        Endpoint("fd00::1", 1),
        Endpoint("api.example", 2),
        Endpoint("10.0.0.1", 3),
    ]


# ---------------------------------------------------------------- broken documents


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"version": 1, "endpoints": [', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"\x80\x81", "not valid JSON"),
        (b"[]", "expected an object with an 'endpoints' list"),
        (b'"state"', "expected an object with an 'endpoints' list"),
        (b"1", "expected an object with an 'endpoints' list"),
        (b"null", "expected an object with an 'endpoints' list"),
        (b"{}", "expected an object with an 'endpoints' list"),
        (b'{"version": 1, "endpoints": {}}', "expected an object with an 'endpoints' list"),
        (b'{"version": 1, "endpoints": null}', "expected an object with an 'endpoints' list"),
        (b'{"endpoints": []}', "unsupported version None"),
        (b'{"version": 2, "endpoints": []}', "unsupported version 2"),
        (b'{"version": "1", "endpoints": []}', "unsupported version '1'"),
        (b'{"version": 0, "endpoints": []}', "unsupported version 0"),
    ],
)
def test_broken_documents_raise_discovery_error(raw: bytes, message: str) -> None:
    with pytest.raises(DiscoveryError) as info:
        decode(raw, wall_offset=0)
    assert str(info.value).startswith(message)


def test_deeply_nested_json_is_a_discovery_error() -> None:
    # json.loads raises RecursionError on this; a corrupt file must not stop the start.
    with pytest.raises(DiscoveryError):
        decode(b"[" * 100_000, wall_offset=0)
    with pytest.raises(DiscoveryError):
        decode(b'{"version": 1, "endpoints": [' + b"[" * 100_000, wall_offset=0)


def test_an_integer_beyond_the_parser_limit_is_a_discovery_error() -> None:
    # Python refuses to parse integers longer than 4300 digits (ValueError, not JSON's).
    with pytest.raises(DiscoveryError):
        decode(b'{"version": 1' + b"0" * 5000 + b', "endpoints": []}', wall_offset=0)


# ---------------------------------------------------------------- broken entries


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("10.0.0.2:6443", "endpoints[1]: expected an object"),
        (["10.0.0.2", 6443], "endpoints[1]: expected an object"),
        (None, "endpoints[1]: expected an object"),
        ({"port": 6443}, "endpoints[1]: needs string 'address' and integer 'port'"),
        ({"address": "10.0.0.2"}, "endpoints[1]: needs string 'address' and integer 'port'"),
        (
            {"address": "10.0.0.2", "port": "6443"},
            "endpoints[1]: needs string 'address' and integer 'port'",
        ),
        (
            {"address": "10.0.0.2", "port": 6443.0},
            "endpoints[1]: needs string 'address' and integer 'port'",
        ),
        (
            {"address": "10.0.0.2", "port": True},
            "endpoints[1]: needs string 'address' and integer 'port'",
        ),
        (
            {"address": 167772162, "port": 6443},
            "endpoints[1]: needs string 'address' and integer 'port'",
        ),
        ({"address": "10.0.0.2", "port": 0}, "endpoints[1]: port out of range: 0"),
        ({"address": "10.0.0.2", "port": 65536}, "endpoints[1]: port out of range: 65536"),
        ({"address": "10.0.0.2", "port": -1}, "endpoints[1]: port out of range: -1"),
        ({"address": "", "port": 6443}, "endpoints[1]: "),
        ({"address": "bad host", "port": 6443}, "endpoints[1]: invalid host 'bad host'"),
        ({"address": "10.0.0.2:6443", "port": 6443}, "endpoints[1]: invalid IPv6 address"),
        ({"address": "[::1]", "port": 6443}, "endpoints[1]: "),
        ({"address": "010.0.0.1", "port": 6443}, "endpoints[1]: invalid host '010.0.0.1'"),
        (
            {**GOOD, "sources": "static"},
            "endpoints[1].sources: expected a list of strings",
        ),
        ({**GOOD, "sources": ["static", 1]}, "endpoints[1].sources: expected a list of strings"),
        ({**GOOD, "state": "sleeping"}, "endpoints[1].state: unknown state 'sleeping'"),
        ({**GOOD, "state": None}, "endpoints[1].state: unknown state None"),
        ({**GOOD, "state": ["healthy"]}, "endpoints[1].state: unknown state ['healthy']"),
        ({**GOOD, "last_success": "yesterday"}, "endpoints[1].last_success: expected a number"),
        ({**GOOD, "last_success": True}, "endpoints[1].last_success: expected a number"),
        ({**GOOD, "last_success": 10**400}, "endpoints[1].last_success: "),
    ],
)
def test_a_bad_entry_is_skipped_and_the_others_kept(entry: Any, message: str) -> None:
    raw = doc({"address": "10.0.0.1", "port": 1}, entry, {"address": "10.0.0.3", "port": 3})
    known, problems = decode(raw, wall_offset=0)
    assert [k.endpoint for k in known] == [Endpoint("10.0.0.1", 1), Endpoint("10.0.0.3", 3)]
    assert len(problems) == 1
    assert problems[0].startswith(message)


def test_every_bad_entry_is_reported() -> None:
    raw = doc(1, GOOD, {"address": "x y", "port": 1}, {**GOOD, "state": "?"})
    known, problems = decode(raw, wall_offset=0)
    assert [k.endpoint for k in known] == [Endpoint("10.0.0.1", 6443)]
    assert [p.split(":")[0] for p in problems] == [
        "endpoints[0]",
        "endpoints[2]",
        "endpoints[3].state",
    ]


# ---------------------------------------------------------------- read and write


def test_read_missing_file_is_empty(tmp_path: Path) -> None:
    assert read(tmp_path / "absent.json", wall_offset=0) == ((), [])


def test_read_unreadable_path_is_a_discovery_error(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError) as info:
        read(tmp_path, wall_offset=0)  # a directory
    assert str(info.value).startswith("cannot read: ")


def test_read_corrupt_file_is_a_discovery_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"version": 1, "endpoi')
    with pytest.raises(DiscoveryError):
        read(path, wall_offset=0)


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, encode(KNOWN, wall_offset=WALL))
    assert read(path, wall_offset=WALL) == (KNOWN, [])


def test_write_atomic_mode_0600_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        write_atomic(path, b"first\n")
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"first\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomic_replaces_a_wider_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


def test_write_atomic_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "lbproxy" / "state.json"
    write_atomic(path, b"x")
    assert path.read_bytes() == b"x"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0


def test_write_atomic_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()  # os.replace onto a directory fails
    (path / "keep").write_text("x")
    with pytest.raises(IsADirectoryError):
        write_atomic(path, b"data")
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
    assert os.listdir(path) == ["keep"]


def test_write_atomic_failure_while_writing_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    monkeypatch.setattr(statefile.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


# ---------------------------------------------------------------- fuzz


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_raises_only_discovery_error(raw: bytes) -> None:
    try:
        known, problems = decode(raw, wall_offset=WALL)
    except DiscoveryError:
        return
    assert all(isinstance(k, KnownEndpoint) for k in known)
    assert all(isinstance(p, str) for p in problems)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["10.0.0.1", "fd00::1", "[::1]", "healthy", "not-an-apiserver", "static"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["address", "port", "sources", "state", "confirmed_apiserver", "last_success"]
            )
            | st.text(max_size=6),
            children,
            max_size=6,
        )
    ),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values, max_size=5), st.sampled_from([1, 1, 1, 2, None]))
def test_decode_arbitrary_documents_raises_only_discovery_error(
    entries: list[Any], version: Any
) -> None:
    raw = json.dumps({"version": version, "endpoints": entries}).encode()
    try:
        known, problems = decode(raw, wall_offset=WALL)
    except DiscoveryError:
        assert version != 1
        return
    assert len(known) + len(problems) == len(entries)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            KnownEndpoint,
            st.builds(
                Endpoint,
                st.sampled_from(["10.0.0.1", "fd00::1", "api.example", "127.0.0.1"]),
                st.integers(1, 65535),
            ),
            st.frozensets(st.sampled_from(["static", "state", "dns", "kubernetes"])),
            st.sampled_from(State),
            st.booleans(),
            st.none() | st.integers(-(10**6), 10**6).map(lambda n: n / 8),
        ),
        max_size=6,
        unique_by=lambda k: k.endpoint,
    )
)
def test_round_trip_property(known: list[KnownEndpoint]) -> None:
    raw = encode(tuple(known), wall_offset=WALL)
    assert decode(raw, wall_offset=WALL) == (tuple(known), [])


@pytest.mark.parametrize("raw_time", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_last_success_is_skipped(raw_time: str) -> None:
    raw = (
        '{"version": 1, "endpoints": ['
        '{"address": "10.0.0.1", "port": 6443, "last_success": ' + raw_time + "},"
        '{"address": "10.0.0.2", "port": 6443}]}'
    ).encode()
    known, problems = decode(raw, wall_offset=0.0)
    assert [k.endpoint for k in known] == [Endpoint("10.0.0.2", 6443)]
    assert problems == ["endpoints[0].last_success: must be a finite number"]
