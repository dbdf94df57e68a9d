"""Decoders for the Kubernetes source: EndpointSlices, Endpoints, lists and watch events."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.discovery import k8s_decode as d
from lbproxy.errors import DecodeError
from lbproxy.model import Endpoint

# Shapes as kube-apiserver writes them (pkg/controlplane/reconcilers/endpointsadapter.go),
# one watch line as `kubectl get --raw '...?watch=true'` prints it.
SLICE = {
    "metadata": {
        "name": "kubernetes",
        "namespace": "default",
        "uid": "0c6b5b4e-8d5a-4a38-9f1c-2a8f3c1e8f4e",
        "resourceVersion": "1234",
        "generation": 3,
        "creationTimestamp": "2024-12-12T02:45:49Z",
        "labels": {"kubernetes.io/service-name": "kubernetes"},
    },
    "addressType": "IPv4",
    "endpoints": [
        {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
        {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
    ],
    "ports": [{"name": "https", "protocol": "TCP", "port": 6443}],
}
ENDPOINTS = {
    "kind": "Endpoints",
    "apiVersion": "v1",
    "metadata": {
        "name": "kubernetes",
        "namespace": "default",
        "resourceVersion": "123",
        "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"},
    },
    "subsets": [
        {
            "addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        }
    ],
}
EXPIRED_LINE = (
    b'{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},'
    b'"status":"Failure","message":"too old resource version: 1 (3171407)",'
    b'"reason":"Expired","code":410}}'
)
BOOKMARK_LINE = (
    b'{"type":"BOOKMARK","object":{"kind":"EndpointSlice",'
    b'"apiVersion":"discovery.k8s.io/v1","metadata":{"resourceVersion":"3171500"}}}'
)


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    out.update(changes)
    return out


A = Endpoint("10.0.0.1", 6443)
B = Endpoint("10.0.0.2", 6443)


# -- EndpointSlice -------------------------------------------------------------------------


def test_slice_ready_endpoints_on_the_https_port() -> None:
    got = d.decode_slice(SLICE)
    assert got == d.Decoded("kubernetes", "1234", frozenset({A, B}), ())


@pytest.mark.parametrize(
    ("conditions", "taken"),
    [
        ({"ready": True}, True),
        ({}, True),  # ready absent: "unknown", taken as ready (k3s, kube-proxy)
        (None, True),
        ({"ready": None}, True),
        ({"ready": False}, False),
        ({"ready": False, "serving": True, "terminating": True}, False),
    ],
)
def test_slice_ready_condition(conditions: Any, taken: bool) -> None:
    obj = with_(SLICE, endpoints=[{"addresses": ["10.0.0.1"], "conditions": conditions}])
    got = d.decode_slice(obj)
    assert got.endpoints == (frozenset({A}) if taken else frozenset())
    assert got.skipped == ()


def test_slice_without_conditions_key_is_ready() -> None:
    obj = with_(SLICE, endpoints=[{"addresses": ["10.0.0.1"]}])
    assert d.decode_slice(obj).endpoints == {A}


def test_slice_port_named_https_wins_else_first() -> None:
    ports = [
        {"name": "metrics", "port": 9000, "protocol": "TCP"},
        {"name": "https", "port": 6444, "protocol": "TCP"},
    ]
    assert d.decode_slice(with_(SLICE, ports=ports)).endpoints == {
        Endpoint("10.0.0.1", 6444),
        Endpoint("10.0.0.2", 6444),
    }
    only = [{"port": 443}]  # unnamed, protocol defaulted
    assert Endpoint("10.0.0.1", 443) in d.decode_slice(with_(SLICE, ports=only)).endpoints
    mixed = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "x", "port": 8443}]
    assert Endpoint("10.0.0.1", 8443) in d.decode_slice(with_(SLICE, ports=mixed)).endpoints


@pytest.mark.parametrize(
    "ports",
    [
        None,
        [],
        [{"name": "https", "port": 0}],
        [{"name": "https", "port": 70000}],
        [{"name": "https", "port": "6443"}],
        [{"name": "https", "port": True}],
        [{"name": "https", "port": 6443.0}],
        [{"name": "https", "port": 6443, "protocol": "UDP"}],
        ["6443"],
        "https",
    ],
)
def test_slice_without_a_usable_port_is_rejected(ports: Any) -> None:
    with pytest.raises(DecodeError, match="port"):
        d.decode_slice(with_(SLICE, ports=ports))


def test_empty_slice_needs_no_port() -> None:
    # The apiserver writes an empty slice as endpoints: null, ports: null.
    got = d.decode_slice(with_(SLICE, endpoints=None, ports=None))
    assert got.endpoints == frozenset()
    assert got.skipped == ()


def test_dual_stack_slices() -> None:
    v6 = with_(
        SLICE,
        metadata={"name": "kubernetes-v6", "resourceVersion": "9"},
        addressType="IPv6",
        endpoints=[{"addresses": ["FD00:0:0::1"], "conditions": {"ready": True}}],
    )
    assert d.decode_slice(v6).endpoints == {Endpoint("fd00::1", 6443)}


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("api.example.com", "not an IP address"),
        ("10.0.0.300", "not an IP address"),
        ("fd00::1", "IPv6 address 'fd00::1' in an IPv4 slice"),
        ("0.0.0.0", "not a unicast address"),
        ("224.0.0.1", "not a unicast address"),
        (17, "not a string"),
        (None, "not a string"),
    ],
)
def test_bad_addresses_are_skipped_and_reported(address: Any, reason: str) -> None:
    obj = with_(
        SLICE,
        endpoints=[
            {"addresses": ["10.0.0.1", address], "conditions": {"ready": True}},
        ],
    )
    got = d.decode_slice(obj)
    assert got.endpoints == {A}
    [problem] = got.skipped
    assert problem.startswith("endpoints[0].addresses[1]: ")
    assert reason in problem


def test_scoped_ipv6_is_skipped() -> None:
    obj = with_(SLICE, addressType="IPv6", endpoints=[{"addresses": ["fe80::1%eth0"]}])
    got = d.decode_slice(obj)
    assert got.endpoints == frozenset()
    assert "scoped" in got.skipped[0]


def test_bad_endpoint_entries_are_skipped_and_reported() -> None:
    obj = with_(
        SLICE,
        endpoints=[
            "10.0.0.9",
            {"addresses": []},
            {"addresses": "10.0.0.9"},
            {"addresses": ["10.0.0.9"], "conditions": "ready"},
            {"addresses": ["10.0.0.9"], "conditions": {"ready": "yes"}},
            {"addresses": ["10.0.0.2"]},
        ],
    )
    got = d.decode_slice(obj)
    assert got.endpoints == {B}
    assert [p.split(":")[0] for p in got.skipped] == [
        "endpoints[0]",
        "endpoints[1].addresses",
        "endpoints[2].addresses",
        "endpoints[3].conditions",
        "endpoints[4].conditions.ready",
    ]


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "EndpointSlice is a list, not an object"),
        ({"addressType": "IPv4"}, "without metadata.name"),
        ({"metadata": {"name": ""}, "addressType": "IPv4"}, "without metadata.name"),
        ({"metadata": "x", "addressType": "IPv4"}, "metadata is a string"),
        ({"metadata": {"name": "k"}, "addressType": "FQDN"}, "unsupported addressType 'FQDN'"),
        ({"metadata": {"name": "k"}}, "unsupported addressType 'None'"),
        ({"metadata": {"name": "k"}, "addressType": "IPv4", "endpoints": {}}, "not a list"),
    ],
)
def test_unusable_slices_raise(obj: Any, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        d.decode_slice(obj)


# -- core/v1 Endpoints -------------------------------------------------------------------------


def test_endpoints_ready_addresses_only() -> None:
    obj = with_(
        ENDPOINTS,
        subsets=[
            {
                "addresses": [{"ip": "10.0.0.1"}],
                "notReadyAddresses": [{"ip": "10.0.0.3"}],
                "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
            },
            {"notReadyAddresses": [{"ip": "10.0.0.4"}], "ports": [{"port": 6443}]},
            {"addresses": [{"ip": "10.0.0.2"}], "ports": [{"name": "x", "port": 7443}]},
        ],
    )
    got = d.decode_endpoints(obj)
    assert got.endpoints == {A, Endpoint("10.0.0.2", 7443)}
    assert got.skipped == ()
    assert d.decode_endpoints(ENDPOINTS) == d.Decoded("kubernetes", "123", frozenset({A, B}))


def test_endpoints_bad_parts_are_skipped() -> None:
    obj = with_(
        ENDPOINTS,
        subsets=[
            "x",
            {"addresses": {"ip": "10.0.0.1"}},
            {"addresses": [{"ip": "10.0.0.1"}]},  # no ports
            {
                "addresses": [{"ip": "host.example"}, "10.0.0.5", {"ip": "10.0.0.2"}],
                "ports": [{"port": 6443}],
            },
        ],
    )
    got = d.decode_endpoints(obj)
    assert got.endpoints == {B}
    assert [p.split(":")[0] for p in got.skipped] == [
        "subsets[0]",
        "subsets[1].addresses",
        "subsets[2]",
        "subsets[3].addresses[0]",
        "subsets[3].addresses[1]",
    ]


def test_endpoints_without_subsets_is_empty() -> None:
    obj = with_(ENDPOINTS)
    del obj["subsets"]
    assert d.decode_endpoints(obj).endpoints == frozenset()
    with pytest.raises(DecodeError, match="subsets is a string"):
        d.decode_endpoints(with_(ENDPOINTS, subsets="x"))


# -- lists, events, Status ---------------------------------------------------------------------


def test_list_answer() -> None:
    doc = {
        "kind": "EndpointSliceList",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"resourceVersion": "1500"},
        "items": [SLICE],
    }
    got = d.decode_list(doc)
    assert got.resource_version == "1500"
    assert got.items == (SLICE,)
    assert d.decode_list({"metadata": {"resourceVersion": "7"}, "items": None}).items == ()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("x", "list answer is a string"),
        ({"items": []}, "without metadata.resourceVersion"),
        ({"metadata": {"resourceVersion": 5}, "items": []}, "without metadata.resourceVersion"),
        ({"metadata": {"resourceVersion": "5"}, "items": {}}, "items is an object"),
        ({"kind": "Status", "status": "Failure", "code": 500}, "resourceVersion"),
    ],
)
def test_bad_list_answers(doc: Any, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        d.decode_list(doc)


def test_watch_lines() -> None:
    expired = d.decode_event_line(EXPIRED_LINE)
    assert expired.type == "ERROR"
    assert d.status_code(expired.object) == 410
    assert d.status_message(expired.object) == "Expired: too old resource version: 1 (3171407)"
    bookmark = d.decode_event_line(BOOKMARK_LINE)
    assert bookmark.type == "BOOKMARK"
    assert d.resource_version(bookmark.object) == "3171500"
    added = d.decode_event_line(json.dumps({"type": "ADDED", "object": SLICE}).encode())
    assert d.decode_slice(added.object).endpoints == {A, B}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json", "not JSON"),
        (b'{"type":"ADDED","object":{"metadata"', "not JSON"),
        (b"\xff\xfe", "not UTF-8|not JSON"),
        (b"[1]", "watch event is a list"),
        (b'{"type":"SNAPSHOT","object":{}}', "unknown watch event type 'SNAPSHOT'"),
        (b'{"type":"ADDED"}', "object is null"),
        (b'{"type":"ADDED","object":[]}', "object is a list"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not JSON"),
        (b'{"n":' + b"9" * 5000 + b"}", "not JSON"),
    ],
)
def test_bad_watch_lines(line: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        d.decode_event_line(line)


def test_status_helpers_tolerate_odd_shapes() -> None:
    assert d.status_code({"code": "410"}) is None
    assert d.status_code({"code": True}) is None
    assert d.status_message({}) == ""
    assert d.resource_version({"metadata": {"resourceVersion": ""}}) is None
    assert d.resource_version("x") is None
    assert d.object_name({"metadata": {"name": 3}}) == ""
    assert d.object_name(None) == ""


def test_cap_keeps_the_lowest_and_counts_the_rest() -> None:
    eps = {Endpoint(f"10.0.{i // 250}.{i % 250 + 1}", 6443) for i in range(300)}
    kept, dropped = d.cap(eps)
    assert len(kept) == d.MAX_ENDPOINTS == 256
    assert dropped == 44
    assert kept == frozenset(sorted(eps)[:256])
    assert d.cap({A}) == (frozenset({A}), 0)


# -- property: only DecodeError, whatever the input ---------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["IPv4", "IPv6", "FQDN", "https", "TCP", "10.0.0.1", "fd00::1", "::"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(
            [
                "metadata", "name", "resourceVersion", "addressType", "endpoints",
                "addresses", "conditions", "ready", "ports", "port", "protocol",
                "subsets", "ip", "items", "type", "object", "code",
            ]
        ) | st.text(max_size=5),
        children,
        max_size=5,
    ),
    max_leaves=30,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_decoders_raise_only_decode_error(value: Any) -> None:
    for decoder in (d.decode_slice, d.decode_endpoints, d.decode_list, d.decode_event):
        with contextlib.suppress(DecodeError):
            decoder(value)
    d.resource_version(value)
    d.object_name(value)
    if isinstance(value, dict):
        d.status_code(value)
        d.status_message(value)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_event_lines_raise_only_decode_error(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        d.decode_event_line(raw)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"addresses": st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=3)},
            optional={"conditions": st.fixed_dictionaries({}, optional={"ready": st.booleans()})},
        ),
        max_size=6,
    )
)
def test_slice_takes_exactly_the_ready_unicast_addresses(endpoints: list[dict[str, Any]]) -> None:
    import ipaddress

    got = d.decode_slice(with_(SLICE, endpoints=endpoints or None))
    expected = set()
    for ep in endpoints:
        if ep.get("conditions", {}).get("ready", True):
            for a in ep["addresses"]:
                ip = ipaddress.ip_address(a)
                if not (ip.is_unspecified or ip.is_multicast):
                    expected.add(Endpoint(a, 6443))
    assert got.endpoints == expected
