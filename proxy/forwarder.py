"""Header hygiene in both directions and the scrubbing of echoed credentials: no I/O."""

from __future__ import annotations

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
    and ``Connection``-listed ones, any echo of the credential masked; and whether a
    Content-Length still frames the body."""
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
    needle = secret.encode()
    if needle and block.find(needle) >= 0:  # find: `in` formats a TypeError first on 3.11
        block = block.replace(needle, b"*" * len(needle))  # no line break in a credential
    return block, b"content-length" in names and b"content-length" not in drop


class Scrubber:
    """Masks every occurrence of a secret in a byte stream, even across chunk boundaries.

    The mask has the secret's length, so ``Content-Length`` stays true.
    """

    __slots__ = ("_secret", "_mask", "_keep", "_tail")

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode("ascii")
        self._mask = b"*" * len(self._secret)
        self._keep = len(self._secret) - 1
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._secret:
            return chunk  # nothing was injected that could be echoed
        data = self._tail + chunk if self._tail else chunk
        if data.find(self._secret) >= 0:
            data = data.replace(self._secret, self._mask)
        if len(data) <= self._keep:
            self._tail = data
            return b""
        self._tail = data[-self._keep :] if self._keep else b""
        return data[: len(data) - self._keep] if self._keep else data

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail
