"""Header hygiene in both directions and the scrubbing of echoed credentials: no I/O."""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

from multidict import CIMultiDict, MultiMapping

# RFC 9110 §7.6.1 (plus the widespread non-standard ones); never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Inbound headers that could carry an app-supplied credential, or that we set or meet ourselves
# (Expect: credproxy answers 100-continue itself, as it reads the body before the upstream does).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "dpop", "host", "expect"})
# Headers frameworks read to serve another method or URL than the request line's (Symfony,
# Laravel, IIS URL Rewrite, Google APIs, nginx auth_request): the policy would have checked one
# request and the upstream would serve another. Stripped unless a route allows them.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
URL_OVERRIDE_HEADERS = ("x-original-url", "x-rewrite-url", "x-override-url", "x-original-uri")
OVERRIDE_HEADERS = frozenset(METHOD_OVERRIDE_HEADERS + URL_OVERRIDE_HEADERS)


def _connection_listed(headers: MultiMapping[str]) -> frozenset[str]:
    """Header names the sender declared hop-by-hop in ``Connection`` (RFC 9110 §7.6.1)."""
    return frozenset(
        name.strip().lower()
        for value in headers.getall("Connection", ())
        for name in value.split(",")
    )


def request_headers(inbound: MultiMapping[str], strip: frozenset[str]) -> CIMultiDict[str]:
    """The app's headers minus hop-by-hop, ``Connection``-listed and credential headers."""
    drop = strip | _connection_listed(inbound) if "Connection" in inbound else strip
    return CIMultiDict((name, value) for name, value in inbound.items() if name.lower() not in drop)


_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)


def response_head_lines(
    raw_headers: Sequence[tuple[bytes, bytes]], secret: str
) -> tuple[bytes, bool]:
    """The upstream's header lines (``Name: value\\r\\n``, bytes as received) minus hop-by-hop
    and ``Connection``-listed ones, any echo of the credential masked (in the encodings
    ``Scrubber`` knows: a ``Location`` carries a query credential percent-encoded); and whether
    a Content-Length still frames the body."""
    names = [name.lower() for name, _ in raw_headers]
    drop = _HOP_BY_HOP_BYTES
    if b"connection" in names:
        drop = drop | {
            listed.strip().lower()
            for (_, value), name in zip(raw_headers, names, strict=True)
            if name == b"connection"
            for listed in value.split(b",")
        }
    block = b"".join(
        [
            b"%s: %s\r\n" % header
            for header, lower in zip(raw_headers, names, strict=True)
            if lower not in drop
        ]
    )
    if secret:
        block = Scrubber(secret).masked(block)  # '*' only: no line break in a mask
    return block, b"content-length" in names and b"content-length" not in drop


