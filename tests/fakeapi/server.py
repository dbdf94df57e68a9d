"""A protocol-faithful fake kube-apiserver (and k3s etcd-only supervisor) for tests.

It listens on a real socket with real TLS and speaks the parts of the Kubernetes API
that lbproxy's discovery and health probing use:

* authentication: client certificate (CN = user) or ``Authorization: Bearer``; anything
  else gets the 401 ``Status`` kube-apiserver sends with ``--anonymous-auth=false``;
* ``/readyz``, ``/livez``, ``/healthz``, ``/version`` and enough discovery (``/api``,
  ``/apis``, ``/api/v1``, ``/apis/discovery.k8s.io/v1``) for ``kubectl``;
* list / get / watch of ``discovery.k8s.io/v1`` EndpointSlices and ``v1`` Endpoints with
  label and field selectors, one global integer resourceVersion, a bounded event history,
  watch bookmarks, ``timeoutSeconds`` and the 410 ``Expired`` error event;
* server-side printing (``Accept: application/json;as=Table;v=v1;g=meta.k8s.io``), so
  ``kubectl get`` shows the same columns as against a real cluster;
* ``mode="etcd-only"``: the k3s supervisor on a node started with
  ``--disable-apiserver``: ``/ping`` and ``/cacerts`` answer, everything else is
  ``503 apiserver disabled``;
* fault switches: injected HTTP errors or connection resets, unserved EndpointSlice API,
  cut or expired watch streams, a frozen server, latency.

Everything runs on the event loop of the test; the mutation methods are plain
(synchronous) methods and must be called from that loop's thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ipaddress
import json
import math
import re
import shutil
import ssl
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import trustme
from aiohttp import web

from .certs import ApiCertificates, ClientCertFiles, issue_client_cert

__all__ = [
    "DEFAULT_GIT_VERSION",
    "ENDPOINTS",
    "ENDPOINT_SLICES",
    "SERVICE_NAME_LABEL",
    "SKIP_MIRROR_LABEL",
    "FakeApiServer",
    "LabelSelectorError",
    "RequestRecord",
    "Resource",
    "make_kubeconfig",
    "parse_label_selector",
    "status_body",
]

JSON = dict[str, Any]
Mode = Literal["apiserver", "etcd-only"]
ReadyValue = bool | None | Mapping[str, bool | None]

DEFAULT_GIT_VERSION = "v1.31.4+k3s1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SKIP_MIRROR_LABEL = "endpointslice.kubernetes.io/skip-mirror"
APISERVER_DISABLED = "apiserver disabled"

_JSON_CT = "application/json"
_TEXT_CT = "text/plain; charset=utf-8"


# --------------------------------------------------------------------------------------------
# resources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One served, namespaced resource type."""

    plural: str
    singular: str
    kind: str
    group: str  # "" for the core group
    version: str
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def qualified_name(self) -> str:
        """``endpoints`` or ``endpointslices.discovery.k8s.io`` (as in error messages)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


ENDPOINTS = Resource("endpoints", "endpoints", "Endpoints", "", "v1", ("ep",))
ENDPOINT_SLICES = Resource(
    "endpointslices", "endpointslice", "EndpointSlice", "discovery.k8s.io", "v1"
)
_RESOURCES = (ENDPOINTS, ENDPOINT_SLICES)
_SUPPORTED_FIELDS = frozenset({"metadata.name", "metadata.namespace"})

_CORE_PATH = re.compile(r"^/api/v1(?:/namespaces/(?P<ns>[^/]+))?/endpoints(?:/(?P<name>[^/]+))?/?$")
_SLICE_PATH = re.compile(
    r"^/apis/discovery\.k8s\.io/v1(?:/namespaces/(?P<ns>[^/]+))?/endpointslices"
    r"(?:/(?P<name>[^/]+))?/?$"
)


# --------------------------------------------------------------------------------------------
# Status bodies
# --------------------------------------------------------------------------------------------

_REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
_MESSAGES: dict[int, str] = {
    400: "the server rejected our request for an unknown reason",
    401: "Unauthorized",
    403: "forbidden: fakeapi injected fault",
    404: "the server could not find the requested resource",
    405: "the server does not allow this method on the requested resource",
    410: "The resourceVersion for the provided list is too old.",
    429: "Too many requests, please try again later.",
    500: "Internal error occurred: fakeapi injected fault",
    503: "the server is currently unable to handle the request",
    504: ("Timeout: request did not complete within the allotted timeout"),
}


def status_body(
    code: int,
    message: str | None = None,
    *,
    reason: str | None = None,
    details: JSON | None = None,
) -> JSON:
    """A ``v1 Status`` failure object, field order as kube-apiserver writes it."""
    body: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message if message is not None else _MESSAGES.get(code, f"HTTP {code}"),
    }
    reason = reason if reason is not None else _REASONS.get(code, "")
    if reason:
        body["reason"] = reason
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_go_bool(text: str) -> bool:
    """``strconv.ParseBool`` semantics (anything unknown is False here)."""
    return text in ("1", "t", "T", "true", "TRUE", "True")


# --------------------------------------------------------------------------------------------
# selectors
# --------------------------------------------------------------------------------------------


class LabelSelectorError(ValueError):
    """The selector string does not parse."""


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: Literal["=", "!=", "in", "notin", "exists", "!"]
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present  # "!"


_KEY = r"[A-Za-z0-9][A-Za-z0-9._/-]*"
_VALUE = r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)?"
_RE_NOT_EXISTS = re.compile(rf"^!\s*({_KEY})$")
_RE_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s*\((.*)\)$")
_RE_EQ = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_RE_EXISTS = re.compile(rf"^({_KEY})$")


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def parse_label_selector(text: str) -> list[_Requirement]:
    """Parse a label selector (``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``,
    ``a``, ``!a``; comma = AND). Raises :class:`LabelSelectorError`."""
    reqs: list[_Requirement] = []
    if not text.strip():
        return reqs
    for raw in _split_top_level(text):
        term = raw.strip()
        if m := _RE_NOT_EXISTS.match(term):
            reqs.append(_Requirement(m.group(1), "!", frozenset()))
        elif m := _RE_SET.match(term):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            op: Literal["in", "notin"] = "in" if m.group(2) == "in" else "notin"
            reqs.append(_Requirement(m.group(1), op, values))
        elif m := _RE_EQ.match(term):
            eq: Literal["=", "!="] = "!=" if m.group(2) == "!=" else "="
            reqs.append(_Requirement(m.group(1), eq, frozenset({m.group(3)})))
        elif m := _RE_EXISTS.match(term):
            reqs.append(_Requirement(m.group(1), "exists", frozenset()))
        else:
            raise LabelSelectorError(f"unable to parse requirement: {term!r}")
    return reqs


@dataclass(frozen=True)
class _FieldTerm:
    key: str
    negate: bool
    value: str


def _parse_field_selector(text: str) -> list[_FieldTerm]:
    terms: list[_FieldTerm] = []
    if not text.strip():
        return terms
    for raw in text.split(","):
        m = re.match(r"^\s*([A-Za-z0-9._-]+)\s*(==|=|!=)\s*(.*?)\s*$", raw)
        if m is None:
            raise LabelSelectorError(f"invalid selector: '{text}'; can't understand '{raw}'")
        if m.group(1) not in _SUPPORTED_FIELDS:
            raise LabelSelectorError(f"field label not supported: {m.group(1)}")
        terms.append(_FieldTerm(m.group(1), m.group(2) == "!=", m.group(3)))
    return terms


# --------------------------------------------------------------------------------------------
# request log, faults, watchers
# --------------------------------------------------------------------------------------------


class RequestRecord(NamedTuple):
    """One HTTP request as the fake saw it (compares equal to a plain 3-tuple)."""

    method: str
    path_qs: str
    authenticated_as: str | None


@dataclass
class _Fault:
    remaining: int
    status: int
    verbs: frozenset[str] | None  # list / watch / get; None = any resource request
    path_prefix: str | None
    message: str | None
    retry_after: int | None


@dataclass
class _HistoryEvent:
    rv: int
    resource: Resource
    type: str
    obj: JSON
    old: JSON | None


_WatchItem = tuple[str, Any]


class _Watcher:
    def __init__(
        self,
        resource: Resource,
        namespace: str | None,
        labels: list[_Requirement],
        fields: list[_FieldTerm],
        allow_bookmarks: bool,
        start_rv: str,
    ) -> None:
        self.resource = resource
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.allow_bookmarks = allow_bookmarks
        self.start_rv = start_rv
        self.last_rv = start_rv
        self._items: deque[_WatchItem] = deque()
        self.signal = asyncio.Event()

    def put(self, kind: str, payload: Any = None) -> None:
        self._items.append((kind, payload))
        self.signal.set()

    def pop(self, *, urgent_only: bool = False) -> _WatchItem | None:
        """Next item; with ``urgent_only`` only a pending cut/close (others stay queued)."""
        if not urgent_only:
            return self._items.popleft() if self._items else None
        for item in self._items:
            if item[0] in ("cut", "close"):
                self._items.remove(item)
                return item
        return None

    def matches(self, obj: JSON) -> bool:
        return _object_matches(obj, self.namespace, self.labels, self.fields)

    def translate(self, ev: _HistoryEvent) -> tuple[str, JSON] | None:
        """Turn a stored event into what this watcher sees (like the watch cache does)."""
        if ev.resource is not self.resource:
            return None
        new_ok = self.matches(ev.obj)
        if ev.type in ("ADDED", "DELETED"):
            return (ev.type, ev.obj) if new_ok else None
        old_ok = ev.old is not None and self.matches(ev.old)
        if new_ok and old_ok:
            return ("MODIFIED", ev.obj)
        if new_ok:
            return ("ADDED", ev.obj)
        if old_ok and ev.old is not None:
            gone = copy.deepcopy(ev.old)
            gone.setdefault("metadata", {})["resourceVersion"] = str(ev.rv)
            return ("DELETED", gone)
        return None


def _meta(obj: JSON) -> JSON:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _object_matches(
    obj: JSON, namespace: str | None, labels: list[_Requirement], fields: list[_FieldTerm]
) -> bool:
    meta = _meta(obj)
    if namespace is not None and meta.get("namespace") != namespace:
        return False
    obj_labels = meta.get("labels") or {}
    if not all(req.matches(obj_labels) for req in labels):
        return False
    for term in fields:
        actual = meta.get("name" if term.key == "metadata.name" else "namespace", "")
        if (actual == term.value) == term.negate:
            return False
    return True


# --------------------------------------------------------------------------------------------
# table printing (server-side, as kube-apiserver's printers do)
# --------------------------------------------------------------------------------------------


def _human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"


def _age(obj: JSON) -> str:
    stamp = _meta(obj).get("creationTimestamp")
    if not isinstance(stamp, str):
        return "<unknown>"
    try:
        created = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    return _human_duration((datetime.now(UTC) - created).total_seconds())


def _join_limited(items: list[str], limit: int = 3) -> str:
    if not items:
        return "<none>"
    text = ",".join(items[:limit])
    if len(items) > limit:
        text += f" + {len(items) - limit} more..."
    return text


def _slice_cells(obj: JSON) -> list[Any]:
    ports = obj.get("ports") or []
    port_text = ",".join(
        str(p.get("port")) if isinstance(p, dict) and p.get("port") is not None else "<unset>"
        for p in ports
    )
    addresses: list[str] = []
    for ep in obj.get("endpoints") or []:
        if isinstance(ep, dict):
            addresses.extend(str(a) for a in ep.get("addresses") or [])
    return [
        _meta(obj).get("name", ""),
        obj.get("addressType", ""),
        port_text or "<unset>",
        _join_limited(addresses),
        _age(obj),
    ]


def _endpoints_cells(obj: JSON) -> list[Any]:
    pairs: list[str] = []
    for subset in obj.get("subsets") or []:
        if not isinstance(subset, dict):
            continue
        ports = [p.get("port") for p in subset.get("ports") or [] if isinstance(p, dict)]
        for addr in subset.get("addresses") or []:
            ip = addr.get("ip", "") if isinstance(addr, dict) else ""
            if ports:
                pairs.extend(f"{_join_host(ip)}:{port}" for port in ports)
            else:
                pairs.append(ip)
    return [_meta(obj).get("name", ""), _join_limited(pairs), _age(obj)]


def _join_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _column(name: str, fmt: str = "", description: str = "") -> JSON:
    return {
        "name": name,
        "type": "string",
        "format": fmt,
        "description": description,
        "priority": 0,
    }


_AGE_DESCRIPTION = (
    "CreationTimestamp is a timestamp representing the server time when this object was created."
)
_TABLE_COLUMNS: dict[str, list[JSON]] = {
    "endpointslices": [
        _column("Name", "name", "Name must be unique within a namespace."),
        _column(
            "AddressType",
            "",
            "addressType specifies the type of address carried by this EndpointSlice.",
        ),
        _column(
            "Ports",
            "",
            "ports specifies the list of network ports exposed by each endpoint in this slice.",
        ),
        _column("Endpoints", "", "endpoints is a list of unique endpoints in this slice."),
        _column(
            "Age",
            "",
            _AGE_DESCRIPTION,
        ),
    ],
    "endpoints": [
        _column("Name", "name", "Name must be unique within a namespace."),
        _column("Endpoints", "", "The set of all endpoints is the union of all subsets."),
        _column(
            "Age",
            "",
            _AGE_DESCRIPTION,
        ),
    ],
}


def _wants_table(accept: str) -> bool:
    for part in accept.split(","):
        params = {p.strip() for p in part.split(";")[1:]}
        if "as=Table" in params and "g=meta.k8s.io" in params and "v=v1" in params:
            return True
    return False


# --------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------


class FakeApiServer:
    """Fake kube-apiserver on a real TLS socket. Use as ``async with FakeApiServer() as api:``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        require_client_cert: bool = True,
        token: str | None = None,
        mode: Mode = "apiserver",
        ca: trustme.CA | None = None,
        git_version: str = DEFAULT_GIT_VERSION,
        bookmark_interval: float = 1.0,
        default_watch_timeout: float = 1800.0,
        history_size: int = 1000,
        initial_resource_version: int = 1000,
        latency: float = 0.0,
        etcd_only_json_errors: bool = False,
        workdir: Path | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._bound_port: int | None = None
        #: when True, requests without a valid client cert or bearer token get 401
        #: (kube-apiserver with --anonymous-auth=false); when False they are served
        #: (logged with ``authenticated_as=None``). Client certs are requested either way.
        self.require_client_cert = require_client_cert
        self.token = token
        self._mode: Mode = "apiserver"
        self.mode = mode
        self.git_version = git_version
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        #: seconds added before every answer (see also :meth:`set_latency`)
        self.latency = latency
        #: newer k3s answers "apiserver disabled" as a JSON Status; older ones as text/plain
        self.etcd_only_json_errors = etcd_only_json_errors
        #: False: the discovery.k8s.io group is not served (404, left out of /apis)
        self.serve_slices = True
        #: /readyz (and /healthz) health; /livez follows ``live``
        self.ready = True
        self.live = True

        self.certs = ApiCertificates(ca)
        self.requests: list[RequestRecord] = []

        self._history_size = history_size
        self._rv = initial_resource_version
        self._compacted_rv = initial_resource_version
        self._objects: dict[str, dict[tuple[str, str], JSON]] = {r.plural: {} for r in _RESOURCES}
        self._history: deque[_HistoryEvent] = deque()
        self._watchers: set[_Watcher] = set()
        self._faults: list[_Fault] = []
        self._latency_rules: list[tuple[str, float]] = []
        self._raw_counter = 0

        self._workdir_arg = workdir
        self._workdir: Path | None = None
        self._owns_workdir = False
        self._ca_path: Path | None = None
        self._client_files: ClientCertFiles | None = None

        self._runner: web.AppRunner | None = None
        self._frozen = False
        self._thawed: asyncio.Event | None = None
        self._closing = False
        self._change: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind and serve. After :meth:`stop`, starts again on the same port with the same state."""
        if self._runner is not None:
            raise RuntimeError("FakeApiServer already running")
        self._ensure_files()
        self._closing = False
        self._change = None
        self._thawed = asyncio.Event()
        if not self._frozen:
            self._thawed.set()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(self._add_common_headers)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        await runner.setup()
        port = self._bound_port if self._bound_port is not None else self._requested_port
        site = web.TCPSite(
            runner,
            self.host,
            port,
            ssl_context=self.certs.server_ssl_context(),
            reuse_address=True,
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockets = runner.addresses
        self._bound_port = int(sockets[0][1])

    async def stop(self) -> None:
        """Stop serving (ends watch streams cleanly, frees the port); state and files are kept."""
        runner = self._runner
        if runner is None:
            return
        self._closing = True
        if self._thawed is not None:
            self._thawed.set()
        for watcher in list(self._watchers):
            watcher.put("close")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while self._watchers:
                    await self._changed().wait()
        self._runner = None
        await runner.cleanup()

    async def close(self) -> None:
        """Stop and remove the temporary certificate directory."""
        await self.stop()
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._ca_path = None
            self._client_files = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def running(self) -> bool:
        return self._runner is not None

    # -- addresses and certificates ----------------------------------------------------------

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("FakeApiServer not started yet")
        return self._bound_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port`` (brackets for IPv6), as a load-balancer backend."""
        return self.url.removeprefix("https://")

    @property
    def ca(self) -> trustme.CA:
        return self.certs.ca

    @property
    def ca_pem(self) -> bytes:
        return self.certs.ca_pem

    @property
    def client_cert_pem(self) -> bytes:
        return self.certs.client_cert_pem

    @property
    def client_key_pem(self) -> bytes:
        return self.certs.client_key_pem

    @property
    def client_common_name(self) -> str:
        return self.certs.client_common_name

    @property
    def workdir(self) -> Path:
        return self._ensure_files()

    @property
    def ca_pem_path(self) -> Path:
        self._ensure_files()
        assert self._ca_path is not None
        return self._ca_path

    @property
    def client_cert_path(self) -> Path:
        self._ensure_files()
        assert self._client_files is not None
        return self._client_files.cert_path

    @property
    def client_key_path(self) -> Path:
        self._ensure_files()
        assert self._client_files is not None
        return self._client_files.key_path

    def client_ssl_context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` trusting the CA, presenting the default client cert if asked."""
        return self.certs.client_ssl_context(client_cert=client_cert)

    def issue_client_cert(
        self, common_name: str, group: str | None = None
    ) -> tuple[trustme.LeafCert, ClientCertFiles]:
        """Mint another client certificate (same CA) and write it next to the others."""
        leaf = issue_client_cert(self.ca, common_name, group)
        stem = "client-" + "".join(ch if ch.isalnum() else "-" for ch in common_name)
        return leaf, ApiCertificates.write_client(leaf, self._ensure_files(), stem)

    def _ensure_files(self) -> Path:
        if self._workdir is None:
            if self._workdir_arg is not None:
                self._workdir = Path(self._workdir_arg)
                self._workdir.mkdir(parents=True, exist_ok=True)
                self._owns_workdir = False
            else:
                self._workdir = Path(tempfile.mkdtemp(prefix="fakeapi-"))
                self._owns_workdir = True
        if self._ca_path is None:
            self._ca_path = self.certs.write_ca(self._workdir)
        if self._client_files is None:
            self._client_files = ApiCertificates.write_client(
                self.certs.client_cert, self._workdir, "client"
            )
        return self._workdir

    # -- mode ------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        if value not in ("apiserver", "etcd-only"):
            raise ValueError(f"unknown mode {value!r}")
        self._mode = value

    # -- store: reading --------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        return self._rv

    @property
    def compacted_resource_version(self) -> int:
        """Watches from a resourceVersion below this get 410 Expired."""
        return self._compacted_rv

    def get_object(self, resource: Resource, name: str, namespace: str = "default") -> JSON | None:
        obj = self._objects[resource.plural].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    # -- store: mutations ------------------------------------------------------------------

    def set_slice(
        self,
        name: str,
        addresses: Sequence[str],
        port: int | None = 6443,
        address_type: str = "IPv4",
        ready: ReadyValue | Sequence[ReadyValue] = True,
        labels: Mapping[str, str] | None = None,
        namespace: str = "default",
        *,
        port_name: str = "https",
        protocol: str = "TCP",
    ) -> str:
        """Create or update an EndpointSlice; returns its resourceVersion.

        ``ready``: True/False/None (condition left out) for all endpoints, a list with one
        value per address, or per-address mappings giving the whole ``conditions`` object
        (e.g. ``{"ready": False, "serving": True, "terminating": True}``). Writing identical
        content is a no-op (no new resourceVersion), as on a real apiserver.
        """
        if isinstance(ready, Sequence) and not isinstance(ready, str):
            per_address = list(ready)
            if len(per_address) != len(addresses):
                raise ValueError("ready list must have one entry per address")
        else:
            per_address = [ready] * len(addresses)
        endpoints = [
            {"addresses": [addr], "conditions": _conditions(value)}
            for addr, value in zip(addresses, per_address, strict=True)
        ]
        ports = (
            [{"name": port_name, "protocol": protocol, "port": port}] if port is not None else None
        )
        obj: JSON = {
            "kind": ENDPOINT_SLICES.kind,
            "apiVersion": ENDPOINT_SLICES.api_version,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(
                    labels if labels is not None else {SERVICE_NAME_LABEL: "kubernetes"}
                ),
            },
            "addressType": address_type,
            "endpoints": endpoints or None,
            "ports": ports,
        }
        return self._put(ENDPOINT_SLICES, obj)

    def delete_slice(self, name: str, namespace: str = "default") -> str | None:
        """Delete an EndpointSlice; returns the deletion resourceVersion (None if absent)."""
        return self._delete(ENDPOINT_SLICES, namespace, name)

    def put_raw_slice(self, obj: Mapping[str, Any]) -> str:
        """Store an EndpointSlice exactly as given (malformed content allowed).

        Only ``metadata.resourceVersion`` (and uid/creationTimestamp/namespace/name when
        missing) are filled in; ``kind``/``apiVersion`` default to EndpointSlice's.
        """
        return self._put_raw(ENDPOINT_SLICES, obj)

    def set_endpoints(
        self,
        name: str = "kubernetes",
        addresses: Sequence[str] = (),
        port: int | None = 6443,
        not_ready: Sequence[str] = (),
        namespace: str = "default",
        labels: Mapping[str, str] | None = None,
        *,
        port_name: str = "https",
        protocol: str = "TCP",
    ) -> str:
        """Create or update a core/v1 Endpoints object; returns its resourceVersion."""
        subset: JSON = {}
        if addresses:
            subset["addresses"] = [{"ip": ip} for ip in addresses]
        if not_ready:
            subset["notReadyAddresses"] = [{"ip": ip} for ip in not_ready]
        if port is not None:
            subset["ports"] = [{"name": port_name, "port": port, "protocol": protocol}]
        obj: JSON = {
            "kind": ENDPOINTS.kind,
            "apiVersion": ENDPOINTS.api_version,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(labels if labels is not None else {SKIP_MIRROR_LABEL: "true"}),
            },
        }
        if addresses or not_ready:
            obj["subsets"] = [subset]
        return self._put(ENDPOINTS, obj)

    def delete_endpoints(self, name: str = "kubernetes", namespace: str = "default") -> str | None:
        return self._delete(ENDPOINTS, namespace, name)

    def put_raw_endpoints(self, obj: Mapping[str, Any]) -> str:
        return self._put_raw(ENDPOINTS, obj)

    def set_apiservers(self, addresses: Sequence[str], port: int = 6443) -> tuple[str, str]:
        """What kube-apiserver's lease reconciler writes: the ``kubernetes`` slice and the
        ``kubernetes`` Endpoints in ``default`` (one mutation each, none if unchanged).

        The slice's addressType follows the first address (the primary IP family); other
        families are left out, as on a single-stack apiserver Service.
        """
        family = "IPv6" if addresses and _is_ipv6(addresses[0]) else "IPv4"
        same_family = [a for a in addresses if _is_ipv6(a) == (family == "IPv6")]
        slice_rv = self.set_slice("kubernetes", same_family, port=port, address_type=family)
        ep_rv = self.set_endpoints("kubernetes", same_family, port=port)
        return slice_rv, ep_rv

    def compact(self) -> int:
        """Drop all history (like an etcd compaction + watch cache reset). Returns the rv."""
        self._history.clear()
        self._compacted_rv = self._rv
        return self._rv

    def _put(self, resource: Resource, obj: JSON) -> str:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        old = self._objects[resource.plural].get(key)
        if old is not None:
            old_meta = _meta(old)
            for field in ("uid", "creationTimestamp"):
                if field in old_meta:
                    meta[field] = old_meta[field]
            meta["resourceVersion"] = old_meta.get("resourceVersion")
            if _canonical(obj) == _canonical(old):
                return str(old_meta.get("resourceVersion"))
        else:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now_rfc3339()
        _order_metadata(obj)
        return self._commit(resource, "MODIFIED" if old is not None else "ADDED", obj, old)

    def _put_raw(self, resource: Resource, raw: Mapping[str, Any]) -> str:
        obj: JSON = copy.deepcopy(dict(raw))
        obj.setdefault("kind", resource.kind)
        obj.setdefault("apiVersion", resource.api_version)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = {}
            obj["metadata"] = meta
        if not meta.get("name"):
            self._raw_counter += 1
            meta["name"] = f"raw-{self._raw_counter}"
        meta.setdefault("namespace", "default")
        key = (str(meta["namespace"]), str(meta["name"]))
        old = self._objects[resource.plural].get(key)
        if old is not None:
            meta.setdefault("uid", _meta(old).get("uid"))
            meta.setdefault("creationTimestamp", _meta(old).get("creationTimestamp"))
        else:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now_rfc3339())
        return self._commit(resource, "MODIFIED" if old is not None else "ADDED", obj, old)

    def _delete(self, resource: Resource, namespace: str, name: str) -> str | None:
        store = self._objects[resource.plural]
        old = store.get((namespace, name))
        if old is None:
            return None
        last = copy.deepcopy(old)
        return self._commit(resource, "DELETED", last, old)

    def _commit(self, resource: Resource, etype: str, obj: JSON, old: JSON | None) -> str:
        self._rv += 1
        rv = self._rv
        obj.setdefault("metadata", {})["resourceVersion"] = str(rv)
        meta = obj["metadata"]
        key = (str(meta.get("namespace")), str(meta.get("name")))
        store = self._objects[resource.plural]
        if etype == "DELETED":
            store.pop(key, None)
        else:
            store[key] = obj
        event = _HistoryEvent(rv, resource, etype, copy.deepcopy(obj), copy.deepcopy(old))
        if self._history_size <= 0:
            self._compacted_rv = rv
        else:
            while len(self._history) >= self._history_size:
                self._compacted_rv = self._history.popleft().rv
            self._history.append(event)
        for watcher in self._watchers:
            translated = watcher.translate(event)
            if translated is not None:
                watcher.put("event", translated)
        return str(rv)

    # -- fault switches --------------------------------------------------------------------

    def fail_next_requests(
        self,
        n: int,
        status: int = 500,
        *,
        verbs: Iterable[str] | None = None,
        path_prefix: str | None = None,
        message: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """The next ``n`` API resource requests (list/watch/get; narrowed by ``verbs``) get
        HTTP ``status`` with a Status body. With ``path_prefix``, any request whose path
        starts with it counts instead (e.g. ``"/readyz"``). ``status=0`` resets the
        connection without any HTTP answer."""
        self._faults.append(
            _Fault(
                remaining=n,
                status=status,
                verbs=frozenset(verbs) if verbs is not None else None,
                path_prefix=path_prefix,
                message=message,
                retry_after=retry_after,
            )
        )

    def fail_next_list(self, status: int = 410, n: int = 1, *, message: str | None = None) -> None:
        """The next ``n`` list requests (not watches) get ``status``; 410 carries the
        ``Expired`` Status a list with a compacted resourceVersion gets."""
        self.fail_next_requests(n, status, verbs=("list",), message=message)

    def fail_next_watch(self, status: int = 500, n: int = 1, *, message: str | None = None) -> None:
        self.fail_next_requests(n, status, verbs=("watch",), message=message)

    def clear_faults(self) -> None:
        self._faults.clear()
        self._latency_rules.clear()
        self.latency = 0.0

    def set_latency(self, seconds: float, *, path_prefix: str | None = None) -> None:
        """Delay answers by ``seconds``: all requests, or those whose path starts with the
        prefix (longest matching prefix wins over the global :attr:`latency`)."""
        if path_prefix is None:
            self.latency = seconds
            return
        self._latency_rules = [r for r in self._latency_rules if r[0] != path_prefix]
        self._latency_rules.append((path_prefix, seconds))

    def freeze(self) -> None:
        """Keep accepting connections (TLS handshakes complete) but answer nothing; open
        watch streams stall too (no events, bookmarks or timeout ends; events queue up).
        :meth:`cut_watch_streams` and shutdown still act. :meth:`unfreeze` resumes all."""
        self._frozen = True
        if self._thawed is not None:
            self._thawed.clear()

    def unfreeze(self) -> None:
        self._frozen = False
        if self._thawed is not None:
            self._thawed.set()
        for watcher in self._watchers:
            watcher.signal.set()

    @property
    def frozen(self) -> bool:
        return self._frozen

    def cut_watch_streams(self, mid_line: bool = True) -> int:
        """Abort every open watch connection (no terminating chunk, no TLS close_notify),
        after writing the first half of an event line if ``mid_line``. Returns how many."""
        for watcher in self._watchers:
            watcher.put("cut", mid_line)
        return len(self._watchers)

    def expire_watches(self, *, compact: bool = True) -> int:
        """Send the 410 ``Expired`` ERROR event into every open watch, then end each stream.
        With ``compact`` (default) history is dropped too, so resuming from the last seen
        resourceVersion also gets 410 and the client must re-list."""
        count = len(self._watchers)
        for watcher in self._watchers:
            watcher.put("expire")
        if compact:
            self.compact()
        return count

    def end_watch_streams(self) -> int:
        """End every open watch cleanly (as a timeoutSeconds expiry would)."""
        for watcher in self._watchers:
            watcher.put("close")
        return len(self._watchers)

    def send_bookmark(self) -> int:
        """Send a BOOKMARK with the current resourceVersion to watches that allow them."""
        count = 0
        for watcher in self._watchers:
            if watcher.allow_bookmarks:
                watcher.put("bookmark", self._rv)
                count += 1
        return count

    @property
    def watch_count(self) -> int:
        return len(self._watchers)

    async def wait_for_watchers(self, n: int = 1, within: float = 5.0) -> None:
        """Wait until at least ``n`` watch streams are open (TimeoutError after ``within`` s)."""
        async with asyncio.timeout(within):
            while len(self._watchers) < n:
                await self._changed().wait()

    async def wait_for_requests(
        self, predicate: Callable[[RequestRecord], bool], n: int = 1, within: float = 5.0
    ) -> list[RequestRecord]:
        """Wait until ``n`` logged requests satisfy ``predicate``; returns them."""
        async with asyncio.timeout(within):
            while True:
                hits = [r for r in self.requests if predicate(r)]
                if len(hits) >= n:
                    return hits
                await self._changed().wait()

    def _changed(self) -> asyncio.Event:
        if self._change is None:
            self._change = asyncio.Event()
        return self._change

    def _notify(self) -> None:
        """Wake waiters of :meth:`wait_for_watchers` / :meth:`wait_for_requests`."""
        change, self._change = self._change, None
        if change is not None:
            change.set()

    # -- HTTP: entry ------------------------------------------------------------------------

    async def _add_common_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Audit-Id", str(uuid.uuid4()))
        response.headers.setdefault("Cache-Control", "no-cache, private")

    def _authenticate(self, request: web.Request) -> str | None:
        transport = request.transport
        if transport is not None:
            cert = transport.get_extra_info("peercert")
            if cert:
                for rdn in cert.get("subject", ()):
                    for attr, value in rdn:
                        if attr == "commonName":
                            return str(value)
                return "<no-cn>"
        if self.token is not None:
            parts = request.headers.get("Authorization", "").split()
            if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1] == self.token:
                return "token"
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        user = self._authenticate(request)
        self.requests.append(RequestRecord(request.method, request.path_qs, user))
        self._notify()
        await self._hold(request.path)
        path = request.path

        if path == "/ping":
            return web.Response(text="pong", content_type="text/plain")
        if path == "/cacerts":
            return web.Response(body=self.ca_pem, content_type="text/plain")
        if self._mode == "etcd-only":
            return self._apiserver_disabled()
        if user is None and self.require_client_cert:
            return self._status(401)

        route = self._classify(path, request)
        fault = self._take_fault(path, route[1] if route is not None else None)
        if fault is not None:
            return self._fault_response(request, fault)

        if path in ("/readyz", "/livez", "/healthz") or path.startswith(
            ("/readyz/", "/livez/", "/healthz/")
        ):
            return self._health(path, request)
        if path == "/version":
            return self._json(self._version_body(), indent=True)
        if route is None:
            discovery = self._discovery(path)
            if discovery is not None:
                return self._json(discovery)
            return self._status(404, details={})

        resource, verb, namespace, name = route
        if request.method not in ("GET", "HEAD"):
            return self._status(405)
        if resource is ENDPOINT_SLICES and not self.serve_slices:
            return self._status(404, details={})
        try:
            if verb == "watch":
                return await self._serve_watch(request, resource, namespace, name)
            if verb == "get":
                assert name is not None
                assert namespace is not None
                return self._serve_get(request, resource, namespace, name)
            return self._serve_list(request, resource, namespace)
        except LabelSelectorError as exc:
            return self._status(400, str(exc))

    async def _hold(self, path: str) -> None:
        thawed = self._thawed
        while thawed is not None and not thawed.is_set() and not self._closing:
            await thawed.wait()
        delay = self.latency
        best = -1
        for prefix, seconds in self._latency_rules:
            if path.startswith(prefix) and len(prefix) > best:
                best, delay = len(prefix), seconds
        if delay > 0:
            await asyncio.sleep(delay)

    def _classify(
        self, path: str, request: web.Request
    ) -> tuple[Resource, str, str | None, str | None] | None:
        for resource, pattern in ((ENDPOINTS, _CORE_PATH), (ENDPOINT_SLICES, _SLICE_PATH)):
            m = pattern.match(path)
            if m is None:
                continue
            ns, name = m.group("ns"), m.group("name")
            if name is not None and ns is None:
                return None  # namespaced resource addressed cluster-wide by name: 404
            if _parse_go_bool(request.query.get("watch", "")):
                return resource, "watch", ns, name
            return resource, ("get" if name is not None else "list"), ns, name
        return None

    def _take_fault(self, path: str, verb: str | None) -> _Fault | None:
        for fault in self._faults:
            if fault.path_prefix is not None:
                hit = path.startswith(fault.path_prefix) and (
                    fault.verbs is None or verb in fault.verbs
                )
            else:
                hit = verb is not None and (fault.verbs is None or verb in fault.verbs)
            if hit:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _fault_response(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        if fault.status == 0:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        message = fault.message
        if fault.status == 410 and message is None:
            message = _MESSAGES[410]
        resp = self._status(fault.status, message)
        if fault.retry_after is not None:
            resp.headers["Retry-After"] = str(fault.retry_after)
        elif fault.status == 429:
            resp.headers["Retry-After"] = "1"
        return resp

    # -- HTTP: simple answers ---------------------------------------------------------------

    @staticmethod
    def _json(body: Any, status: int = 200, *, indent: bool = False) -> web.Response:
        text = json.dumps(body, indent=2) if indent else _dumps(body)
        return web.Response(
            status=status, body=(text + "\n").encode(), headers={"Content-Type": _JSON_CT}
        )

    def _status(
        self, code: int, message: str | None = None, details: JSON | None = None
    ) -> web.Response:
        return self._json(status_body(code, message, details=details), status=code)

    def _apiserver_disabled(self) -> web.Response:
        if self.etcd_only_json_errors:
            return self._status(503, APISERVER_DISABLED)
        return web.Response(status=503, text=APISERVER_DISABLED, content_type="text/plain")

    def _health(self, path: str, request: web.Request) -> web.Response:
        endpoint, _, single = path.strip("/").partition("/")
        healthy = self.live if endpoint == "livez" else self.ready
        checks = ["ping", "log", "etcd"]
        if endpoint == "readyz":
            checks += ["etcd-readiness", "informer-sync"]
        checks.append("poststarthook/start-apiserver-admission-initializer")
        if endpoint == "readyz":
            checks.append("shutdown")

        def text(status: int, body: str) -> web.Response:
            return web.Response(
                status=status,
                text=body,
                content_type="text/plain",
                charset="utf-8",
                headers={"X-Content-Type-Options": "nosniff"},
            )

        if single:  # one check, e.g. /readyz/etcd
            if single not in checks:
                return self._status(404, details={})
            if healthy or not single.startswith("etcd"):
                return text(200, "ok")
            return text(500, "internal server error: etcd client connection not yet established\n")
        if healthy and "verbose" not in request.query:
            return text(200, "ok")
        lines = [
            f"[-]{name} failed: reason withheld"
            if not healthy and name.startswith("etcd")
            else f"[+]{name} ok"
            for name in checks
        ]
        lines.append(f"{endpoint} check {'passed' if healthy else 'failed'}")
        return text(200 if healthy else 500, "\n".join(lines) + "\n")

    def _version_body(self) -> JSON:
        m = re.match(r"^v(\d+)\.(\d+)", self.git_version)
        major, minor = (m.group(1), m.group(2)) if m else ("1", "31")
        return {
            "major": major,
            "minor": minor,
            "gitVersion": self.git_version,
            "gitCommit": "ae4b40a1e3fcb0ba12b8b8fd1b6c1d5e1c7d3e2f",
            "gitTreeState": "clean",
            "buildDate": "2024-12-12T02:45:49Z",
            "goVersion": "go1.22.9",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _discovery(self, path: str) -> JSON | None:
        path = path.rstrip("/") or "/"
        verbs = ["get", "list", "watch"]
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": self.address}
                ],
            }
        if path == "/api/v1":
            return {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": [
                    {
                        "name": "endpoints",
                        "singularName": "endpoints",
                        "namespaced": True,
                        "kind": "Endpoints",
                        "verbs": verbs,
                        "shortNames": ["ep"],
                        "storageVersionHash": "fWeeMqaN/OA=",
                    }
                ],
            }
        group = ENDPOINT_SLICES.group
        group_doc = {
            "name": group,
            "versions": [{"groupVersion": f"{group}/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": f"{group}/v1", "version": "v1"},
        }
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [group_doc] if self.serve_slices else [],
            }
        if not self.serve_slices:
            return None
        if path == f"/apis/{group}":
            return {"kind": "APIGroup", "apiVersion": "v1", **group_doc}
        if path == f"/apis/{group}/v1":
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{group}/v1",
                "resources": [
                    {
                        "name": "endpointslices",
                        "singularName": "endpointslice",
                        "namespaced": True,
                        "kind": "EndpointSlice",
                        "verbs": verbs,
                        "storageVersionHash": "Nx3SIv6I0mE=",
                    }
                ],
            }
        return None

    # -- HTTP: list / get -------------------------------------------------------------------

    def _selected(
        self,
        resource: Resource,
        namespace: str | None,
        labels: list[_Requirement],
        fields: list[_FieldTerm],
    ) -> list[JSON]:
        store = self._objects[resource.plural]
        return [
            store[key]
            for key in sorted(store)
            if _object_matches(store[key], namespace, labels, fields)
        ]

    def _serve_list(
        self, request: web.Request, resource: Resource, namespace: str | None
    ) -> web.Response:
        query = request.query
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = _parse_field_selector(query.get("fieldSelector", ""))
        items = self._selected(resource, namespace, labels, fields)
        list_rv = str(self._rv)
        list_meta: JSON = {"resourceVersion": list_rv}

        token = query.get("continue", "")
        if token:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
                start_key = (str(decoded["ns"]), str(decoded["name"]))
                list_rv = str(decoded["rv"])
            except (ValueError, KeyError, TypeError):
                return self._status(
                    400, "continue key is not valid: incorrect encoded start resourceVersion"
                )
            list_meta["resourceVersion"] = list_rv
            items = [
                o
                for o in items
                if (_meta(o).get("namespace", ""), _meta(o).get("name", "")) > start_key
            ]
        limit_text = query.get("limit", "")
        if limit_text.isdigit() and 0 < int(limit_text) < len(items):
            limit = int(limit_text)
            last = _meta(items[limit - 1])
            remaining = len(items) - limit
            items = items[:limit]
            list_meta["continue"] = base64.urlsafe_b64encode(
                _dumps(
                    {"rv": list_rv, "ns": last.get("namespace", ""), "name": last.get("name", "")}
                ).encode()
            ).decode()
            list_meta["remainingItemCount"] = remaining

        if _wants_table(request.headers.get("Accept", "")):
            return self._json(
                self._table(resource, items, list_meta, query.get("includeObject", ""))
            )
        body = {
            "kind": resource.list_kind,
            "apiVersion": resource.api_version,
            "metadata": list_meta,
            "items": [_strip_type_meta(o) for o in items],
        }
        return self._json(body)

    def _serve_get(
        self, request: web.Request, resource: Resource, namespace: str, name: str
    ) -> web.Response:
        obj = self._objects[resource.plural].get((namespace, name))
        if obj is None:
            details: JSON = {"name": name}
            if resource.group:
                details["group"] = resource.group
            details["kind"] = resource.plural
            return self._status(404, f'{resource.qualified_name} "{name}" not found', details)
        if _wants_table(request.headers.get("Accept", "")):
            table_meta = {"resourceVersion": _meta(obj).get("resourceVersion", "")}
            return self._json(
                self._table(resource, [obj], table_meta, request.query.get("includeObject", ""))
            )
        return self._json(obj)

    def _table(self, resource: Resource, items: list[JSON], meta: JSON, include: str) -> JSON:
        cells: Callable[[JSON], list[Any]] = (
            _slice_cells if resource is ENDPOINT_SLICES else _endpoints_cells
        )
        rows: list[JSON] = []
        for obj in items:
            row: JSON = {"cells": cells(obj)}
            if include == "Object":
                row["object"] = copy.deepcopy(obj)
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": copy.deepcopy(_meta(obj)),
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta,
            "columnDefinitions": _TABLE_COLUMNS[resource.plural],
            "rows": rows,
        }

    # -- HTTP: watch ------------------------------------------------------------------------

    async def _serve_watch(
        self,
        request: web.Request,
        resource: Resource,
        namespace: str | None,
        name: str | None,
    ) -> web.StreamResponse:
        query = request.query
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = _parse_field_selector(query.get("fieldSelector", ""))
        if name is not None:
            fields.append(_FieldTerm("metadata.name", False, name))
        rv_text = query.get("resourceVersion", "")
        timeout_text = query.get("timeoutSeconds", "")
        try:
            start_rv = int(rv_text) if rv_text not in ("", "0") else None
            duration = float(int(timeout_text)) if timeout_text else 0.0
        except ValueError:
            return self._status(400, f"invalid resourceVersion {rv_text!r} or timeoutSeconds")
        if duration <= 0:
            duration = self.default_watch_timeout

        watcher = _Watcher(
            resource,
            namespace,
            labels,
            fields,
            _parse_go_bool(query.get("allowWatchBookmarks", "")),
            rv_text,
        )
        # Initial events and registration happen without yielding to the loop, so no
        # mutation can slip in between (no lost or duplicated events).
        if start_rv is None:
            for obj in self._selected(resource, namespace, labels, fields):
                watcher.put("event", ("ADDED", copy.deepcopy(obj)))
        elif start_rv < self._compacted_rv:
            watcher.put("expire")
        else:
            for ev in self._history:
                if ev.rv > start_rv:
                    translated = watcher.translate(ev)
                    if translated is not None:
                        watcher.put("event", translated)
        self._watchers.add(watcher)
        self._notify()

        resp = web.StreamResponse(status=200, headers={"Content-Type": _JSON_CT})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            await self._pump(request, resp, watcher, duration)
        except ConnectionError:
            return resp  # client went away; aiohttp notices the broken connection
        finally:
            self._watchers.discard(watcher)
            self._notify()
        return resp

    def _event_line(self, etype: str, obj: JSON) -> bytes:
        return (_dumps({"type": etype, "object": obj}) + "\n").encode()

    def _bookmark_line(self, resource: Resource, rv: int) -> bytes:
        obj = {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(rv)},
        }
        return self._event_line("BOOKMARK", obj)

    async def _pump(
        self, request: web.Request, resp: web.StreamResponse, watcher: _Watcher, duration: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        next_bookmark = math.inf

        while True:
            # A frozen server writes nothing (no events, bookmarks or timeout ends), but
            # connection-level faults (cut) and shutdown still go through.
            frozen = self._frozen and not self._closing
            now = loop.time()
            if not frozen and now >= deadline:
                break
            interval = self.bookmark_interval  # re-read: tests may change it at runtime
            if not watcher.allow_bookmarks or interval <= 0:
                next_bookmark = math.inf
            elif next_bookmark == math.inf:
                next_bookmark = now + interval

            item = watcher.pop(urgent_only=frozen)
            if item is None:
                if not frozen and now >= next_bookmark:
                    # mailbox empty: every event up to the current rv has been written
                    await resp.write(self._bookmark_line(watcher.resource, self._rv))
                    next_bookmark = now + interval
                    continue
                watcher.signal.clear()
                wake = math.inf if frozen else min(deadline, next_bookmark)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if wake == math.inf else wake - now):
                        await watcher.signal.wait()
                continue

            kind, payload = item
            if kind == "event":
                etype, obj = payload
                watcher.last_rv = str(_meta(obj).get("resourceVersion", watcher.last_rv))
                await resp.write(self._event_line(etype, obj))
            elif kind == "bookmark":
                await resp.write(self._bookmark_line(watcher.resource, int(payload)))
                if next_bookmark != math.inf:
                    next_bookmark = loop.time() + interval
            elif kind == "expire":
                too_old = watcher.last_rv or watcher.start_rv or "0"
                status = status_body(
                    410, f"too old resource version: {too_old} ({self._compacted_rv})"
                )
                await resp.write(self._event_line("ERROR", status))
                break
            elif kind == "cut":
                if payload:
                    line = self._bookmark_line(watcher.resource, self._rv)
                    await resp.write(line[: len(line) // 2])
                transport = request.transport
                if transport is not None:
                    transport.abort()
                return
            else:  # "close"
                break
        await resp.write_eof()


def _is_ipv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return ":" in address


def _conditions(value: ReadyValue) -> JSON:
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if v is not None}
    if value is None:
        return {}
    return {"ready": bool(value)}


_META_ORDER = (
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "labels",
    "annotations",
)


def _order_metadata(obj: JSON) -> None:
    meta = obj["metadata"]
    ordered = {k: meta[k] for k in _META_ORDER if k in meta}
    ordered.update({k: v for k, v in meta.items() if k not in ordered})
    obj["metadata"] = ordered


def _canonical(obj: JSON) -> str:
    clone = copy.deepcopy(obj)
    _meta(clone).pop("resourceVersion", None)
    return json.dumps(clone, sort_keys=True)


def _strip_type_meta(obj: JSON) -> JSON:
    """List items carry no kind/apiVersion on a real apiserver."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


# --------------------------------------------------------------------------------------------
# kubeconfig
# --------------------------------------------------------------------------------------------


def make_kubeconfig(
    api: FakeApiServer,
    path: str | Path,
    *,
    inline: bool,
    token: str | None = None,
    server: str | None = None,
    tls_server_name: str | None = None,
) -> Path:
    """Write a kubeconfig (JSON, which kubectl and client-go accept) for ``api``.

    ``inline``: embed PEM as ``*-data`` instead of file paths. With ``token`` the user
    authenticates with that bearer token instead of the client certificate. ``server``
    overrides the URL (e.g. to point at a proxy in front of the fake).
    """
    path = Path(path)
    cluster: JSON = {"server": server or api.url}
    if inline:
        cluster["certificate-authority-data"] = base64.b64encode(api.ca_pem).decode()
    else:
        cluster["certificate-authority"] = str(api.ca_pem_path)
    if tls_server_name is not None:
        cluster["tls-server-name"] = tls_server_name
    user: JSON = {}
    if token is not None:
        user["token"] = token
    elif inline:
        user["client-certificate-data"] = base64.b64encode(api.client_cert_pem).decode()
        user["client-key-data"] = base64.b64encode(api.client_key_pem).decode()
    else:
        user["client-certificate"] = str(api.client_cert_path)
        user["client-key"] = str(api.client_key_path)
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fakeapi", "cluster": cluster}],
        "users": [{"name": "fakeapi", "user": user}],
        "contexts": [
            {
                "name": "fakeapi",
                "context": {"cluster": "fakeapi", "user": "fakeapi", "namespace": "default"},
            }
        ],
        "current-context": "fakeapi",
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.chmod(0o600)
    return path
