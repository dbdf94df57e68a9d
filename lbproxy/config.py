"""Configuration: the TOML file and command-line overrides, validated into frozen values.

Every problem is reported with its key path (``probe.timeout: must be > 0``) and all
problems are reported at once, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import enum
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from lbproxy.errors import ConfigError
from lbproxy.model import Endpoint, parse_hostport
from lbproxy.pool.selection import Policy

T = TypeVar("T")

DEFAULT_LISTEN = "127.0.0.1:6445"
DEFAULT_ADMIN = "127.0.0.1:6446"
DEFAULT_LISTEN_ENDPOINT = Endpoint("127.0.0.1", 6445)
DEFAULT_ADMIN_ENDPOINT = Endpoint("127.0.0.1", 6446)
DEFAULT_STATE_FILE = "/var/lib/lbproxy/state.json"
DEFAULT_K3S_DATA_DIR = "/var/lib/rancher/k3s"
MAX_KEEPALIVE = 32767  # seconds; Linux's limit for TCP_KEEPIDLE and TCP_KEEPINTVL
MAX_USER_TIMEOUT = (2**31 - 1) // 1000  # seconds; TCP_USER_TIMEOUT is an int of milliseconds


class ProbeKind(enum.Enum):
    TCP = "tcp"
    TLS = "tls"
    HTTPS = "https"


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    kind: ProbeKind = ProbeKind.HTTPS
    path: str = "/readyz"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 1
    fall: int = 2
    jitter: float = 0.1
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    dial_timeout: float = 2.0
    keepalive_idle: float = 30.0
    keepalive_interval: float = 10.0
    keepalive_count: int = 3
    user_timeout: float = 30.0  # TCP_USER_TIMEOUT on upstream sockets; 0 disables
    buffer_size: int = 256 * 1024  # write-buffer high-water mark per direction


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = ("https://127.0.0.1:2382", "https://127.0.0.1:2379")
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password_file: str = ""
    apiaddresses_key: str = "k3s/apiaddresses"
    masterleases_prefix: str = "/registry/masterleases/"
    timeout: float = 5.0
    backoff_max: float = 30.0


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    kubeconfig: str = "/var/lib/rancher/k3s/agent/k3scontroller.kubeconfig"
    namespace: str = "default"
    service: str = "kubernetes"
    server_name: str = "kubernetes"
    timeout: float = 5.0
    watch_timeout: int = 300  # timeoutSeconds sent with each watch
    backoff_max: float = 30.0


@dataclass(frozen=True, slots=True)
class DnsConfig:
    names: tuple[str, ...] = ()
    srv: tuple[str, ...] = ()
    nameservers: tuple[str, ...] = ()
    min_refresh: float = 5.0
    max_refresh: float = 300.0
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[Endpoint, ...] = (DEFAULT_LISTEN_ENDPOINT,)
    admin: Endpoint | None = DEFAULT_ADMIN_ENDPOINT
    state_file: str = DEFAULT_STATE_FILE
    default_port: int = 6443
    policy: Policy = Policy.STICKY
    drain_timeout: float = 10.0
    preset: str = ""
    data_dir: str = DEFAULT_K3S_DATA_DIR
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    loop: str = "uvloop"
    servers: tuple[str, ...] = ()
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    etcd: EtcdConfig | None = None
    kubernetes: KubernetesConfig | None = None
    dns: DnsConfig | None = None
    # Things worth a log line at start that are not errors (e.g. what a preset left out).
    notes: tuple[str, ...] = ()


LOG_LEVELS = ("debug", "info", "warning", "error")


class _Reader:
    """Reads typed values from one TOML table, collecting problems by key path."""

    def __init__(self, table: Mapping[str, Any], prefix: str, problems: list[tuple[str, str]]):
        self.table = table
        self.prefix = prefix
        self.problems = problems
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def problem(self, key: str, message: str) -> None:
        self.problems.append((self.path(key), message))

    def _get(self, key: str, default: T, check: Callable[[Any], T | None], what: str) -> T:
        self.seen.add(key)
        if key not in self.table:
            return default
        value = check(self.table[key])
        if value is None:
            self.problem(key, f"must be {what}, got {type(self.table[key]).__name__}")
            return default
        return value

    def string(self, key: str, default: str) -> str:
        return self._get(key, default, lambda v: v if isinstance(v, str) else None, "a string")

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(
            key, default, lambda v: v if isinstance(v, bool) else None, "true or false"
        )

    def number(self, key: str, default: float, *, positive: bool = False) -> float:
        def check(v: Any) -> float | None:
            if isinstance(v, bool) or not isinstance(v, int | float):
                return None
            try:
                return float(v)
            except OverflowError:  # tomllib reads integers of any size
                return math.inf

        value = self._get(key, default, check, "a number")
        if not math.isfinite(value):  # TOML also has nan and inf
            self.problem(key, "must be a finite number")
            return default
        if positive and not value > 0:
            self.problem(key, "must be > 0")
        elif value < 0:
            self.problem(key, "must be >= 0")
        return value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        def check(v: Any) -> int | None:
            return v if isinstance(v, int) and not isinstance(v, bool) else None

        value = self._get(key, default, check, "an integer")
        if not low <= value <= high:
            self.problem(key, f"must be between {low} and {high}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        def check(v: Any) -> tuple[str, ...] | None:
            if isinstance(v, list) and all(isinstance(x, str) for x in v):
                return tuple(v)
            return None

        return self._get(key, default, check, "a list of strings")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in choices:
            shown = ", ".join(c or "''" for c in choices)
            self.problem(key, f"must be one of {shown}; got {value!r}")
            return default
        return value

    def table_(self, key: str) -> Mapping[str, Any] | None:
        self.seen.add(key)
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(key, "must be a table")
            return None
        return value

    def finish(self) -> None:
        for key in self.table:
            if key not in self.seen:
                self.problem(key or '""', "unknown key")


def _parse_address(text: str, default_port: int | None = None) -> Endpoint:
    try:
        return parse_hostport(text, default_port)
    except ValueError as exc:
        message = str(exc)
        if text.count(":") > 1 and "[" not in text and "[addr]:port" not in message:
            # "::1:6445" reads as an IPv6 address without a port; say how to add one.
            message += " (write IPv6 as [addr]:port)"
        raise ValueError(message) from None


def _addresses(
    r: _Reader, key: str, texts: tuple[str, ...], default_port: int | None
) -> tuple[Endpoint, ...]:
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(_parse_address(text, default_port))
        except ValueError as exc:
            r.problems.append((f"{r.path(key)}[{i}]", str(exc)))
    return tuple(out)


def _check_file(r: _Reader, key: str, value: str) -> None:
    if not value:
        return
    try:
        found = Path(value).is_file()
    except OSError as exc:  # e.g. ENAMETOOLONG, EACCES on a parent directory
        r.problem(key, f"cannot check {value}: {exc.strerror or exc}")
        return
    if not found:
        r.problem(key, f"file not found: {value}")


def _probe(table: Mapping[str, Any], problems: list[tuple[str, str]]) -> ProbeConfig:
    d = ProbeConfig()
    r = _Reader(table, "probe.", problems)
    kind = ProbeKind(r.choice("kind", d.kind.value, tuple(k.value for k in ProbeKind)))
    path = r.string("path", d.path)
    if not path.startswith("/"):
        r.problem("path", "must start with '/'")
    cfg = ProbeConfig(
        kind=kind,
        path=path,
        interval=r.number("interval", d.interval, positive=True),
        timeout=r.number("timeout", d.timeout, positive=True),
        rise=r.integer("rise", d.rise, low=1, high=100),
        fall=r.integer("fall", d.fall, low=1, high=100),
        jitter=r.number("jitter", d.jitter),
        ca_file=r.string("ca_file", d.ca_file),
        cert_file=r.string("cert_file", d.cert_file),
        key_file=r.string("key_file", d.key_file),
        server_name=r.string("server_name", d.server_name),
        insecure_skip_verify=r.boolean("insecure_skip_verify", d.insecure_skip_verify),
    )
    if cfg.jitter >= 1:
        r.problem("jitter", "must be < 1 (a fraction of the interval)")
    if bool(cfg.cert_file) != bool(cfg.key_file):
        r.problem(
            "cert_file" if not cfg.cert_file else "key_file", "cert_file and key_file go together"
        )
    r.finish()
    return cfg


def _forward(table: Mapping[str, Any], problems: list[tuple[str, str]]) -> ForwardConfig:
    d = ForwardConfig()
    r = _Reader(table, "forward.", problems)
    cfg = ForwardConfig(
        dial_timeout=r.number("dial_timeout", d.dial_timeout, positive=True),
        keepalive_idle=r.number("keepalive_idle", d.keepalive_idle, positive=True),
        keepalive_interval=r.number("keepalive_interval", d.keepalive_interval, positive=True),
        keepalive_count=r.integer("keepalive_count", d.keepalive_count, low=1, high=127),
        user_timeout=r.number("user_timeout", d.user_timeout),
        buffer_size=r.integer("buffer_size", d.buffer_size, low=4096, high=64 * 1024 * 1024),
    )
    # The socket options take C ints: Linux caps keepalive times at 32767 s, and
    # TCP_USER_TIMEOUT is milliseconds. A larger value cannot be set on a socket.
    for key, value, high in (
        ("keepalive_idle", cfg.keepalive_idle, MAX_KEEPALIVE),
        ("keepalive_interval", cfg.keepalive_interval, MAX_KEEPALIVE),
        ("user_timeout", cfg.user_timeout, MAX_USER_TIMEOUT),
    ):
        if value > high:
            r.problem(key, f"must be <= {high}")
    r.finish()
    return cfg


def _etcd(table: Mapping[str, Any], problems: list[tuple[str, str]]) -> EtcdConfig:
    d = EtcdConfig()
    r = _Reader(table, "discovery.etcd.", problems)
    endpoints = r.strings("endpoints", d.endpoints)
    for i, url in enumerate(endpoints):
        if not url.startswith(("http://", "https://")):
            problems.append((f"discovery.etcd.endpoints[{i}]", f"must be an http(s) URL: {url!r}"))
    if not endpoints:
        r.problem("endpoints", "must not be empty")
    cfg = EtcdConfig(
        endpoints=endpoints,
        ca_file=r.string("ca_file", d.ca_file),
        cert_file=r.string("cert_file", d.cert_file),
        key_file=r.string("key_file", d.key_file),
        username=r.string("username", d.username),
        password_file=r.string("password_file", d.password_file),
        apiaddresses_key=r.string("apiaddresses_key", d.apiaddresses_key),
        masterleases_prefix=r.string("masterleases_prefix", d.masterleases_prefix),
        timeout=r.number("timeout", d.timeout, positive=True),
        backoff_max=r.number("backoff_max", d.backoff_max, positive=True),
    )
    if cfg.username and not cfg.password_file:
        r.problem("password_file", "required when username is set")
    if bool(cfg.cert_file) != bool(cfg.key_file):
        r.problem(
            "cert_file" if not cfg.cert_file else "key_file", "cert_file and key_file go together"
        )
    if not cfg.masterleases_prefix.endswith("/"):
        r.problem("masterleases_prefix", "must end with '/'")
    r.finish()
    return cfg


def _kubernetes(table: Mapping[str, Any], problems: list[tuple[str, str]]) -> KubernetesConfig:
    d = KubernetesConfig()
    r = _Reader(table, "discovery.kubernetes.", problems)
    cfg = KubernetesConfig(
        kubeconfig=r.string("kubeconfig", d.kubeconfig),
        namespace=r.string("namespace", d.namespace),
        service=r.string("service", d.service),
        server_name=r.string("server_name", d.server_name),
        timeout=r.number("timeout", d.timeout, positive=True),
        watch_timeout=r.integer("watch_timeout", d.watch_timeout, low=1, high=3600),
        backoff_max=r.number("backoff_max", d.backoff_max, positive=True),
    )
    r.finish()
    return cfg


def _dns(table: Mapping[str, Any], problems: list[tuple[str, str]]) -> DnsConfig:
    d = DnsConfig()
    r = _Reader(table, "discovery.dns.", problems)
    cfg = DnsConfig(
        names=r.strings("names", d.names),
        srv=r.strings("srv", d.srv),
        nameservers=r.strings("nameservers", d.nameservers),
        min_refresh=r.number("min_refresh", d.min_refresh, positive=True),
        max_refresh=r.number("max_refresh", d.max_refresh, positive=True),
        timeout=r.number("timeout", d.timeout, positive=True),
    )
    for i, ns in enumerate(cfg.nameservers):
        try:
            ep = parse_hostport(ns, 53)
        except ValueError as exc:
            problems.append((f"discovery.dns.nameservers[{i}]", str(exc)))
            continue
        if not ep.is_ip:
            problems.append((f"discovery.dns.nameservers[{i}]", f"must be an IP address: {ns!r}"))
    if cfg.min_refresh > cfg.max_refresh:
        r.problem("min_refresh", "must be <= max_refresh")
    if not cfg.names and not cfg.srv:
        r.problem("names", "names or srv must list at least one name")
    r.finish()
    return cfg


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document; raises ConfigError listing every problem."""
    problems: list[tuple[str, str]] = []
    d = Config()
    r = _Reader(data, "", problems)
    default_port = r.integer("default_port", d.default_port, low=1, high=65535)
    before = len(problems)
    listen = _addresses(r, "listen", r.strings("listen", (DEFAULT_LISTEN,)), None)
    if "listen" in data and not listen and len(problems) == before:
        r.problem("listen", "must list at least one address")
    admin_text = r.string("admin", DEFAULT_ADMIN)
    admin: Endpoint | None = None
    if admin_text:
        try:
            admin = _parse_address(admin_text)
        except ValueError as exc:
            r.problem("admin", str(exc))
    preset = r.choice("preset", "", ("", "k3s"))
    cfg = Config(
        listen=listen,
        admin=admin,
        state_file=r.string("state_file", d.state_file),
        default_port=default_port,
        policy=Policy(r.choice("policy", d.policy.value, tuple(p.value for p in Policy))),
        drain_timeout=r.number("drain_timeout", d.drain_timeout),
        preset=preset,
        data_dir=r.string("data_dir", d.data_dir),
        log_format=r.choice("log_format", d.log_format, ("auto", "json", "console")),
        log_level=r.choice("log_level", d.log_level, LOG_LEVELS),
        loop=r.choice("loop", d.loop, ("uvloop", "asyncio")),
    )
    servers = r.table_("servers")
    if servers is not None:
        sr = _Reader(servers, "servers.", problems)
        addresses = sr.strings("addresses", ())
        _addresses(sr, "addresses", addresses, default_port)  # validation only
        cfg = replace(cfg, servers=addresses)
        sr.finish()
    if (t := r.table_("probe")) is not None:
        cfg = replace(cfg, probe=_probe(t, problems))
    if (t := r.table_("forward")) is not None:
        cfg = replace(cfg, forward=_forward(t, problems))
    discovery = r.table_("discovery")
    if discovery is not None:
        dr = _Reader(discovery, "discovery.", problems)
        if (t := dr.table_("etcd")) is not None:
            cfg = replace(cfg, etcd=_etcd(t, problems))
        if (t := dr.table_("kubernetes")) is not None:
            cfg = replace(cfg, kubernetes=_kubernetes(t, problems))
        if (t := dr.table_("dns")) is not None:
            cfg = replace(cfg, dns=_dns(t, problems))
        dr.finish()
    r.finish()
    if cfg.preset == "k3s":
        cfg = apply_k3s_preset(cfg)
    _check_file(_Reader({}, "probe.", problems), "ca_file", cfg.probe.ca_file)
    _check_file(_Reader({}, "probe.", problems), "cert_file", cfg.probe.cert_file)
    _check_file(_Reader({}, "probe.", problems), "key_file", cfg.probe.key_file)
    if problems:
        raise ConfigError(problems)
    return cfg