# How an upstream may echo one byte of a credential besides itself: percent-encoded (how the
# query injector sends it; either hex case), a JSON \u00XX (either case) or short escape (\/ as
# PHP writes it), and '+' for a space (the query's form encoding).
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})|\\u00([0-7][0-9A-Fa-f])|\\([/\\\"])")
_ESCAPE_OR_PLUS = re.compile(_ESCAPE.pattern + rb"|(\+)")
_PARTIAL_ESCAPE = re.compile(rb"(?:%[0-9A-Fa-f]?|\\(?:u(?:0(?:0[0-7]?)?)?)?)\Z")
_MAX_ESCAPE_BYTES = 6  # \u00XX


def _decoded(data: bytes, escape: re.Pattern[bytes]) -> tuple[bytes, list[int], list[int]]:
    """``data`` with every escape decoded to its byte, and where each escape ended: in the
    decoded bytes and in ``data`` (ascending), to map decoded offsets back."""
    pieces: list[bytes] = []
    decoded_ends: list[int] = []
    raw_ends: list[int] = []
    raw = size = 0
    for match in escape.finditer(data):
        start, end = match.span()
        code = match[1] or match[2]
        pieces += (data[raw:start], bytes.fromhex(code.decode()) if code else match[3] or b" ")
        size += start - raw + 1
        decoded_ends.append(size)
        raw_ends.append(end)
        raw = end
    pieces.append(data[raw:])
    return b"".join(pieces), decoded_ends, raw_ends


def _raw_offset(offset: int, decoded_ends: list[int], raw_ends: list[int]) -> int:
    """Where decoded byte ``offset`` begins in the raw data."""
    i = bisect.bisect_right(decoded_ends, offset)
    return offset if i == 0 else raw_ends[i - 1] + offset - decoded_ends[i - 1]


class Scrubber:
    """Masks every echo of a secret in a byte stream, even across chunk boundaries: the secret
    itself, and its percent-encoded, JSON-escaped and plus-form encodings, mixed in any way.

    A mask has the length of what it covers, so ``Content-Length`` stays true. Between chunks it
    holds back only a tail that could begin an echo, so streams are not delayed.
    """

    __slots__ = ("_secret", "_escapes", "_echo_bytes", "_run", "_window", "_tail")

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        spaced = b" " in self._secret
        self._escapes = (_ESCAPE, _ESCAPE_OR_PLUS) if spaced else (_ESCAPE,)
        # An echo is a run of bytes that are the secret's own or make up escapes: elsewhere
        # (binary data, prose) nothing needs decoding, and runs are found at C speed.
        self._echo_bytes = bytearray(256)  # a translate table: 1 for a byte an echo may hold
        for byte in {*self._secret, *b"%\\u0123456789ABCDEFabcdef", *b"+" * spaced}:
            self._echo_bytes[byte] = 1
        self._run = b"\x01" * len(self._secret)  # an echo takes at least a byte per byte
        # every byte but one of an echo, each at its longest (\u00XX), and an escape cut short
        self._window = max(len(self._secret) - 1, 0) * _MAX_ESCAPE_BYTES + _MAX_ESCAPE_BYTES - 1
        self._tail = b""

    def masked(self, data: bytes) -> bytes:
        """``data`` with every whole echo of the secret in it masked with '*'."""
        secret = self._secret
        if not secret:
            return data
        if data.find(secret) >= 0:  # find: `in` formats a TypeError first on 3.11
            data = data.replace(secret, b"*" * len(secret))
        if data.find(b"%") < 0 and data.find(b"\\") < 0 and len(self._escapes) == 1:
            return data  # nothing encoded: the common case
        kinds = data.translate(self._echo_bytes)
        out: bytearray | None = None
        start = kinds.find(self._run)
        while start >= 0:
            end = kinds.find(b"\x00", start)
            end = len(data) if end < 0 else end
            for escape in self._escapes:
                run = bytes(out[start:end]) if out is not None else data[start:end]
                decoded, decoded_ends, raw_ends = _decoded(run, escape)
                at = decoded.find(secret)
                while at >= 0:
                    first = start + _raw_offset(at, decoded_ends, raw_ends)
                    last = start + _raw_offset(at + len(secret), decoded_ends, raw_ends)
                    out = out if out is not None else bytearray(data)
                    out[first:last] = b"*" * (last - first)
                    at = decoded.find(secret, at + len(secret))
            start = kinds.find(self._run, end)
        return bytes(out) if out is not None else data

    def _held_from(self, data: bytes) -> int:
        """Where the shortest tail of ``data`` that could begin an echo starts (len: none)."""
        secret = self._secret
        base = max(len(data) - self._window, 0)
        base += data[base:].translate(self._echo_bytes).rfind(b"\x00") + 1  # the last run
        window = data[base:]
        partial = _PARTIAL_ESCAPE.search(window)
        # an escape cut short could begin an echo: held, whatever comes before it
        held = cut = partial.start() if partial is not None else len(window)
        for escape in self._escapes:
            decoded, decoded_ends, raw_ends = _decoded(window[:cut], escape)
            at = decoded.find(secret[:1], max(len(decoded) - len(secret) + 1, 0))
            while at >= 0:
                if secret.startswith(decoded[at:]):  # the longest such tail comes first
                    held = min(held, _raw_offset(at, decoded_ends, raw_ends))
                    break
                at = decoded.find(secret[:1], at + 1)
        return base + held

    def feed(self, chunk: bytes) -> bytes:
        if not self._secret:
            return chunk  # nothing was injected that could be echoed
        data = self.masked(self._tail + chunk if self._tail else chunk)
        held = self._held_from(data)
        self._tail = data[held:]
        return data[:held]

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail
