"""Where an upstream is and how a connection to it opens, for both pools (HTTP/1.1 in
``outbound.upstream``, HTTP/2 in ``outbound.h2_upstream``): the origin of a route's upstream URL,
its timeouts, the TLS context it is reached with, and one ``connect`` that translates OS and TLS
errors and checks an upstream's SPIFFE ID before a byte is sent."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from yarl import URL

from ..errors import UpstreamConnectError, UpstreamTimeout, UpstreamTLSError
from .spiffe_tls import check_peer

_DEFAULT_TLS = ssl.create_default_context()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a route's connections go: ``of`` takes the upstream URL."""

    host: str
    port: int
    tls: bool
    host_header: str  # as the Host header names it: default port left out

    @classmethod
    def of(cls, upstream: str) -> Origin:
        url = URL(upstream)
        host = url.raw_host or ""
        port = url.port or (443 if url.scheme == "https" else 80)
        name = f"[{host}]" if ":" in host else host
        explicit = url.explicit_port not in (None, {"http": 80, "https": 443}.get(url.scheme))
        return cls(host, port, url.scheme == "https", f"{name}:{port}" if explicit else name)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    idle_s: float  # longest silence while an answer is awaited or read
    total_s: float  # the whole exchange, answer body included
    streams_outlive_total: bool = False  # an event stream is bounded by idle_s alone


def tls_context(origin: Origin, tls: ssl.SSLContext | bool) -> ssl.SSLContext | None:
    """The context ``origin`` is reached with: the route's own, the system's, or none (http)."""
    return (tls if isinstance(tls, ssl.SSLContext) else _DEFAULT_TLS) if origin.tls else None


P = TypeVar("P", bound=asyncio.Protocol)


async def connect(
    loop: asyncio.AbstractEventLoop,
    protocol: Callable[[], P],
    origin: Origin,
    context: ssl.SSLContext | None,
    timeouts: Timeouts,
    where: str,
) -> tuple[asyncio.Transport, P]:
    """A connection to ``origin`` within ``connect_s``, for HTTP/1.1 and HTTP/2 alike: OS and
    TLS errors leave as the ``UpstreamError`` family, and an upstream that must present a
    SPIFFE ID (``upstream_spiffe_id``) is checked before a byte is sent (``check_peer``)."""
    try:
        async with asyncio.timeout(timeouts.connect_s):
            transport, connection = await loop.create_connection(
                protocol,
                origin.host,
                origin.port,
                ssl=context,
                server_hostname=origin.host if context is not None else None,
            )
    except TimeoutError:
        raise UpstreamTimeout(f"{where}: no connection in {timeouts.connect_s:g}s") from None
    except ssl.SSLError as exc:
        raise UpstreamTLSError(f"{where}: TLS failed: {exc}") from None
    except OSError as exc:
        raise UpstreamConnectError(f"{where}: cannot connect: {exc}") from None
    check_peer(context, transport, where)
    return transport, connection
