"""Reads the credentials and server of a kubeconfig for the Kubernetes source, once at
start, and reports any problem as a ConfigError naming the file and the field.

Kubeconfigs are YAML (k3s writes them from a text template, client-go through
sigs.k8s.io/yaml) or JSON. lbproxy keeps its run-time dependencies to a minimum, so this
module carries a small, strict YAML reader for the subset those writers produce: block
mappings and sequences (also the compact ``- key: value`` form), plain, single- and
double-quoted scalars, ``|``/``>`` block scalars, one-line flow collections and
comments. Anything outside it (anchors, aliases, tags, multi-line plain or quoted
scalars, several documents) is refused with the line number rather than guessed at, so
a kubeconfig is never misread; JSON documents go straight to the json module.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from lbproxy.errors import ConfigError

CONFIG_KEY: Final = "discovery.kubernetes.kubeconfig"
MAX_KUBECONFIG_SIZE: Final = 4 * 1024 * 1024


class YamlError(ValueError):
    """The text is not YAML this reader accepts; ``line`` is 1-based (0: unknown)."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}" if line else message)


# ------------------------------------------------------------------------------ YAML


@dataclass(slots=True)
class _Line:
    no: int  # index into the raw lines (0-based)
    indent: int
    text: str  # without the indentation; may end in a comment


_NULLS: Final = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE: Final = frozenset({"true", "True", "TRUE"})
_FALSE: Final = frozenset({"false", "False", "FALSE"})
_INT: Final = re.compile(r"[-+]?[0-9]+")
_WS: Final = " \t\r\n"  # YAML white space and breaks (str.strip() also takes NBSP, ...)
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_ESCAPES: Final = {
    "0": "\0",
    "a": "\a",
    "b": "\b",
    "t": "\t",
    "\t": "\t",
    "n": "\n",
    "v": "\v",
    "f": "\f",
    "r": "\r",
    "e": "\x1b",
    " ": " ",
    '"': '"',
    "/": "/",
    "\\": "\\",
    "N": "\x85",
    "_": "\xa0",
    "L": "\u2028",
    "P": "\u2029",
}
_HEX_ESCAPES: Final = {"x": 2, "u": 4, "U": 8}
# Characters that cannot start a plain scalar (YAML 1.2 c-indicator), apart from the
# ones handled before: quotes, flow openers, "-", "|", ">" and "#".
_RESERVED_START: Final = {
    "&": "anchors are not supported",
    "*": "aliases are not supported",
    "!": "tags are not supported",
    "%": "directives are not supported",
    "@": "'@' cannot start a plain scalar",
    "`": "'`' cannot start a plain scalar",
    "?": "complex mapping keys are not supported",
    "]": "unexpected ']'",
    "}": "unexpected '}'",
    ",": "unexpected ','",
}


def _resolve_plain(text: str) -> Any:
    """YAML 1.2 core schema, as far as a kubeconfig needs it: null, booleans, integers;
    everything else stays a string."""
    if text in _NULLS:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if _INT.fullmatch(text):
        return int(text)
    return text


def _combine_surrogates(text: str) -> str:
    """``\\ud83d\\ude00`` escapes (as JSON writes them) become one character."""
    if any("\ud800" <= c <= "\udfff" for c in text):
        try:
            return text.encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            raise ValueError("unpaired surrogate escape") from None
    return text


def _double_quoted(text: str, pos: int) -> tuple[str, int]:
    """Parse ``"..."`` starting at ``text[pos]``; returns the value and the index after it."""
    out: list[str] = []
    i = pos + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return _combine_surrogates("".join(out)), i + 1
        if c == "\\":
            if i + 1 >= n:
                break
            e = text[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
                continue
            width = _HEX_ESCAPES.get(e)
            digits = text[i + 2 : i + 2 + width] if width else ""
            if (
                width is None
                or len(digits) != width
                or not all(d in "0123456789abcdefABCDEF" for d in digits)
            ):
                raise ValueError(f"invalid escape '\\{e}' in a double-quoted scalar")
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise ValueError(f"escape '\\{e}{digits}' is not a character")
            out.append(chr(code))
            i += 2 + width
            continue
        out.append(c)
        i += 1
    raise ValueError("double-quoted scalar not closed on its line (multi-line is not supported)")


def _single_quoted(text: str, pos: int) -> tuple[str, int]:
    out: list[str] = []
    i = pos + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "'":
            if i + 1 < n and text[i + 1] == "'":
                out.append("'")
                i += 2
                continue
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise ValueError("single-quoted scalar not closed on its line (multi-line is not supported)")


def _quoted(text: str, pos: int) -> tuple[str, int]:
    if text[pos] == '"':
        return _double_quoted(text, pos)
    return _single_quoted(text, pos)


def _rest_is_comment(text: str, pos: int) -> bool:
    rest = text[pos:]
    stripped = rest.lstrip(" \t")
    if not stripped:
        return True
    # A comment needs white space before its "#".
    return stripped.startswith("#") and len(stripped) < len(rest)


class _Flow:
    """One-line flow collections: ``{}``, ``[a, "b"]``, ``{k: v, "k2": [1]}`` (and JSON)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def value(self) -> Any:
        self.skip_space()
        c = self.peek()
        if c == "{":
            return self.mapping()
        if c == "[":
            return self.sequence()
        if c in ("'", '"'):
            value, self.pos = _quoted(self.text, self.pos)
            return value
        return _resolve_plain(self.plain())

    def plain(self) -> str:
        c = self.peek()
        if not c:
            raise ValueError("flow collection not closed on its line")
        nxt = self.text[self.pos + 1 : self.pos + 2]
        if c in _RESERVED_START or c in "#|>" or (c in "-:" and nxt in ("", " ", "\t")):
            raise ValueError(_RESERVED_START.get(c, f"unexpected {c!r} in a flow collection"))
        start = self.pos
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in ",[]{}":
                break
            if c == ":" and self.text[self.pos + 1 : self.pos + 2] in (
                "",
                " ",
                "\t",
                ",",
                "]",
                "}",
            ):
                break
            if c == "#" and self.text[self.pos - 1] in " \t":
                raise ValueError("comment inside a flow collection")
            self.pos += 1
        return self.text[start : self.pos].strip(_WS)

    def enter(self) -> None:
        self.depth += 1
        if self.depth > 64:
            raise ValueError("flow collections nested too deeply")
        self.pos += 1

    def mapping(self) -> dict[str, Any]:
        self.enter()
        out: dict[str, Any] = {}
        while True:
            self.skip_space()
            if self.peek() == "}":
                self.pos += 1
                self.depth -= 1
                return out
            if self.peek() in ("'", '"'):
                key, self.pos = _quoted(self.text, self.pos)
            else:
                key = self.plain()
            self.skip_space()
            if self.peek() == ":":
                self.pos += 1
                value = self.value()
            else:
                value = None
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
            self.skip_space()
            c = self.peek()
            if c == ",":
                self.pos += 1
            elif c != "}":
                raise ValueError("expected ',' or '}' in a flow mapping")

    def sequence(self) -> list[Any]:
        self.enter()
        out: list[Any] = []
        while True:
            self.skip_space()
            if self.peek() == "]":
                self.pos += 1
                self.depth -= 1
                return out
            out.append(self.value())
            self.skip_space()
            c = self.peek()
            if c == ",":
                self.pos += 1
            elif c != "]":
                raise ValueError("expected ',' or ']' in a flow sequence")


def _is_seq_item(text: str) -> bool:
    return text == "-" or text.startswith(("- ", "-\t"))


class _Block:
    def __init__(self, raw: list[str], lines: list[_Line], ends_with_break: bool) -> None:
        self.raw = raw
        self.lines = lines
        self.ends_with_break = ends_with_break  # whether the last line has its line break

    def fail(self, i: int, message: str) -> YamlError:
        no = self.lines[i].no + 1 if i < len(self.lines) else len(self.raw)
        return YamlError(no, message)

    def node(self, i: int, indent: int) -> tuple[Any, int]:
        if _is_seq_item(self.lines[i].text):
            return self.sequence(i, indent)
        return self.mapping(i, indent)

    def split_key(self, i: int) -> tuple[str, str] | None:
        """``key: rest`` or None when the line is not a mapping entry."""
        text = self.lines[i].text
        if text[0] in ("'", '"'):
            try:
                key, end = _quoted(text, 0)
            except ValueError:
                return None
            rest = text[end:].lstrip(" ")
            if rest == ":" or rest.startswith((": ", ":\t")):
                return key, rest[1:]
            return None
        if text[0] in "[{|>":
            return None
        for m in re.finditer(r":(?:[ \t]|$)", text):
            before = text[: m.start()]
            if re.search(r"[ \t]#", before):
                return None  # the colon is inside a comment
            if text[0] in _RESERVED_START:
                raise self.fail(i, _RESERVED_START[text[0]])
            if not before.strip(" \t"):
                raise self.fail(i, "empty mapping key")
            return before.rstrip(" \t"), text[m.end() :]
        return None

    def mapping(self, i: int, indent: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        while i < len(self.lines):
            line = self.lines[i]
            if line.indent < indent:
                break
            if line.indent > indent:
                raise self.fail(i, "unexpected indentation")
            if _is_seq_item(line.text):
                raise self.fail(i, "a sequence item where a mapping key was expected")
            split = self.split_key(i)
            if split is None:
                raise self.fail(i, "expected 'key: value'")
            key, rest = split
            if key in out:
                raise self.fail(i, f"duplicate key {key!r}")
            out[key], i = self.value(i, indent, rest, in_mapping=True)
        return out, i

    def sequence(self, i: int, indent: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        while i < len(self.lines):
            line = self.lines[i]
            if line.indent < indent:
                break
            if line.indent > indent:
                raise self.fail(i, "unexpected indentation")
            if not _is_seq_item(line.text):
                if out and self.split_key(i) is not None:
                    break  # "key:\n- a\nnext: b" (go-yaml style): back to the mapping
                raise self.fail(i, "expected a sequence item '- '")
            rest = line.text[1:]
            content = rest.lstrip(" ")
            if "\t" in rest[: len(rest) - len(content)]:
                raise self.fail(i, "tab in indentation")
            if not content or content.startswith("#"):
                value, i = self.value(i, indent, "", in_mapping=False)
            else:
                # Compact form: the item's content starts a nested node on this line.
                sub = indent + 1 + (len(rest) - len(content))
                self.lines[i] = _Line(line.no, sub, content)
                if _is_seq_item(content) or self.split_key(i) is not None:
                    value, i = self.node(i, sub)
                else:
                    value, i = self.value(i, indent, content, in_mapping=False)
            out.append(value)
        return out, i

    def value(self, i: int, indent: int, rest: str, *, in_mapping: bool) -> tuple[Any, int]:
        """The value after ``key:`` or ``-`` on line i; returns it and the next line."""
        text = rest.strip(" \t")
        if not text or text.startswith("#"):
            j = i + 1
            if j < len(self.lines):
                nxt = self.lines[j]
                if nxt.indent > indent:
                    return self.node(j, nxt.indent)
                if in_mapping and nxt.indent == indent and _is_seq_item(nxt.text):
                    return self.sequence(j, indent)
            return None, j
        c = text[0]
        if c in "|>":
            return self.block_scalar(i, indent, text)
        try:
            if c in ("'", '"'):
                value, end = _quoted(text, 0)
                if not _rest_is_comment(text, end):
                    raise ValueError("unexpected text after a quoted scalar")
            elif c in "[{":
                flow = _Flow(text)
                value = flow.value()
                if not _rest_is_comment(text, flow.pos):
                    raise ValueError("unexpected text after a flow collection")
            elif c in _RESERVED_START:
                raise ValueError(_RESERVED_START[c])
            else:
                m = re.search(r"[ \t]#", text)
                plain = text[: m.start()].rstrip(" \t") if m else text
                if re.search(r":[ \t]", plain) or plain.endswith(":"):
                    raise ValueError("a mapping value is not allowed here")
                value = _resolve_plain(plain)
        except ValueError as exc:
            raise self.fail(i, str(exc)) from None
        j = i + 1
        if j < len(self.lines) and self.lines[j].indent > indent:
            raise self.fail(j, "unexpected indentation (multi-line scalars are not supported)")
        return value, j

    def block_scalar(self, i: int, indent: int, header: str) -> tuple[str, int]:
        m = re.fullmatch(r"([|>])([-+]?)([1-9]?)([-+]?)(?:[ \t]+#.*)?[ \t]*", header)
        if m is None or (m.group(2) and m.group(4)):
            raise self.fail(i, f"invalid block scalar header {header[:20]!r}")
        style, chomp = m.group(1), m.group(2) or m.group(4)
        explicit = int(m.group(3)) if m.group(3) else None
        start = self.lines[i].no + 1
        k = start
        body: list[str] = []
        content_indent = indent + explicit if explicit is not None else None
        while k < len(self.raw):
            raw = self.raw[k]
            stripped = raw.lstrip(" ")
            if not stripped:  # only spaces: an empty line of the scalar
                body.append(raw)
                k += 1
                continue
            here = len(raw) - len(stripped)
            if content_indent is None:
                if here <= indent:
                    break
                content_indent = here
            if here < content_indent:
                if here > indent:
                    raise YamlError(k + 1, "block scalar line indented less than its first line")
                break
            body.append(raw)
            k += 1
        if content_indent is None:  # no content line: every line is empty
            trailing_only = len(body)
            body = []
        else:
            trailing_only = 0
        ci = content_indent if content_indent is not None else indent + 1
        # Trailing empty lines count only for "keep" chomping (spaces past the
        # indentation make a line content).
        trailing = 0
        while body and not body[-1].strip(" ") and len(body[-1]) <= ci:
            body.pop()
            trailing += 1
        trailing += trailing_only
        rows = [row[ci:] for row in body]
        text = "\n".join(rows) if style == "|" else _fold(rows)
        if chomp == "-":
            pass
        elif rows and (k < len(self.raw) or trailing or self.ends_with_break):
            text += "\n" + ("\n" * trailing if chomp == "+" else "")
        elif chomp == "+":
            text = "\n" * trailing
        # Skip the filtered lines this scalar consumed.
        j = i + 1
        while j < len(self.lines) and self.lines[j].no < k:
            j += 1
        return text, j


def _fold(rows: list[str]) -> str:
    """Folded scalar: lines join with a space; blank lines and more-indented lines keep
    their line breaks."""
    out = ""
    prev_kind = ""  # "", "text", "blank", "indented"
    for row in rows:
        if not row.strip(_WS):
            out += "\n"
            prev_kind = "blank"
            continue
        indented = row[0] in " \t"
        if prev_kind == "text" and not indented:
            out += " "
        elif prev_kind in ("text", "indented") or (prev_kind == "blank" and indented):
            out += "\n"
        out += row
        prev_kind = "indented" if indented else "text"
    return out


def parse_yaml(text: str) -> Any:
    """Parse one YAML (or JSON) document in the subset described in the module docstring."""
    if text.startswith("\ufeff"):
        text = text[1:]
    stripped = text.strip(_WS)
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except RecursionError:
            raise YamlError(0, "JSON nested too deeply") from None
        except ValueError:
            pass  # flow-style YAML that is not JSON: read it below
    # YAML breaks lines only at CR and LF (str.splitlines also splits at NEL, LS, ...).
    raw = _LINE_BREAK.split(text)
    ends_with_break = bool(raw) and raw[-1] == ""
    if ends_with_break:
        raw.pop()  # the break that ends the last line
    lines: list[_Line] = []
    started = False
    for no, row in enumerate(raw):
        content = row.lstrip(" ")
        if not content.strip(_WS) or content.startswith("#"):
            continue
        indent = len(row) - len(content)
        if content.startswith("\t"):
            raise YamlError(no + 1, "tab in indentation")
        if indent == 0 and (content.rstrip(_WS) == "---" or content.startswith(("--- ", "---\t"))):
            if started:
                raise YamlError(no + 1, "several documents in one file are not supported")
            started = True
            rest = content[3:].strip(_WS)
            if rest and not rest.startswith("#"):
                raise YamlError(no + 1, "content on the '---' line is not supported")
            continue
        if indent == 0 and (content.rstrip(_WS) == "..." or content.startswith("... ")):
            tail = [r for r in raw[no + 1 :] if r.strip(_WS) and not r.lstrip(_WS).startswith("#")]
            if tail:
                raise YamlError(no + 1, "several documents in one file are not supported")
            break
        if indent == 0 and content.startswith("%"):
            raise YamlError(no + 1, _RESERVED_START["%"])
        started = True
        lines.append(_Line(no, indent, content.rstrip(" \t")))
    if not lines:
        return None
    block = _Block(raw, lines, ends_with_break)
    first = lines[0]
    try:
        if _is_seq_item(first.text) or block.split_key(0) is not None:
            value, i = block.node(0, first.indent)
        else:
            if first.text[0] in "|>":
                raise YamlError(
                    first.no + 1, "a block scalar as the whole document is not supported"
                )
            value, i = block.value(0, -1, first.text, in_mapping=False)
    except RecursionError:
        raise YamlError(0, "nested too deeply") from None
    if i < len(lines):
        raise block.fail(i, "unexpected content (indentation does not match)")
    return value


# ------------------------------------------------------------------------------ kubeconfig


@dataclass(frozen=True, slots=True, eq=False)
class Kubeconfig:
    """What the Kubernetes source needs from a kubeconfig's current context."""

    path: str
    server: str  # the cluster's URL as written
    scheme: str  # "https" or "http"
    host: str  # without brackets
    port: int
    base_path: str  # the URL's path, without a trailing "/" ("" usually)
    tls_server_name: str
    insecure: bool
    ssl_context: ssl.SSLContext = field(repr=False)
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    cluster_field: str = "clusters[0].cluster"
    user_field: str = "users[0].user"


def _fail(path: str, where: str, message: str, key: str) -> ConfigError:
    return ConfigError.single(key, f"{path}: {where}: {message}" if where else f"{path}: {message}")


def _entry(
    doc: dict[str, Any], section: str, name: str, path: str, key: str, ctx_field: str
) -> tuple[int, dict[str, Any]]:
    """Find ``{name: ..., <singular>: {...}}`` in a list section; returns its index and body."""
    singular = section[:-1]
    entries = doc.get(section)
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise _fail(path, section, "must be a list", key)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _fail(path, f"{section}[{i}]", "must be a mapping", key)
        if entry.get("name") == name:
            body = entry.get(singular)
            if body is None:
                body = {}
            if not isinstance(body, dict):
                raise _fail(path, f"{section}[{i}].{singular}", "must be a mapping", key)
            return i, body
    raise _fail(path, ctx_field, f"no {singular} named {name!r} in {section}", key)


def _string(body: dict[str, Any], name: str, where: str, path: str, key: str) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(path, f"{where}.{name}", "must be a string", key)
    return value


def _read_file(
    body: dict[str, Any], name: str, where: str, path: str, key: str, base: Path
) -> tuple[bytes, str] | None:
    """The content of a ``<name>`` file or ``<name>-data`` (base64); data wins, as in
    client-go. Returns the bytes and the field they came from."""
    data = _string(body, f"{name}-data", where, path, key)
    if data is not None:
        try:
            return base64.b64decode("".join(data.split()), validate=True), f"{where}.{name}-data"
        except (binascii.Error, ValueError):
            raise _fail(path, f"{where}.{name}-data", "not valid base64", key) from None
    file = _string(body, name, where, path, key)
    if file is None:
        return None
    full = Path(file).expanduser()
    if not full.is_absolute():
        full = base / full  # relative to the kubeconfig's directory, as in client-go
    try:
        return full.read_bytes(), f"{where}.{name}"
    except FileNotFoundError:
        raise _fail(path, f"{where}.{name}", f"file not found: {full}", key) from None
    except OSError as exc:
        raise _fail(path, f"{where}.{name}", f"cannot read {full}: {exc.strerror}", key) from None


def _boolean(body: dict[str, Any], name: str, where: str, path: str, key: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    # sigs.k8s.io/yaml (go-yaml v2) reads YAML 1.1 booleans; so does client-go.
    if isinstance(value, str) and value in ("y", "Y", "yes", "Yes", "YES", "on", "On", "ON"):
        return True
    if isinstance(value, str) and value in ("n", "N", "no", "No", "NO", "off", "Off", "OFF"):
        return False
    raise _fail(path, f"{where}.{name}", "must be true or false", key)


def _parse_server(server: str, where: str, path: str, key: str) -> tuple[str, str, int, str]:
    try:
        url = urlsplit(server)
        port = url.port
    except ValueError as exc:
        raise _fail(path, f"{where}.server", f"invalid URL {server!r}: {exc}", key) from None
    if url.scheme not in ("https", "http"):
        raise _fail(path, f"{where}.server", f"must be an https:// URL, got {server!r}", key)
    host = url.hostname
    if not host:
        raise _fail(path, f"{where}.server", f"no host in {server!r}", key)
    if port is None:
        port = 443 if url.scheme == "https" else 80
    return url.scheme, host, port, url.path.rstrip("/")


def _ssl_context(
    ca: tuple[bytes, str] | None,
    cert: tuple[bytes, str] | None,
    client_key: tuple[bytes, str] | None,
    insecure: bool,
    path: str,
    key: str,
) -> ssl.SSLContext:
    if ca is not None:
        try:
            ctx = ssl.create_default_context(cadata=ca[0].decode("ascii"))
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise _fail(path, ca[1], f"not a PEM CA certificate: {_ssl_reason(exc)}", key) from None
    else:
        ctx = ssl.create_default_context()
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None and client_key is not None:
        # ssl loads a certificate chain only from files: write both to a private
        # directory just long enough to load them.
        with tempfile.TemporaryDirectory(prefix="lbproxy-kubeconfig-") as tmp:
            cert_path = os.path.join(tmp, "client.crt")
            key_path = os.path.join(tmp, "client.key")
            for target, content in ((cert_path, cert[0]), (key_path, client_key[0])):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(content)
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except (ssl.SSLError, OSError, ValueError) as exc:
                where = f"{cert[1]} / {client_key[1].rsplit('.', 1)[-1]}"
                raise _fail(
                    path,
                    where,
                    f"cannot load the client certificate and key: {_ssl_reason(exc)}",
                    key,
                ) from None
    return ctx


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__


_UNSUPPORTED_USER: Final = {
    "exec": "exec credential plugins are not supported",
    "auth-provider": "auth providers are not supported",
    "username": "basic authentication is not supported",
    "password": "basic authentication is not supported",
}


def load_kubeconfig(path: str, *, key: str = CONFIG_KEY) -> Kubeconfig:
    """Read ``path`` and resolve its current context; ConfigError(key, "<path>: <field>:
    <problem>") on anything missing, unreadable or unsupported."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError.single(key, f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError.single(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_KUBECONFIG_SIZE:
        raise _fail(path, "", f"larger than {MAX_KUBECONFIG_SIZE} bytes", key)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "", "not UTF-8 text", key) from None
    try:
        doc = parse_yaml(text)
    except YamlError as exc:
        raise _fail(path, "", f"not a kubeconfig this reader accepts: {exc}", key) from None
    if not isinstance(doc, dict):
        raise _fail(path, "", "not a kubeconfig (expected a mapping at the top)", key)
    base = file.parent

    current = doc.get("current-context")
    contexts = doc.get("contexts")
    if current is None or current == "":
        if isinstance(contexts, list) and len(contexts) == 1 and isinstance(contexts[0], dict):
            current = contexts[0].get("name")
        if not isinstance(current, str) or not current:
            raise _fail(path, "current-context", "not set", key)
    if not isinstance(current, str):
        raise _fail(path, "current-context", "must be a string", key)
    ci, context = _entry(doc, "contexts", current, path, key, "current-context")
    cwhere = f"contexts[{ci}].context"
    cluster_name = _string(context, "cluster", cwhere, path, key)
    if cluster_name is None:
        raise _fail(path, f"{cwhere}.cluster", "missing", key)
    ki, cluster = _entry(doc, "clusters", cluster_name, path, key, f"{cwhere}.cluster")
    where = f"clusters[{ki}].cluster"
    server = _string(cluster, "server", where, path, key)
    if server is None:
        raise _fail(path, f"{where}.server", "missing", key)
    scheme, host, port, base_path = _parse_server(server, where, path, key)
    insecure = _boolean(cluster, "insecure-skip-tls-verify", where, path, key)
    ca = _read_file(cluster, "certificate-authority", where, path, key, base)
    tls_server_name = _string(cluster, "tls-server-name", where, path, key) or ""

    user_name = _string(context, "user", cwhere, path, key)
    user: dict[str, Any] = {}
    uwhere = "users[?].user"
    if user_name is not None:
        ui, user = _entry(doc, "users", user_name, path, key, f"{cwhere}.user")
        uwhere = f"users[{ui}].user"
    for name, problem in _UNSUPPORTED_USER.items():
        if user.get(name) not in (None, "", {}):
            raise _fail(path, f"{uwhere}.{name}", problem, key)
    cert = _read_file(user, "client-certificate", uwhere, path, key, base)
    client_key = _read_file(user, "client-key", uwhere, path, key, base)
    if cert is not None and client_key is None:
        raise _fail(path, f"{uwhere}.client-key", "missing (client-certificate is set)", key)
    if client_key is not None and cert is None:
        raise _fail(path, f"{uwhere}.client-certificate", "missing (client-key is set)", key)
    token = _string(user, "token", uwhere, path, key)
    token_file = _string(user, "tokenFile", uwhere, path, key)
    if token is None and token_file is not None:
        full = Path(token_file).expanduser()
        if not full.is_absolute():
            full = base / full
        token_file = str(full)
        token = read_token_file(token_file, path=path, where=f"{uwhere}.tokenFile", key=key)
    elif token is not None:
        token_file = None
        token = token.strip()
    ctx = _ssl_context(ca, cert, client_key, insecure, path, key)
    return Kubeconfig(
        path=path,
        server=server,
        scheme=scheme,
        host=host,
        port=port,
        base_path=base_path,
        tls_server_name=tls_server_name,
        insecure=insecure,
        ssl_context=ctx,
        token=token,
        token_file=token_file,
        cluster_field=where,
        user_field=uwhere,
    )


def read_token_file(
    token_file: str, *, path: str = "", where: str = "tokenFile", key: str = CONFIG_KEY
) -> str:
    """The bearer token in ``token_file`` (surrounding white space dropped)."""
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise _fail(path, where, f"file not found: {token_file}", key) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise _fail(path, where, f"cannot read {token_file}: {reason}", key) from None
    if not token:
        raise _fail(path, where, f"{token_file} is empty", key)
    return token
