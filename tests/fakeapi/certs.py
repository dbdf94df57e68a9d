"""Certificate material for the fake kube-apiserver, made with trustme.

One CA signs both the serving certificate and the client certificates (k3s uses
separate server and client CAs; for tests one shared CA is enough, and callers
can pass their own CA so several fakes trust each other's clients).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

__all__ = [
    "DEFAULT_CLIENT_CN",
    "DEFAULT_CLIENT_GROUP",
    "SERVER_SANS",
    "ApiCertificates",
    "ClientCertFiles",
    "issue_client_cert",
]

#: SANs on the serving certificate, like the ones kube-apiserver/k3s put on theirs.
SERVER_SANS: tuple[str, ...] = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
    "127.0.0.1",
    "::1",
)

DEFAULT_CLIENT_CN = "system:admin"
DEFAULT_CLIENT_GROUP = "system:masters"


def issue_client_cert(
    ca: trustme.CA,
    common_name: str = DEFAULT_CLIENT_CN,
    group: str | None = DEFAULT_CLIENT_GROUP,
) -> trustme.LeafCert:
    """Issue a client certificate: CN is the user name, O the group (as Kubernetes reads them).

    trustme insists on at least one SAN; a client certificate needs none, but an e-mail
    style SAN is harmless and keeps the SAN extension non-empty.
    """
    local = "".join(ch if ch.isalnum() else "-" for ch in common_name) or "client"
    return ca.issue_cert(
        f"{local}@fakeapi.test",
        common_name=common_name,
        organization_name=group,
    )


@dataclass(frozen=True)
class ClientCertFiles:
    """A client certificate written to disk."""

    cert_path: Path
    key_path: Path


class ApiCertificates:
    """CA + serving cert + default client cert, with helpers for SSL contexts and files."""

    def __init__(
        self,
        ca: trustme.CA | None = None,
        *,
        extra_sans: tuple[str, ...] = (),
        client_common_name: str = DEFAULT_CLIENT_CN,
        client_group: str | None = DEFAULT_CLIENT_GROUP,
    ) -> None:
        self.ca: trustme.CA = ca if ca is not None else trustme.CA(organization_name="fakeapi")
        self.server_cert: trustme.LeafCert = self.ca.issue_cert(
            *SERVER_SANS, *extra_sans, common_name="kube-apiserver"
        )
        self.client_common_name = client_common_name
        self.client_cert: trustme.LeafCert = issue_client_cert(
            self.ca, client_common_name, client_group
        )

    # -- PEM bytes ---------------------------------------------------------------------------

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    @property
    def client_cert_pem(self) -> bytes:
        return b"".join(blob.bytes() for blob in self.client_cert.cert_chain_pems)

    @property
    def client_key_pem(self) -> bytes:
        return self.client_cert.private_key_pem.bytes()

    # -- SSL contexts ------------------------------------------------------------------------

    def server_ssl_context(self) -> ssl.SSLContext:
        """Serving context: presents the server cert, *requests* client certs (CERT_OPTIONAL).

        Like Go's ``VerifyClientCertIfGiven``: no certificate is fine, a certificate that
        does not chain to the CA fails the handshake.
        """
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        self.ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def client_ssl_context(
        self, *, client_cert: bool = True, leaf: trustme.LeafCert | None = None
    ) -> ssl.SSLContext:
        """A client context trusting the CA, optionally presenting a client certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        if leaf is not None:
            leaf.configure_cert(ctx)
        elif client_cert:
            self.client_cert.configure_cert(ctx)
        return ctx

    # -- files -------------------------------------------------------------------------------

    def write_ca(self, directory: Path) -> Path:
        path = directory / "ca.crt"
        path.write_bytes(self.ca_pem)
        return path

    @staticmethod
    def write_client(leaf: trustme.LeafCert, directory: Path, stem: str) -> ClientCertFiles:
        cert_path = directory / f"{stem}.crt"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key_path.write_bytes(leaf.private_key_pem.bytes())
        key_path.chmod(0o600)
        return ClientCertFiles(cert_path=cert_path, key_path=key_path)
