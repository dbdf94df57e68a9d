"""The DNS source's pure parts: entries, answers (recorded from dnsmasq) and schedules."""

from __future__ import annotations

import contextlib
import ipaddress
import random
from collections.abc import Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from lbproxy.discovery.dns import (
    AAAA,
    Lookup,
    SrvRecord,
    decode_addresses,
    decode_srv,
    describe_error,
    dns_name,
    glue_for,
    glue_of,
    merge_lookups,
    min_ttl,
    name_endpoints,
    parse_name,
    parse_srv_name,
    refresh_delay,
    retry_delay,
    srv_endpoints,
    srv_records,
    usable_address,
)
from lbproxy.errors import DiscoveryError
from lbproxy.model import Endpoint

A = dns.rdatatype.A

# Responses recorded from dnsmasq 2.x (id 4242, no EDNS) serving:
#   --host-record=api.k3s.example,10.0.0.11,fd00::11,30
#   --host-record=api-2.k3s.example,10.0.0.12         (--local-ttl=120)
#   --cname=alias.k3s.example,api.k3s.example,45
#   --srv-host=_kube-apiserver._tcp.k3s.example,api.k3s.example,6443,10,60
#   --srv-host=_kube-apiserver._tcp.k3s.example,api-2.k3s.example,6443,20,40
#   --local=/k3s.example/
RECORDED = {
    "a": "10928580000100010000000003617069036b3373076578616d706c650000010001c00c00010001"
    "0000001e00040a00000b",
    "aaaa": "10928580000100010000000003617069036b3373076578616d706c6500001c0001c00c001c0001"
    "0000001e0010fd000000000000000000000000000011",
    "cname": "10928580000100020000000005616c696173036b3373076578616d706c650000010001c00c0005"
    "00010000002d000603617069c012c02f000100010000001e00040a00000b",
    "srv": "1092858000010002000000030f5f6b7562652d617069736572766572045f746370036b3373076578616d"
    "706c650000210001c00c0021000100000078001900140028192b056170692d32036b3373076578616d70"
    "6c6500c00c00210001000000780017000a003c192b03617069036b3373076578616d706c650003617069"
    "c021000100010000001e00040a00000bc07a001c00010000001e0010fd00000000000000000000000000"
    "0011056170692d32c021000100010000007800040a00000c",
    "nxdomain": "109281830001000000000000076d697373696e67036b3373076578616d706c650000010001",
    "nodata": "109281800001000000000000056170692d32036b3373076578616d706c6500001c0001",
}


def recorded(key: str) -> dns.message.Message:
    return dns.message.from_wire(bytes.fromhex(RECORDED[key]))


def response(
    qname: str,
    rdtype: str,
    answer: Sequence[dns.rrset.RRset] = (),
    additional: Sequence[dns.rrset.RRset] = (),
) -> dns.message.Message:
    """A response built with dnspython and sent through the wire format and back."""
    msg = dns.message.make_response(dns.message.make_query(qname, rdtype))
    msg.answer.extend(answer)
    msg.additional.extend(additional)
    return dns.message.from_wire(msg.to_wire())


