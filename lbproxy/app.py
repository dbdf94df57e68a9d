"""Builds a Runtime from a Config: picks the probe and the discovery sources it enables."""

from __future__ import annotations

from lbproxy.config import Config
from lbproxy.discovery.base import Source
from lbproxy.runtime import Runtime


def build_sources(cfg: Config, runtime: Runtime) -> list[Source]:
    """One source per enabled [discovery.*] section."""
    sources: list[Source] = []
    if cfg.etcd is not None:
        from lbproxy.discovery.etcd import EtcdSource

        sources.append(EtcdSource(cfg.etcd, cfg.default_port))
    if cfg.kubernetes is not None:
        from lbproxy.discovery.kubernetes import KubernetesSource
        from lbproxy.model import Endpoint

        def own_addresses() -> list[Endpoint]:
            # Configured and bound listen addresses: the source never dials through them.
            bound = [Endpoint(host, port) for host, port in runtime.listen_addresses]
            return [*cfg.listen, *bound]

        # Reads the kubeconfig now, so a bad one stops `lbproxy run` at start.
        sources.append(KubernetesSource.from_config(cfg.kubernetes, runtime, own_addresses))
    if cfg.dns is not None:
        from lbproxy.discovery.dns import DnsSource

        sources.append(DnsSource(cfg.dns, cfg.default_port))
    return sources


def build_runtime(cfg: Config) -> Runtime:
    """The sources are built by the runtime right after its listeners are bound."""
    return Runtime(cfg, source_factory=lambda runtime: build_sources(cfg, runtime))
