"""Header hygiene, request framing and response scrubbing."""

import asyncio
import gzip
import json
from collections.abc import Iterator
from urllib.parse import quote, quote_plus, unquote

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.inbound.answer import stream_back
from proxy.inbound.request import AppRequest
from proxy.outbound.h2_upstream import _request_fields
from proxy.outbound.hygiene import (
    CREDENTIAL_HEADERS,
    HOP_BY_HOP,
    Scrubber,
    request_headers,
    response_head_lines,
)
from proxy.outbound.origin import Origin
from proxy.outbound.upstream import request_head
from proxy.wire import BaseProtocol, HttpRequestParser, HttpResponseParser
from tests.counterparts import LEDGER, PREAMBLE
from tests.raw_upstream import RawUpstream, Request

SECRET = "eyJhbGciOiJFUzI1NiJ9.payload.signature-value"
KEY = "sk_live/4f+Zq= 9x"  # a static key with every character encoders treat specially


def _json_u(value: str, *, lower: bool = False, only: str = "") -> str:
    """JSON ``\\u00XX`` escapes (.NET, Go) for the characters in ``only`` (default: all but
    letters and digits)."""
    return "".join(
        (f"\\u{ord(c):04x}" if lower else f"\\u{ord(c):04X}")
        if (c in only if only else not c.isalnum())
        else c
        for c in value
    )


def _escaped(value: str, template: str) -> str:
    """Every character but letters and digits written as ``template`` % its code point."""
    return "".join(c if c.isalnum() else template % ord(c) for c in value)


def encoded_forms(value: str) -> dict[str, str]:
    """Every form in which an upstream may echo an injected value, by name."""
    percent = quote(value, safe="")
    plus = quote_plus(value, safe="")
    html = _escaped(value, "&#%d;")  # Go html/template
    return {
        "literal": value,
        "percent": percent,
        "percent-lower": _lower_hex(percent),
        "plus": plus,
        "plus-lower": _lower_hex(plus),
        "json-slash": json.dumps(value)[1:-1].replace("/", "\\/"),
        "json-u": _json_u(value),
        "json-u-lower": _json_u(value, lower=True),
        "json-u-mixed": _json_u(value, only="+").replace("/", "\\/"),
        # a URL carrying the value, itself percent-encoded into another URL (return_to=), twice
        "percent-2": quote(percent, safe=""),
        "percent-2-lower": quote(_lower_hex(percent), safe=""),
        "percent-3": quote(quote(percent, safe=""), safe=""),
        "plus-2": quote_plus(plus, safe=""),
        "html-dec": html,
        "html-dec-zeros": _escaped(value, "&#%04d;"),
        "html-hex": _escaped(value, "&#x%X;"),
        "html-hex-lower-zeros": _escaped(value, "&#X%04x;"),
        "js-x": _escaped(value, "\\x%02x"),
        "js-x-upper": _escaped(value, "\\x%02X"),
        "percent-of-html": quote(html, safe=""),
        "percent-of-js-x": quote(_escaped(value, "\\x%02x"), safe=""),
    }


def _lower_hex(percent: str) -> str:
    return "%".join(
        [percent.split("%")[0]] + [p[:2].lower() + p[2:] for p in percent.split("%")[1:]]
    )


def test_scrubber_masks_secret_split_at_every_chunk_boundary():
    """However the body is chunked, the secret never survives and the length is unchanged."""
    body = f"a{SECRET}b{SECRET}{SECRET}c".encode()
    for size in range(1, len(body) + 1):
        scrubber = Scrubber(SECRET)
        out = b"".join(scrubber.feed(body[i : i + size]) for i in range(0, len(body), size))
        out += scrubber.flush()
        assert SECRET.encode() not in out and len(out) == len(body), size
        assert out.count(b"*" * len(SECRET)) == 3


