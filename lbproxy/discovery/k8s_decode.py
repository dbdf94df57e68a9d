"""Pure decoders for the Kubernetes source: API lists, watch events, EndpointSlices and
core/v1 Endpoints become endpoints; they raise only DecodeError.

Nothing here does I/O or logs. What a decoder leaves out of an otherwise usable object
(a not-an-IP address, an endpoint that is not an object) is returned in ``skipped`` for
the caller to log; an object that cannot be used at all raises DecodeError.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from lbproxy.errors import DecodeError
from lbproxy.model import Endpoint

# A sane upper bound on the set one source reports: the Kubernetes apiserver Service
# has one endpoint per apiserver, so hundreds mean a broken or hostile answer.
MAX_ENDPOINTS: Final = 256
HTTPS_PORT_NAME: Final = "https"
WATCH_TYPES: Final = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
_ADDRESS_TYPES: Final = {"IPv4": 4, "IPv6": 6}


@dataclass(frozen=True, slots=True)
class Decoded:
    """The usable endpoints of one EndpointSlice or Endpoints object."""

    name: str
    resource_version: str | None
    endpoints: frozenset[Endpoint]
    skipped: tuple[str, ...] = ()  # one line per address or entry left out, with why


@dataclass(frozen=True, slots=True)
class ListAnswer:
    resource_version: str
    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # one of WATCH_TYPES
    object: Mapping[str, Any]


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def decode_json(raw: bytes | str) -> Any:
    """Parse one JSON document."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise DecodeError("JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8: {exc.reason}") from None
    except ValueError as exc:  # JSONDecodeError, and int() of an over-long number
        raise DecodeError(f"not JSON: {exc}") from None


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DecodeError(f"metadata is {_describe(meta)}, not an object")
    return meta


def resource_version(obj: Any) -> str | None:
    """``metadata.resourceVersion`` of an object, or None when absent or not a string."""
    if not isinstance(obj, dict):
        return None
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return None
    rv = meta.get("resourceVersion")
    return rv if isinstance(rv, str) and rv else None


def object_name(obj: Any) -> str:
    """``metadata.name`` for log lines; empty when it cannot be read."""
    if isinstance(obj, dict):
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            name = meta.get("name")
            if isinstance(name, str):
                return name
    return ""


def _name(obj: Any, kind: str) -> str:
    if not isinstance(obj, dict):
        raise DecodeError(f"{kind} is {_describe(obj)}, not an object")
    name = _metadata(obj).get("name")
    if not isinstance(name, str) or not name:
        raise DecodeError(f"{kind} without metadata.name")
    return name


def decode_list(doc: Any) -> ListAnswer:
    """A ``...List`` answer: its items (undecoded) and ``metadata.resourceVersion``."""
    if not isinstance(doc, dict):
        raise DecodeError(f"list answer is {_describe(doc)}, not an object")
    rv = _metadata(doc).get("resourceVersion")
    if not isinstance(rv, str) or not rv:
        raise DecodeError("list answer without metadata.resourceVersion")
    items = doc.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise DecodeError(f"list answer items is {_describe(items)}, not a list")
    return ListAnswer(rv, tuple(items))


def decode_event(doc: Any) -> WatchEvent:
    """One watch event ``{"type": ..., "object": {...}}``."""
    if not isinstance(doc, dict):
        raise DecodeError(f"watch event is {_describe(doc)}, not an object")
    etype = doc.get("type")
    if not isinstance(etype, str) or etype not in WATCH_TYPES:
        raise DecodeError(f"unknown watch event type {str(etype)[:40]!r}")
    obj = doc.get("object")
    if not isinstance(obj, dict):
        raise DecodeError(f"watch event object is {_describe(obj)}, not an object")
    return WatchEvent(etype, obj)


def decode_event_line(line: bytes) -> WatchEvent:
    return decode_event(decode_json(line))


def status_code(obj: Mapping[str, Any]) -> int | None:
    """The ``code`` of a ``Status`` object (an ERROR event's object)."""
    code = obj.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    return None


def status_message(obj: Mapping[str, Any]) -> str:
    message = obj.get("message")
    reason = obj.get("reason")
    parts = [p for p in (reason, message) if isinstance(p, str) and p]
    return ": ".join(parts)[:300]


