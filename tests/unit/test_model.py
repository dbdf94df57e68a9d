"""parse_hostport and Endpoint: every accepted spelling and every error message path."""

from __future__ import annotations

import re

import pytest

from lbproxy.model import AUTHORITATIVE_SOURCES, Endpoint, names, parse_hostport


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # IPv4, normalised by ipaddress
        ("10.0.0.1:6443", Endpoint("10.0.0.1", 6443)),
        ("  10.0.0.1:6443\n", Endpoint("10.0.0.1", 6443)),
        ("127.0.0.1:1", Endpoint("127.0.0.1", 1)),
        ("127.0.0.1:65535", Endpoint("127.0.0.1", 65535)),
        # [v6]:port, compressed and lower-cased
        ("[::1]:6443", Endpoint("::1", 6443)),
        ("[2001:DB8:0:0::1]:443", Endpoint("2001:db8::1", 443)),
        ("[fe80::1%eth0]:6443", Endpoint("fe80::1%eth0", 6443)),
        # host names: lower-cased, trailing dot dropped, underscores tolerated
        ("api.example.com:6443", Endpoint("api.example.com", 6443)),
        ("API.Example.COM.:6443", Endpoint("api.example.com", 6443)),
        ("k3s-server-1:6443", Endpoint("k3s-server-1", 6443)),
        ("_k3s.local:6443", Endpoint("_k3s.local", 6443)),
        ("a" * 63 + ".example:1", Endpoint("a" * 63 + ".example", 1)),
        ("server1:6443", Endpoint("server1", 6443)),
        # a name may look hexadecimal in part, as long as it is not all numbers
        ("0xhost:6443", Endpoint("0xhost", 6443)),
        ("0xff.example:6443", Endpoint("0xff.example", 6443)),
        ("1.2.3.example:6443", Endpoint("1.2.3.example", 6443)),
    ],
)
def test_parse_hostport_accepts(text: str, expected: Endpoint) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", Endpoint("10.0.0.1", 6443)),
        ("api.example.com", Endpoint("api.example.com", 6443)),
        ("[::1]", Endpoint("::1", 6443)),
        # a bare IPv6 address carries no port, so every colon belongs to the address
        ("::1", Endpoint("::1", 6443)),
        ("2001:db8::7", Endpoint("2001:db8::7", 6443)),
        ("fe80::1%eth0", Endpoint("fe80::1%eth0", 6443)),
    ],
)
def test_parse_hostport_default_port(text: str, expected: Endpoint) -> None:
    assert parse_hostport(text, default_port=6443) == expected


