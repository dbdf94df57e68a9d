"""The DNS source: A/AAAA names and SRV records, re-resolved at their TTL, become endpoints.

Theory of operation
-------------------
Each configured entry (a ``names`` entry or an ``srv`` entry) is followed by its own task:
resolve, record the result, report the union over all entries when it changed, sleep
until the entry's next refresh. So a name whose server never answers delays nobody else.

* ``names``: A and AAAA are asked together; the endpoints are every address at the
  entry's port (``name:port``, else ``default_port``). A CNAME chain is followed.
* ``srv``: the SRV RRset, then each target's A/AAAA records. When the reply carries the
  target's addresses in its additional section (glue), those are used and the target is
  not asked again; otherwise the target is resolved like a ``names`` entry.
* Refresh: at the minimum TTL over every answer used for the entry (CNAMEs, SRV, target
  addresses), bounded by ``min_refresh`` and ``max_refresh``. A round with a failure is
  retried after ``min_refresh`` times a random factor in [1, 1.5), so that many nodes
  that lost their resolver together do not retry in lockstep.
* Never lose a set: a timeout, SERVFAIL (any rcode the resolver gives up on), NXDOMAIN or
  an answer with no usable records keeps the entry's last set. Within a round that did
  get fresh addresses, a *family* or a SRV *target* whose query failed keeps its own
  previous addresses, while one that answered "no such records" contributes none (a
  name that moved from IPv6 to IPv4 only must lose its old AAAA addresses).
* An entry that never resolved contributes nothing. The union is reported whenever it
  changes, and once after every entry has been tried, even if it is empty.

SRV priority and weight: every target of every priority becomes an endpoint; weights are
not used. The pool has no notion of preference tiers: it health-probes every endpoint and
picks among the healthy ones. Keeping only the lowest priority group would hide the
backups (higher priority values) from the pool at exactly the moment they are needed,
when the preferred targets are down but still listed. Priority and weight are kept on
``SrvRecord`` and logged with each change (``dns.srv_records``) so that an operator sees
them; a future pool preference tier could use them.

Names are queried as fully qualified: resolv.conf ``search`` domains are not applied.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import structlog

from lbproxy.config import DnsConfig
from lbproxy.discovery.base import Emit
from lbproxy.errors import DiscoveryError
from lbproxy.model import SOURCE_DNS, Endpoint, names, parse_hostport
from lbproxy.pool.events import EndpointsDiscovered

log = structlog.get_logger("lbproxy.dns")

A: Final = dns.rdatatype.A
AAAA: Final = dns.rdatatype.AAAA
SRV: Final = dns.rdatatype.SRV
ADDRESS_TYPES: Final = (A, AAAA)
# Failures are retried after min_refresh times a factor drawn from [1, RETRY_SPREAD).
RETRY_SPREAD: Final = 1.5
# EDNS0 with the payload size the DNS flag day 2020 settled on: big enough for a few
# dozen SRV records with glue, small enough not to fragment; larger answers use TCP.
EDNS_PAYLOAD: Final = 1232

# One question: an owner name (lower case, absolute) and A or AAAA.
Question = tuple[str, dns.rdatatype.RdataType]


# ============================================================== pure conversion
@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # lower case, absolute ("api-1.example.com.")


@dataclass(frozen=True, slots=True)
class Lookup:
    """What one question (one owner name, one type) gave."""

    addresses: tuple[str, ...] = ()
    ttl: int | None = None  # minimum over the answer and any CNAMEs; None without records
    # Why there are no addresses ("NXDOMAIN", "no records", "timeout", "SERVFAIL"...).
    problem: str | None = None
    # The resolver failed (no answer, or an rcode it gives up on): the previous answer
    # for this question stays. NXDOMAIN and empty answers are answers, not failures.
    failed: bool = False


@dataclass(frozen=True, slots=True)
class SrvAnswer:
    records: tuple[SrvRecord, ...]
    ttl: int | None
    # Target addresses found in the additional section, by (target, rdtype).
    glue: Mapping[Question, Lookup]


def dns_name(host: str, original: str) -> dns.name.Name:
    """The absolute DNS name for a host name (IDNA-encoded if it is not ASCII).

    Raises ValueError naming the entry."""
    try:
        return dns.name.from_text(host)
    except dns.exception.DNSException as exc:
        raise ValueError(f"not a DNS name ({_short(exc)}): {original!r}") from None


def parse_name(text: str, default_port: int) -> Endpoint:
    """A ``names`` entry: ``host``, ``host:port``, or an IP literal (used as it is).

    Raises ValueError naming the entry."""
    ep = parse_hostport(text, default_port)
    if not ep.is_ip:
        dns_name(ep.host, text)
    return ep


def parse_srv_name(text: str) -> dns.name.Name:
    """An ``srv`` entry such as ``_https._tcp.example.com``: a name, no port.

    Raises ValueError naming the entry."""
    if ":" in text or "[" in text:
        raise ValueError(f"an SRV name takes no port (the records carry it): {text!r}")
    ep = parse_hostport(text, 1)
    if ep.is_ip:
        raise ValueError(f"an SRV name must be a DNS name, not an address: {text!r}")
    return dns_name(ep.host, text)


def target_text(name: dns.name.Name) -> str:
    return name.to_text().lower()


def usable_address(text: str) -> str | None:
    """Normalised address text, or None for one nobody can connect to (0.0.0.0, ::,
    multicast), which DNS-based blocking and broken zones do hand out."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None
    return str(ip)


