"""The Kubernetes source: lists, then watches, the apiserver Service's EndpointSlices (or
its core/v1 Endpoints) and reports the ready addresses as one set to the pool.

Where it connects
-----------------
On a k3s etcd-only node the kubeconfig's server is k3s's local load balancer, which may
be lbproxy itself: discovering through it would make lbproxy depend on its own pool. So
the source dials a healthy apiserver from the pool directly (``PoolView``), verifies
its certificate against ``server_name`` ("kubernetes" is on every apiserver's cert;
empty means the endpoint's address), sticks to it while it works and rotates to the
next on failure. Only while the pool has no healthy apiserver does it use the
kubeconfig's server (verified as kubectl would: ``tls-server-name``, else the URL's
host), and never when that is one of lbproxy's own listen addresses; then it waits for
the prober instead, and a watch on the kubeconfig's server moves to a pool endpoint as
soon as one is healthy. A watch also moves when its endpoint leaves the healthy set, so
a frozen apiserver is left as soon as the prober fails it.

List, then watch
----------------
LIST gives the objects and a resourceVersion; WATCH from it streams one JSON event per
line. Events and bookmarks move the resourceVersion on; a stream that ends (the
server's ``timeoutSeconds``) or is cut resumes from it. 410 Expired (as the HTTP
status or an ERROR event inside the stream) means re-LIST; any other error backs off
with jitter, then re-LISTs. The set is reported after the first LIST and then only
when it changes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog
from yarl import URL

from lbproxy import __version__
from lbproxy.config import KubernetesConfig
from lbproxy.discovery.backoff import Backoff
from lbproxy.discovery.base import Emit, PoolView
from lbproxy.discovery.k8s_decode import (
    MAX_ENDPOINTS,
    Decoded,
    cap,
    decode_endpoints,
    decode_event_line,
    decode_json,
    decode_list,
    decode_slice,
    object_name,
    resource_version,
    status_code,
    status_message,
)
from lbproxy.discovery.kubeconfig import Kubeconfig, load_kubeconfig, read_token_file
from lbproxy.errors import ConfigError, DecodeError, LbproxyError, describe
from lbproxy.model import SOURCE_KUBERNETES, Endpoint
from lbproxy.pool.events import EndpointsDiscovered

log = structlog.get_logger("lbproxy")

SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
SLICES: Final = "endpointslices"
ENDPOINTS: Final = "endpoints"
BACKOFF_START: Final = 0.2  # seconds; doubles per consecutive failure up to backoff_max
WAIT_FOR_POOL: Final = 0.5  # how often to look for a healthy apiserver while none is
POOL_CHECK_INTERVAL: Final = 0.5  # how often a running watch checks its endpoint is healthy
QUICK_END: Final = 0.5  # an empty watch stream that ends sooner than this is a failure
MAX_LINE: Final = 16 * 1024 * 1024  # one watch event
MAX_BODY: Final = 64 * 1024 * 1024  # one list answer
ERROR_SNIPPET: Final = 300
_DNS_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class _Failure(Exception):
    """This attempt failed; back off, then go on as ``relist`` says."""

    def __init__(
        self, message: str, *, relist: bool, rotate: bool = True, resume_at_once: bool = False
    ) -> None:
        super().__init__(message)
        self.relist = relist
        self.rotate = rotate
        self.resume_at_once = resume_at_once


class _Expired(Exception):
    """410: the resourceVersion is too old; LIST again."""


class _Moved(Exception):
    """A better endpoint is available (or ours stopped being healthy): resume there."""


@dataclass(frozen=True, slots=True)
class _Target:
    base: URL  # scheme, host, port and any path prefix
    server_hostname: str | None
    endpoint: Endpoint | None  # None: the kubeconfig's server (the fallback)

    def __str__(self) -> str:
        return str(self.endpoint) if self.endpoint is not None else str(self.base)


def is_own_address(host: str, port: int, own: Iterable[Endpoint]) -> bool:
    """True when ``host:port`` is (or may be) one of lbproxy's own listeners.

    A wildcard listener (0.0.0.0 or ::) counts for every host on its port: its
    addresses are this machine's, and refusing a fallback is the safe error.
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for ep in own:
        if ep.port != port:
            continue
        try:
            mine = ipaddress.ip_address(ep.host)
        except ValueError:
            if ep.host.lower() == host.lower():
                return True
            continue
        if mine.is_unspecified:
            return True
        if ip is not None and ip == mine:
            return True
        if ip is None and host.lower().rstrip(".") == "localhost" and mine.is_loopback:
            return True
    return False