def test_explicit_port_wins_over_default() -> None:
    assert parse_hostport("[::1]:443", default_port=6443) == Endpoint("::1", 443)
    assert parse_hostport("10.0.0.1:443", default_port=6443) == Endpoint("10.0.0.1", 443)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # empty
        ("", "empty address"),
        ("   \t", "empty address"),
        # missing port, with and without brackets
        ("10.0.0.1", "missing port in '10.0.0.1'"),
        ("api.example.com", "missing port in 'api.example.com'"),
        ("[::1]", "missing port in '[::1]'"),
        ("::1", "missing port in '::1'"),
        # bad port
        ("10.0.0.1:", "invalid port in '10.0.0.1:'"),
        ("10.0.0.1:https", "invalid port in '10.0.0.1:https'"),
        ("10.0.0.1:-1", "invalid port in '10.0.0.1:-1'"),
        ("10.0.0.1:+80", "invalid port in '10.0.0.1:+80'"),
        ("10.0.0.1: 80", "invalid port in '10.0.0.1: 80'"),
        ("[::1]:", "invalid port in '[::1]:'"),
        ("[::1]:x", "invalid port in '[::1]:x'"),
        # digits that str.isdigit() accepts but are not an ASCII port number
        ("10.0.0.1:²", "invalid port in '10.0.0.1:²'"),
        ("10.0.0.1:٦٤٤٣", "invalid port in '10.0.0.1:٦٤٤٣'"),
        # out of range
        ("10.0.0.1:0", "port out of range 1-65535 in '10.0.0.1:0'"),
        ("10.0.0.1:65536", "port out of range 1-65535 in '10.0.0.1:65536'"),
        ("[::1]:99999999", "port out of range 1-65535 in '[::1]:99999999'"),
        # brackets
        ("[::1:6443", "unclosed '[' in '[::1:6443'"),
        ("[", "unclosed '[' in '['"),
        ("[]:6443", "invalid IPv6 address in '[]:6443'"),
        ("[10.0.0.1]:6443", "invalid IPv6 address in '[10.0.0.1]:6443'"),
        ("[api.example.com]:6443", "invalid IPv6 address in '[api.example.com]:6443'"),
        ("[::1]6443", "unexpected text after ']' in '[::1]6443'"),
        ("[::1]]:6443", "unexpected text after ']' in '[::1]]:6443'"),
        # an unbracketed IPv6 address with a port, or other colon junk
        ("::1:6443:x", "invalid address '::1:6443:x' (write IPv6 as [addr]:port)"),
        ("a:b:c", "invalid address 'a:b:c' (write IPv6 as [addr]:port)"),
        # missing host
        (":6443", "missing host in ':6443'"),
        # junk host names
        ("-api:6443", "invalid host '-api' in '-api:6443'"),
        ("api-:6443", "invalid host 'api-' in 'api-:6443'"),
        ("a..b:6443", "invalid host 'a..b' in 'a..b:6443'"),
        (".:6443", "invalid host '.' in '.:6443'"),
        ("api example:6443", "invalid host 'api example' in 'api example:6443'"),
        ("api/x:6443", "invalid host 'api/x' in 'api/x:6443'"),
        ("]:6443", "invalid host ']' in ']:6443'"),
        ("a" * 64 + ":1", "invalid host '" + "a" * 64 + "' in '" + "a" * 64 + ":1'"),
        # numeric forms that ipaddress rejects but the C resolver would read as IPv4
        # (inet_aton: 010.0.0.1 is octal for 8.0.0.1, 1.2.3 is 1.2.0.3, 0x7f000001 is
        # 127.0.0.1): refusing them keeps the dialled address the one that was written
        ("010.0.0.1:6443", "invalid host '010.0.0.1' in '010.0.0.1:6443'"),
        ("1.2.3:6443", "invalid host '1.2.3' in '1.2.3:6443'"),
        ("256.1.1.1:6443", "invalid host '256.1.1.1' in '256.1.1.1:6443'"),
        ("0x7f000001:6443", "invalid host '0x7f000001' in '0x7f000001:6443'"),
        ("2130706433:6443", "invalid host '2130706433' in '2130706433:6443'"),
    ],
)
def test_parse_hostport_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as excinfo:
        parse_hostport(text)
    assert str(excinfo.value) == message


def test_overlong_host_name_is_rejected() -> None:
    # every label is valid, only the whole name exceeds 253 characters
    host = ".".join(["a" * 63] * 4)
    with pytest.raises(ValueError, match="invalid host") as excinfo:
        parse_hostport(f"{host}:6443")
    assert host in str(excinfo.value)
    assert parse_hostport(f"{host[:253]}:6443").host == host[:253]


def test_error_for_default_port_still_names_bad_input() -> None:
    with pytest.raises(ValueError, match=r"invalid IPv6 address in '\[zz\]'"):
        parse_hostport("[zz]", default_port=6443)


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [
        (Endpoint("10.0.0.1", 6443), "10.0.0.1:6443"),
        (Endpoint("::1", 6443), "[::1]:6443"),
        (Endpoint("api.example.com", 443), "api.example.com:443"),
    ],
)
def test_endpoint_str_round_trips(endpoint: Endpoint, text: str) -> None:
    assert str(endpoint) == text
    assert parse_hostport(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    ("host", "is_ip"),
    [("10.0.0.1", True), ("::1", True), ("api.example.com", False), ("server1", False)],
)
def test_endpoint_is_ip(host: str, is_ip: bool) -> None:
    assert Endpoint(host, 1).is_ip is is_ip


def test_endpoints_are_ordered_values() -> None:
    a, b = Endpoint("10.0.0.1", 6443), Endpoint("10.0.0.1", 6444)
    assert sorted([b, a]) == [a, b]
    assert len({a, Endpoint("10.0.0.1", 6443)}) == 1


def test_authoritative_sources_are_the_ones_an_apiserver_writes() -> None:
    assert (
        frozenset({"etcd:k3s/apiaddresses", "etcd:masterleases", "kubernetes"})
        == AUTHORITATIVE_SOURCES
    )


def test_names_are_sorted_host_port_strings() -> None:
    eps = {Endpoint("10.0.0.2", 6443), Endpoint("::1", 6445), Endpoint("10.0.0.1", 6443)}
    assert names(eps) == ["10.0.0.1:6443", "10.0.0.2:6443", "[::1]:6445"]
    assert names([]) == []