def addresses_of(rrsets: Iterable[dns.rrset.RRset]) -> tuple[str, ...]:
    """The usable addresses of the IN A/AAAA records among ``rrsets``, sorted, unique."""
    found: set[str] = set()
    for rrset in rrsets:
        if rrset.rdclass != dns.rdataclass.IN or rrset.rdtype not in ADDRESS_TYPES:
            continue
        for rd in rrset:
            address = usable_address(rd.address)
            if address is not None:
                found.add(address)
    return tuple(sorted(found, key=ipaddress.ip_address))


def _chain(response: dns.message.Message) -> dns.message.ChainingResult:
    if not isinstance(response, dns.message.QueryMessage):
        raise DiscoveryError(f"not a DNS query response (opcode {response.opcode()})")
    try:
        return response.resolve_chaining()
    except dns.exception.DNSException as exc:
        raise DiscoveryError(f"malformed DNS response: {describe_error(exc)}") from None


def decode_addresses(response: dns.message.Message) -> Lookup:
    """The A or AAAA answer to the response's question, following CNAMEs.

    Raises DiscoveryError for a response that is not one answer to one question."""
    chain = _chain(response)
    if chain.answer is None:
        return Lookup(problem="no records")
    addresses = addresses_of([chain.answer])
    if not addresses:
        return Lookup(problem="no usable addresses")
    return Lookup(addresses, chain.minimum_ttl)


def srv_records(rrset: dns.rrset.RRset | None) -> tuple[SrvRecord, ...]:
    """Usable SRV records, best first (lowest priority, then highest weight).

    Skips the "." target (RFC 2782: the service is decidedly not available here) and port
    0, which no client can connect to."""
    if rrset is None or rrset.rdtype != SRV:
        return ()
    records = {
        SrvRecord(rd.priority, rd.weight, rd.port, target_text(rd.target))
        for rd in rrset
        if rd.port != 0 and rd.target != dns.name.root and rd.target != dns.name.empty
    }
    return tuple(sorted(records, key=lambda r: (r.priority, -r.weight, r.target, r.port)))


def glue_of(response: dns.message.Message) -> dict[Question, Lookup]:
    """A/AAAA records in the additional section, by (owner, rdtype)."""
    glue: dict[Question, Lookup] = {}
    for rrset in response.additional:
        if rrset.rdclass != dns.rdataclass.IN or rrset.rdtype not in ADDRESS_TYPES:
            continue
        addresses = addresses_of([rrset])
        if not addresses:
            continue
        key = (target_text(rrset.name), rrset.rdtype)
        before = glue.get(key)
        if before is not None and before.ttl is not None:
            # The same RRset split over two entries: merge, keep the smaller TTL.
            addresses = tuple(
                sorted(set(before.addresses) | set(addresses), key=ipaddress.ip_address)
            )
            glue[key] = Lookup(addresses, min(before.ttl, rrset.ttl))
        else:
            glue[key] = Lookup(addresses, rrset.ttl)
    return glue