def load(path: str | Path) -> Config:
    """Read and validate a TOML file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError.single("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError.single("config", f"{path} is not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError.single("config", f"{path}: invalid TOML: {exc}") from None
    return from_mapping(data)


def apply_k3s_preset(cfg: Config) -> Config:
    """Fill in what a k3s node has on disk, unless set explicitly.

    Reads (relative to data_dir): server/tls/etcd/{server-ca.crt,client.crt,client.key}
    for etcd; agent/{server-ca.crt,client-k3s-controller.crt,client-k3s-controller.key}
    for the probe's TLS; agent/k3scontroller.kubeconfig (else agent/kubelet.kubeconfig)
    for the Kubernetes source.

    On a node's first boot k3s has not written these yet, and it needs lbproxy to join
    the cluster: so what is missing is left out, with a note, instead of refusing to
    start. The probe then goes without a client certificate (an apiserver's 401 still
    counts as live) and, without the cluster CA, without verifying the serving
    certificate; the Kubernetes source waits for a restart of lbproxy. The etcd source
    keeps retrying until its files appear.
    """
    base = Path(cfg.data_dir)
    etcd_tls = base / "server" / "tls" / "etcd"
    agent = base / "agent"
    notes = list(cfg.notes)

    def present(*paths: Path) -> bool:
        return all(_exists(p) for p in paths)

    etcd = cfg.etcd or EtcdConfig()
    etcd = replace(
        etcd,
        ca_file=etcd.ca_file or str(etcd_tls / "server-ca.crt"),
        cert_file=etcd.cert_file or str(etcd_tls / "client.crt"),
        key_file=etcd.key_file or str(etcd_tls / "client.key"),
    )
    probe = cfg.probe
    if probe.kind is ProbeKind.HTTPS:
        cert, key = agent / "client-k3s-controller.crt", agent / "client-k3s-controller.key"
        if not probe.cert_file:
            if present(cert, key):
                probe = replace(probe, cert_file=str(cert), key_file=str(key))
            else:
                notes.append(f"k3s preset: no {cert} yet: probing without a client certificate")
        if not probe.ca_file and not probe.insecure_skip_verify:
            ca = next(
                (
                    c
                    for c in (agent / "server-ca.crt", base / "server/tls/server-ca.crt")
                    if _exists(c)
                ),
                None,
            )
            if ca is not None:
                probe = replace(probe, ca_file=str(ca))
            else:
                notes.append(
                    f"k3s preset: no cluster CA under {base} yet: probes do not verify the "
                    "serving certificate until lbproxy restarts"
                )
                probe = replace(probe, insecure_skip_verify=True)
        probe = replace(probe, server_name=probe.server_name or "kubernetes")
    kube = cfg.kubernetes
    if kube is None or kube.kubeconfig == KubernetesConfig().kubeconfig:
        # Not set explicitly (the default names the default data_dir): follow data_dir.
        candidates = (agent / "k3scontroller.kubeconfig", agent / "kubelet.kubeconfig")
        found = next((c for c in candidates if _exists(c)), None)
        if found is not None:
            kube = replace(kube or KubernetesConfig(), kubeconfig=str(found))
        elif kube is None:
            notes.append(
                f"k3s preset: no {candidates[0]} yet: Kubernetes discovery is off until "
                "lbproxy restarts"
            )
        else:
            kube = replace(kube, kubeconfig=str(candidates[0]))
    return replace(cfg, etcd=etcd, probe=probe, kubernetes=kube, notes=tuple(notes))


def _exists(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False