@pytest.mark.parametrize(
    ("secret", "form"),
    [pytest.param(KEY, name, id=f"key-{name}") for name in encoded_forms(KEY)]
    + [
        pytest.param(SECRET, name, id=f"jwt-{name}")
        for name in ("literal", "json-u", "percent-2", "html-dec", "js-x")
    ],
)
def test_scrubber_masks_every_encoded_echo_split_at_every_offset(secret, form):
    """An echo in any encoding the injectors produce or an upstream adds (percent either case
    and nested up to three deep, plus-form, JSON and JavaScript escapes, HTML references) is
    masked wherever the chunks split it, the length unchanged."""
    echo = encoded_forms(secret)[form].encode()
    body = b'{"a":"' + echo + b'","b":"x' + echo + echo + b'"}'
    splits = [[body[:at], body[at:]] for at in range(len(body) + 1)]
    splits += [[body[i : i + n] for i in range(0, len(body), n)] for n in range(1, 9)]
    for chunks in splits:
        scrubber = Scrubber(secret)
        out = b"".join(scrubber.feed(chunk) for chunk in chunks) + scrubber.flush()
        assert len(out) == len(body) and out.count(b"*" * len(echo)) == 3, chunks


def test_scrubber_holds_back_only_a_tail_that_could_begin_an_echo():
    """Bytes that cannot begin an echo leave at once; a possible start of one (plain or
    encoded, or an escape cut short) waits for the next chunk, and no longer."""
    scrubber = Scrubber(KEY)
    assert scrubber.feed(b"data: hello\n\n") == b"data: hello\n\n"
    assert scrubber.feed(b"x sk_live%2F4") == b"x "
    assert scrubber.feed(b"g") == b"sk_live%2F4g"
    assert scrubber.feed(b"ok sk_li") == b"ok "
    assert scrubber.feed(b"ve\\u00") == b""
    assert scrubber.feed(b"zz%") == b"sk_live\\u00zz"
    assert scrubber.feed(b"20 done") == b"%20 done" and scrubber.flush() == b""


def test_scrubber_holds_back_a_nested_or_html_escape_cut_short():
    """A second layer of percent-encoding, an HTML reference or a JavaScript escape cut short
    by a chunk boundary waits for the next chunk; the echo it began is masked whole."""
    scrubber = Scrubber(KEY)
    assert scrubber.feed(b"a sk_live%25") == b"a "  # '%25' may begin '%252F'
    assert scrubber.feed(b"2F4f&#") == b""  # 'sk_live/4f' two layers down, then '&#'
    assert scrubber.feed(b"43;Zq= 9x\n") == b"*" * len("sk_live%252F4f&#43;Zq= 9x") + b"\n"
    assert scrubber.feed(b"x &#x") == b"x " and scrubber.feed(b"2") == b""
    assert scrubber.feed(b"B; \\x") == b"&#x2B; " and scrubber.flush() == b"\\x"
    assert scrubber.feed(b"100% &# done") == b"100% &# done"


def test_request_headers_drop_hop_by_hop_connection_listed_and_credentials():
    """Connection-listed names, hop-by-hop and credential headers are removed; the rest stays in order."""
    inbound = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Host", "127.0.0.1"),
                ("Connection", "close, X-Secret-Hop"),
                ("X-Secret-Hop", "1"),
                ("Authorization", "Bearer x"),
                ("DPoP", "p"),
                ("Transfer-Encoding", "chunked"),
                ("X-Api-Key", "k"),
                ("Accept", "a"),
                ("aUtHoRiZaTiOn", "Bearer y"),
                ("Accept", "b"),
            ]
        )
    )
    out = request_headers(inbound, HOP_BY_HOP | CREDENTIAL_HEADERS | {"x-api-key"})
    assert list(out.items()) == [("Accept", "a"), ("Accept", "b")]
    out.add("Authorization", "Bearer injected")  # a copy: the app's headers stay as they came
    assert inbound.getall("Authorization") == ["Bearer x", "Bearer y"]


