"""Header hygiene, request framing and response scrubbing."""

import asyncio

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser, HttpResponseParser
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app_server import AppRequest
from proxy.forwarder import (
    CREDENTIAL_HEADERS,
    HOP_BY_HOP,
    Scrubber,
    request_headers,
    response_head_lines,
)
from proxy.handler import _stream_back
from proxy.upstream import request_head

SECRET = "eyJhbGciOiJFUzI1NiJ9.payload.signature-value"


def test_scrubber_masks_secret_split_at_every_chunk_boundary():
    """However the body is chunked, the secret never survives and the length is unchanged."""
    body = f"a{SECRET}b{SECRET}{SECRET}c".encode()
    for size in range(1, len(body) + 1):
        scrubber = Scrubber(SECRET)
        out = b"".join(scrubber.feed(body[i : i + size]) for i in range(0, len(body), size))
        out += scrubber.flush()
        assert SECRET.encode() not in out and len(out) == len(body), size
        assert out.count(b"*" * len(SECRET)) == 3


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
                ("Accept", "b"),
            ]
        )
    )
    out = request_headers(inbound, HOP_BY_HOP | CREDENTIAL_HEADERS | {"x-api-key"})
    assert list(out.items()) == [("Accept", "a"), ("Accept", "b")]


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

        def __init__(self) -> None:
            self.body = answer_body

        def release(self) -> None:
            pass

    await _stream_back(request, Upstream(), secret, "route t", None)  # type: ignore[arg-type]
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body))
    assert writes[0].endswith(body.replace(secret.encode(), b"*" * len(secret)))