def decode_srv(response: dns.message.Message) -> SrvAnswer:
    """The SRV answer to the response's question (following CNAMEs) and its glue.

    Raises DiscoveryError for a response that is not one answer to one question."""
    chain = _chain(response)
    records = srv_records(chain.answer)
    if not records:
        return SrvAnswer((), None, {})
    return SrvAnswer(records, chain.minimum_ttl, glue_of(response))


def glue_for(
    target: str, glue: Mapping[Question, Lookup]
) -> dict[dns.rdatatype.RdataType, Lookup] | None:
    """The target's addresses from glue, for both families, or None if it has none.

    When the server sent any address of the target, it sent all it wanted to: a family
    it left out counts as empty, not as something to ask about."""
    if not any((target, t) in glue for t in ADDRESS_TYPES):
        return None
    return {t: glue.get((target, t), Lookup(problem="no records")) for t in ADDRESS_TYPES}


def merge_lookups(
    lookups: Mapping[Question, Lookup],
    previous: Mapping[Question, tuple[str, ...]],
) -> dict[Question, tuple[str, ...]] | None:
    """Addresses per question for this round, or None to keep the whole previous set.

    None when no question got fresh addresses. Otherwise a failed question keeps its
    previous addresses and one answered without records gets none."""
    if not any(lookup.addresses for lookup in lookups.values()):
        return None
    return {
        key: previous.get(key, ()) if lookup.failed else lookup.addresses
        for key, lookup in lookups.items()
    }


def name_endpoints(addresses: Iterable[str], port: int) -> frozenset[Endpoint]:
    return frozenset(Endpoint(a, port) for a in addresses)


def srv_endpoints(
    records: Iterable[SrvRecord], addresses: Mapping[Question, tuple[str, ...]]
) -> frozenset[Endpoint]:
    """Every address of every record's target at the record's port (see the module
    docstring for why all priorities are kept)."""
    return frozenset(
        Endpoint(a, r.port)
        for r in records
        for t in ADDRESS_TYPES
        for a in addresses.get((r.target, t), ())
    )


def min_ttl(lookups: Iterable[Lookup], *more: int | None) -> int | None:
    ttls = [lk.ttl for lk in lookups if lk.ttl is not None and not lk.failed]
    ttls += [t for t in more if t is not None]
    return min(ttls) if ttls else None


def refresh_delay(ttl: int | None, min_refresh: float, max_refresh: float) -> float:
    """Seconds until the next refresh after a good round: the TTL, within the bounds."""
    if ttl is None:
        return min_refresh
    return float(min(max(ttl, min_refresh), max_refresh))


def retry_delay(min_refresh: float, max_refresh: float, rng: random.Random) -> float:
    """Seconds until a retry after a failed round: min_refresh with jitter upwards, so
    never sooner than min_refresh and never later than max_refresh."""
    return min(min_refresh * rng.uniform(1.0, RETRY_SPREAD), max(min_refresh, max_refresh))