def test_response_head_lines_mask_credential_echo_and_drop_hop_by_hop():
    """An upstream echoing the token in a header gets a mask; hop-by-hop and Connection-listed
    response headers go; names and other values pass byte for byte."""
    raw = (
        (b"X-Debug", f"token={SECRET}".encode()),
        (b"Keep-Alive", b"timeout=5"),
        (b"connection", b"X-Hop"),
        (b"X-Hop", b"1"),
        (b"X-Caf\xc3\xa9", b"caf\xc3\xa9"),
        (b"Content-Length", b"3"),
    )
    lines, has_length = response_head_lines(raw, SECRET)
    assert lines == (
        b"X-Debug: token=" + b"*" * len(SECRET) + b"\r\n"
        b"X-Caf\xc3\xa9: caf\xc3\xa9\r\nContent-Length: 3\r\n"
    )
    assert has_length


def test_response_head_lines_mask_a_percent_encoded_credential_in_location():
    """A redirect carrying the query-injected key percent-encoded (either hex case) is masked,
    the header's length kept."""
    location = f"https://elsewhere.example/cb?api_key={quote(KEY, safe='')}&n=1"
    raw = ((b"Location", location.encode()), (b"X-Lower", _lower_hex(quote(KEY, safe="")).encode()))
    lines, _ = response_head_lines(raw, KEY)
    assert b"4f" not in lines.lower() and b"Zq" not in lines
    assert len(lines) == sum(len(name) + len(value) + 4 for name, value in raw)


@pytest.mark.parametrize(
    "form", ["percent-2", "percent-3", "plus-2", "html-dec", "html-hex-lower-zeros", "js-x"]
)
def test_response_head_lines_mask_a_nested_or_escaped_credential(form):
    """A header echoing the key percent-encoded twice or three times, or HTML- or JavaScript-
    escaped, is masked, the header's length kept."""
    echo = encoded_forms(KEY)[form]
    raw = ((b"Location", f"https://login.example/?return_to={echo}&n=1".encode()),)
    lines, _ = response_head_lines(raw, KEY)
    assert echo.encode() not in lines and b"*" * len(echo) + b"&n=1\r\n" in lines
    assert len(lines) == sum(len(name) + len(value) + 4 for name, value in raw)


def test_response_head_lines_content_length_listed_in_connection_frames_nothing():
    lines, has_length = response_head_lines(
        ((b"Connection", b"content-length"), (b"Content-Length", b"3")), ""
    )
    assert lines == b"" and not has_length


def test_request_head_frames_the_body_itself_and_refuses_a_line_break_in_a_value():
    """Content-Length comes from the bytes sent, a stream of unknown length is chunked, and a
    value that would start a second header line is refused before anything is written."""
    head, chunked = request_head("POST", "/x", "h", CIMultiDict({"Content-Length": "99"}), b"abc")
    assert head == b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n" and not chunked

    async def stream():
        yield b"abc"

    head, chunked = request_head("PUT", "/x", "h", CIMultiDict(), stream())
    assert head.endswith(b"Transfer-Encoding: chunked\r\n\r\n") and chunked
    with pytest.raises(ValueError, match="line break"):
        request_head("GET", "/x", "h", CIMultiDict({"X-A": "v\r\nAuthorization: forged"}), None)
    for forged in ("v\rX-B: 1", "v\nX-B: 1", "v\0"):  # a bare CR or LF ends a line somewhere
        with pytest.raises(ValueError, match="line break"):
            request_head("GET", "/x", "h", CIMultiDict({"X-A": forged}), None)
        with pytest.raises(ValueError, match="line break"):
            request_head("GET", "/x", "h", CIMultiDict({forged: "v"}), None)
        with pytest.raises(ValueError, match="line break"):
            request_head("GET", "/" + forged, "h", CIMultiDict(), None)
        with pytest.raises(ValueError, match="line break"):
            request_head("GET", "/x", forged, CIMultiDict(), None)
    origin = Origin("h", 443, True, "h")  # the HTTP/2 request: an HTTP/1.1 hop may follow it
    for forged in ("v\rX-B: 1", "v\nX-B: 1", "v\0"):
        for method, target, headers in (
            ("GET", "/x", {"X-A": forged}),
            ("GET", "/x", {forged: "v"}),
            ("GET", "/" + forged, {}),
            (forged, "/x", {}),
        ):
            with pytest.raises(ValueError, match="line break"):
                _request_fields(method, target, origin, CIMultiDict(headers), None)
    assert (b"x-a", b"v w") in _request_fields(
        "GET", "/x", origin, CIMultiDict({"X-A": "v w"}), None
    )
    head, _ = request_head("GET", "/x", "h", CIMultiDict({"A": "1", "B": "2 3"}), None)
    assert head == b"GET /x HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2 3\r\n\r\n"
    assert request_head("GET", "/x", "h", CIMultiDict(), None)[0].endswith(b"h\r\n\r\n")