def rrset(owner: str, ttl: int, rdtype: str, *values: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(owner, ttl, "IN", rdtype, list(values))


# ------------------------------------------------------------------ recorded answers
def test_recorded_a_and_aaaa() -> None:
    assert decode_addresses(recorded("a")) == Lookup(("10.0.0.11",), 30)
    assert decode_addresses(recorded("aaaa")) == Lookup(("fd00::11",), 30)
    assert name_endpoints(("10.0.0.11", "fd00::11"), 6443) == {
        Endpoint("10.0.0.11", 6443),
        Endpoint("fd00::11", 6443),
    }


def test_recorded_cname_chain_takes_the_smallest_ttl() -> None:
    # CNAME 45 s, A 30 s: the answer goes stale at the first expiry.
    assert decode_addresses(recorded("cname")) == Lookup(("10.0.0.11",), 30)
    msg = response(
        "alias.test",
        "A",
        [
            rrset("alias.test.", 5, "CNAME", "api.test."),
            rrset("api.test.", 300, "A", "10.0.0.1", "10.0.0.2"),
        ],
    )
    assert decode_addresses(msg) == Lookup(("10.0.0.1", "10.0.0.2"), 5)


def test_recorded_srv_with_glue() -> None:
    answer = decode_srv(recorded("srv"))
    assert answer.records == (
        SrvRecord(10, 60, 6443, "api.k3s.example."),
        SrvRecord(20, 40, 6443, "api-2.k3s.example."),
    )
    assert answer.ttl == 120
    assert answer.glue == {
        ("api.k3s.example.", A): Lookup(("10.0.0.11",), 30),
        ("api.k3s.example.", AAAA): Lookup(("fd00::11",), 30),
        ("api-2.k3s.example.", A): Lookup(("10.0.0.12",), 120),
    }
    # api-2 sent only an A record: its AAAA counts as empty, not as a question to ask.
    assert glue_for("api-2.k3s.example.", answer.glue) == {
        A: Lookup(("10.0.0.12",), 120),
        AAAA: Lookup(problem="no records"),
    }
    assert glue_for("other.k3s.example.", answer.glue) is None
    addresses = {k: v.addresses for k, v in answer.glue.items()}
    assert srv_endpoints(answer.records, addresses) == {
        Endpoint("10.0.0.11", 6443),
        Endpoint("fd00::11", 6443),
        Endpoint("10.0.0.12", 6443),
    }


def test_recorded_nxdomain_and_nodata_have_no_addresses() -> None:
    # The resolver raises NXDOMAIN itself; the decoder sees NODATA-like replies.
    assert decode_addresses(recorded("nodata")) == Lookup(problem="no records")
    assert decode_addresses(recorded("nxdomain")) == Lookup(problem="no records")
    assert decode_srv(recorded("nodata")).records == ()


def test_srv_without_glue_and_the_skipped_records() -> None:
    msg = response(
        "_api._tcp.test",
        "SRV",
        [
            rrset(
                "_api._tcp.test.",
                60,
                "SRV",
                "0 0 0 zero-port.test.",  # no client can connect to port 0
                "0 0 443 .",  # RFC 2782: decidedly not available
                "20 1 7443 B.test.",
                "10 5 6443 a.test.",
                "10 9 6443 c.test.",
            )
        ],
    )
    answer = decode_srv(msg)
    assert answer.records == (
        SrvRecord(10, 9, 6443, "c.test."),
        SrvRecord(10, 5, 6443, "a.test."),
        SrvRecord(20, 1, 7443, "b.test."),
    )
    assert answer.glue == {}
    # Every priority becomes an endpoint; a target without addresses contributes none.
    addresses = {("a.test.", A): ("10.0.0.1",), ("b.test.", AAAA): ("fd00::2",)}
    assert srv_endpoints(answer.records, addresses) == {
        Endpoint("10.0.0.1", 6443),
        Endpoint("fd00::2", 7443),
    }


def test_only_srv_decodes_as_srv_and_only_addresses_as_addresses() -> None:
    assert srv_records(None) == ()
    assert srv_records(rrset("x.test.", 1, "A", "10.0.0.1")) == ()
    # A reply that answers A with a TXT record (broken server) gives no addresses.
    msg = response("x.test", "A", [rrset("x.test.", 1, "TXT", '"hello"')])
    assert decode_addresses(msg).addresses == ()


def test_unusable_addresses_are_dropped() -> None:
    msg = response("x.test", "A", [rrset("x.test.", 9, "A", "0.0.0.0", "224.0.0.1")])
    assert decode_addresses(msg) == Lookup(problem="no usable addresses")
    msg = response("x.test", "AAAA", [rrset("x.test.", 9, "AAAA", "::", "FD00:0::1")])
    assert decode_addresses(msg) == Lookup(("fd00::1",), 9)
    assert usable_address("not an address") is None
    assert (
        glue_of(response("_x._tcp.test", "SRV", additional=[rrset("t.test.", 1, "A", "0.0.0.0")]))
        == {}
    )


def test_glue_split_over_two_rrsets_is_merged() -> None:
    msg = dns.message.make_response(dns.message.make_query("_x._tcp.test", "SRV"))
    msg.additional.append(rrset("t.test.", 50, "A", "10.0.0.1"))
    msg.additional.append(rrset("t.test.", 20, "A", "10.0.0.2"))  # a second section entry
    assert glue_of(msg) == {("t.test.", A): Lookup(("10.0.0.1", "10.0.0.2"), 20)}


def test_a_response_that_is_no_answer_raises_discovery_error() -> None:
    query = dns.message.make_query("x.test", "A")  # no QR bit
    with pytest.raises(DiscoveryError):
        decode_addresses(query)
    two = dns.message.make_response(query)
    two.question.append(two.question[0])
    with pytest.raises(DiscoveryError):
        decode_srv(two)
    update = dns.message.make_query("x.test", "A")
    update.set_opcode(dns.opcode.NOTIFY)
    with pytest.raises(DiscoveryError):
        decode_addresses(dns.message.make_response(update))


# ------------------------------------------------------------------ entries
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api.example.com", Endpoint("api.example.com", 6443)),
        ("API.Example.com.:7443", Endpoint("api.example.com", 7443)),
        ("10.0.0.1", Endpoint("10.0.0.1", 6443)),
        ("[fd00::1]:9443", Endpoint("fd00::1", 9443)),
    ],
)
def test_parse_name(text: str, expected: Endpoint) -> None:
    assert parse_name(text, 6443) == expected


