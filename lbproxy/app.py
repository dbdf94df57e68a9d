"""Builds a Runtime from a Config: picks the probe and the discovery sources it enables."""

from __future__ import annotations

from lbproxy.config import Config
from lbproxy.discovery.base import Source
from lbproxy.runtime import Runtime


def build_sources(cfg: Config, runtime: Runtime) -> list[Source]:
    """One source per enabled [discovery.*] section."""
    sources: list[Source] = []
    return sources


def build_runtime(cfg: Config) -> Runtime:
    runtime = Runtime(cfg)
    runtime.sources.extend(build_sources(cfg, runtime))
    return runtime
