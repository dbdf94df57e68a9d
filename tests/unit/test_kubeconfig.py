"""The kubeconfig reader: its YAML subset, and what it takes from the current context."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import ssl
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.discovery.kubeconfig import YamlError, load_kubeconfig, parse_yaml
from lbproxy.errors import ConfigError
from tests.fakeapi.certs import ApiCertificates

KEY = "discovery.kubernetes.kubeconfig"

# What k3s writes for its controllers (pkg/agent/config: kubeconfigTemplate).
K3S_TEMPLATE = """\
apiVersion: v1
clusters:
- cluster:
    server: https://127.0.0.1:6444
    certificate-authority: {ca}
  name: local
contexts:
- context:
    cluster: local
    namespace: default
    user: user
  name: Default
current-context: Default
kind: Config
preferences: {{}}
users:
- name: user
  user:
    client-certificate: {cert}
    client-key: {key}
"""

# What client-go's clientcmd.WriteToFile writes (k3s.yaml): keys sorted, data inline.
CLIENT_GO = """\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
"""

# Hand-written: indented sequences, comments, quotes, a document marker, a token.
HAND_WRITTEN = """\
# lbproxy test kubeconfig
---
apiVersion: "v1"
kind: Config
current-context: 'prod'   # the one in use
clusters:
  - name: staging
    cluster: {{server: "https://staging.example:6443"}}
  - name: prod
    cluster:
      server: https://[fd00::10]:6443/base/   # IPv6 with a path
      certificate-authority-data: "{ca}"
      tls-server-name: kubernetes.default
      insecure-skip-tls-verify: false
contexts:
  - name: staging
    context: {{cluster: staging, user: nobody}}
  - name: prod
    context:
      cluster: prod
      user: "robot"
users:
  - name: robot
    user:
      token: "s3cr3t # not a comment"
