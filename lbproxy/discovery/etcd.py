"""The etcd source: reads ``k3s/apiaddresses`` and the apiserver masterleases through
etcd's v3 JSON gateway (range, then watch) and reports each complete set to the pool.

Theory of operation
-------------------
Two followers run side by side, one per key space, each with its own revision:

* ``k3s/apiaddresses`` (one key, a JSON array of ``ip:port``) is reported as
  ``etcd:k3s/apiaddresses``;
* ``/registry/masterleases/<ip>`` (one key per live apiserver; the value holds no port,
  so ``default_port`` is used) is reported as ``etcd:masterleases``.

A follower ranges, reports the set, then watches from ``revision + 1`` with progress
notifications on. The gateway answers nothing until a request body is complete (it is
not full duplex over HTTP/1.1), so each watch is one POST with one ``create_request``.
It tracks the last revision it has seen (events' ``mod_revision``, progress
notifications' header revision) and after a disconnect resumes the watch from there,
so nothing written meanwhile is lost. A start revision that etcd has compacted away
(``compact_revision``), any other cancelled watch, or an etcd whose revision is behind
what was already seen (restored from a snapshot) means: range again.

While etcd cannot be reached nothing is reported (the pool keeps what it has) and the
follower retries with capped, jittered exponential backoff. A value that does not
decode is logged (``etcd.value_invalid``) and leaves the last good set in place.

Both followers share one ``Gateway``: the endpoint in use (tried in the configured
order, moving on when one fails) and the auth token (re-authenticated when etcd calls
it invalid).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import structlog

from lbproxy.config import EtcdConfig
from lbproxy.discovery.backoff import Backoff
from lbproxy.discovery.base import Emit
from lbproxy.discovery.decode import (
    MAX_ENDPOINTS,
    EventType,
    KeyValue,
    WatchEvent,
    b64encode,
    decode_apiaddresses,
    decode_masterlease,
    masterlease_ip,
    parse_error,
    parse_range,
    parse_token,
    parse_watch_line,
    prefix_range_end,
)
from lbproxy.errors import ConfigError, DecodeError, DiscoveryError, describe
from lbproxy.health.checks import make_ssl_context
from lbproxy.model import SOURCE_ETCD_APIADDRESSES, SOURCE_ETCD_MASTERLEASES, Endpoint
from lbproxy.pool.events import EndpointsDiscovered

log = structlog.get_logger("lbproxy.discovery.etcd")

# One watch message (a line) or one range answer larger than this is refused. etcd
# values are at most 1.5 MiB by default (2 MiB in base64); a message this large means
# something is wrong, and waiting for its end would hold unbounded memory.
MAX_MESSAGE: Final = 16 * 1024 * 1024
MAX_ERROR_BODY: Final = 64 * 1024
# A watch that receives nothing at all (no event, no progress notification) for this
# long is dropped and resumed: it guards against a frozen etcd that keeps the socket.
WATCH_IDLE_TIMEOUT: Final = 60.0
BACKOFF_BASE: Final = 0.1
# A watch counts as healthy (and resets the backoff) once it delivered a message after
# its creation, or stayed up this long.
STABLE_AFTER: Final = 5.0
# gRPC status codes that etcd's gateway puts in error bodies.
GRPC_INVALID_ARGUMENT: Final = 3
GRPC_UNAUTHENTICATED: Final = 16
_TOKEN_PROBLEMS: Final = ("invalid auth token", "user name is empty", "auth token")


class EtcdHttpError(DiscoveryError):
    """etcd answered a request with an error (a 4xx with a gateway error body)."""

    def __init__(self, status: int, code: int, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"HTTP {status}, code {code}: {message}")

    @property
    def token_problem(self) -> bool:
        """The token is missing, expired or unknown (simple tokens die with a restart)."""
        return self.code == GRPC_UNAUTHENTICATED or any(p in self.message for p in _TOKEN_PROBLEMS)


class AuthError(DiscoveryError):
    """Authentication itself failed: wrong user or password, unreadable password_file."""


class _Resync(Exception):
    """The watch cannot continue from the revision it has: range again (``now``: without
    waiting, as after a compaction)."""

    def __init__(self, reason: str, *, now: bool) -> None:
        super().__init__(reason)
        self.now = now


class Gateway:
    """POSTs to etcd's JSON gateway: endpoint fallback, error bodies and the auth token."""

    def __init__(self, cfg: EtcdConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        self.endpoints = [url.rstrip("/") for url in cfg.endpoints]
        self.current = 0
        self.token: str | None = None
        self._auth_lock = asyncio.Lock()

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.current]

    async def request(self, path: str, body: Mapping[str, Any]) -> bytes:
        """A unary call; returns the answer's body."""
        resp = await self._start(path, body, aiohttp.ClientTimeout(total=self.cfg.timeout))
        try:
            data = await _read_limited(resp, MAX_MESSAGE, "answer")
        except BaseException:
            resp.close()
            raise
        resp.release()  # read to the end: the connection can be reused
        return data

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, body: Mapping[str, Any], timeouts: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streamed answer (a watch), closed on exit: a watch never ends by itself."""
        resp = await self._start(path, body, timeouts)
        try:
            yield resp
        finally:
            # Abort rather than close: the connection is dropped anyway, and a TLS
            # close would wait for the peer's close_notify, which a stopping event
            # loop never sees (leaving the socket open).
            connection = resp.connection
            if connection is not None and connection.transport is not None:
                connection.transport.abort()
            resp.close()

    async def _start(
        self, path: str, body: Mapping[str, Any], timeouts: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """A 2xx answer, authenticating first (and once more on a rejected token)."""
        if self.cfg.username and self.token is None:
            await self.authenticate(stale=None)
        token = self.token
        try:
            return await self._open_any(path, body, timeouts, token)
        except EtcdHttpError as exc:
            if not (self.cfg.username and exc.token_problem):
                raise
            log.info("etcd.token_rejected", endpoint=self.endpoint, error=exc.message)
        await self.authenticate(stale=token)
        return await self._open_any(path, body, timeouts, self.token)

    def token_rejected(self, token: str | None) -> None:
        """A watch was refused for want of permission: the token may be stale."""
        if token is not None and self.token == token:
            self.token = None

    async def authenticate(self, *, stale: str | None) -> None:
        """Get a new token, unless another caller already replaced ``stale``."""
        async with self._auth_lock:
            if self.token is not None and self.token != stale:
                return
            self.token = None
            try:
                text = await asyncio.to_thread(
                    Path(self.cfg.password_file).read_text, encoding="utf-8"
                )
            except (OSError, UnicodeDecodeError) as exc:
                raise AuthError(
                    f"cannot read password_file {self.cfg.password_file}: {describe(exc)}"
                ) from None
            password = text.rstrip("\r\n")
            body = {"name": self.cfg.username, "password": password}
            timeout = aiohttp.ClientTimeout(total=self.cfg.timeout)
            try:
                resp = await self._open_any("/v3/auth/authenticate", body, timeout, None)
            except EtcdHttpError as exc:
                raise AuthError(f"etcd refused user {self.cfg.username!r}: {exc.message}") from None
            try:
                data = await _read_limited(resp, MAX_ERROR_BODY, "authenticate answer")
            finally:
                resp.close()
            self.token = parse_token(data)
            log.info("etcd.authenticated", endpoint=self.endpoint, user=self.cfg.username)

    async def _open_any(
        self,
        path: str,
        body: Mapping[str, Any],
        timeouts: aiohttp.ClientTimeout,
        token: str | None,
    ) -> aiohttp.ClientResponse:
        """Try the current endpoint, then the next ones in order, once each.

        Moves on when an endpoint cannot be reached, fails TLS, answers 5xx or answers
        something that is not etcd; an etcd error body (4xx) is the answer.
        """
        headers = {"Authorization": token} if token else {}
        failures: list[str] = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self.current + step) % count
            base = self.endpoints[index]
            try:
                resp = await self.session.post(
                    base + path, json=body, headers=headers, timeout=timeouts
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failures.append(f"{base}: {describe(exc)}")
                continue
            if resp.status < 300:
                self._select(index)
                return resp
            try:
                data = await _read_limited(resp, MAX_ERROR_BODY, "error answer")
            except (aiohttp.ClientError, TimeoutError, OSError, DiscoveryError) as exc:
                failures.append(f"{base}: HTTP {resp.status} ({describe(exc)})")
                continue
            finally:
                resp.close()
            error = parse_error(data)
            if error is not None and resp.status < 500:
                self._select(index)
                raise EtcdHttpError(resp.status, error.code, error.message)
            detail = error.message if error is not None else data[:120].decode("utf-8", "replace")
            failures.append(f"{base}: HTTP {resp.status} {detail.strip()}".rstrip())
        raise DiscoveryError("no etcd endpoint answered: " + "; ".join(failures))

    def _select(self, index: int) -> None:
        if index != self.current:
            log.info(
                "etcd.endpoint_selected",
                endpoint=self.endpoints[index],
                previous=self.endpoints[self.current],
            )
            self.current = index


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise DiscoveryError(f"{what} of {resp.content_length} bytes is over {limit}")
    buf = bytearray()
    async for chunk in resp.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise DiscoveryError(f"{what} is over {limit} bytes")
    return bytes(buf)


class MessageTooLong(DiscoveryError):
    """A watch message (line) exceeded MAX_MESSAGE bytes."""


async def split_lines(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """Newline-delimited messages from a byte stream.

    Done by hand rather than with StreamReader.readline, whose line limit is tied to
    the read buffer size (and differs between aiohttp versions). Raises
    MessageTooLong for a line over ``limit`` and DiscoveryError when the stream ends
    inside a line (a truncated stream).
    """
    buf = bytearray()
    async for chunk in chunks:
        scan = len(buf)
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", scan)) >= 0:
            if end - start > limit:
                raise MessageTooLong(f"watch message of {end - start} bytes, over {limit}")
            line = bytes(buf[start:end])
            start = scan = end + 1
            if line.strip():
                yield line
        if start:
            del buf[:start]
        if len(buf) > limit:
            raise MessageTooLong(f"watch message longer than {limit} bytes (no newline)")
    if buf.strip():
        raise DiscoveryError(f"stream ended inside a message ({len(buf)} bytes, truncated)")


# --------------------------------------------------------------------------- key spaces
class _KeySpace(Protocol):
    """What one follower watches and how its keys become endpoints."""

    source: str
    key: bytes
    range_end: bytes  # b"" for one key

    def load(self, kvs: Iterable[KeyValue]) -> None: ...

    def apply(self, event: WatchEvent) -> None: ...

    def current(self) -> frozenset[Endpoint] | None:
        """The set to report; None while nothing usable has been read."""
        ...


class ApiAddresses:
    """``k3s/apiaddresses``: a JSON array of ``ip:port``; ``""`` after a cluster reset."""

    source = SOURCE_ETCD_APIADDRESSES

    def __init__(self, key: str) -> None:
        self.key = key.encode()
        self.range_end = b""
        self._endpoints: frozenset[Endpoint] | None = None

    def load(self, kvs: Iterable[KeyValue]) -> None:
        found = [kv for kv in kvs if kv.key == self.key]
        if found:
            self._put(found[0])
        else:
            log.info("etcd.key_absent", etcd_key=self.key.decode(), source=self.source)
            self._endpoints = frozenset()

    def apply(self, event: WatchEvent) -> None:
        if event.kv.key != self.key:
            return
        if event.type is EventType.DELETE:
            log.info("etcd.key_deleted", etcd_key=self.key.decode(), source=self.source)
            self._endpoints = frozenset()
        else:
            self._put(event.kv)

    def current(self) -> frozenset[Endpoint] | None:
        return self._endpoints

    def _put(self, kv: KeyValue) -> None:
        name = self.key.decode()
        try:
            decoded = decode_apiaddresses(kv.value)
        except DecodeError as exc:
            log.warning(
                "etcd.value_invalid",
                etcd_key=name,
                revision=kv.mod_revision,
                error=str(exc),
                action="kept the last good set" if self._endpoints is not None else "skipped",
            )
            return
        for problem in decoded.problems:
            log.warning(
                "etcd.entry_skipped", etcd_key=name, revision=kv.mod_revision, error=problem
            )
        if not decoded.endpoints:
            log.info("etcd.value_empty", etcd_key=name, revision=kv.mod_revision)
        self._endpoints = decoded.endpoints


class MasterLeases:
    """``<prefix><ip>`` keys, one per live apiserver; the IP in the key name counts."""

    source = SOURCE_ETCD_MASTERLEASES

    def __init__(self, prefix: str, default_port: int) -> None:
        self.key = prefix.encode()
        self.range_end = prefix_range_end(self.key)
        self.port = default_port
        self._leases: dict[bytes, Endpoint] = {}
        self._loaded = False

    def load(self, kvs: Iterable[KeyValue]) -> None:
        self._leases = {}
        self._loaded = True
        for kv in kvs:
            self._put(kv)

    def apply(self, event: WatchEvent) -> None:
        if event.type is EventType.DELETE:
            self._leases.pop(event.kv.key, None)
        else:
            self._put(event.kv)

    def current(self) -> frozenset[Endpoint] | None:
        if not self._loaded:
            return None
        eps = sorted(set(self._leases.values()))
        if len(eps) > MAX_ENDPOINTS:
            log.warning(
                "etcd.endpoints_truncated",
                etcd_key=self.key.decode(),
                count=len(eps),
                limit=MAX_ENDPOINTS,
            )
            eps = eps[:MAX_ENDPOINTS]
        return frozenset(eps)

    def _put(self, kv: KeyValue) -> None:
        name = kv.key.decode("utf-8", "replace")
        try:
            ip = masterlease_ip(kv.key, self.key)
        except DecodeError as exc:
            log.warning("etcd.key_invalid", etcd_key=name, error=str(exc), action="skipped")
            self._leases.pop(kv.key, None)
            return
        try:
            value_ip = decode_masterlease(kv.value)
        except DecodeError as exc:
            log.warning(
                "etcd.value_invalid",
                etcd_key=name,
                revision=kv.mod_revision,
                error=str(exc),
                action="used the IP in the key",
            )
        else:
            if value_ip != ip:
                log.warning(
                    "etcd.masterlease_mismatch",
                    etcd_key=name,
                    key_ip=ip,
                    value_ip=value_ip,
                    action="used the IP in the key",
                )
        self._leases[kv.key] = Endpoint(ip, self.port)


# --------------------------------------------------------------------------- the source
class EtcdSource:
    """``[discovery.etcd]``: the apiaddresses and masterleases followers on one gateway."""

    name = "etcd"

    def __init__(
        self, cfg: EtcdConfig, default_port: int, *, rng: random.Random | None = None
    ) -> None:
        self.cfg = cfg
        self.default_port = default_port
        self._rng = rng or random.Random()
        # Counters by source name, for the admin view and tests: how often each
        # follower ranged, and how often it (re)started a watch.
        self.ranges: dict[str, int] = {}
        self.watches: dict[str, int] = {}

    async def run(self, emit: Emit) -> None:
        backoff = Backoff(self.cfg.backoff_max, base=BACKOFF_BASE, rng=self._rng)
        while True:
            try:
                ssl_ctx = self._ssl_context()
            except ConfigError as exc:
                delay = backoff.next()
                log.error("etcd.tls_invalid", error=str(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            break
        connector = aiohttp.TCPConnector(ssl=ssl_ctx if ssl_ctx is not None else True)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            gateway = Gateway(self.cfg, session)
            spaces: list[_KeySpace] = [
                ApiAddresses(self.cfg.apiaddresses_key),
                MasterLeases(self.cfg.masterleases_prefix, self.default_port),
            ]
            async with asyncio.TaskGroup() as tg:
                for space in spaces:
                    tg.create_task(self._follow(gateway, space, emit))

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not any(url.startswith("https://") for url in self.cfg.endpoints):
            return None
        return make_ssl_context(
            self.cfg.ca_file, self.cfg.cert_file, self.cfg.key_file, where="discovery.etcd"
        )

    async def _follow(self, gateway: Gateway, space: _KeySpace, emit: Emit) -> None:
        """Range, watch, resume; forever. Reports ``space``'s set whenever it changes."""
        follower = _Follower(space, gateway, emit, self)
        backoff = Backoff(self.cfg.backoff_max, base=BACKOFF_BASE, rng=self._rng)
        source = space.source
        while True:
            try:
                if follower.revision == 0:
                    await follower.range()
                await follower.watch(backoff)
            except _Resync as exc:
                log.info("etcd.resync", source=source, reason=str(exc))
                follower.revision = 0
                if exc.now:
                    continue
            except MessageTooLong as exc:
                # Skip the backlog that produced it: read the current state instead.
                log.error("etcd.watch_message_too_long", source=source, error=str(exc))
                follower.revision = 0
            except AuthError as exc:
                log.error("etcd.auth_failed", source=source, error=str(exc))
            except (DiscoveryError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                fields = {
                    "source": source,
                    "endpoint": gateway.endpoint,
                    "error": describe(exc),
                    "revision": follower.revision,
                }
                if backoff.attempts == 0:
                    # A healthy watch ended (etcd restarted, idle timeout): resume at
                    # once; it becomes a warning if resuming fails.
                    log.info("etcd.watch_interrupted", **fields)
                else:
                    log.warning("etcd.unavailable", **fields, action="kept the last known set")
            await asyncio.sleep(backoff.next())


class _Follower:
    """The range/watch state of one key space."""

    def __init__(self, space: _KeySpace, gateway: Gateway, emit: Emit, owner: EtcdSource):
        self.space = space
        self.gateway = gateway
        self.emit = emit
        self.owner = owner
        self.revision = 0  # the last revision fully seen; 0: range first
        self.reported: frozenset[Endpoint] | None = None

    def _range_body(self) -> dict[str, Any]:
        body = {"key": b64encode(self.space.key)}
        if self.space.range_end:
            body["range_end"] = b64encode(self.space.range_end)
        return body

    async def range(self) -> None:
        source = self.space.source
        data = await self.gateway.request("/v3/kv/range", self._range_body())
        try:
            result = parse_range(data)
        except DecodeError as exc:
            raise DiscoveryError(f"invalid range answer: {exc}") from None
        self.owner.ranges[source] = self.owner.ranges.get(source, 0) + 1
        self.space.load(result.kvs)
        self.revision = result.revision
        log.debug("etcd.ranged", source=source, revision=result.revision, kvs=len(result.kvs))
        self.report()

    async def watch(self, backoff: Backoff) -> None:
        """Watch from ``revision + 1`` until the stream ends (always by an exception)."""
        source = self.space.source
        request = {
            **self._range_body(),
            "start_revision": str(self.revision + 1),
            "progress_notify": True,
        }
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.gateway.cfg.timeout, sock_read=WATCH_IDLE_TIMEOUT
        )
        token = self.gateway.token
        started = time.monotonic()
        created = delivered = False
        try:
            body = {"create_request": request}
            async with self.gateway.stream("/v3/watch", body, timeout) as resp:
                async for line in split_lines(resp.content.iter_any(), MAX_MESSAGE):
                    try:
                        msg = parse_watch_line(line)
                    except DecodeError as exc:
                        raise DiscoveryError(f"invalid watch message: {exc}") from None
                    if msg.error:
                        if any(p in msg.error for p in _TOKEN_PROBLEMS):
                            self.gateway.token_rejected(token)
                        raise DiscoveryError(f"watch failed: {msg.error}")
                    if msg.compact_revision:
                        raise _Resync(
                            f"revision {self.revision + 1} was compacted"
                            f" (compact revision {msg.compact_revision})",
                            now=True,
                        )
                    if msg.canceled:
                        reason = msg.cancel_reason or "no reason given"
                        if "PermissionDenied" in reason or "auth" in reason:
                            # A simple token dies with an etcd restart, and a watch
                            # with a dead one is refused this way: get a new one.
                            self.gateway.token_rejected(token)
                            raise DiscoveryError(f"watch refused: {reason}")
                        raise _Resync(f"watch canceled: {reason}", now=False)
                    if 0 < msg.revision < self.revision:
                        # etcd is behind what this follower has seen: restored from a
                        # snapshot or replaced. A watch from our revision would wait
                        # for a future that never comes.
                        raise _Resync(
                            f"etcd is at revision {msg.revision},"
                            f" behind the {self.revision} already seen",
                            now=True,
                        )
                    if msg.created:
                        created = True
                        self.owner.watches[source] = self.owner.watches.get(source, 0) + 1
                        log.debug("etcd.watching", source=source, start=self.revision + 1)
                        continue
                    delivered = True
                    if msg.events:
                        for event in msg.events:
                            self.space.apply(event)
                            self.revision = max(self.revision, event.kv.mod_revision)
                        self.report()
                    else:
                        # Progress notification: every event up to here has been sent.
                        self.revision = max(self.revision, msg.revision)
        finally:
            if created and (delivered or time.monotonic() - started >= STABLE_AFTER):
                backoff.reset()
        raise DiscoveryError("watch stream closed by etcd")

    def report(self) -> None:
        current = self.space.current()
        if current is None or current == self.reported:
            return
        self.reported = current
        log.info(
            "etcd.endpoints_changed",
            source=self.space.source,
            revision=self.revision,
            endpoints=sorted(str(ep) for ep in current)[:20],
            count=len(current),
        )
        self.emit(EndpointsDiscovered(self.space.source, current))
