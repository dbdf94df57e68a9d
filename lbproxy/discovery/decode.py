"""Pure decoders for what the etcd source reads: the v3 JSON gateway's envelopes, k3s's
``k3s/apiaddresses`` value, and the kube-apiserver's masterlease keys and values.

Nothing here does I/O. Every function either returns a value or raises
``DecodeError``; anything else escaping on any input is a bug (the unit tests fuzz
them with arbitrary bytes).

The gateway's JSON follows the protobuf JSON mapping: keys and values are standard
base64, int64 fields are strings, and fields at their default value are left out (a
PUT event has no ``type``, an empty range has no ``kvs``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from lbproxy.errors import DecodeError
from lbproxy.model import Endpoint, parse_hostport

# A source never reports more endpoints than this; a value listing more is cut short
# (and the cut logged), so a runaway writer cannot grow the pool and the prober's load.
MAX_ENDPOINTS: Final = 256
# etcd refuses requests over 1.5 MiB by default; anything much larger is not a
# k3s-written value.
MAX_APIADDRESSES_BYTES: Final = 4 * 1024 * 1024
# Problems reported per value; the rest are counted.
MAX_PROBLEMS: Final = 10

K8S_MAGIC: Final = b"k8s\x00"

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


# --------------------------------------------------------------------------- JSON envelope
def parse_json(data: bytes | str, what: str) -> Any:
    """``json.loads`` that raises only DecodeError (also for deep nesting and huge ints)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DecodeError(f"{what}: invalid JSON: {_short(str(exc))}") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(value: object, what: str) -> bytes:
    """A base64 field; a missing field (None) is the default, empty bytes."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise DecodeError(f"{what}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise DecodeError(f"{what}: invalid base64") from None


def parse_int64(value: object, what: str) -> int:
    """An int64 field: a decimal string (or a plain number); missing means 0."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise DecodeError(f"{what}: expected an int64, got a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value[1:] if value.startswith("-") else value
        if not (0 < len(text) <= 20 and text.isascii() and text.isdigit()):
            raise DecodeError(f"{what}: expected an int64 string, got {_short(value)!r}")
        number = int(value)
    else:
        raise DecodeError(f"{what}: expected an int64, got {type(value).__name__}")
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise DecodeError(f"{what}: {number} is out of the int64 range")
    return number


