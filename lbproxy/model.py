"""Plain values shared by every layer: endpoints, their addresses and source names."""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

# Source names carried as provenance on every endpoint.
SOURCE_STATIC: Final = "static"
SOURCE_STATE: Final = "state"
SOURCE_ETCD_APIADDRESSES: Final = "etcd:k3s/apiaddresses"
SOURCE_ETCD_MASTERLEASES: Final = "etcd:masterleases"
SOURCE_KUBERNETES: Final = "kubernetes"
SOURCE_DNS: Final = "dns"

# Sources whose listing is itself proof that an endpoint is a real apiserver:
# the apiserver (or k3s on its behalf) writes them.
AUTHORITATIVE_SOURCES: Final = frozenset(
    {SOURCE_ETCD_APIADDRESSES, SOURCE_ETCD_MASTERLEASES, SOURCE_KUBERNETES}
)


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """An apiserver address: an IP literal or a host name, and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def names(endpoints: Iterable[Endpoint]) -> list[str]:
    """Endpoints as sorted "host:port" strings, for log lines and messages."""
    return sorted(str(e) for e in endpoints)


def _check_port(text: str, original: str) -> int:
    # isascii: str.isdigit() also accepts "²" (which int() rejects) and other scripts' digits.
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"invalid port in {original!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range 1-65535 in {original!r}")
    return port


def _check_host(host: str, original: str) -> str:
    if not host:
        raise ValueError(f"missing host in {original!r}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    # Numbers-and-dots that ipaddress rejects ("010.0.0.1", "1.2.3", "0x7f000001") would
    # reach the C resolver, whose inet_aton reads them as octal/hex/short IPv4 forms.
    numeric = all(
        label.isdigit()
        or (label[:2].lower() == "0x" and all(c in string.hexdigits for c in label[2:]))
        for label in labels
    )
    ok = not numeric and all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isalnum() or c in "-_" for c in label)
        for label in labels
    )
    if not ok or len(host) > 253:
        raise ValueError(f"invalid host {host!r} in {original!r}")
    return host.rstrip(".").lower()


def parse_hostport(text: str, default_port: int | None = None) -> Endpoint:
    """Parse ``host:port``, ``[v6]:port``, a bare host or a bare IPv6 address.

    Raises ValueError with a message that names the offending text.
    """
    original = text
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {original!r}")
        host = text[1:end]
        rest = text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {original!r}") from None
        if rest == "":
            port = default_port
        elif rest.startswith(":"):
            port = _check_port(rest[1:], original)
        else:
            raise ValueError(f"unexpected text after ']' in {original!r}")
    elif text.count(":") > 1:
        # A bare IPv6 address without brackets carries no port.
        try:
            host = str(ipaddress.IPv6Address(text))
        except ValueError:
            raise ValueError(f"invalid address {original!r} (write IPv6 as [addr]:port)") from None
        port = default_port
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        port = _check_port(port_text, original)
    else:
        host, port = text, default_port
    if port is None:
        raise ValueError(f"missing port in {original!r}")
    return Endpoint(_check_host(host, original), port)