def _valid_port(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    return None


def pick_port(ports: Any) -> int:
    """The port named ``https``, else the first usable TCP port; DecodeError if none."""
    if ports is None:
        raise DecodeError("no ports")
    if not isinstance(ports, list):
        raise DecodeError(f"ports is {_describe(ports)}, not a list")
    first: int | None = None
    for entry in ports:
        if not isinstance(entry, dict):
            continue
        protocol = entry.get("protocol", "TCP")
        if protocol is not None and protocol != "TCP":
            continue
        port = _valid_port(entry.get("port"))
        if port is None:
            continue
        if entry.get("name") == HTTPS_PORT_NAME:
            return port
        if first is None:
            first = port
    if first is None:
        raise DecodeError("no usable port (a TCP port between 1 and 65535)")
    return first


def parse_ip(text: Any, version: int | None = None) -> str:
    """A normalised IP literal usable as an apiserver address; DecodeError otherwise."""
    if not isinstance(text, str):
        raise DecodeError(f"address is {_describe(text)}, not a string")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise DecodeError(f"not an IP address: {text[:80]!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise DecodeError(f"scoped IPv6 address not supported: {text[:80]!r}")
    if version is not None and ip.version != version:
        raise DecodeError(f"IPv{ip.version} address {text!r} in an IPv{version} slice")
    if ip.is_unspecified or ip.is_multicast:
        raise DecodeError(f"not a unicast address: {text!r}")
    return str(ip)


def decode_slice(obj: Any) -> Decoded:
    """A ``discovery.k8s.io/v1`` EndpointSlice: its ready endpoints on its https port.

    Ready means ``conditions.ready`` is true or absent, as k3s and kube-proxy read it.
    """
    name = _name(obj, "EndpointSlice")
    address_type = obj.get("addressType")
    version = _ADDRESS_TYPES.get(address_type) if isinstance(address_type, str) else None
    if version is None:
        raise DecodeError(f"unsupported addressType {str(address_type)[:40]!r}")
    entries = obj.get("endpoints")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise DecodeError(f"endpoints is {_describe(entries)}, not a list")
    rv = resource_version(obj)
    if not entries:
        return Decoded(name, rv, frozenset())
    port = pick_port(obj.get("ports"))
    found: set[Endpoint] = set()
    skipped: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            skipped.append(f"endpoints[{i}]: {_describe(entry)}, not an object")
            continue
        conditions = entry.get("conditions")
        if conditions is None:
            conditions = {}
        if not isinstance(conditions, dict):
            skipped.append(f"endpoints[{i}].conditions: {_describe(conditions)}, not an object")
            continue
        ready = conditions.get("ready")
        if ready is False:
            continue  # not ready: left out on purpose, nothing to report
        if ready is not None and ready is not True:
            skipped.append(f"endpoints[{i}].conditions.ready: {_describe(ready)}, not a boolean")
            continue
        addresses = entry.get("addresses")
        if not isinstance(addresses, list) or not addresses:
            skipped.append(f"endpoints[{i}].addresses: missing or empty")
            continue
        for j, address in enumerate(addresses):
            try:
                found.add(Endpoint(parse_ip(address, version), port))
            except DecodeError as exc:
                skipped.append(f"endpoints[{i}].addresses[{j}]: {exc}")
    return Decoded(name, rv, frozenset(found), tuple(skipped))


def decode_endpoints(obj: Any) -> Decoded:
    """A core/v1 Endpoints object: ``subsets[].addresses`` on each subset's https port.

    ``notReadyAddresses`` are left out, as their name says.
    """
    name = _name(obj, "Endpoints")
    subsets = obj.get("subsets")
    if subsets is None:
        subsets = []
    if not isinstance(subsets, list):
        raise DecodeError(f"subsets is {_describe(subsets)}, not a list")
    found: set[Endpoint] = set()
    skipped: list[str] = []
    for i, subset in enumerate(subsets):
        if not isinstance(subset, dict):
            skipped.append(f"subsets[{i}]: {_describe(subset)}, not an object")
            continue
        addresses = subset.get("addresses")
        if addresses is None:
            continue
        if not isinstance(addresses, list):
            skipped.append(f"subsets[{i}].addresses: {_describe(addresses)}, not a list")
            continue
        if not addresses:
            continue
        try:
            port = pick_port(subset.get("ports"))
        except DecodeError as exc:
            skipped.append(f"subsets[{i}]: {exc}")
            continue
        for j, address in enumerate(addresses):
            ip = address.get("ip") if isinstance(address, dict) else address
            try:
                if not isinstance(address, dict):
                    raise DecodeError(f"{_describe(address)}, not an object")
                found.add(Endpoint(parse_ip(ip), port))
            except DecodeError as exc:
                skipped.append(f"subsets[{i}].addresses[{j}]: {exc}")
    return Decoded(name, resource_version(obj), frozenset(found), tuple(skipped))


def cap(
    endpoints: Iterable[Endpoint], limit: int = MAX_ENDPOINTS
) -> tuple[frozenset[Endpoint], int]:
    """At most ``limit`` endpoints (the lowest, so the choice is stable) and how many were
    dropped."""
    ordered = sorted(set(endpoints))
    return frozenset(ordered[:limit]), max(0, len(ordered) - limit)