def _object(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DecodeError(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _bool(value: object, what: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise DecodeError(f"{what}: expected a boolean, got {type(value).__name__}")
    return value


def _string(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DecodeError(f"{what}: expected a string, got {type(value).__name__}")
    return value


def header_revision(obj: Mapping[str, Any]) -> int:
    """``header.revision`` of a response: the store revision it was served at."""
    header = _object(obj.get("header"), "header")
    return parse_int64(header.get("revision"), "header.revision")


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix`` (as etcd's
    clientv3.GetPrefixRangeEnd): the prefix with its last byte below 0xff incremented."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"  # every byte is 0xff: no upper bound


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


def parse_kv(value: object, what: str = "kv") -> KeyValue:
    obj = _object(value, what)
    key = b64decode(obj.get("key"), f"{what}.key")
    if not key:
        raise DecodeError(f"{what}: missing key")
    return KeyValue(
        key=key,
        value=b64decode(obj.get("value"), f"{what}.value"),
        mod_revision=parse_int64(obj.get("mod_revision"), f"{what}.mod_revision"),
        lease=parse_int64(obj.get("lease"), f"{what}.lease"),
    )


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int
    kvs: tuple[KeyValue, ...]


def parse_range(data: bytes) -> RangeResult:
    """The body of a ``/v3/kv/range`` answer."""
    obj = _object(parse_json(data, "range response"), "range response")
    kvs = obj.get("kvs")
    if kvs is None:
        kvs = []
    if not isinstance(kvs, list):
        raise DecodeError(f"range response: kvs must be a list, got {type(kvs).__name__}")
    return RangeResult(
        revision=header_revision(obj),
        kvs=tuple(parse_kv(kv, f"kvs[{i}]") for i, kv in enumerate(kvs)),
    )


@dataclass(frozen=True, slots=True)
class GatewayError:
    """The body of a non-2xx answer: ``{"error":…,"code":<grpc code>,"message":…}``."""

    code: int
    message: str


def parse_error(data: bytes) -> GatewayError | None:
    """None when the body is not an etcd gateway error (e.g. some other HTTP server)."""
    try:
        obj = parse_json(data, "error response")
    except DecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    code, message = obj.get("code"), obj.get("message", obj.get("error"))
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
        return None
    return GatewayError(code, message)


def parse_token(data: bytes) -> str:
    """The token of a ``/v3/auth/authenticate`` answer."""
    obj = _object(parse_json(data, "authenticate response"), "authenticate response")
    token = _string(obj.get("token"), "token")
    if not token or not token.isascii() or not token.isprintable():
        raise DecodeError("authenticate response: no usable token")
    return token


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """One line of a ``/v3/watch`` stream."""

    revision: int  # header.revision
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    events: tuple[WatchEvent, ...] = ()
    error: str = ""  # the gateway's in-stream error ({"error":{…}}), if any

    @property
    def is_progress(self) -> bool:
        """A progress notification: every event up to ``revision`` has been sent."""
        return not (self.created or self.canceled or self.events or self.error)


def parse_watch_line(line: bytes) -> WatchMessage:
    obj = _object(parse_json(line, "watch message"), "watch message")
    if "error" in obj and "result" not in obj:
        err = obj["error"]
        if isinstance(err, dict):
            message = err.get("message")
            text = message if isinstance(message, str) else json.dumps(err)[:200]
        else:
            text = str(err)[:200]
        return WatchMessage(revision=0, error=text or "unknown error")
    result = _object(obj.get("result"), "result")
    if not result:
        raise DecodeError("watch message: neither result nor error")
    events = result.get("events")
    if events is None:
        events = []
    if not isinstance(events, list):
        raise DecodeError(f"watch message: events must be a list, got {type(events).__name__}")
    parsed = []
    for i, item in enumerate(events):
        ev = _object(item, f"events[{i}]")
        kind = _string(ev.get("type"), f"events[{i}].type") or "PUT"
        try:
            event_type = EventType(kind)
        except ValueError:
            raise DecodeError(f"events[{i}]: unknown event type {_short(kind)!r}") from None
        parsed.append(WatchEvent(event_type, parse_kv(ev.get("kv"), f"events[{i}].kv")))
    return WatchMessage(
        revision=header_revision(result),
        created=_bool(result.get("created"), "created"),
        canceled=_bool(result.get("canceled"), "canceled"),
        compact_revision=parse_int64(result.get("compact_revision"), "compact_revision"),
        cancel_reason=_string(result.get("cancel_reason"), "cancel_reason"),
        events=tuple(parsed),
    )


# --------------------------------------------------------------------------- k3s/apiaddresses
@dataclass(frozen=True, slots=True)
class Decoded:
    """Endpoints from a value, and what was skipped in it (for the log)."""

    endpoints: frozenset[Endpoint]
    problems: tuple[str, ...] = ()


def decode_apiaddresses(value: bytes, *, limit: int = MAX_ENDPOINTS) -> Decoded:
    """k3s's JSON array of ``"ip:port"`` (written by json.Encoder, so with a trailing
    newline). ``""`` (a cluster reset) is the empty set.

    Bad entries (not a string, not an IP literal with a port, duplicates, beyond
    ``limit``) are skipped and listed in ``problems``. The whole value is refused with
    DecodeError when it is not a JSON array, or when it lists entries but none usable:
    such a value must not replace the last good set.
    """
    if len(value) > MAX_APIADDRESSES_BYTES:
        raise DecodeError(f"value is {len(value)} bytes, over {MAX_APIADDRESSES_BYTES}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("value is not UTF-8") from None
    if not text.strip():
        return Decoded(frozenset())
    doc = parse_json(text, "value")
    if not isinstance(doc, list):
        raise DecodeError(f"expected a JSON array of 'ip:port' strings, got {_json_type(doc)}")
    found: dict[Endpoint, None] = {}  # insertion-ordered
    problems: list[str] = []
    for i, item in enumerate(doc):
        if len(found) >= limit:
            problems.append(
                f"truncated: {len(doc) - i} more entries beyond the limit of {limit} ignored"
            )
            break
        if not isinstance(item, str):
            problems.append(f"entry {i}: expected an 'ip:port' string, got {_json_type(item)}")
            continue
        try:
            ep = parse_hostport(item)
        except ValueError as exc:
            problems.append(f"entry {i}: {_short(str(exc))}")
            continue
        if not ep.is_ip:
            problems.append(f"entry {i}: {_short(item)!r} is not an IP address")
        elif ep in found:
            problems.append(f"entry {i}: duplicate {ep}")
        else:
            found[ep] = None
    if doc and not found:
        raise DecodeError("no usable entry: " + "; ".join(_capped(problems)))
    return Decoded(frozenset(found), tuple(_capped(problems)))


# --------------------------------------------------------------------------- masterleases
def masterlease_ip(key: bytes, prefix: bytes) -> str:
    """The IP a masterlease key names: ``<prefix><ip>``, e.g. /registry/masterleases/10.0.0.1."""
    if not key.startswith(prefix):
        raise DecodeError(f"key does not start with {prefix!r}")
    return _ip(key[len(prefix) :], "key")


def decode_masterlease(value: bytes) -> str:
    """The IP in a masterlease value: a protobuf ``v1.Endpoints`` in the ``k8s\\0``
    ``runtime.Unknown`` envelope; the apiserver reads ``subsets[0].addresses[0].ip``.

    A minimal walk of the wire format (varint, fixed32/64 and length-delimited fields)
    instead of a protobuf dependency: only the path to the IP is decoded.
    """
    if not value.startswith(K8S_MAGIC):
        raise DecodeError("value lacks the k8s protobuf prefix (k8s\\x00)")
    unknown = _fields(value[len(K8S_MAGIC) :], "runtime.Unknown")
    type_meta = _first(unknown, 1, "runtime.Unknown")
    if type_meta is not None:
        meta = _fields(type_meta, "TypeMeta")
        api_version = _first(meta, 1, "TypeMeta")
        kind = _first(meta, 2, "TypeMeta")
        if kind is not None and kind != b"Endpoints":
            raise DecodeError(f"object kind is {_short(repr(kind))}, not Endpoints")
        if api_version is not None and api_version not in (b"", b"v1"):
            raise DecodeError(f"object apiVersion is {_short(repr(api_version))}, not v1")
    encoding = _first(unknown, 3, "runtime.Unknown")
    if encoding:
        raise DecodeError(f"unsupported content encoding {_short(repr(encoding))}")
    raw = _first(unknown, 2, "runtime.Unknown")
    if not raw:
        raise DecodeError("no object in the envelope")
    subset = _first(_fields(raw, "Endpoints"), 2, "Endpoints")
    if subset is None:
        raise DecodeError("Endpoints has no subsets")
    address = _first(_fields(subset, "EndpointSubset"), 1, "EndpointSubset")
    if address is None:
        raise DecodeError("first subset has no addresses")
    ip = _first(_fields(address, "EndpointAddress"), 1, "EndpointAddress")
    if ip is None:
        raise DecodeError("first address has no ip")
    return _ip(ip, "ip")


# Protobuf wire types.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

Field = tuple[int, int, int | bytes]  # number, wire type, value


def _varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise DecodeError(f"{what}: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
    raise DecodeError(f"{what}: varint longer than 10 bytes")


def _fields(buf: bytes, what: str) -> list[Field]:
    """Every top-level field of one message; raises on truncation or unknown wire types."""
    out: list[Field] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, what)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise DecodeError(f"{what}: field number 0")
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(buf, pos, what)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
            if pos + size > len(buf):
                raise DecodeError(f"{what}: truncated field {number}")
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        elif wire == _LEN:
            size, pos = _varint(buf, pos, what)
            if pos + size > len(buf):
                raise DecodeError(f"{what}: field {number} runs past the end ({size} bytes)")
            value = buf[pos : pos + size]
            pos += size
        else:
            raise DecodeError(f"{what}: unsupported wire type {wire} (field {number})")
        out.append((number, wire, value))
    return out


def _first(fields: list[Field], number: int, what: str) -> bytes | None:
    for num, wire, value in fields:
        if num == number:
            if not isinstance(value, bytes):
                raise DecodeError(f"{what}: field {number} has wire type {wire}, expected 2")
            return value
    return None


def _ip(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError(f"{what}: not ASCII: {_short(repr(raw))}") from None
    # ipaddress accepts IPv6 zone ids ("fe80::1%eth0"); an apiserver address has none.
    if "%" in text:
        raise DecodeError(f"{what}: {_short(text)!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise DecodeError(f"{what}: {_short(text)!r} is not an IP address") from None


# --------------------------------------------------------------------------- helpers
def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _json_type(value: object) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "an array"
        case _:
            return "an object"


def _capped(problems: list[str]) -> Iterator[str]:
    yield from problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        yield f"… and {len(problems) - MAX_PROBLEMS} more problems"
