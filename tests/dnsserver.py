"""A small authoritative DNS server for tests, built on dnspython, on 127.0.0.1:0.

It serves one mutable zone over UDP and TCP on the same port. Tests change the records
(per-name TTLs, A/AAAA/SRV/CNAME), switch a name (or the whole server) into a failure
mode and read the query log::

    async with DnsServer() as dns:
        dns.set_address("api.test", "10.0.0.1", "fd00::1", ttl=1)
        dns.set_srv("_api._tcp.test", [(10, 5, 6443, "api.test")], glue=True)
        dns.mode("api.test", Mode.SERVFAIL)
        ...
        dns.queries_for("api.test", "A")

Modes: ``OK`` answers from the zone (NXDOMAIN for a name it does not hold, NODATA for a
type it does not hold), ``NXDOMAIN``, ``SERVFAIL``, ``DROP`` (no reply at all, so the
client times out), and ``EMPTY`` (NOERROR with an empty answer section). ``truncate``
makes every UDP reply an empty one with the TC bit set, so clients must retry over TCP.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

LOCALHOST = "127.0.0.1"
ZONE_ORIGIN = "test."
SOA_TTL = 30


class Mode(enum.Enum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    SERVFAIL = "servfail"
    DROP = "drop"
    EMPTY = "empty"


@dataclass(frozen=True, slots=True)
class Query:
    at: float  # loop.time() when the query arrived
    name: str  # lower case, no trailing dot
    rdtype: str  # "A", "AAAA", "SRV", ...
    transport: str  # "udp" or "tcp"
    mode: Mode  # how it was answered


def _name(text: str | dns.name.Name) -> dns.name.Name:
    if isinstance(text, dns.name.Name):
        return text
    return dns.name.from_text(text)


def _key(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class DnsServer:
    """Authoritative for every name it is given; see the module docstring."""

    def __init__(self) -> None:
        # name -> rdtype -> (ttl, rdata texts)
        self._zone: dict[str, dict[str, tuple[int, tuple[str, ...]]]] = {}
        self._glue: set[str] = set()  # SRV names whose replies carry target addresses
        self._modes: dict[tuple[str, str | None], Mode] = {}
        self.default_mode = Mode.OK
        self.truncate = False
        self.queries: list[Query] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_conns: set[asyncio.Transport] = set()

    # ------------------------------------------------------------------ zone edits
    def set_records(self, name: str, rdtype: str, values: Iterable[str], ttl: int = 60) -> None:
        """Replace one RRset; an empty ``values`` removes it."""
        rrs = self._zone.setdefault(_key(_name(name)), {})
        values = tuple(values)
        if values:
            rrs[rdtype.upper()] = (ttl, values)
        else:
            rrs.pop(rdtype.upper(), None)

    def set_address(self, name: str, *addresses: str, ttl: int = 60) -> None:
        """Replace the A and AAAA RRsets of ``name`` with these addresses."""
        self.set_records(name, "A", [a for a in addresses if ":" not in a], ttl)
        self.set_records(name, "AAAA", [a for a in addresses if ":" in a], ttl)
        self._zone.setdefault(_key(_name(name)), {})

    def set_srv(
        self,
        name: str,
        records: Sequence[tuple[int, int, int, str]],
        *,
        ttl: int = 60,
        glue: bool = False,
    ) -> None:
        """``records`` are (priority, weight, port, target); ``glue`` adds the targets'
        A/AAAA records (those in this zone) to the additional section."""
        values = [f"{p} {w} {port} {_name(t).to_text()}" for p, w, port, t in records]
        self.set_records(name, "SRV", values, ttl)
        key = _key(_name(name))
        if glue:
            self._glue.add(key)
        else:
            self._glue.discard(key)

    def set_cname(self, name: str, target: str, ttl: int = 60) -> None:
        self.set_records(name, "CNAME", [_name(target).to_text()], ttl)

    def remove(self, name: str) -> None:
        """Forget the name entirely: it answers NXDOMAIN from now on."""
        self._zone.pop(_key(_name(name)), None)

    def mode(self, name: str | None, mode: Mode, rdtype: str | None = None) -> None:
        """Answer ``name`` (one ``rdtype``, or all) in ``mode``; ``name=None`` sets the
        default for every name without a mode of its own."""
        if name is None:
            self.default_mode = mode
            return
        key = (_key(_name(name)), rdtype.upper() if rdtype else None)
        if mode is Mode.OK:
            self._modes.pop(key, None)
        else:
            self._modes[key] = mode

    # ------------------------------------------------------------------ query log
    def queries_for(self, name: str, rdtype: str | None = None) -> list[Query]:
        key = _key(_name(name))
        return [
            q
            for q in self.queries
            if q.name == key and (rdtype is None or q.rdtype == rdtype.upper())
        ]

    # ------------------------------------------------------------------ answering
    def _mode_for(self, key: str, rdtype: str) -> Mode:
        return self._modes.get((key, rdtype), self._modes.get((key, None), self.default_mode))

    def _rrset(self, owner: str, rdtype: str) -> dns.rrset.RRset | None:
        entry = self._zone.get(owner, {}).get(rdtype)
        if entry is None:
            return None
        ttl, values = entry
        return dns.rrset.from_text_list(
            dns.name.from_text(owner), ttl, dns.rdataclass.IN, rdtype, list(values)
        )

    def _soa(self) -> dns.rrset.RRset:
        return dns.rrset.from_text(
            ZONE_ORIGIN, SOA_TTL, "IN", "SOA", f"ns.{ZONE_ORIGIN} admin.{ZONE_ORIGIN} 1 60 60 60 1"
        )

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one query, or None to drop it (including malformed queries)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - whatever arrives, the test server stays up
            return None
        if not query.question:
            return None
        question = query.question[0]
        key = _key(question.name)
        rdtype = dns.rdatatype.to_text(question.rdtype)
        mode = self._mode_for(key, rdtype)
        loop = asyncio.get_running_loop()
        self.queries.append(Query(loop.time(), key, rdtype, transport, mode))
        if mode is Mode.DROP:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if mode is Mode.NXDOMAIN:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        elif mode is Mode.SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif mode is Mode.EMPTY:
            response.authority.append(self._soa())
        elif transport == "udp" and self.truncate:
            response.flags |= dns.flags.TC
        else:
            self._fill(response, key, rdtype)
        return response.to_wire()

    def _fill(self, response: dns.message.Message, key: str, rdtype: str) -> None:
        owner = key
        for _ in range(8):  # follow CNAMEs inside the zone, as an authority would
            if owner not in self._zone:
                if owner == key:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                    response.authority.append(self._soa())
                return
            found = self._rrset(owner, rdtype)
            if found is not None:
                response.answer.append(found)
                if rdtype == "SRV" and owner in self._glue:
                    for rd in found:
                        target = _key(rd.target)
                        for t in ("A", "AAAA"):
                            if (glue := self._rrset(target, t)) is not None:
                                response.additional.append(glue)
                return
            cname = self._rrset(owner, "CNAME")
            if cname is None or rdtype == "CNAME":
                response.authority.append(self._soa())  # NODATA
                return
            response.answer.append(cname)
            owner = _key(cname[0].target)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        # UDP first on a free port, then TCP on the same number; retry if it is taken.
        for _ in range(20):
            transport, _proto = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(LOCALHOST, 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await loop.create_server(lambda: _Tcp(self), LOCALHOST, port)
            except OSError:
                transport.close()
                continue
            self._udp = transport
            self.port = port
            return self
        raise OSError("no free port for UDP and TCP together")

    @property
    def nameserver(self) -> str:
        """What [discovery.dns] nameservers takes."""
        return f"{LOCALHOST}:{self.port}"

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self._tcp_conns):
                conn.close()
            await self._tcp.wait_closed()
            self._tcp = None
        # Let the transports' close callbacks run before the loop goes away.
        await asyncio.sleep(0)

    async def __aenter__(self) -> DnsServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not every loop's datagram transport subclasses asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.server.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class _Tcp(asyncio.Protocol):
    """Two-byte length-prefixed messages (RFC 1035 4.2.2), several per connection."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server._tcp_conns.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.server._tcp_conns.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (size,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + size:
                return
            wire = bytes(self.buffer[2 : 2 + size])
            del self.buffer[: 2 + size]
            reply = self.server.answer(wire, "tcp")
            if reply is not None and self.transport is not None:
                self.transport.write(struct.pack("!H", len(reply)) + reply)