def describe_error(exc: BaseException) -> str:
    """A short text for a resolver exception: NXDOMAIN, timeout, SERVFAIL, ..."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "NXDOMAIN"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        texts = sorted(
            {e[3] if isinstance(e[3], str) else _short(e[3]) for e in errors if len(e) > 3}
        )
        if texts:
            return ", ".join(texts)
    return _short(exc)


def _short(exc: object) -> str:
    # One line: a bare dnspython exception's text is its (multi-line) docstring.
    text = str(exc).strip().split("\n", 1)[0].strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


# ============================================================== the source
def make_resolver(cfg: DnsConfig) -> dns.asyncresolver.Resolver:
    """A resolver for the configured nameservers, else the system's (/etc/resolv.conf).

    Raises dns.resolver.NoResolverConfiguration when the system has none."""
    if cfg.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for text in cfg.nameservers:
            ep = parse_hostport(text, 53)  # config validation already checked it
            servers.append(dns.nameserver.Do53Nameserver(ep.host, ep.port))
        resolver.nameservers = servers
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.timeout = cfg.timeout
    resolver.lifetime = cfg.timeout
    resolver.cache = None  # the TTL schedules our queries; a cache would only get stale
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    return resolver


@dataclass(eq=False)
class _Entry:
    """One configured name and what is known about it."""

    text: str  # as configured, for logs
    qname: dns.name.Name
    port: int | None  # None for an SRV entry
    endpoints: frozenset[Endpoint] = frozenset()
    addresses: dict[Question, tuple[str, ...]] = field(default_factory=dict)
    records: tuple[SrvRecord, ...] = ()
    tried: bool = False
    failures: int = 0  # consecutive rounds with a failure


@dataclass(frozen=True, slots=True)
class _Round:
    lookups: dict[Question, Lookup]
    records: tuple[SrvRecord, ...] = ()
    srv_ttl: int | None = None
    problem: str | None = None  # why the SRV question itself gave nothing


class DnsSource:
    """Follows ``[discovery.dns]`` names and SRV records; see the module docstring."""

    name = SOURCE_DNS

    def __init__(
        self,
        cfg: DnsConfig,
        default_port: int,
        *,
        rng: random.Random | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        self.cfg = cfg
        self._rng = rng or random.Random()
        self._resolver = resolver
        self._fixed: set[Endpoint] = set()
        self._entries: list[_Entry] = []
        self._emit: Emit | None = None
        self._emitted: frozenset[Endpoint] | None = None
        for text in cfg.names:
            try:
                ep = parse_name(text, default_port)
            except ValueError as exc:
                log.warning("dns.name_invalid", name=text, error=str(exc))
                continue
            if ep.is_ip:
                self._fixed.add(ep)  # nothing to resolve
            else:
                self._entries.append(_Entry(text, dns_name(ep.host, text), ep.port))
        for text in cfg.srv:
            try:
                qname = parse_srv_name(text)
            except ValueError as exc:
                log.warning("dns.name_invalid", name=text, error=str(exc))
                continue
            self._entries.append(_Entry(text, qname, None))

    @property
    def endpoints(self) -> frozenset[Endpoint]:
        """The union over all entries (what the last report said, or will say)."""
        return frozenset(self._fixed).union(*(e.endpoints for e in self._entries))

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        self._emitted = None  # report again after a restart
        while self._resolver is None:
            try:
                self._resolver = make_resolver(self.cfg)
            except (dns.exception.DNSException, OSError) as exc:
                log.warning("dns.resolver_unavailable", error=describe_error(exc))
                await asyncio.sleep(
                    retry_delay(self.cfg.min_refresh, self.cfg.max_refresh, self._rng)
                )
        self._publish()
        if not self._entries:
            await asyncio.Event().wait()  # nothing to follow; run until cancelled
        async with asyncio.TaskGroup() as tg:
            for entry in self._entries:
                tg.create_task(self._follow(entry), name=f"dns:{entry.text}")

    async def _follow(self, entry: _Entry) -> None:
        while True:
            delay = await self._refresh(entry)
            await asyncio.sleep(delay)

    async def _refresh(self, entry: _Entry) -> float:
        """Resolve one entry, record it, report the union if it changed; returns the
        seconds until its next refresh."""
        if entry.port is None:
            rnd = await self._resolve_srv(entry)
        else:
            rnd = _Round(await self._resolve_addresses(entry.qname))
        entry.tried = True
        delay = self._record(entry, rnd)
        self._publish()
        return delay

    # ------------------------------------------------------------ resolving
    async def _ask(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.message.Message | Lookup:
        """The response to one question, or a Lookup saying why there is none."""
        assert self._resolver is not None
        query = asyncio.ensure_future(
            self._resolver.resolve(qname, rdtype, raise_on_no_answer=False)
        )
        try:
            answer = await asyncio.shield(query)
        except asyncio.CancelledError:
            # Let the query end (within the resolver's lifetime, cfg.timeout) before we
            # stop. uvloop (0.23) never closes the UDP handle of a create_datagram_endpoint
            # call cancelled while it waits for connection_made, and its loop.close() then
            # blocks on that handle forever: a shutdown that hits a query at that moment
            # would hang the process.
            await asyncio.wait([query])
            if not query.cancelled():
                query.exception()  # retrieved: it no longer matters
            raise
        except dns.resolver.NXDOMAIN:
            return Lookup(problem="NXDOMAIN")
        except (dns.exception.DNSException, OSError) as exc:
            return Lookup(problem=describe_error(exc), failed=True)
        return answer.response

    async def _lookup(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Lookup:
        response = await self._ask(qname, rdtype)
        if isinstance(response, Lookup):
            return response
        try:
            return decode_addresses(response)
        except DiscoveryError as exc:
            return Lookup(problem=str(exc), failed=True)

    async def _resolve_addresses(self, qname: dns.name.Name) -> dict[Question, Lookup]:
        owner = target_text(qname)
        async with asyncio.TaskGroup() as tg:
            tasks = {t: tg.create_task(self._lookup(qname, t)) for t in ADDRESS_TYPES}
        return {(owner, t): task.result() for t, task in tasks.items()}

    async def _resolve_srv(self, entry: _Entry) -> _Round:
        response = await self._ask(entry.qname, SRV)
        if isinstance(response, Lookup):
            return _Round({}, problem=response.problem)
        try:
            answer = decode_srv(response)
        except DiscoveryError as exc:
            return _Round({}, problem=str(exc))
        if not answer.records:
            return _Round({}, problem="no records")
        lookups: dict[Question, Lookup] = {}
        ask: list[str] = []
        for target in dict.fromkeys(r.target for r in answer.records):
            glued = glue_for(target, answer.glue)
            if glued is None:
                ask.append(target)
            else:
                lookups.update({(target, t): lk for t, lk in glued.items()})
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._resolve_addresses(dns.name.from_text(t))) for t in ask]
        for task in tasks:
            lookups.update(task.result())
        return _Round(lookups, answer.records, answer.ttl)

    # ------------------------------------------------------------ recording
    def _record(self, entry: _Entry, rnd: _Round) -> float:
        failed = [(key, lk) for key, lk in rnd.lookups.items() if lk.failed]
        merged = None if rnd.problem else merge_lookups(rnd.lookups, entry.addresses)
        endpoints: frozenset[Endpoint] = frozenset()
        if merged is not None:
            if entry.port is not None:
                endpoints = name_endpoints((a for v in merged.values() for a in v), entry.port)
            else:
                endpoints = srv_endpoints(rnd.records, merged)
        # Log a failure streak at its start, then quietly (debug) until it ends, so that a
        # dead name does not write a warning every min_refresh.
        note = log.warning if entry.failures == 0 else log.debug
        for (owner, rdtype), lookup in failed if endpoints else ():
            note(
                "dns.resolve_failed",
                name=entry.text,
                query=owner,
                rdtype=dns.rdatatype.to_text(rdtype),
                error=lookup.problem,
                kept=list(entry.addresses.get((owner, rdtype), ())),
            )
        if merged is None or not endpoints:
            problems = [rnd.problem] if rnd.problem else [lk.problem for lk in rnd.lookups.values()]
            note(
                "dns.resolve_failed",
                name=entry.text,
                error=", ".join(sorted({p or "no usable records" for p in problems})),
                kept=names(entry.endpoints),
            )
            entry.failures += 1
            return retry_delay(self.cfg.min_refresh, self.cfg.max_refresh, self._rng)
        if entry.failures and not failed:
            log.info("dns.resolve_recovered", name=entry.text, failures=entry.failures)
        ttl = min_ttl(rnd.lookups.values(), rnd.srv_ttl)
        if rnd.records != entry.records:
            log.info(
                "dns.srv_records",
                name=entry.text,
                ttl=ttl,
                records=[
                    {"priority": r.priority, "weight": r.weight, "port": r.port, "target": r.target}
                    for r in rnd.records
                ],
            )
        if endpoints != entry.endpoints:
            log.info("dns.resolved", name=entry.text, endpoints=names(endpoints), ttl=ttl)
        entry.addresses = merged
        entry.records = rnd.records
        entry.endpoints = endpoints
        if failed:
            entry.failures += 1
            return retry_delay(self.cfg.min_refresh, self.cfg.max_refresh, self._rng)
        entry.failures = 0
        return refresh_delay(ttl, self.cfg.min_refresh, self.cfg.max_refresh)

    def _publish(self) -> None:
        union = self.endpoints
        if union == self._emitted or self._emit is None:
            return
        if self._emitted is None and not union and not all(e.tried for e in self._entries):
            return  # wait for the first round before reporting "nothing"
        before = self._emitted or frozenset()
        log.info(
            "dns.endpoints_changed",
            endpoints=names(union),
            added=names(union - before),
            removed=names(before - union),
        )
        self._emitted = union
        self._emit(EndpointsDiscovered(SOURCE_DNS, union))
