"""One active probe of one endpoint (tcp connect, TLS handshake, or HTTPS GET /readyz).

Every probe runs under one overall timeout, so a frozen process or a blackholed host
that still completes the TCP handshake counts as failed once the timeout passes.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lbproxy import __version__
from lbproxy.config import ProbeConfig, ProbeKind
from lbproxy.errors import ConfigError, describe, is_local_error
from lbproxy.model import Endpoint
from lbproxy.pool.events import ProbeCompleted
from lbproxy.pool.states import ProbeOutcome

# The k3s supervisor on an etcd-only node answers every apiserver path with this.
NOT_APISERVER_MARKER = b"apiserver disabled"
MAX_RESPONSE = 16 * 1024

Check = Callable[[Endpoint], Awaitable[ProbeCompleted]]


def make_ssl_context(
    ca_file: str, cert_file: str, key_file: str, *, insecure: bool = False, where: str = "probe"
) -> ssl.SSLContext:
    """A client context: the given CA (or the system CAs), and an optional client cert."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError.single(f"{where}.ca_file", f"cannot load {ca_file}: {exc}") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError.single(
                f"{where}.cert_file", f"cannot load {cert_file} / {key_file}: {exc}"
            ) from None
    return ctx


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes


def parse_response(raw: bytes) -> HttpAnswer:
    """Status and (raw, possibly chunk-framed) body of an HTTP/1.x response."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("incomplete HTTP response header")
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:60]!r}")
    return HttpAnswer(int(parts[1]), body)


def classify(answer: HttpAnswer) -> tuple[ProbeOutcome, str | None]:
    status = answer.status
    if status == 200:
        return ProbeOutcome.OK, None
    if status in (401, 403):
        return ProbeOutcome.UNAUTHORIZED, None
    snippet = answer.body[:80].decode("utf-8", "replace").strip()
    if status == 503 and NOT_APISERVER_MARKER in answer.body:
        return ProbeOutcome.NOT_APISERVER, f"HTTP 503: {snippet}"
    return ProbeOutcome.FAILED, f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"


class Checker:
    """Builds the probe function for the configured kind; TLS settings are loaded once."""

    def __init__(self, cfg: ProbeConfig) -> None:
        self.cfg = cfg
        self.ssl: ssl.SSLContext | None = None
        if cfg.kind is not ProbeKind.TCP:
            self.ssl = make_ssl_context(
                cfg.ca_file, cfg.cert_file, cfg.key_file, insecure=cfg.insecure_skip_verify
            )

    async def __call__(self, ep: Endpoint) -> ProbeCompleted:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                outcome, error = await self._run(ep)
        except TimeoutError:
            return ProbeCompleted(
                ep, ProbeOutcome.FAILED, False, None, f"timeout after {self.cfg.timeout:g}s"
            )
        except ssl.SSLError as exc:
            return ProbeCompleted(ep, ProbeOutcome.FAILED, False, None, f"TLS: {exc.reason or exc}")
        except (OSError, ValueError, EOFError) as exc:
            if is_local_error(exc):
                raise  # out of descriptors here: no verdict on the endpoint (see Runtime)
            return ProbeCompleted(ep, ProbeOutcome.FAILED, False, None, describe(exc))
        latency = time.monotonic() - started
        confirms = self.cfg.kind is ProbeKind.HTTPS and outcome in (
            ProbeOutcome.OK,
            ProbeOutcome.UNAUTHORIZED,
        )
        return ProbeCompleted(ep, outcome, confirms, latency, error)

    async def _run(self, ep: Endpoint) -> tuple[ProbeOutcome, str | None]:
        server_name = self.cfg.server_name or ep.host
        reader, writer = await asyncio.open_connection(
            ep.host,
            ep.port,
            ssl=self.ssl,
            server_hostname=server_name if self.ssl is not None else None,
        )
        try:
            if self.cfg.kind is not ProbeKind.HTTPS:
                return ProbeOutcome.OK, None
            host = f"[{server_name}]" if ":" in server_name else server_name
            writer.write(
                f"GET {self.cfg.path} HTTP/1.1\r\nHost: {host}\r\n"
                f"User-Agent: lbproxy/{__version__}\r\nAccept: */*\r\n"
                "Connection: close\r\n\r\n".encode("ascii")
            )
            raw = await reader.read(MAX_RESPONSE)
            while raw and b"\r\n\r\n" not in raw and len(raw) < MAX_RESPONSE:
                more = await reader.read(MAX_RESPONSE - len(raw))
                if not more:
                    break
                raw += more
            if not raw:
                raise EOFError("connection closed without an answer")
            answer = parse_response(raw)
            if answer.status == 503 and NOT_APISERVER_MARKER not in answer.body:
                # The marker may come in a later segment; read the short body to the end.
                rest = await reader.read(MAX_RESPONSE)
                answer = HttpAnswer(answer.status, answer.body + rest)
            return classify(answer)
        finally:
            writer.transport.abort()