async def test_a_small_answer_leaves_in_one_write_with_its_credential_echo_masked():
    """Head, body and the scrubber's held-back tail go to the app in one write (one syscall,
    one segment), the echoed credential masked (a short secret once split the answer in two)."""
    loop = asyncio.get_running_loop()
    writes: list[bytes] = []

    class AppSide:  # what the app's connection would put on the wire
        writing_paused = False

        def write(self, data: bytes) -> None:
            writes.append(data)

    parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16)
    [(message, payload)], _, _ = parser.feed_data(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    request = AppRequest(AppSide(), message, payload)  # type: ignore[arg-type]
    secret = "k-0123456789abcdef"  # shorter than the body: the scrubber holds a tail back
    body = b'{"echo":"' + secret.encode() + b'","more":"' + b"x" * 40 + b'"}'
    answer_parser = HttpResponseParser(BaseProtocol(loop), loop, 2**16, read_until_eof=True)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    [(answer_head, answer_body)], _, _ = answer_parser.feed_data(head + body)

    class Upstream:
        status = 200
        message = answer_head
        trailers: list[tuple[bytes, bytes]] = []  # an HTTP/1.1 answer's: none

        def __init__(self) -> None:
            self.body = answer_body

        def release(self) -> None:
            pass

    await stream_back(request, Upstream(), secret, "route t", None)  # type: ignore[arg-type]
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body))
    assert writes[0].endswith(body.replace(secret.encode(), b"*" * len(secret)))


# -- end to end: a running credproxy in front of an upstream that echoes what it received ------


def _credential(request: Request) -> str:
    """The value the injector put on the wire: key header, bearer JWT or query parameter."""
    if request.values("X-Api-Key"):
        return request.values("X-Api-Key")[0]
    if request.values("Authorization"):
        return request.values("Authorization")[0].removeprefix("Bearer ")
    query = request.target.partition("?")[2]
    return next(unquote(p[8:]) for p in query.split("&") if p.startswith("api_key="))


def _encoding_echo(request: Request) -> bytes:
    """Echo the credential as misbehaving upstreams do: in every encoding in the body, percent-
    encoded in a redirect, or gzipped whatever the request's Accept-Encoding said."""
    value = _credential(request)
    path = request.target.split("?")[0].rsplit("/", 1)[1]
    head = "HTTP/1.1 200 OK\r\n"
    body = json.dumps({"received": request.target}).encode()
    if path == "login":  # a login redirect: the original URL, percent-encoded, in return_to
        origin = f"https://api.example{request.target}"
        head = f"HTTP/1.1 302 Found\r\nLocation: https://login.example/?return_to={quote(origin, safe='')}\r\n"
    elif path == "redirect":
        query = request.target.partition("?")[2]
        head = f"HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/cb?{query}\r\n"
        head += f"X-Lower: {_lower_hex(quote(value, safe=''))}\r\n"
    elif path == "forms":
        body = "\n".join(encoded_forms(value).values()).encode()
    elif path == "gzip":
        head += "Content-Encoding: gzip\r\n"
        body = gzip.compress(body + value.encode())
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.fixture
def echoing() -> Iterator[RawUpstream]:
    upstream = RawUpstream(_encoding_echo).start()
    yield upstream
    upstream.stop()


