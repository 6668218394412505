"""Header hygiene in both directions and the scrubbing of echoed credentials: no I/O."""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Sequence

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

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


def forges_a_line(text: str) -> bool:
    """A CR, LF or NUL in what goes out: where some parser ends a header line early (a forged
    header, a smuggled request). Three ``memchr`` scans."""
    return "\r" in text or "\n" in text or "\0" in text


def request_headers(
    inbound: CIMultiDictProxy[str] | CIMultiDict[str], strip: frozenset[str]
) -> CIMultiDict[str]:
    """The app's headers minus hop-by-hop, ``Connection``-listed and credential headers."""
    drop = strip | _connection_listed(inbound) if "Connection" in inbound else strip
    headers = inbound.copy()  # copy, then remove: building from pairs costs multidict an error
    for name in inbound:
        if name.lower() in drop:
            headers.popall(name, None)
    return headers


_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)


def response_head_lines(
    raw_headers: Sequence[tuple[bytes, bytes]], secret: str
) -> tuple[bytes, bool]:
    """The upstream's header lines (``Name: value\\r\\n``, bytes as received) minus hop-by-hop
    and ``Connection``-listed ones, any echo of the credential masked (in the encodings
    ``Scrubber`` knows: a ``Location`` carries a query credential percent-encoded, twice when
    the original URL is itself a parameter, ``return_to=``); and whether
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
    kept = [
        b": ".join(header)  # join: a third of what `%` formatting costs
        for header, lower in zip(raw_headers, names, strict=True)
        if lower not in drop
    ]
    block = b"\r\n".join(kept) + b"\r\n" if kept else b""
    if secret:
        block = mask_echoes(block, secret)  # '*' only: no line break in a mask
    return block, b"content-length" in names and b"content-length" not in drop


# How an upstream may echo one byte of a credential besides itself; each escape stands for one
# byte (ASCII but for percent-encoding, which escapes UTF-8 byte by byte), hex in either case:
#   %XX             percent-encoding, as the query injector sends it
#   \u00XX  \xXX    JSON and JavaScript escapes
#   \/  \\  \"       JSON short escapes (\/ as PHP writes it)
#   &#NN;  &#xXX;   HTML numeric references (Go html/template writes &#43;), up to 5 leading zeros
#   +               a space, in the query's form encoding
_ESCAPE = re.compile(
    rb"%([0-9A-Fa-f]{2})"
    rb"|\\(?:u00|x)([0-7][0-9A-Fa-f])"
    rb"|&#[xX]0{0,5}([0-7]?[0-9A-Fa-f]);"
    rb"|&#0{0,5}(1[01][0-9]|12[0-7]|[1-9]?[0-9]);"
    rb"|\\([/\\\"])"
)
_ESCAPE_OR_PLUS = re.compile(_ESCAPE.pattern + rb"|(\+)")
_HEX_GROUPS = (1, 2, 3)
_DECIMAL_GROUP = 4
_LITERAL_GROUP = 5
# The start of an escape, cut short by the end of the data (or of a chunk).
_PARTIAL_ESCAPE = re.compile(
    rb"(?:%[0-9A-Fa-f]?"
    rb"|\\(?:u(?:0(?:0[0-7]?)?)?|x[0-7]?)?"
    rb"|&(?:#(?:[xX][0-9A-Fa-f]{0,7}|[0-9]{0,8})?)?"
    rb")\Z"
)
# The bytes that may begin an escape, as ints: ``int in bytes`` is one memchr, where ``find``
# parses its arguments first and ``bytes in bytes`` formats a TypeError first (3.11).
_PERCENT, _BACKSLASH, _AMPERSAND, _PLUS, _SPACE = b"%\\&+ "
_MAX_PARTIAL_BYTES = 11  # &#x0000002B without its ';'
# An echo nested in encodings is decoded this many times: a URL with the key percent-encoded,
# itself percent-encoded into another URL's query (a login redirect's return_to), and once more.
_LAYERS = 3
# The most bytes one byte of an echo takes on the wire, in the forms decoded: an HTML reference
# with leading zeros under two more layers of percent-encoding (%2526%2523x000002B%253B).
_MAX_ESCAPE_BYTES = 23


def _decoded(data: bytes, escape: re.Pattern[bytes]) -> tuple[bytes, list[int], list[int]]:
    """``data`` with every escape decoded to its byte, and where each escape ended: in the
    decoded bytes and in ``data`` (ascending), to map decoded offsets back."""
    pieces: list[bytes] = []
    decoded_ends: list[int] = []
    raw_ends: list[int] = []
    raw = size = 0
    for match in escape.finditer(data):
        start, end = match.span()
        group = match.lastindex
        if group in _HEX_GROUPS:
            byte = bytes((int(match[group], 16),))
        elif group == _DECIMAL_GROUP:
            byte = bytes((int(match[group]),))
        elif group == _LITERAL_GROUP:
            byte = match[group]
        else:
            byte = b" "
        pieces += (data[raw:start], byte)
        size += start - raw + 1
        decoded_ends.append(size)
        raw_ends.append(end)
        raw = end
    pieces.append(data[raw:])
    return b"".join(pieces), decoded_ends, raw_ends


def _raw_offset(offset: int, layers: list[tuple[list[int], list[int]]]) -> int:
    """Where byte ``offset`` of the innermost decoding begins in the raw data, through every
    layer (each: where its escapes ended, decoded and raw)."""
    for decoded_ends, raw_ends in reversed(layers):
        i = bisect.bisect_right(decoded_ends, offset)
        offset = offset if i == 0 else raw_ends[i - 1] + offset - decoded_ends[i - 1]
    return offset


def _may_escape(data: bytes, start: int, plus: bool) -> bool:
    """Whether ``data[start:]`` holds a byte that may begin an escape, whole or cut short."""
    tail = data[start:] if start else data
    return _PERCENT in tail or _BACKSLASH in tail or _AMPERSAND in tail or (plus and _PLUS in tail)


def _secret_start(data: bytes, base: int, secret: bytes) -> int:
    """Where in ``data[base:]`` the longest tail that begins ``secret`` starts (len: none)."""
    end = len(data)
    if end > base and data[end - 1] == secret[0] and len(secret) > 1:
        last = end - 1  # a one-byte tail: checked apart, the search below looks for two bytes
    else:
        last = end
    pair = secret[:2]
    at = data.find(pair, max(end - len(secret) + 1, base))
    while at >= 0:
        if secret.startswith(data[at:]):
            return at - base
        at = data.find(pair, at + 1)
    return last - base


def _has_escape(data: bytes, plus: bool) -> bool:
    return (
        _PERCENT in data
        or _BACKSLASH in data
        or (_AMPERSAND in data and data.find(b"&#") >= 0)
        or (plus and _PLUS in data)
    )


def mask_echoes(data: bytes, secret: str) -> bytes:
    """``data`` (whole: a header block, a reason, an error text) with every echo of ``secret``
    masked; the common case, no echo and nothing encoded, costs a few searches."""
    if not secret:
        return data
    needle = secret.encode()
    if data.find(needle) < 0 and not _has_escape(data, _SPACE in needle):
        return data
    return Scrubber(secret).masked(data)


_EchoTables = tuple[tuple[re.Pattern[bytes], ...], bytes, bytes, bytes]


@functools.lru_cache(maxsize=64)  # one per credential in use, built once rather than per request
def _echo_tables(secret: bytes) -> _EchoTables:
    """What a ``Scrubber`` of ``secret`` needs for data holding an escape: (the escape patterns,
    the echo and escape translate tables, the shortest echo run)."""
    plus = b" " in secret
    escapes = (_ESCAPE, _ESCAPE_OR_PLUS) if plus else (_ESCAPE,)
    # An echo is a run of bytes that are the secret's own or make up escapes: elsewhere
    # (binary data, prose) nothing needs decoding, and runs are found at C speed.
    # Translate tables: 1 for a byte an echo may hold; 2 for one that may begin an escape.
    echo_bytes = bytearray(256)
    for byte in {*secret, *b"%\\&ux#;X0123456789ABCDEFabcdef", *b"+" * plus}:
        echo_bytes[byte] = 1
    escape_bytes = bytearray(256)
    for byte in b"%\\&" + b"+" * plus:
        escape_bytes[byte] = 2
    run = b"\x01" * len(secret)  # an echo takes at least a byte per byte
    return escapes, bytes(echo_bytes), bytes(escape_bytes), run


class Scrubber:
    """Masks every echo of a secret in a byte stream, even across chunk boundaries: the secret
    itself, and its percent-encoded, JSON- and JavaScript-escaped, HTML-referenced and plus-form
    encodings, mixed in any way and nested up to ``_LAYERS`` deep (``%252B``).

    A mask has the length of what it covers, so ``Content-Length`` stays true. Between chunks it
    holds back only a tail that could begin an echo, so streams are not delayed.
    """

    __slots__ = ("_secret", "_plus", "_window", "_tail")

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self._plus = b" " in self._secret
        # every byte but one of an echo, each at its longest, and an escape cut short
        self._window = max(len(self._secret) - 1, 0) * _MAX_ESCAPE_BYTES + _MAX_ESCAPE_BYTES - 1
        self._tail = b""

    # What only data holding an escape needs: built once per secret, when first needed (a
    # credential minted per request, a self-signed JWT, rarely gets that far).
    @property
    def _escapes(self) -> tuple[re.Pattern[bytes], ...]:
        return _echo_tables(self._secret)[0]

    @property
    def _echo_bytes(self) -> bytes:
        return _echo_tables(self._secret)[1]

    @property
    def _escape_bytes(self) -> bytes:
        return _echo_tables(self._secret)[2]

    @property
    def _run(self) -> bytes:
        return _echo_tables(self._secret)[3]

    def masked(self, data: bytes) -> bytes:
        """``data`` with every whole echo of the secret in it masked with '*'."""
        secret = self._secret
        if not secret:
            return data
        if data.find(secret) >= 0:  # find: `in` formats a TypeError first on 3.11
            data = data.replace(secret, b"*" * len(secret))
        if not _has_escape(data, self._plus):
            return data  # nothing encoded: the common case
        runs = data.translate(self._echo_bytes)
        if runs.find(self._run) < 0:
            return data  # no run of echo bytes as long as the secret: binary data, prose
        kinds = data.translate(self._escape_bytes)
        length = len(secret)
        out: bytearray | None = None
        # Only a run of echo bytes as long as the secret and holding an escape can hide an
        # encoded echo: leap from a long run to the next escape and back, at C speed.
        end = 0
        while (run := runs.find(self._run, end)) >= 0 and (at := kinds.find(b"\x02", run)) >= 0:
            start = run if at < run + length else runs.rfind(b"\x00", 0, at) + 1
            end = runs.find(b"\x00", at)
            end = len(data) if end < 0 else end
            if end - start < length:
                continue
            for escape in self._escapes:
                text = data[start:end] if out is None else bytes(out[start:end])
                for first, last in self._echoes(text, escape):
                    out = out if out is not None else bytearray(data)
                    out[start + first : start + last] = b"*" * (last - first)
        return bytes(out) if out is not None else data

    def _echoes(self, run: bytes, escape: re.Pattern[bytes]) -> list[tuple[int, int]]:
        """Where in ``run`` an encoded echo of the secret lies, decoding up to ``_LAYERS`` deep."""
        secret = self._secret
        found: list[tuple[int, int]] = []
        layers: list[tuple[list[int], list[int]]] = []
        text = run
        for _ in range(_LAYERS):
            text, decoded_ends, raw_ends = _decoded(text, escape)
            if not decoded_ends:
                break  # nothing left to decode
            layers.append((decoded_ends, raw_ends))
            at = text.find(secret)
            while at >= 0:
                found.append((_raw_offset(at, layers), _raw_offset(at + len(secret), layers)))
                at = text.find(secret, at + len(secret))
        return found

    def _held_from(self, data: bytes) -> int:
        """Where the shortest tail of ``data`` that could begin an echo starts (len: none)."""
        secret = self._secret
        base = max(len(data) - self._window, 0)
        if not _may_escape(data, base, self._plus):  # nothing encoded near the end: only the
            return base + _secret_start(data, base, secret)  # secret's own first bytes count
        base += data[base:].translate(self._echo_bytes).rfind(b"\x00") + 1  # the last run
        window = data[base:]
        held = len(window)
        for escape in self._escapes:
            text = window
            layers: list[tuple[list[int], list[int]]] = []
            for depth in range(_LAYERS + 1):
                cut = len(text)
                if depth < _LAYERS:  # an escape cut short could begin an echo: held
                    partial = _PARTIAL_ESCAPE.search(text, max(cut - _MAX_PARTIAL_BYTES, 0))
                    cut = partial.start() if partial is not None else cut
                    held = min(held, _raw_offset(cut, layers))
                # and so could the secret's first bytes (the longest such tail comes first)
                at = text.find(secret[:1], max(cut - len(secret) + 1, 0), cut)
                while at >= 0:
                    if secret.startswith(text[at:cut]):
                        held = min(held, _raw_offset(at, layers))
                        break
                    at = text.find(secret[:1], at + 1, cut)
                if depth == _LAYERS:
                    break
                text, decoded_ends, raw_ends = _decoded(text[:cut], escape)
                if not decoded_ends:
                    break  # nothing decodes: deeper layers hold nothing new
                layers.append((decoded_ends, raw_ends))
        return base + held

    def feed(self, chunk: bytes) -> bytes:
        if not self._secret:
            return chunk  # nothing was injected that could be echoed
        data = self.masked(self._tail + chunk if self._tail else chunk)
        held = self._held_from(data)
        self._tail = data[held:]
        return data[:held]

    def last(self, chunk: bytes) -> bytes:
        """The stream's last bytes with what was held back, masked: nothing left to hold."""
        if not self._secret:
            return chunk
        data, self._tail = self._tail + chunk if self._tail else chunk, b""
        return self.masked(data)

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail
