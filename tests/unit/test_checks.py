"""parse_response and classify: what an HTTPS probe concludes from the raw answer bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.health.checks import HttpAnswer, classify, parse_response
from lbproxy.pool.states import ProbeOutcome


def response(status_line: bytes, body: bytes = b"", headers: bytes = b"") -> bytes:
    if not headers and body:
        headers = b"Content-Length: %d\r\n" % len(body)
    return status_line + b"\r\n" + headers + b"\r\n" + body


# ---------------------------------------------------------------- parse_response


def test_parse_a_plain_response() -> None:
    raw = response(b"HTTP/1.1 200 OK", b"ok", b"Content-Type: text/plain\r\nContent-Length: 2\r\n")
    assert parse_response(raw) == HttpAnswer(200, b"ok")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200\r\n\r\n", HttpAnswer(200, b"")),  # no reason phrase
        (b"HTTP/1.0 401 Unauthorized\r\n\r\n", HttpAnswer(401, b"")),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\nbody", HttpAnswer(503, b"body")),
        (b"HTTP/1.1 404 Not Found\r\nX: y\r\n\r\n\r\n\r\n", HttpAnswer(404, b"\r\n\r\n")),
        (b"HTTP/1.1 299 Odd Reason With Spaces\r\n\r\n", HttpAnswer(299, b"")),
        (b"HTTP/1.1 100 Continue\r\n\r\n", HttpAnswer(100, b"")),
    ],
)
def test_parse_variants(raw: bytes, expected: HttpAnswer) -> None:
    assert parse_response(raw) == expected


def test_parse_keeps_a_chunked_body_raw() -> None:
    raw = (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"13\r\napiserver disabled\n\r\n0\r\n\r\n"
    )
    answer = parse_response(raw)
    assert answer.status == 503
    assert answer.body == b"13\r\napiserver disabled\n\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"garbage",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n",  # header not finished
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 \r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 -200 OK\r\n\r\n",
        b"HTTP/1.1 2O0 OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"http/1.1 200 OK\r\n\r\n",
        b" HTTP/1.1 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",  # a TLS record
        b"\x15\x03\x03\x00\x02\x02\x28",  # a TLS alert
        b"HTTP/1.1 \xd9\xa0\xd9\xa0\xd9\xa0 OK\r\n\r\n",  # Arabic-Indic digits
    ],
)
def test_garbage_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"HTTP"):
        parse_response(raw)


# ---------------------------------------------------------------- classify


@pytest.mark.parametrize(
    ("status", "body", "outcome", "error"),
    [
        # 2xx: only 200 means ready
        (200, b"ok", ProbeOutcome.OK, None),
        (200, b"", ProbeOutcome.OK, None),
        (201, b"", ProbeOutcome.FAILED, "HTTP 201"),
        (204, b"", ProbeOutcome.FAILED, "HTTP 204"),
        # 1xx and 3xx
        (100, b"", ProbeOutcome.FAILED, "HTTP 100"),
        (301, b"moved", ProbeOutcome.FAILED, "HTTP 301: moved"),
        (302, b"", ProbeOutcome.FAILED, "HTTP 302"),
        # 4xx: 401/403 are a live apiserver that refuses anonymous probes
        (401, b'{"kind":"Status"}', ProbeOutcome.UNAUTHORIZED, None),
        (403, b"forbidden", ProbeOutcome.UNAUTHORIZED, None),
        (400, b"bad request", ProbeOutcome.FAILED, "HTTP 400: bad request"),
        (404, b"404 page not found\n", ProbeOutcome.FAILED, "HTTP 404: 404 page not found"),
        (429, b"", ProbeOutcome.FAILED, "HTTP 429"),
        # 5xx: 503 "apiserver disabled" is the k3s etcd-only supervisor
        (
            503,
            b"apiserver disabled\n",
            ProbeOutcome.NOT_APISERVER,
            "HTTP 503: apiserver disabled",
        ),
        (
            503,
            b"[-]etcd failed: reason withheld\nreadyz check failed\n",
            ProbeOutcome.FAILED,
            "HTTP 503: [-]etcd failed: reason withheld\nreadyz check failed",
        ),
        (503, b"", ProbeOutcome.FAILED, "HTTP 503"),
        (500, b"internal error", ProbeOutcome.FAILED, "HTTP 500: internal error"),
        (502, b"apiserver disabled", ProbeOutcome.FAILED, "HTTP 502: apiserver disabled"),
        (504, b"  \r\n", ProbeOutcome.FAILED, "HTTP 504"),
        (599, b"", ProbeOutcome.FAILED, "HTTP 599"),
    ],
)
def test_classify_every_status_class(
    status: int, body: bytes, outcome: ProbeOutcome, error: str | None
) -> None:
    assert classify(HttpAnswer(status, body)) == (outcome, error)


def test_classify_a_chunked_503_with_the_marker() -> None:
    raw = (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"13\r\napiserver disabled\n\r\n0\r\n\r\n"
    )
    outcome, error = classify(parse_response(raw))
    assert outcome is ProbeOutcome.NOT_APISERVER
    assert error is not None
    assert error.startswith("HTTP 503: ")
    assert "apiserver disabled" in error


def test_classify_finds_the_marker_after_headers_and_other_text() -> None:
    body = b"x" * 200 + b"apiserver disabled"
    outcome, error = classify(HttpAnswer(503, body))
    assert outcome is ProbeOutcome.NOT_APISERVER
    assert error == "HTTP 503: " + "x" * 80


def test_classify_error_snippet_is_short_and_decoded() -> None:
    outcome, error = classify(HttpAnswer(500, b"\xff\xfe" + b"e" * 500))
    assert outcome is ProbeOutcome.FAILED
    assert error is not None
    assert error.startswith("HTTP 500: \ufffd\ufffd")
    assert len(error) == len("HTTP 500: ") + 80


def test_parse_then_classify_real_answers() -> None:
    unauthorized = (
        b"HTTP/1.1 401 Unauthorized\r\nAudit-Id: 1\r\nCache-Control: no-cache, private\r\n"
        b"Content-Type: application/json\r\nContent-Length: 129\r\n\r\n"
        b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
        b'"message":"Unauthorized","reason":"Unauthorized","code":401}'
    )
    assert classify(parse_response(unauthorized)) == (ProbeOutcome.UNAUTHORIZED, None)
    ready = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert classify(parse_response(ready)) == (ProbeOutcome.OK, None)


# ---------------------------------------------------------------- fuzz


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_parse_response_arbitrary_bytes_only_value_error(raw: bytes) -> None:
    try:
        answer = parse_response(raw)
    except ValueError:
        return
    assert answer.status >= 0
    classify(answer)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/1.", b"HTTP/1.1", b""]),
    st.binary(max_size=12) | st.integers(0, 10**6).map(lambda n: str(n).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"\r\n\r\n", b"\r\n", b"\n\n", b""]),
    st.binary(max_size=60),
)
def test_parse_response_near_miss_only_value_error(
    prefix: bytes, status: bytes, rest: bytes, sep: bytes, body: bytes
) -> None:
    raw = prefix + status + b" " + rest + sep + body
    try:
        answer = parse_response(raw)
    except ValueError:
        return
    outcome, error = classify(answer)
    assert isinstance(outcome, ProbeOutcome)
    assert error is None or error.startswith(f"HTTP {answer.status}")