@pytest.fixture
def sidecar(echoing, credproxy, tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    LEDGER.secret(KEY)
    allow = "allow: [{callers: [test-suite]}]"
    return credproxy(f"""\
{PREAMBLE}issuers:
  key: {{type: static, secret_file: {key_file}}}
  self: {{type: self_signed_jwt, iss: orders, sub: orders}}
routes:
  - {{name: header, path_prefix: /h/, upstream: "{echoing.origin}", {allow},
     credential: {{issuer: key, inject: header, header: X-Api-Key}}}}
  - {{name: query, path_prefix: /q/, upstream: "{echoing.origin}", {allow},
     credential: {{issuer: key, inject: query, query_param: api_key}}}}
  - {{name: jwt, path_prefix: /jwt/, upstream: "{echoing.origin}", {allow},
     credential: {{issuer: self, inject: bearer}}}}
audit: {{file: "{{audit}}"}}
""")


@pytest.mark.parametrize("prefix", ["/h/", "/q/", "/jwt/"])
async def test_encoded_echoes_of_the_credential_never_reach_the_app(
    prefix, sidecar, echoing, client
):
    """Percent-encoded (either case, plus-form) and JSON-escaped echoes in a body, and a
    redirect Location carrying the query key, reach the app masked, lengths kept."""
    async with client.get(sidecar.url + prefix + "forms") as response:
        body = await response.read()
        assert response.status == 200 and int(response.headers["Content-Length"]) == len(body)
    async with client.get(sidecar.url + prefix + "redirect", allow_redirects=False) as response:
        assert response.status == 302
        head = str(list(response.headers.items()))
    values = [_credential(r) for r in echoing.requests]  # a JWT is minted per request
    assert len(values) == 2 and body.count(b"\n") == len(encoded_forms(values[0])) - 1
    for value in values:
        LEDGER.secret(value)
        for name, form in encoded_forms(value).items():
            assert form.encode() not in body and form not in head, name


@pytest.mark.parametrize("prefix", ["/h/", "/jwt/"])
async def test_a_compressed_answer_on_a_bearer_route_is_refused_not_passed_blind(
    prefix, sidecar, echoing, client
):
    """The upstream is asked for identity whatever the app accepts; a gzipped answer anyway
    (it would carry the credential past the scrubber) is a 502 problem, not the app's."""
    async with client.get(
        sidecar.url + prefix + "gzip", headers={"Accept-Encoding": "gzip, br"}
    ) as response:
        problem = await response.json(content_type=None)
        assert response.status == 502 and problem["code"] == "upstream_compressed_answer"
    [request] = echoing.requests
    LEDGER.secret(_credential(request))
    assert request.values("Accept-Encoding") == ["identity"]


async def test_a_login_redirect_carrying_the_query_key_double_encoded_is_masked(
    sidecar, echoing, client
):
    """The reviewer's repro: a query-injected key comes back in ``return_to=`` inside the
    original URL, so percent-encoded twice; the app gets it masked, the Location's length kept."""
    async with client.get(sidecar.url + "/q/login?x=1", allow_redirects=False) as response:
        location = response.headers["Location"]
        assert response.status == 302
    [request] = echoing.requests
    twice = quote(quote(KEY, safe=""), safe="")
    assert twice in quote(request.target, safe="")  # what the upstream echoed
    expected = "https://login.example/?return_to=" + quote(
        f"https://api.example{request.target}", safe=""
    )
    assert twice not in location and len(location) == len(expected)
    assert location == expected.replace(twice, "*" * len(twice))


def test_the_last_chunk_is_masked_with_what_was_held_back_and_nothing_is_held():
    """``last`` (the stream's final bytes) masks an echo split between the held tail and the
    last chunk, percent-encoded too, and returns everything: nothing stays behind."""
    secret = "tok/en+secret"
    for echo in (secret.encode(), b"tok%2Fen%2Bsecret"):
        for cut in range(1, len(echo)):
            scrubber = Scrubber(secret)
            out = scrubber.feed(b"x=" + echo[:cut]) + scrubber.last(echo[cut:] + b";")
            assert out == b"x=" + b"*" * len(echo) + b";", (echo, cut)
            assert scrubber.flush() == b""
