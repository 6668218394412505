"""The upstream side: one pooled keep-alive client, streaming bodies, hop-by-hop hygiene.

Third-party errors are translated here, once, into the ``UpstreamError`` family.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from multidict import CIMultiDict, MultiMapping

from .errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)

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


def response_headers(upstream: MultiMapping[str], secret: str) -> CIMultiDict[str]:
    """The upstream's headers minus hop-by-hop ones, with any echo of the credential masked."""
    drop = HOP_BY_HOP | _connection_listed(upstream)
    mask = "*" * len(secret)
    return CIMultiDict(
        (name, value.replace(secret, mask) if secret and secret in value else value)
        for name, value in upstream.items()
        if name.lower() not in drop
    )


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
        if self._secret in data:
            data = data.replace(self._secret, self._mask)
        if len(data) <= self._keep:
            self._tail = data
            return b""
        self._tail = data[-self._keep :] if self._keep else b""
        return data[: len(data) - self._keep] if self._keep else data

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail


def new_session() -> aiohttp.ClientSession:
    """The process's one upstream client: pooled keep-alive, no cookies, no added headers."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must never carry cookies between callers
        auto_decompress=False,  # bodies pass through byte for byte
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        trust_env=False,  # the app's HTTP_PROXY may point at us: never loop back
    )


@contextmanager
def upstream_errors(where: str) -> Iterator[None]:
    """Translate aiohttp and OS errors into the ``UpstreamError`` family, naming the upstream."""
    try:
        yield
    except UpstreamError:
        raise
    except TimeoutError as exc:
        raise UpstreamTimeout(f"{where}: timed out") from exc
    except aiohttp.ClientSSLError as exc:
        raise UpstreamTLSError(f"{where}: TLS failed: {exc}") from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamConnectError(f"{where}: cannot connect: {exc.os_error}") from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        raise UpstreamProtocolError(f"{where}: {exc.__class__.__name__}: {exc}") from exc
    except aiohttp.ClientResponseError as exc:
        raise UpstreamProtocolError(f"{where}: invalid response: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(f"{where}: {exc.__class__.__name__}: {exc}") from exc
