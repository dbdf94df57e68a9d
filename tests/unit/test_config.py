"""Config validation: documented defaults, every problem named by its key path, all at once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbproxy.cli import build_parser, config_from_args
from lbproxy.config import (
    Config,
    DnsConfig,
    EtcdConfig,
    ForwardConfig,
    KubernetesConfig,
    ProbeKind,
    from_mapping,
    load,
)
from lbproxy.errors import ConfigError
from lbproxy.model import Endpoint
from lbproxy.pool.selection import Policy


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(data)
    return info.value.lines()


# ---------------------------------------------------------------- defaults


def test_defaults_match_the_documented_ones() -> None:
    cfg = from_mapping({})
    assert cfg == Config()
    assert cfg.listen == (Endpoint("127.0.0.1", 6445),)
    assert cfg.admin == Endpoint("127.0.0.1", 6446)
    assert cfg.default_port == 6443
    assert cfg.policy is Policy.STICKY
    assert cfg.drain_timeout == 10.0
    assert cfg.servers == ()
    assert cfg.preset == ""
    probe = cfg.probe
    assert probe.kind is ProbeKind.HTTPS
    assert probe.path == "/readyz"
    assert (probe.interval, probe.timeout, probe.rise, probe.fall) == (2.0, 1.0, 1, 2)
    assert cfg.forward == ForwardConfig()
    # Discovery sources are off unless their section is present.
    assert (cfg.etcd, cfg.kubernetes, cfg.dns) == (None, None, None)


def test_empty_sections_give_the_section_defaults() -> None:
    cfg = from_mapping(
        {
            "probe": {},
            "forward": {},
            "servers": {},
            "discovery": {"etcd": {}, "kubernetes": {}, "dns": {"names": ["api.example"]}},
        }
    )
    assert cfg.probe == Config().probe
    assert cfg.forward == ForwardConfig()
    assert cfg.etcd == EtcdConfig()
    assert cfg.kubernetes == KubernetesConfig()
    assert cfg.dns == DnsConfig(names=("api.example",))


def test_a_full_valid_document(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    cert = tmp_path / "client.crt"
    key = tmp_path / "client.key"
    for f in (ca, cert, key):
        f.write_text("x")
    cfg = from_mapping(
        {
            "listen": ["127.0.0.1:7443", "[::1]:7443"],
            "admin": "[::1]:7444",
            "state_file": "/tmp/x.json",
            "default_port": 443,
            "policy": "least-connections",
            "drain_timeout": 0,
            "log_format": "json",
            "log_level": "debug",
            "loop": "asyncio",
            "servers": {"addresses": ["10.0.0.1", "10.0.0.2:6444", "[fd00::1]", "api.example"]},
            "probe": {
                "kind": "tls",
                "path": "/livez",
                "interval": 0.5,
                "timeout": 3,
                "rise": 2,
                "fall": 3,
                "jitter": 0,
                "ca_file": str(ca),
                "cert_file": str(cert),
                "key_file": str(key),
                "server_name": "kubernetes",
                "insecure_skip_verify": True,
            },
            "forward": {"dial_timeout": 1, "buffer_size": 4096, "user_timeout": 0},
        }
    )
    assert cfg.listen == (Endpoint("127.0.0.1", 7443), Endpoint("::1", 7443))
    assert cfg.admin == Endpoint("::1", 7444)
    assert cfg.default_port == 443
    assert cfg.policy is Policy.LEAST_CONNECTIONS
    assert cfg.drain_timeout == 0.0
    assert cfg.servers == ("10.0.0.1", "10.0.0.2:6444", "[fd00::1]", "api.example")
    assert cfg.probe.kind is ProbeKind.TLS
    assert cfg.probe.interval == 0.5
    assert isinstance(cfg.probe.timeout, float)
    assert cfg.probe.timeout == 3.0
    assert cfg.probe.insecure_skip_verify is True
    assert cfg.forward.buffer_size == 4096
    assert cfg.forward.user_timeout == 0.0


def test_empty_admin_disables_the_admin_api() -> None:
    assert from_mapping({"admin": ""}).admin is None


# ---------------------------------------------------------------- one problem each


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # wrong types
        ({"drain_timeout": "10"}, "drain_timeout: must be a number, got str"),
        ({"drain_timeout": True}, "drain_timeout: must be a number, got bool"),
        ({"default_port": "6443"}, "default_port: must be an integer, got str"),
        ({"default_port": 6443.0}, "default_port: must be an integer, got float"),
        ({"admin": 6446}, "admin: must be a string, got int"),
        ({"state_file": ["a"]}, "state_file: must be a string, got list"),
        ({"listen": "127.0.0.1:6445"}, "listen: must be a list of strings, got str"),
        ({"listen": ["127.0.0.1:6445", 6445]}, "listen: must be a list of strings, got list"),
        ({"probe": {"rise": True}}, "probe.rise: must be an integer, got bool"),
        ({"probe": {"fall": 1.5}}, "probe.fall: must be an integer, got float"),
        ({"probe": {"path": 1}}, "probe.path: must be a string, got int"),
        (
            {"probe": {"insecure_skip_verify": "yes"}},
            "probe.insecure_skip_verify: must be true or false, got str",
        ),
        (
            {"forward": {"keepalive_count": "3"}},
            "forward.keepalive_count: must be an integer, got str",
        ),
        ({"probe": "https"}, "probe: must be a table"),
        ({"forward": []}, "forward: must be a table"),
        ({"servers": ["10.0.0.1"]}, "servers: must be a table"),
        ({"discovery": 1}, "discovery: must be a table"),
        ({"discovery": {"etcd": "on"}}, "discovery.etcd: must be a table"),
        ({"discovery": {"kubernetes": True}}, "discovery.kubernetes: must be a table"),
        ({"discovery": {"dns": ["a"]}}, "discovery.dns: must be a table"),
        (
            {"servers": {"addresses": "10.0.0.1"}},
            "servers.addresses: must be a list of strings, got str",
        ),
        # durations: negative and zero
        ({"drain_timeout": -1}, "drain_timeout: must be >= 0"),
        ({"probe": {"timeout": 0}}, "probe.timeout: must be > 0"),
        ({"probe": {"timeout": -0.5}}, "probe.timeout: must be > 0"),
        ({"probe": {"interval": 0}}, "probe.interval: must be > 0"),
        ({"probe": {"jitter": -0.1}}, "probe.jitter: must be >= 0"),
        ({"probe": {"jitter": 1}}, "probe.jitter: must be < 1 (a fraction of the interval)"),
        ({"forward": {"dial_timeout": 0}}, "forward.dial_timeout: must be > 0"),
        ({"forward": {"keepalive_idle": 0}}, "forward.keepalive_idle: must be > 0"),
        ({"forward": {"keepalive_interval": -1}}, "forward.keepalive_interval: must be > 0"),
        ({"forward": {"user_timeout": -1}}, "forward.user_timeout: must be >= 0"),
        # socket options are C ints with kernel limits
        ({"forward": {"keepalive_idle": 32768}}, "forward.keepalive_idle: must be <= 32767"),
        ({"forward": {"keepalive_interval": 1e9}}, "forward.keepalive_interval: must be <= 32767"),
        ({"forward": {"user_timeout": 2147484}}, "forward.user_timeout: must be <= 2147483"),
        # ranges
        ({"default_port": 0}, "default_port: must be between 1 and 65535"),
        ({"default_port": 65536}, "default_port: must be between 1 and 65535"),
        ({"probe": {"rise": 0}}, "probe.rise: must be between 1 and 100"),
        ({"probe": {"fall": 101}}, "probe.fall: must be between 1 and 100"),
        ({"forward": {"keepalive_count": 0}}, "forward.keepalive_count: must be between 1 and 127"),
        (
            {"forward": {"buffer_size": 100}},
            "forward.buffer_size: must be between 4096 and 67108864",
        ),
        # choices
        ({"policy": "random"}, "policy: must be one of sticky, least-connections; got 'random'"),
        ({"probe": {"kind": "http"}}, "probe.kind: must be one of tcp, tls, https; got 'http'"),
        ({"probe": {"kind": "HTTPS"}}, "probe.kind: must be one of tcp, tls, https; got 'HTTPS'"),
        ({"log_format": "xml"}, "log_format: must be one of auto, json, console; got 'xml'"),
        (
            {"log_level": "trace"},
            "log_level: must be one of debug, info, warning, error; got 'trace'",
        ),
        ({"loop": "trio"}, "loop: must be one of uvloop, asyncio; got 'trio'"),
        ({"preset": "k8s"}, "preset: must be one of '', k3s; got 'k8s'"),
        ({"probe": {"path": "readyz"}}, "probe.path: must start with '/'"),
        # addresses
        ({"listen": []}, "listen: must list at least one address"),
        ({"listen": ["127.0.0.1"]}, "listen[0]: missing port in '127.0.0.1'"),
        (
            {"listen": ["127.0.0.1:6445", "127.0.0.1:99999"]},
            "listen[1]: port out of range 1-65535 in '127.0.0.1:99999'",
        ),
        ({"listen": ["localhost:http"]}, "listen[0]: invalid port in 'localhost:http'"),
        ({"listen": ["[::1:6445"]}, "listen[0]: unclosed '[' in '[::1:6445'"),
        ({"admin": "nohost"}, "admin: missing port in 'nohost'"),
        ({"admin": ":6446"}, "admin: missing host in ':6446'"),
        (
            {"servers": {"addresses": ["10.0.0.1", "bad host:6443"]}},
            "servers.addresses[1]: invalid host 'bad host' in 'bad host:6443'",
        ),
        ({"servers": {"addresses": [""]}}, "servers.addresses[0]: empty address"),
        # unknown keys at every level
        ({"bogus": 1}, "bogus: unknown key"),
        ({"probe": {"bogus": 1}}, "probe.bogus: unknown key"),
        ({"forward": {"bogus": 1}}, "forward.bogus: unknown key"),
        ({"servers": {"bogus": 1}}, "servers.bogus: unknown key"),
        ({"discovery": {"bogus": {}}}, "discovery.bogus: unknown key"),
        ({"discovery": {"etcd": {"bogus": 1}}}, "discovery.etcd.bogus: unknown key"),
        ({"discovery": {"kubernetes": {"bogus": 1}}}, "discovery.kubernetes.bogus: unknown key"),
        (
            {"discovery": {"dns": {"names": ["a.example"], "bogus": 1}}},
            "discovery.dns.bogus: unknown key",
        ),
        # discovery: etcd
        ({"discovery": {"etcd": {"endpoints": []}}}, "discovery.etcd.endpoints: must not be empty"),
        (
            {"discovery": {"etcd": {"endpoints": ["https://127.0.0.1:2379", "127.0.0.1:2379"]}}},
            "discovery.etcd.endpoints[1]: must be an http(s) URL: '127.0.0.1:2379'",
        ),
        (
            {"discovery": {"etcd": {"username": "root"}}},
            "discovery.etcd.password_file: required when username is set",
        ),
        (
            {"discovery": {"etcd": {"cert_file": "/c.crt"}}},
            "discovery.etcd.key_file: cert_file and key_file go together",
        ),
        (
            {"discovery": {"etcd": {"key_file": "/c.key"}}},
            "discovery.etcd.cert_file: cert_file and key_file go together",
        ),
        (
            {"discovery": {"etcd": {"masterleases_prefix": "/registry/masterleases"}}},
            "discovery.etcd.masterleases_prefix: must end with '/'",
        ),
        ({"discovery": {"etcd": {"timeout": 0}}}, "discovery.etcd.timeout: must be > 0"),
        ({"discovery": {"etcd": {"backoff_max": -1}}}, "discovery.etcd.backoff_max: must be > 0"),
        # discovery: kubernetes
        (
            {"discovery": {"kubernetes": {"watch_timeout": 0}}},
            "discovery.kubernetes.watch_timeout: must be between 1 and 3600",
        ),
        (
            {"discovery": {"kubernetes": {"namespace": 1}}},
            "discovery.kubernetes.namespace: must be a string, got int",
        ),
        (
            {"discovery": {"kubernetes": {"timeout": 0}}},
            "discovery.kubernetes.timeout: must be > 0",
        ),
        # discovery: dns
        (
            {"discovery": {"dns": {}}},
            "discovery.dns.names: names or srv must list at least one name",
        ),
        (
            {"discovery": {"dns": {"names": ["a.example"], "nameservers": ["dns.example"]}}},
            "discovery.dns.nameservers[0]: must be an IP address: 'dns.example'",
        ),
        (
            {"discovery": {"dns": {"srv": ["_x._tcp.example"], "nameservers": ["1.1.1.1:0"]}}},
            "discovery.dns.nameservers[0]: port out of range 1-65535 in '1.1.1.1:0'",
        ),
        (
            {"discovery": {"dns": {"names": ["a.example"], "min_refresh": 10, "max_refresh": 5}}},
            "discovery.dns.min_refresh: must be <= max_refresh",
        ),
        (
            {"discovery": {"dns": {"names": ["a.example"], "timeout": 0}}},
            "discovery.dns.timeout: must be > 0",
        ),
    ],
)
def test_each_problem_is_reported_with_its_key_path(data: dict[str, Any], expected: str) -> None:
    assert problems_of(data) == [expected]


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, pytest.param(10**400, id="int-beyond-float")],
)
@pytest.mark.parametrize(
    ("section", "key"),
    [
        (None, "drain_timeout"),
        ("probe", "timeout"),
        ("probe", "jitter"),
        ("forward", "user_timeout"),
    ],
)
def test_durations_must_be_finite(section: str | None, key: str, value: float) -> None:
    # TOML allows nan and inf, and tomllib reads integers of any size; none is a duration.
    data: dict[str, Any] = {key: value} if section is None else {section: {key: value}}
    path = key if section is None else f"{section}.{key}"
    assert problems_of(data) == [f"{path}: must be a finite number"]


def test_ipv6_listen_needs_brackets_and_says_so() -> None:
    assert from_mapping({"listen": ["[::1]:6445"]}).listen == (Endpoint("::1", 6445),)
    [line] = problems_of({"listen": ["::1:6445"]})
    assert line.startswith("listen[0]: ")
    assert "'::1:6445'" in line
    # The message must point at the fix, not just call the address wrong.
    assert "[addr]:port" in line
    [line] = problems_of({"admin": "::1:6446"})
    assert line.startswith("admin: ")
    assert "[addr]:port" in line


def test_bare_ipv6_server_takes_the_default_port() -> None:
    cfg = from_mapping({"servers": {"addresses": ["fd00::1", "[fd00::2]:7443"]}})
    assert cfg.servers == ("fd00::1", "[fd00::2]:7443")


def test_probe_cert_without_key_and_key_without_cert(tmp_path: Path) -> None:
    cert = tmp_path / "c.crt"
    cert.write_text("x")
    assert problems_of({"probe": {"cert_file": str(cert)}}) == [
        "probe.key_file: cert_file and key_file go together"
    ]
    assert problems_of({"probe": {"key_file": str(cert)}}) == [
        "probe.cert_file: cert_file and key_file go together"
    ]


def test_probe_files_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    assert problems_of({"probe": {"ca_file": str(missing)}}) == [
        f"probe.ca_file: file not found: {missing}"
    ]
    assert problems_of({"probe": {"ca_file": str(tmp_path)}}) == [
        f"probe.ca_file: file not found: {tmp_path}"
    ]


def test_a_probe_file_name_the_os_rejects_is_a_problem_not_a_crash() -> None:
    # A name longer than NAME_MAX makes stat() fail with ENAMETOOLONG.
    lines = problems_of({"probe": {"ca_file": "/" + "a" * 5000}})
    assert len(lines) == 1
    assert lines[0].startswith("probe.ca_file: ")


# ---------------------------------------------------------------- all at once


def test_every_problem_is_reported_at_once() -> None:
    lines = problems_of(
        {
            "bogus": 1,
            "default_port": 0,
            "listen": [],
            "drain_timeout": -1,
            "policy": "random",
            "probe": {"timeout": 0, "kind": "http", "extra": True},
            "forward": {"dial_timeout": "1s"},
            "discovery": {"etcd": {"endpoints": ["127.0.0.1:2379"]}, "dns": {}},
        }
    )
    assert sorted(lines) == sorted(
        [
            "bogus: unknown key",
            "default_port: must be between 1 and 65535",
            "listen: must list at least one address",
            "drain_timeout: must be >= 0",
            "policy: must be one of sticky, least-connections; got 'random'",
            "probe.timeout: must be > 0",
            "probe.kind: must be one of tcp, tls, https; got 'http'",
            "probe.extra: unknown key",
            "forward.dial_timeout: must be a number, got str",
            "discovery.etcd.endpoints[0]: must be an http(s) URL: '127.0.0.1:2379'",
            "discovery.dns.names: names or srv must list at least one name",
        ]
    )


def test_every_bad_address_in_a_list_is_reported() -> None:
    lines = problems_of({"listen": ["nohost", "127.0.0.1:6445", "1.2.3.4:0"]})
    assert lines == [
        "listen[0]: missing port in 'nohost'",
        "listen[2]: port out of range 1-65535 in '1.2.3.4:0'",
    ]


def test_config_error_message_joins_the_lines() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping({"bogus": 1, "probe": {"timeout": 0}})
    assert str(info.value) == "probe.timeout: must be > 0; bogus: unknown key"


# ---------------------------------------------------------------- k3s preset


def _k3s_data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "k3s"
    agent = data / "agent"
    agent.mkdir(parents=True)
    for name in (
        "server-ca.crt",
        "client-k3s-controller.crt",
        "client-k3s-controller.key",
        "k3scontroller.kubeconfig",
    ):
        (agent / name).write_text("x")
    return data


def test_k3s_preset_fills_paths_from_data_dir(tmp_path: Path) -> None:
    data = _k3s_data_dir(tmp_path)
    cfg = from_mapping({"preset": "k3s", "data_dir": str(data)})
    etcd_tls = data / "server" / "tls" / "etcd"
    agent = data / "agent"
    assert cfg.etcd is not None
    assert cfg.etcd.ca_file == str(etcd_tls / "server-ca.crt")
    assert cfg.etcd.cert_file == str(etcd_tls / "client.crt")
    assert cfg.etcd.key_file == str(etcd_tls / "client.key")
    assert cfg.etcd.endpoints == EtcdConfig().endpoints
    assert cfg.probe.kind is ProbeKind.HTTPS
    assert cfg.probe.ca_file == str(agent / "server-ca.crt")
    assert cfg.probe.cert_file == str(agent / "client-k3s-controller.crt")
    assert cfg.probe.key_file == str(agent / "client-k3s-controller.key")
    assert cfg.probe.server_name == "kubernetes"
    assert cfg.kubernetes is not None
    assert cfg.kubernetes.kubeconfig == str(agent / "k3scontroller.kubeconfig")


def test_k3s_preset_keeps_explicit_values(tmp_path: Path) -> None:
    data = _k3s_data_dir(tmp_path)
    own_ca = tmp_path / "own-ca.crt"
    own_ca.write_text("x")
    cfg = from_mapping(
        {
            "preset": "k3s",
            "data_dir": str(data),
            "probe": {"ca_file": str(own_ca), "server_name": "api.example"},
            "discovery": {
                "etcd": {"endpoints": ["https://127.0.0.1:2379"], "ca_file": "/etc/etcd-ca.crt"},
                "kubernetes": {"kubeconfig": "/etc/kubeconfig", "namespace": "x"},
            },
        }
    )
    assert cfg.probe.ca_file == str(own_ca)
    assert cfg.probe.server_name == "api.example"
    assert cfg.probe.cert_file == str(data / "agent" / "client-k3s-controller.crt")
    assert cfg.etcd is not None
    assert cfg.etcd.endpoints == ("https://127.0.0.1:2379",)
    assert cfg.etcd.ca_file == "/etc/etcd-ca.crt"
    assert cfg.etcd.cert_file == str(data / "server" / "tls" / "etcd" / "client.crt")
    assert cfg.kubernetes == KubernetesConfig(kubeconfig="/etc/kubeconfig", namespace="x")


def test_k3s_preset_fills_kubeconfig_in_a_section_that_leaves_it_out(tmp_path: Path) -> None:
    data = _k3s_data_dir(tmp_path)
    cfg = from_mapping(
        {
            "preset": "k3s",
            "data_dir": str(data),
            "discovery": {"kubernetes": {"namespace": "default"}},
        }
    )
    assert cfg.kubernetes is not None
    assert cfg.kubernetes.kubeconfig == str(data / "agent" / "k3scontroller.kubeconfig")


def test_k3s_preset_leaves_a_tcp_probe_alone(tmp_path: Path) -> None:
    cfg = from_mapping({"preset": "k3s", "data_dir": str(tmp_path), "probe": {"kind": "tcp"}})
    assert cfg.probe.kind is ProbeKind.TCP
    assert (cfg.probe.ca_file, cfg.probe.cert_file, cfg.probe.key_file) == ("", "", "")


def test_k3s_preset_on_first_boot_leaves_out_what_k3s_has_not_written_yet(
    tmp_path: Path,
) -> None:
    """k3s needs lbproxy to join, so lbproxy must start before k3s writes its files."""
    cfg = from_mapping({"preset": "k3s", "data_dir": str(tmp_path)})
    agent = tmp_path / "agent"
    assert (cfg.probe.cert_file, cfg.probe.key_file, cfg.probe.ca_file) == ("", "", "")
    assert cfg.probe.insecure_skip_verify
    assert cfg.kubernetes is None
    assert cfg.etcd is not None  # keeps retrying until its files appear
    assert cfg.notes == (
        f"k3s preset: no {agent / 'client-k3s-controller.crt'} yet: probing without a "
        "client certificate",
        f"k3s preset: no cluster CA under {tmp_path} yet: probes do not verify the serving "
        "certificate until lbproxy restarts",
        f"k3s preset: no {agent / 'k3scontroller.kubeconfig'} yet: Kubernetes discovery "
        "is off until lbproxy restarts",
    )


def test_k3s_preset_falls_back_to_the_kubelet_kubeconfig_and_server_ca(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    agent.mkdir()
    (agent / "kubelet.kubeconfig").write_text("x")
    (tmp_path / "server" / "tls").mkdir(parents=True)
    (tmp_path / "server" / "tls" / "server-ca.crt").write_text("x")
    cfg = from_mapping({"preset": "k3s", "data_dir": str(tmp_path)})
    assert cfg.kubernetes is not None
    assert cfg.kubernetes.kubeconfig == str(agent / "kubelet.kubeconfig")
    assert cfg.probe.ca_file == str(tmp_path / "server" / "tls" / "server-ca.crt")
    assert not cfg.probe.insecure_skip_verify


# ---------------------------------------------------------------- flags over the file


def _args(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_flags_override_file_values(tmp_path: Path) -> None:
    data = _k3s_data_dir(tmp_path)
    path = tmp_path / "lbproxy.toml"
    path.write_text(
        'listen = ["127.0.0.1:7000"]\n'
        'admin = "127.0.0.1:7001"\n'
        'state_file = "/from/file.json"\n'
        'log_format = "console"\n'
        'log_level = "debug"\n'
        'loop = "uvloop"\n'
        "drain_timeout = 3\n"
        "[servers]\n"
        'addresses = ["10.0.0.1"]\n'
        "[probe]\n"
        'kind = "https"\n'
        "timeout = 4\n"
        "interval = 5\n"
    )
    cfg = _args(
        "--config",
        str(path),
        "--listen",
        "127.0.0.1:8000",
        "--listen",
        "[::1]:8000",
        "--server",
        "10.0.0.2",
        "--server",
        "[fd00::3]:7443",
        "--admin",
        "",
        "--state-file",
        "/from/flag.json",
        "--probe",
        "tcp",
        "--log-format",
        "json",
        "--log-level",
        "warning",
        "--loop",
        "asyncio",
        "--k3s",
        "--data-dir",
        str(data),
    )
    assert cfg.listen == (Endpoint("127.0.0.1", 8000), Endpoint("::1", 8000))
    assert cfg.servers == ("10.0.0.2", "[fd00::3]:7443")
    assert cfg.admin is None
    assert cfg.state_file == "/from/flag.json"
    assert cfg.probe.kind is ProbeKind.TCP
    assert (cfg.log_format, cfg.log_level, cfg.loop) == ("json", "warning", "asyncio")
    assert cfg.preset == "k3s"
    assert cfg.data_dir == str(data)
    # What no flag touches stays as the file says.
    assert cfg.drain_timeout == 3.0
    assert (cfg.probe.timeout, cfg.probe.interval) == (4.0, 5.0)


def test_without_flags_the_file_wins(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.toml"
    path.write_text(
        'admin = "127.0.0.1:7001"\n[probe]\nkind = "tls"\n[servers]\naddresses = ["a"]\n'
    )
    cfg = _args("--config", str(path))
    assert cfg.admin == Endpoint("127.0.0.1", 7001)
    assert cfg.probe.kind is ProbeKind.TLS
    assert cfg.servers == ("a",)


def test_flags_alone_without_a_file() -> None:
    cfg = _args("--server", "127.0.0.1:6443", "--probe", "tcp")
    assert cfg.servers == ("127.0.0.1:6443",)
    assert cfg.probe.kind is ProbeKind.TCP
    assert cfg.listen == Config().listen


def test_bad_flag_values_are_reported_by_key_path() -> None:
    with pytest.raises(ConfigError) as info:
        _args("--listen", "nohost", "--server", "bad host", "--admin", "::1:1")
    lines = info.value.lines()
    assert "listen[0]: missing port in 'nohost'" in lines
    assert "servers.addresses[0]: invalid host 'bad host' in 'bad host'" in lines
    assert any(line.startswith("admin: ") for line in lines)
    assert len(lines) == 3


def test_a_flag_over_a_non_table_in_the_file_reports_the_file_problem(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.toml"
    path.write_text('probe = "tcp"\nservers = ["10.0.0.1"]\n')
    with pytest.raises(ConfigError) as info:
        _args("--config", str(path), "--probe", "tcp", "--server", "10.0.0.2")
    assert sorted(info.value.lines()) == ["probe: must be a table", "servers: must be a table"]


def test_an_invalid_choice_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", "--probe", "http"])
    assert info.value.code == 2
    assert "--probe" in capsys.readouterr().err


def test_config_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        _args("--config", str(missing))
    [line] = info.value.lines()
    assert line.startswith(f"config: cannot read {missing}: ")

    broken = tmp_path / "broken.toml"
    broken.write_text("listen = [\n")
    with pytest.raises(ConfigError) as info:
        _args("--config", str(broken))
    [line] = info.value.lines()
    assert line.startswith(f"config: {broken}: invalid TOML: ")

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    for call in (lambda: _args("--config", str(binary)), lambda: load(binary)):
        with pytest.raises(ConfigError) as info:
            call()
        [line] = info.value.lines()
        assert line.startswith("config: ")
        assert str(binary) in line


def test_load_reads_and_validates(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.toml"
    path.write_text("[probe]\ntimeout = 0\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.lines() == ["probe.timeout: must be > 0"]
    path.write_text('[probe]\nkind = "tcp"\n')
    assert load(path).probe.kind is ProbeKind.TCP


# ---------------------------------------------------------------- fuzz

KNOWN_KEYS = [
    "listen", "admin", "state_file", "default_port", "policy", "drain_timeout", "preset",
    "data_dir", "log_format", "log_level", "loop", "servers", "addresses", "probe", "forward",
    "discovery", "etcd", "kubernetes", "dns", "kind", "path", "interval", "timeout", "rise",
    "fall", "jitter", "ca_file", "cert_file", "key_file", "server_name", "insecure_skip_verify",
    "dial_timeout", "keepalive_idle", "keepalive_interval", "keepalive_count", "user_timeout",
    "buffer_size", "endpoints", "username", "password_file", "apiaddresses_key",
    "masterleases_prefix", "backoff_max", "kubeconfig", "namespace", "service", "watch_timeout",
    "names", "srv", "nameservers", "min_refresh", "max_refresh",
]  # fmt: skip

INTERESTING_STRINGS = [
    "", "127.0.0.1:6445", "[::1]:6445", "::1:6445", "[::1", "fd00::1", "a b:1", "10.0.0.1",
    "https://127.0.0.1:2379", "127.0.0.1:2379", "k3s", "tcp", "tls", "https", "sticky",
    "least-connections", "json", "debug", "asyncio", "/readyz", "/registry/", "/", "\x00",
    "/" + "a" * 300, "\ud800", "1.1.1.1", "dns.example",
]  # fmt: skip

toml_leaves = (
    st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(INTERESTING_STRINGS)
    | st.dates()
)
toml_keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=8)
toml_values = st.recursive(
    toml_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(toml_keys, children, max_size=6)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(toml_keys, toml_values, max_size=8))
def test_from_mapping_returns_a_config_or_raises_config_error(data: dict[str, Any]) -> None:
    try:
        cfg = from_mapping(data)
    except ConfigError as exc:
        problems = exc.problems
    else:
        assert isinstance(cfg, Config)
        assert cfg.listen
        return
    assert problems
    for key_path, message in problems:
        assert isinstance(key_path, str)
        assert key_path
        assert isinstance(message, str)
        assert message
