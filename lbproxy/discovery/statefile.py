"""The state file: the known endpoints, written atomically and read back at start."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from lbproxy.errors import DiscoveryError
from lbproxy.model import Endpoint, parse_hostport
from lbproxy.pool.events import KnownEndpoint
from lbproxy.pool.states import State

FORMAT_VERSION = 1


def encode(known: tuple[KnownEndpoint, ...], *, wall_offset: float) -> bytes:
    """JSON for the file; pool times are turned into wall-clock seconds with the offset."""
    doc = {
        "version": FORMAT_VERSION,
        "endpoints": [
            {
                "address": k.endpoint.host,
                "port": k.endpoint.port,
                "sources": sorted(k.sources),
                "state": k.state.value,
                "confirmed_apiserver": k.confirmed_apiserver,
                "last_success": (
                    None if k.last_success_at is None else round(k.last_success_at + wall_offset, 3)
                ),
            }
            for k in known
        ],
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def _entry(item: Any, wall_offset: float, where: str) -> KnownEndpoint:
    if not isinstance(item, dict):
        raise DiscoveryError(f"{where}: expected an object")
    address, port = item.get("address"), item.get("port")
    if not isinstance(address, str) or not isinstance(port, int) or isinstance(port, bool):
        raise DiscoveryError(f"{where}: needs string 'address' and integer 'port'")
    try:
        ep = parse_hostport(f"[{address}]" if ":" in address else address, port)
        ep = Endpoint(ep.host, port)
        if not 1 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
    except ValueError as exc:
        raise DiscoveryError(f"{where}: {exc}") from None
    sources = item.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise DiscoveryError(f"{where}.sources: expected a list of strings")
    try:
        state = State(item.get("state", State.UNCHECKED.value))
    except ValueError:
        raise DiscoveryError(f"{where}.state: unknown state {item.get('state')!r}") from None
    last = item.get("last_success")
    if last is not None and (not isinstance(last, int | float) or isinstance(last, bool)):
        raise DiscoveryError(f"{where}.last_success: expected a number or null")
    if isinstance(last, float) and not math.isfinite(last):
        raise DiscoveryError(f"{where}.last_success: must be a finite number")
    try:
        last_at = None if last is None else float(last) - wall_offset
    except OverflowError:  # an integer beyond float range
        raise DiscoveryError(f"{where}.last_success: out of range") from None
    return KnownEndpoint(
        endpoint=ep,
        sources=frozenset(sources),
        state=state,
        confirmed_apiserver=bool(item.get("confirmed_apiserver", False)),
        last_success_at=last_at,
    )


def decode(raw: bytes, *, wall_offset: float) -> tuple[tuple[KnownEndpoint, ...], list[str]]:
    """Parse the file. A broken document raises DiscoveryError; a broken entry is skipped
    and reported in the returned problem list, so one bad line does not lose the rest."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integers past Python's
        # digit limit; RecursionError comes from deeply nested arrays.
        raise DiscoveryError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        raise DiscoveryError("expected an object with an 'endpoints' list")
    if doc.get("version") != FORMAT_VERSION:
        raise DiscoveryError(f"unsupported version {doc.get('version')!r}")
    known: list[KnownEndpoint] = []
    problems: list[str] = []
    for i, item in enumerate(doc["endpoints"]):
        try:
            known.append(_entry(item, wall_offset, f"endpoints[{i}]"))
        except DiscoveryError as exc:
            problems.append(str(exc))
    return tuple(known), problems


def read(path: Path, *, wall_offset: float) -> tuple[tuple[KnownEndpoint, ...], list[str]]:
    """Read the file; a missing file is an empty list, unreadable raises DiscoveryError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return (), []
    except OSError as exc:
        raise DiscoveryError(f"cannot read: {exc.strerror}") from None
    return decode(raw, wall_offset=wall_offset)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename: a reader sees old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