@pytest.mark.parametrize("text", ["", "api:0", "api:http", "bad name", "-x.test", "a..b"])
def test_parse_name_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_name(text, 6443)


def test_non_ascii_names_are_idna_encoded_or_rejected() -> None:
    assert dns_name("bücher.test", "x").to_text() == "xn--bcher-kva.test."
    with pytest.raises(ValueError, match="not a DNS name"):
        parse_name("½.test", 6443)  # alphanumeric to Python, but maps to a disallowed U+2044


def test_parse_srv_name() -> None:
    assert parse_srv_name("_https._tcp.Example.com") == dns.name.from_text(
        "_https._tcp.example.com"
    )
    for bad in ("_https._tcp.example.com:443", "10.0.0.1", "[fd00::1]", "", "a b"):
        with pytest.raises(ValueError, match=r"\S"):
            parse_srv_name(bad)


@given(st.text(max_size=80))
@example("x" * 64 + ".test")
@example("é.test")
@example("a.b:65536")
def test_parse_entries_raise_only_value_error(text: str) -> None:
    try:
        ep = parse_name(text, 6443)
    except ValueError:
        pass
    else:
        assert 1 <= ep.port <= 65535
        assert ep.is_ip or dns_name(ep.host, text).is_absolute()
    try:
        name = parse_srv_name(text)
    except ValueError:
        pass
    else:
        assert name.is_absolute()


# ------------------------------------------------------------------ merging
Q_A = ("api.test.", A)
Q_AAAA = ("api.test.", AAAA)


def test_merge_keeps_a_failed_family_and_drops_an_empty_one() -> None:
    previous = {Q_A: ("10.0.0.1",), Q_AAAA: ("fd00::1",)}
    # A fresh, AAAA timed out: the old AAAA addresses stay.
    got = merge_lookups(
        {Q_A: Lookup(("10.0.0.2",), 5), Q_AAAA: Lookup(problem="timeout", failed=True)},
        previous,
    )
    assert got == {Q_A: ("10.0.0.2",), Q_AAAA: ("fd00::1",)}
    # A fresh, AAAA answered "none": the name left IPv6.
    got = merge_lookups(
        {Q_A: Lookup(("10.0.0.2",), 5), Q_AAAA: Lookup(problem="no records")}, previous
    )
    assert got == {Q_A: ("10.0.0.2",), Q_AAAA: ()}
    # Nothing fresh at all: keep the whole previous set.
    assert (
        merge_lookups(
            {Q_A: Lookup(problem="NXDOMAIN"), Q_AAAA: Lookup(problem="SERVFAIL", failed=True)},
            previous,
        )
        is None
    )