"""


@pytest.fixture(scope="module")
def certs() -> ApiCertificates:
    return ApiCertificates()


@pytest.fixture
def files(certs: ApiCertificates, tmp_path: Path) -> dict[str, Path]:
    out = {"ca": tmp_path / "ca.crt", "cert": tmp_path / "c.crt", "key": tmp_path / "c.key"}
    out["ca"].write_bytes(certs.ca_pem)
    out["cert"].write_bytes(certs.client_cert_pem)
    out["key"].write_bytes(certs.client_key_pem)
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write(tmp_path: Path, text: str, name: str = "kubeconfig") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problem(path: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_kubeconfig(path)
    [(key, message)] = info.value.problems
    assert key == KEY
    return message


# -- reading real shapes ------------------------------------------------------------------------


def test_k3s_template_with_files(files: dict[str, Path], tmp_path: Path) -> None:
    path = write(tmp_path, K3S_TEMPLATE.format(**{k: str(v) for k, v in files.items()}))
    kc = load_kubeconfig(path)
    assert (kc.scheme, kc.host, kc.port, kc.base_path) == ("https", "127.0.0.1", 6444, "")
    assert kc.server == "https://127.0.0.1:6444"
    assert kc.token is None
    assert kc.insecure is False
    assert kc.ssl_context.verify_mode is ssl.CERT_REQUIRED
    assert kc.ssl_context.check_hostname is True
    assert (kc.cluster_field, kc.user_field) == ("clusters[0].cluster", "users[0].user")


def test_client_go_output_with_inline_data(certs: ApiCertificates, tmp_path: Path) -> None:
    text = CLIENT_GO.format(
        ca=b64(certs.ca_pem), cert=b64(certs.client_cert_pem), key=b64(certs.client_key_pem)
    )
    kc = load_kubeconfig(write(tmp_path, text))
    assert (kc.host, kc.port) == ("127.0.0.1", 6443)
    # The CA from the data is the one trusted.
    [ca] = kc.ssl_context.get_ca_certs()
    assert ("organizationName", "fakeapi") in {item for rdn in ca["subject"] for item in rdn}


def test_hand_written_yaml_with_token(certs: ApiCertificates, tmp_path: Path) -> None:
    kc = load_kubeconfig(write(tmp_path, HAND_WRITTEN.format(ca=b64(certs.ca_pem))))
    assert (kc.host, kc.port, kc.base_path) == ("fd00::10", 6443, "/base")
    assert kc.tls_server_name == "kubernetes.default"
    assert kc.token == "s3cr3t # not a comment"
    assert kc.cluster_field == "clusters[1].cluster"
    assert kc.user_field == "users[0].user"


def test_json_kubeconfig(files: dict[str, Path], tmp_path: Path) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": "https://10.1.2.3", "insecure-skip-tls-verify": True},
            }
        ],
        "users": [{"name": "u", "user": {"tokenFile": "token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "token").write_text("  abc.def\n")
    kc = load_kubeconfig(write(tmp_path, json.dumps(doc, indent=2)))
    assert (kc.host, kc.port) == ("10.1.2.3", 443)
    assert kc.insecure is True
    assert kc.ssl_context.verify_mode is ssl.CERT_NONE
    assert kc.ssl_context.check_hostname is False
    assert kc.token == "abc.def"  # tokenFile relative to the kubeconfig's directory
    assert kc.token_file == str(tmp_path / "token")


def test_relative_files_and_single_context_without_current(
    files: dict[str, Path], tmp_path: Path
) -> None:
    text = K3S_TEMPLATE.format(ca="ca.crt", cert="c.crt", key="./c.key").replace(
        "current-context: Default\n", ""
    )
    kc = load_kubeconfig(write(tmp_path, text))
    assert kc.port == 6444


def test_data_wins_over_file_and_token_over_token_file(
    certs: ApiCertificates, tmp_path: Path
) -> None:
    text = CLIENT_GO.format(
        ca=b64(certs.ca_pem), cert=b64(certs.client_cert_pem), key=b64(certs.client_key_pem)
    )
    text = text.replace(
        "    client-key-data:",
        "    client-key: /does/not/exist\n    token: t1\n    tokenFile: /nope\n"
        "    client-key-data:",
    )
    kc = load_kubeconfig(write(tmp_path, text))
    assert kc.token == "t1"
    assert kc.token_file is None


def test_yaml_1_1_booleans_for_insecure(files: dict[str, Path], tmp_path: Path) -> None:
    base = K3S_TEMPLATE.format(**{k: str(v) for k, v in files.items()})
    for word, insecure in (("yes", True), ("on", True), ("no", False), ("'false'", None)):
        text = base.replace("    server:", f"    insecure-skip-tls-verify: {word}\n    server:")
        path = write(tmp_path, text)
        if insecure is None:
            assert "insecure-skip-tls-verify: must be true or false" in problem(path)
        else:
            assert load_kubeconfig(path).insecure is insecure


# -- errors name the file and the field ---------------------------------------------------------


def test_missing_kubeconfig(tmp_path: Path) -> None:
    assert problem(str(tmp_path / "nope")) == f"file not found: {tmp_path / 'nope'}"


def test_missing_client_key_file(files: dict[str, Path], tmp_path: Path) -> None:
    text = K3S_TEMPLATE.format(ca=files["ca"], cert=files["cert"], key="/x")
    path = write(tmp_path, text)
    assert problem(path) == f"{path}: users[0].user.client-key: file not found: /x"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("current-context: Default", "current-context: Other"),
         "current-context: no context named 'Other' in contexts"),
        (("    cluster: local\n", "    cluster: elsewhere\n"),
         "contexts[0].context.cluster: no cluster named 'elsewhere' in clusters"),
        (("    user: user\n", "    user: ghost\n"),
         "contexts[0].context.user: no user named 'ghost' in users"),
        (("    server: https://127.0.0.1:6444\n", ""), "clusters[0].cluster.server: missing"),
        (("https://127.0.0.1:6444", "ftp://x"),
         "clusters[0].cluster.server: must be an https:// URL, got 'ftp://x'"),
        (("https://127.0.0.1:6444", "https://127.0.0.1:99999"),
         "clusters[0].cluster.server: invalid URL"),
        (("https://127.0.0.1:6444", "https://:6443"), "clusters[0].cluster.server: no host"),
        (("    client-key: {key}\n", ""),
         "users[0].user.client-key: missing (client-certificate is set)"),
        (("    client-certificate: {cert}\n", ""),
         "users[0].user.client-certificate: missing (client-key is set)"),
        (("    client-key: {key}\n", "    client-key: {key}\n    exec: {{command: aws}}\n"),
         "users[0].user.exec: exec credential plugins are not supported"),
        (("    client-key: {key}\n", "    client-key: {key}\n    tokenFile: /no/token\n"),
         "users[0].user.tokenFile: file not found: /no/token"),
        (("    client-key: {key}\n", "    client-key: {key}\n    token: 5\n"),
         "users[0].user.token: must be a string"),
        (("users:\n", "users: none\nx:\n"), "users: must be a list"),
        (("- name: user\n", "- 7\n- name: user\n"), "users[0]: must be a mapping"),
    ],
)  # fmt: skip
def test_field_errors(
    files: dict[str, Path], tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    old, new = edit
    template = K3S_TEMPLATE.replace(old, new)
    assert template != K3S_TEMPLATE
    path = write(tmp_path, template.format(**{k: str(v) for k, v in files.items()}))
    assert problem(path).startswith(f"{path}: {expected}")


def test_bad_inline_data(certs: ApiCertificates, tmp_path: Path) -> None:
    good = {
        "ca": b64(certs.ca_pem),
        "cert": b64(certs.client_cert_pem),
        "key": b64(certs.client_key_pem),
    }
    path = write(tmp_path, CLIENT_GO.format(**{**good, "key": "not*base64"}))
    assert problem(path) == f"{path}: users[0].user.client-key-data: not valid base64"
    path = write(tmp_path, CLIENT_GO.format(**{**good, "ca": b64(b"not a cert")}))
    assert problem(path).startswith(
        f"{path}: clusters[0].cluster.certificate-authority-data: not a PEM CA certificate"
    )
    other = ApiCertificates()  # a key that does not belong to the certificate
    path = write(tmp_path, CLIENT_GO.format(**{**good, "key": b64(other.client_key_pem)}))
    message = problem(path)
    assert message.startswith(
        f"{path}: users[0].user.client-certificate-data / client-key-data: "
        "cannot load the client certificate and key"
    )
    path = write(tmp_path, CLIENT_GO.format(**{**good, "cert": b64(b"junk"), "key": b64(b"junk")}))
    assert "cannot load the client certificate and key" in problem(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "not a kubeconfig (expected a mapping at the top)"),
        ("- a\n", "not a kubeconfig (expected a mapping at the top)"),
        ("a: &x 1\n", "not a kubeconfig this reader accepts: line 1: anchors are not supported"),
        ("a: b\n  c: d\n", "line 2: unexpected indentation"),
        ("current-context: [x]\n", "current-context: must be a string"),
        ("kind: Config\n", "current-context: not set"),
    ],
)
def test_document_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert expected in problem(path)
    assert problem(path).startswith(f"{path}: ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "kc"
    path.write_bytes(b"\xff\xfe\x00")
    assert problem(str(path)) == f"{path}: not UTF-8 text"


def test_unreadable_path(tmp_path: Path) -> None:
    assert problem(str(tmp_path)).startswith(f"cannot read {tmp_path}: ")


# -- the YAML subset ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("a: 1\nb: -2\nc: +3\n", {"a": 1, "b": -2, "c": 3}),
        ("a: true\nb: False\nc: ~\nd: null\ne:\n",
         {"a": True, "b": False, "c": None, "d": None, "e": None}),
        ("a: 1.5\nb: 0x1F\nc: yes\n", {"a": "1.5", "b": "0x1F", "c": "yes"}),
        ("url: https://h:6443/p?q=1#frag\n", {"url": "https://h:6443/p?q=1#frag"}),
        ("a: x # comment\nb: x#not\n", {"a": "x", "b": "x#not"}),
        ("a: 'it''s: #1'\n", {"a": "it's: #1"}),
        ('a: "\\t\\u00e9\\x41\\U0001F600\\\\\\"\\/"\n', {"a": "\téA\U0001f600\\\"/"}),
        ('a: "\\ud83d\\ude00"\n', {"a": "\U0001f600"}),
        ('"k: 1": v\n\'q\': w\n', {"k: 1": "v", "q": "w"}),
        ("a:\n- 1\n- 2\nb: 3\n", {"a": [1, 2], "b": 3}),
        ("a:\n  - 1\n  -\n    b: 2\n  - - 3\n    - 4\n", {"a": [1, {"b": 2}, [3, 4]]}),
        ("- a: 1\n  b: 2\n- c\n", [{"a": 1, "b": 2}, "c"]),
        ("a: {}\nb: []\nc: {x: [1, 'y'], \"z\": {}}\n",
         {"a": {}, "b": [], "c": {"x": [1, "y"], "z": {}}}),
        ("a: [https://h:1, b]\n", {"a": ["https://h:1", "b"]}),
        ('{"a": [1, 2], "b": {"c": null}}', {"a": [1, 2], "b": {"c": None}}),
        ("{a: b, c: [d]}", {"a": "b", "c": ["d"]}),
        ("a: |\n  x\n   y\n\n  z\n\nb: 1\n", {"a": "x\n y\n\nz\n", "b": 1}),
        ("a: |-\n  x\n", {"a": "x"}),
        ("a: |+\n  x\n\n", {"a": "x\n\n"}),
        ("a: >\n  x\n  y\n\n  z\n", {"a": "x y\nz\n"}),
        ("a: |2\n    x\n  y\n", {"a": "  x\ny\n"}),
        ("a: |\n  # not a comment\n", {"a": "# not a comment\n"}),
        ("a: |\nb: 1\n", {"a": "", "b": 1}),
        ("\ufeff# c\n---\na: 1\n...\n# end\n", {"a": 1}),
        ("a:\n\n  # c\n  b: 1\n", {"a": {"b": 1}}),
        ("plain", "plain"),
        ("", None),
    ],
)  # fmt: skip
def test_yaml_subset(text: str, value: Any) -> None:
    assert parse_yaml(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &x 1\n", "line 1: anchors are not supported"),
        ("a: *x\n", "line 1: aliases are not supported"),
        ("a: !!binary x\n", "line 1: tags are not supported"),
        ("%YAML 1.2\n---\na: 1\n", "line 1: directives are not supported"),
        ("? a\n: b\n", "complex mapping keys are not supported"),
        ("a: b: c\n", "line 1: a mapping value is not allowed here"),
        ("a: b\n  c\n", "line 2: unexpected indentation (multi-line scalars are not supported)"),
        ("a: 'x\n  y'\n", "line 1: single-quoted scalar not closed"),
        ('a: "x\n', "line 1: double-quoted scalar not closed"),
        ('a: "\\q"\n', "line 1: invalid escape"),
        ('a: "\\ud83d"\n', "line 1: unpaired surrogate"),
        ("a: [1,\n  2]\n", "line 1: flow collection not closed"),
        ("a: [1] x\n", "unexpected text after a flow collection"),
        ("a: 'x' y\n", "unexpected text after a quoted scalar"),
        ("a: 1\na: 2\n", "line 2: duplicate key 'a'"),
        ("a: {b: 1, b: 2}\n", "duplicate key 'b'"),
        ("a:\n\tb: 1\n", "line 2: tab in indentation"),
        ("a: 1\n b: 2\n", "line 2: unexpected indentation"),
        ("a:\n  b: 1\n c: 2\n", "line 3: unexpected indentation"),
        ("a: 1\n- b\n", "line 2: a sequence item where a mapping key was expected"),
        ("- a\nb: 1\n", "line 2: unexpected content"),
        ("a: 1\n---\nb: 2\n", "line 2: several documents"),
        ("a: 1\n...\nb: 2\n", "line 2: several documents"),
        ("--- a\n", "content on the '---' line"),
        ("a: |x\n", "invalid block scalar header"),
        ("a: |\n    x\n  y\n", "line 3: block scalar line indented less"),
        ("a:\n  - 1\n  x\n", "expected a sequence item"),
        ("just text\nmore: 1\n", "unexpected indentation"),
        ("a: " + "[" * 70 + "]" * 70 + "\n", "nested too deeply"),
        ("".join(f"{' ' * i}k:\n" for i in range(3000)), "nested too deeply"),
        ("".join(f"{' ' * i}- \n" for i in range(3000)) + "x", "nested too deeply"),
    ],
)  # fmt: skip
def test_yaml_outside_the_subset_is_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(YamlError, match=re.escape(message)):
        parse_yaml(text)


# A small block-style emitter, as client-go's and k3s's writers produce, for round trips.
_PLAIN = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./:=@-]*")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, str)
    plain_ok = (
        _PLAIN.fullmatch(value)
        and not value.endswith(":")
        and parse_yaml(f"k: {value}") == {"k": value}  # not read back as null/bool/int
    )
    return value if plain_ok else json.dumps(value, ensure_ascii=False)


def emit(value: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{pad}{_scalar(key)}:"
            if isinstance(item, dict | list) and item:
                lines.append(head)
                # client-go style: a list under a key sits at the key's indentation
                lines += emit(item, indent if isinstance(item, list) else indent + 2)
            elif isinstance(item, dict | list):
                lines.append(f"{head} {'{}' if isinstance(item, dict) else '[]'}")
            else:
                lines.append(f"{head} {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                inner = emit(item, indent + 2)
                lines.append(f"{pad}- {inner[0][indent + 2 :]}")
                lines += inner[1:]
            elif isinstance(item, dict | list):
                lines.append(f"{pad}- {'{}' if isinstance(item, dict) else '[]'}")
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(pad + _scalar(value))
    return lines


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.text(max_size=12)
    | st.sampled_from(["https://127.0.0.1:6443", "a b", "#x", "x #y", "-", "- a", "'", "~", "yes"])
)
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), documents, min_size=1, max_size=4))
def test_round_trip_block_style(doc: dict[str, Any]) -> None:
    text = "\n".join(emit(doc)) + "\n"
    assert parse_yaml(text) == doc, text


@settings(max_examples=100, deadline=None)
@given(documents)
def test_round_trip_json(doc: Any) -> None:
    assert parse_yaml(json.dumps(doc)) == doc
    assert parse_yaml(json.dumps(doc, ensure_ascii=False, indent=1)) == doc


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["a:", " b: 1", "- x", "  - y", "'q'", '"e\\', "{", "[", "]", "|", ">", "#", " ",
             "\t", "&", "*", "!", "---", "...", ": ", "k: v # c", "\n", "  ", "-", "?", "%"]
        )
        | st.text(max_size=5),
        max_size=20,
    ).map("".join)
)  # fmt: skip
def test_any_text_parses_or_raises_yaml_error(text: str) -> None:
    with contextlib.suppress(YamlError):
        parse_yaml(text)