class KubernetesSource:
    """``[discovery.kubernetes]``: a long-running list-then-watch client."""

    name = SOURCE_KUBERNETES

    def __init__(
        self,
        cfg: KubernetesConfig,
        kubeconfig: Kubeconfig,
        pool: PoolView,
        own_addresses: Callable[[], Iterable[Endpoint]] = lambda: (),
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.kubeconfig = kubeconfig
        self.pool = pool
        self.own_addresses = own_addresses
        self.rng = rng or random.Random()
        self.resource = SLICES
        self.resource_version: str | None = None
        self.objects: dict[str, frozenset[Endpoint]] = {}
        self.reported: frozenset[Endpoint] | None = None
        self._emit: Emit | None = None
        self._token = kubeconfig.token
        self._current: Endpoint | None = None
        self._avoid: set[Endpoint] = set()
        self._waiting = False
        self._progress = False
        self._capped_logged = 0
        self._connected_to: str | None = None

    @classmethod
    def from_config(
        cls,
        cfg: KubernetesConfig,
        pool: PoolView,
        own_addresses: Callable[[], Iterable[Endpoint]] = lambda: (),
    ) -> KubernetesSource:
        """Build the source, reading the kubeconfig now: ConfigError if it is unusable."""
        for key, value in (("namespace", cfg.namespace), ("service", cfg.service)):
            if not _DNS_LABEL.fullmatch(value):
                raise ConfigError.single(
                    f"discovery.kubernetes.{key}", f"must be a DNS label, got {value!r}"
                )
        return cls(cfg, load_kubeconfig(cfg.kubeconfig), pool, own_addresses)

    # ------------------------------------------------------------------ requests

    def _path(self) -> str:
        ns = self.cfg.namespace
        if self.resource == SLICES:
            return f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
        return f"/api/v1/namespaces/{ns}/endpoints"

    def _selector(self) -> dict[str, str]:
        if self.resource == SLICES:
            return {"labelSelector": f"{SERVICE_NAME_LABEL}={self.cfg.service}"}
        return {"fieldSelector": f"metadata.name={self.cfg.service}"}

    async def _headers(self) -> dict[str, str]:
        token_file = self.kubeconfig.token_file
        if token_file is not None:
            # Projected service-account tokens rotate: read the file for each request.
            try:
                self._token = await asyncio.to_thread(read_token_file, token_file)
            except ConfigError as exc:
                log.warning("kubernetes.token_unreadable", path=token_file, error=str(exc))
        headers = {"Accept": "application/json", "User-Agent": f"lbproxy/{__version__}"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    # ------------------------------------------------------------------ where to connect

    def _own(self) -> list[Endpoint]:
        return list(self.own_addresses())

    def _healthy(self) -> list[Endpoint]:
        own = self._own()
        return [
            ep for ep in self.pool.healthy_apiservers() if not is_own_address(ep.host, ep.port, own)
        ]

    def _fallback_allowed(self) -> bool:
        kc = self.kubeconfig
        return not is_own_address(kc.host, kc.port, self._own())

    def _server_name(self, host: str) -> str:
        return self.cfg.server_name or self.kubeconfig.tls_server_name or host

    def _choose(self) -> _Target | None:
        healthy = self._healthy()
        if healthy:
            if self._current in healthy:
                ep = self._current
            else:
                fresh = [e for e in healthy if e not in self._avoid]
                if not fresh:
                    self._avoid.clear()
                    fresh = healthy
                ep = fresh[0]
            assert ep is not None
            base = URL.build(scheme="https", host=ep.host, port=ep.port)
            return _Target(base, self._server_name(ep.host), ep)
        if self._fallback_allowed():
            kc = self.kubeconfig
            base = URL.build(scheme=kc.scheme, host=kc.host, port=kc.port, path=kc.base_path)
            name = (self.kubeconfig.tls_server_name or kc.host) if kc.scheme == "https" else None
            return _Target(base, name, None)
        return None

    async def _target(self) -> _Target:
        while (target := self._choose()) is None:
            if not self._waiting:
                self._waiting = True
                log.info(
                    "kubernetes.waiting",
                    reason="no healthy apiserver in the pool yet, and the kubeconfig's "
                    "server is lbproxy's own listener",
                    server=self.kubeconfig.server,
                )
            await asyncio.sleep(WAIT_FOR_POOL)
        self._waiting = False
        return target

    def _failed(self, target: _Target) -> None:
        if target.endpoint is not None:
            self._avoid.add(target.endpoint)
            if self._current == target.endpoint:
                self._current = None

    def _connected(self, target: _Target) -> None:
        where = str(target)
        if where != self._connected_to:
            log.info("kubernetes.connected", server=where, resource=self.resource)
            self._connected_to = where
        self._current = target.endpoint
        if target.endpoint is not None:
            self._avoid.discard(target.endpoint)

    def _leave_reason(self, target: _Target) -> str | None:
        """Why a running watch on ``target`` should move elsewhere, if it should."""
        healthy = self._healthy()
        if target.endpoint is None:
            return "a healthy apiserver is in the pool" if healthy else None
        if target.endpoint not in healthy:
            return "the endpoint is no longer a healthy apiserver"
        return None

    # ------------------------------------------------------------------ main loop

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        backoff = Backoff(self.cfg.backoff_max, base=BACKOFF_START, rng=self.rng)
        relist = True
        connector = aiohttp.TCPConnector(ssl=self.kubeconfig.ssl_context, limit=4)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            while True:
                target = await self._target()
                self._progress = False
                try:
                    if relist:
                        await self._list(session, target)
                        relist = False
                    await self._watch(session, target)
                except _Expired as exc:
                    relist = True
                    if self._progress:
                        backoff.reset()
                    delay = backoff.next()
                    # The first 410 in a row re-lists at once; repeats back off.
                    log.info(
                        "kubernetes.expired",
                        server=str(target),
                        error=str(exc),
                        retry_in=round(delay, 3) if backoff.attempts > 1 else 0,
                    )
                    if backoff.attempts > 1:
                        await asyncio.sleep(delay)
                    continue
                except _Moved as exc:
                    log.info("kubernetes.moving", server=str(target), reason=str(exc))
                    self._current = None
                    continue
                except _Failure as exc:
                    relist = relist or exc.relist
                    if self._progress:
                        backoff.reset()
                    if exc.rotate:
                        self._failed(target)
                    delay = backoff.next()
                    # A stream cut after progress resumes at once; repeats back off.
                    if exc.resume_at_once and backoff.attempts == 1:
                        delay = 0.0
                    log.warning(
                        "kubernetes.request_failed",
                        server=str(target),
                        resource=self.resource,
                        error=str(exc),
                        retry_in=round(delay, 3),
                        relist=relist,
                    )
                    await asyncio.sleep(delay)
                    continue
                # The stream ended normally (timeoutSeconds): resume from resourceVersion.
                backoff.reset()
                log.debug("kubernetes.watch_ended", server=str(target), rv=self.resource_version)

    # ------------------------------------------------------------------ LIST

    async def _get(
        self, session: aiohttp.ClientSession, target: _Target, params: Mapping[str, str]
    ) -> tuple[int, bytes]:
        url = target.base.with_path(target.base.path.rstrip("/") + self._path()).with_query(params)
        try:
            async with session.get(
                url,
                headers=await self._headers(),
                server_hostname=target.server_hostname,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            ) as resp:
                body = await _read_capped(resp, MAX_BODY)
                return resp.status, body
        except (aiohttp.ClientError, TimeoutError, OSError, LbproxyError) as exc:
            raise _Failure(f"LIST {self.resource}: {_describe_error(exc)}", relist=True) from None

    async def _list(self, session: aiohttp.ClientSession, target: _Target) -> None:
        self.resource = SLICES
        status, body = await self._get(session, target, self._selector())
        if status in (403, 404):
            # Not served (before discovery.k8s.io/v1) or not allowed: core/v1 Endpoints
            # carry the same addresses.
            log.info(
                "kubernetes.slices_unavailable",
                server=str(target),
                status=status,
                fallback="core/v1 endpoints",
            )
            self.resource = ENDPOINTS
            status, body = await self._get(session, target, self._selector())
        if status != 200:
            raise _Failure(f"LIST {self.resource}: {_http_error(status, body)}", relist=True)
        try:
            answer = decode_list(decode_json(body))
        except DecodeError as exc:
            raise _Failure(f"LIST {self.resource}: {exc}", relist=True) from None
        self._connected(target)
        objects: dict[str, frozenset[Endpoint]] = {}
        for item in answer.items:
            decoded = self._decode(item)
            if decoded is not None:
                objects[decoded.name] = decoded.endpoints
        first = self.reported is None
        self.objects = objects
        self.resource_version = answer.resource_version
        log.debug(
            "kubernetes.listed",
            server=str(target),
            resource=self.resource,
            objects=len(objects),
            rv=answer.resource_version,
        )
        self._publish(force=first)

    # ------------------------------------------------------------------ WATCH

    async def _watch(self, session: aiohttp.ClientSession, target: _Target) -> None:
        stream = asyncio.create_task(self._stream(session, target))
        try:
            while True:
                done, _ = await asyncio.wait({stream}, timeout=POOL_CHECK_INTERVAL)
                if done:
                    return stream.result()
                reason = self._leave_reason(target)
                if reason is not None:
                    raise _Moved(reason)
        finally:
            # Also when this task is cancelled just as the stream failed: collect the
            # stream's outcome so that nothing is left unretrieved.
            stream.cancel()
            await asyncio.gather(stream, return_exceptions=True)

    async def _stream(self, session: aiohttp.ClientSession, target: _Target) -> None:
        assert self.resource_version is not None
        params = {
            **self._selector(),
            "watch": "1",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.cfg.watch_timeout),
        }
        url = target.base.with_path(target.base.path.rstrip("/") + self._path()).with_query(params)
        # The server ends the stream after timeoutSeconds; silence well past that means
        # a frozen server or a dead path.
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.cfg.timeout,
            sock_read=self.cfg.watch_timeout + max(self.cfg.timeout, 5.0),
        )
        buffer = bytearray()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with session.get(
                url,
                headers=await self._headers(),
                server_hostname=target.server_hostname,
                timeout=timeout,
            ) as resp:
                if resp.status == 410:
                    raise _Expired(_http_error(410, await _read_capped(resp, ERROR_SNIPPET * 4)))
                if resp.status != 200:
                    body = await _read_capped(resp, ERROR_SNIPPET * 4)
                    raise _Failure(
                        f"WATCH {self.resource}: {_http_error(resp.status, body)}", relist=True
                    )
                self._connected(target)
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    start = 0
                    while (end := buffer.find(b"\n", start)) >= 0:
                        line = bytes(buffer[start:end])
                        start = end + 1
                        if line.strip():
                            self._handle_line(line)
                    if start:
                        del buffer[:start]
                    if len(buffer) > MAX_LINE:
                        raise _Failure(f"watch event longer than {MAX_LINE} bytes", relist=True)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if buffer.strip():
                log.info("kubernetes.partial_line_discarded", server=str(target), size=len(buffer))
            # Cut, reset or silent: the resourceVersion is still good, so resume the
            # watch (elsewhere, if there is another apiserver) without a LIST.
            raise _Failure(
                f"WATCH {self.resource}: {_describe_error(exc)}",
                relist=False,
                resume_at_once=self._progress,
            ) from None
        if buffer.strip():
            log.info("kubernetes.partial_line_discarded", server=str(target), size=len(buffer))
        if not self._progress and loop.time() - started < QUICK_END:
            # An empty stream that ended at once is not the server's timeoutSeconds:
            # back off rather than spin.
            raise _Failure(f"WATCH {self.resource}: the stream ended at once", relist=False)

    def _handle_line(self, line: bytes) -> None:
        try:
            event = decode_event_line(line)
        except DecodeError as exc:
            log.warning(
                "kubernetes.line_skipped",
                error=str(exc),
                line=line[:200].decode("utf-8", "replace"),
            )
            return
        self._progress = True
        obj = event.object
        if event.type == "ERROR":
            code = status_code(obj)
            message = status_message(obj)
            if code == 410:
                raise _Expired(f"ERROR event 410: {message}")
            raise _Failure(f"ERROR event {code}: {message}", relist=True, rotate=False)
        rv = resource_version(obj)
        if event.type == "BOOKMARK":
            if rv is not None:
                self.resource_version = rv
            return
        if event.type == "DELETED":
            name = object_name(obj)
            if not name:
                log.warning("kubernetes.object_skipped", object="", error="DELETED without a name")
            else:
                self.objects.pop(name, None)
        else:
            decoded = self._decode(obj)
            if decoded is not None:
                self.objects[decoded.name] = decoded.endpoints
        if rv is not None:
            self.resource_version = rv
        self._publish(force=False)

    # ------------------------------------------------------------------ decoding and reporting

    def _decode(self, obj: Any) -> Decoded | None:
        """Decode one object; anything unusable is logged and left out."""
        decoder = decode_slice if self.resource == SLICES else decode_endpoints
        try:
            decoded = decoder(obj)
        except DecodeError as exc:
            log.warning(
                "kubernetes.object_skipped",
                resource=self.resource,
                object=object_name(obj),
                error=str(exc),
            )
            return None
        if self.resource == ENDPOINTS and decoded.name != self.cfg.service:
            return None
        for problem in decoded.skipped:
            log.warning(
                "kubernetes.endpoint_skipped",
                resource=self.resource,
                object=decoded.name,
                error=problem,
            )
        return decoded

    def _publish(self, *, force: bool) -> None:
        union: set[Endpoint] = set()
        for eps in self.objects.values():
            union |= eps
        endpoints, dropped = cap(union, MAX_ENDPOINTS)
        if dropped and dropped != self._capped_logged:
            log.warning(
                "kubernetes.endpoints_capped",
                limit=MAX_ENDPOINTS,
                dropped=dropped,
                total=len(union),
            )
        self._capped_logged = dropped
        if not force and endpoints == self.reported:
            return
        self.reported = endpoints
        log.info(
            "kubernetes.discovered",
            resource=self.resource,
            endpoints=sorted(str(e) for e in endpoints),
        )
        assert self._emit is not None
        self._emit(EndpointsDiscovered(SOURCE_KUBERNETES, endpoints))


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            if limit >= MAX_BODY:
                raise DecodeError(f"answer larger than {limit} bytes")
            break
    return bytes(body[:limit])


def _http_error(status: int, body: bytes) -> str:
    """``HTTP 500: InternalError: ...`` from a Status body when there is one."""
    detail = ""
    try:
        doc = decode_json(body)
    except DecodeError:
        detail = body[:ERROR_SNIPPET].decode("utf-8", "replace").strip()
    else:
        if isinstance(doc, dict):
            detail = status_message(doc)
    return f"HTTP {status}: {detail}" if detail else f"HTTP {status}"


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return describe(exc.os_error)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "stream cut"
    return describe(exc)