addresses_st = st.lists(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str), max_size=4
).map(tuple)
lookup_st = st.one_of(
    st.builds(Lookup, addresses_st, st.integers(0, 2**31 - 1)),
    st.builds(Lookup, st.just(()), st.none(), st.sampled_from(["NXDOMAIN", "no records"])),
    st.builds(
        Lookup, st.just(()), st.none(), st.sampled_from(["timeout", "SERVFAIL"]), st.just(True)
    ),
)


@given(
    st.dictionaries(st.sampled_from([Q_A, Q_AAAA, ("b.test.", A)]), lookup_st),
    st.dictionaries(st.sampled_from([Q_A, Q_AAAA, ("b.test.", A)]), addresses_st),
)
def test_merge_never_invents_and_never_empties(
    lookups: dict[tuple[str, dns.rdatatype.RdataType], Lookup],
    previous: dict[tuple[str, dns.rdatatype.RdataType], tuple[str, ...]],
) -> None:
    got = merge_lookups(lookups, previous)
    if got is None:
        assert not any(lk.addresses for lk in lookups.values())
        return
    assert any(got.values())
    assert got.keys() == lookups.keys()
    for key, value in got.items():
        assert value == (previous.get(key, ()) if lookups[key].failed else lookups[key].addresses)


# ------------------------------------------------------------------ schedule
def test_refresh_delay_is_the_ttl_within_bounds() -> None:
    assert refresh_delay(30, 5, 300) == 30
    assert refresh_delay(0, 5, 300) == 5
    assert refresh_delay(86400, 5, 300) == 300
    assert refresh_delay(None, 5, 300) == 5
    assert min_ttl([Lookup(("10.0.0.1",), 30), Lookup(("fd00::1",), 10)]) == 10
    assert min_ttl([Lookup(problem="timeout", failed=True)], 60) == 60
    assert min_ttl([Lookup(problem="no records")]) is None


@given(
    st.one_of(st.none(), st.integers(0, 2**31 - 1)),
    st.floats(0.01, 1000),
    st.floats(0.01, 1000),
    st.integers(),
)
def test_delays_stay_within_bounds(ttl: int | None, lo: float, hi: float, seed: int) -> None:
    assume(lo <= hi)
    assert lo <= refresh_delay(ttl, lo, hi) <= hi
    assert lo <= retry_delay(lo, hi, random.Random(seed)) <= hi


def test_retry_delay_has_jitter() -> None:
    rng = random.Random(1)
    delays = {retry_delay(5, 300, rng) for _ in range(20)}
    assert len(delays) > 10
    assert all(5 <= d < 7.5 for d in delays)


# ------------------------------------------------------------------ errors
def test_describe_error() -> None:
    query = dns.message.make_query("api.test", "A")
    assert describe_error(dns.resolver.NXDOMAIN()) == "NXDOMAIN"
    assert describe_error(dns.resolver.LifetimeTimeout(timeout=2.0, errors=[])) == "timeout"
    servfail = dns.resolver.NoNameservers(
        request=query,
        errors=[
            ("127.0.0.1", False, 53, "SERVFAIL", None),
            ("127.0.0.2", False, 53, "SERVFAIL", None),
            ("127.0.0.3", True, 53, ConnectionRefusedError(111, "refused"), None),
        ],
    )
    assert describe_error(servfail) == "ConnectionRefusedError: [Errno 111] refused, SERVFAIL"
    assert describe_error(dns.resolver.NoNameservers(request=query, errors=[])).startswith(
        "NoNameservers: All nameservers failed"
    )
    assert describe_error(dns.exception.FormError()) == "FormError: DNS message is malformed."
    assert describe_error(dns.exception.DNSException()) == (
        "DNSException: Abstract base class shared by all dnspython exceptions."
    )
    assert describe_error(OSError()) == "OSError"


