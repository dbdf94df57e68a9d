"""Static seeds from --server and [servers] addresses."""

from __future__ import annotations

from lbproxy.model import SOURCE_STATIC, parse_hostport
from lbproxy.pool.events import EndpointsDiscovered


def seeds(addresses: tuple[str, ...], default_port: int) -> EndpointsDiscovered:
    """Config validation has already rejected malformed addresses."""
    eps = frozenset(parse_hostport(a, default_port) for a in addresses)
    return EndpointsDiscovered(SOURCE_STATIC, eps)
