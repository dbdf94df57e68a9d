"""Test doubles for the Kubernetes API: a protocol-faithful fake kube-apiserver.

Usage (pytest's rootdir, the project root, must be importable; ``python -m pytest``
from the project root makes it so)::

    from tests.fakeapi import FakeApiServer, make_kubeconfig

    async with FakeApiServer(token="t") as api:
        api.set_apiservers(["10.0.0.1", "10.0.0.2"])   # kubernetes slice + Endpoints
        ctx = api.client_ssl_context()                  # trusts api.ca, presents client cert
        ...  # GET f"{api.url}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        api.expire_watches()                            # 410 Expired into open watches
        make_kubeconfig(api, tmp_path / "kc.json", inline=True)

See :class:`FakeApiServer` for the mutation methods and fault switches.
"""

from .certs import ApiCertificates, ClientCertFiles, issue_client_cert
from .server import (
    DEFAULT_GIT_VERSION,
    ENDPOINT_SLICES,
    ENDPOINTS,
    SERVICE_NAME_LABEL,
    SKIP_MIRROR_LABEL,
    FakeApiServer,
    LabelSelectorError,
    RequestRecord,
    Resource,
    make_kubeconfig,
    parse_label_selector,
    status_body,
)

__all__ = [
    "DEFAULT_GIT_VERSION",
    "ENDPOINTS",
    "ENDPOINT_SLICES",
    "SERVICE_NAME_LABEL",
    "SKIP_MIRROR_LABEL",
    "ApiCertificates",
    "ClientCertFiles",
    "FakeApiServer",
    "LabelSelectorError",
    "RequestRecord",
    "Resource",
    "issue_client_cert",
    "make_kubeconfig",
    "parse_label_selector",
    "status_body",
]