# ------------------------------------------------------------------ weird bytes
owner_st = st.sampled_from(["x.test.", "y.test.", "X.Test."])
address_rrset_st = st.builds(
    lambda owner, ttl, ips: rrset(owner, ttl, "A" if "." in ips[0] else "AAAA", *ips),
    owner_st,
    st.integers(0, 2**31 - 1),
    st.one_of(
        st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=3),
        st.lists(st.ip_addresses(v=6).map(str), min_size=1, max_size=3),
    ),
)
cname_st = st.builds(
    lambda owner, ttl, target: rrset(owner, ttl, "CNAME", target),
    owner_st,
    st.integers(0, 2**31 - 1),
    owner_st,
)


@given(
    st.sampled_from(["A", "AAAA", "SRV"]),
    st.lists(st.one_of(address_rrset_st, cname_st), max_size=5),
    st.lists(address_rrset_st, max_size=3),
)
def test_decoders_on_arbitrary_sections(
    rdtype: str, answer: list[dns.rrset.RRset], additional: list[dns.rrset.RRset]
) -> None:
    """Whatever a server puts in the sections (loops, wrong owners, wrong types), the
    decoders return addresses of the asked type only, or raise DiscoveryError."""
    msg = dns.message.make_response(dns.message.make_query("x.test", rdtype))
    for section, rrsets in ((msg.answer, answer), (msg.additional, additional)):
        for r in rrsets:  # merge duplicates as a server's sections would be
            if (
                found := msg.find_rrset(section, r.name, r.rdclass, r.rdtype, create=True)
            ) is not r:
                found.update(r)
    try:
        msg = dns.message.from_wire(msg.to_wire())
    except dns.exception.DNSException:
        return
    try:
        addresses = decode_addresses(msg)
        srv = decode_srv(msg)
    except DiscoveryError:
        return
    want = 4 if rdtype == "A" else 6
    for text in addresses.addresses:
        ip = ipaddress.ip_address(text)
        assert ip.version == want
        assert str(ip) == text
        assert not ip.is_unspecified
        assert not ip.is_multicast
    assert (addresses.ttl is None) == (not addresses.addresses)
    assert srv.records == ()


RECORDED_WIRES = [bytes.fromhex(v) for v in RECORDED.values()]


@given(
    st.sampled_from(RECORDED_WIRES),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6),
)
@example(bytes.fromhex(RECORDED["srv"]), [(3, 0x80)])  # rcode bits
def test_decoders_on_corrupted_recordings(wire: bytes, flips: list[tuple[int, int]]) -> None:
    """Bytes flipped in a real reply: parse errors are the resolver's business, and what
    parses decodes or raises DiscoveryError, nothing else."""
    data = bytearray(wire)
    for pos, value in flips:
        data[pos % len(data)] = value
    try:
        msg = dns.message.from_wire(bytes(data))
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return
    for decode in (decode_addresses, decode_srv):
        with contextlib.suppress(DiscoveryError):
            decode(msg)


@given(st.binary(max_size=300))
def test_decoders_on_random_bytes(data: bytes) -> None:
    try:
        msg = dns.message.from_wire(data)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return
    for decode in (decode_addresses, decode_srv):
        with contextlib.suppress(DiscoveryError):
            decode(msg)


def test_response_flags_sanity() -> None:
    # The recordings are authoritative answers (AA), as the test server's are.
    assert recorded("a").flags & dns.flags.AA
    assert recorded("nxdomain").rcode() == dns.rcode.NXDOMAIN
    assert recorded("srv").question[0].rdclass == dns.rdataclass.IN
