"""The app's request body on its way out: framed by credproxy, buffered only where a route must
(an injector signs it, or a small one is kept for one replay), bounded in size and in time."""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader
from multidict import CIMultiDict

from ..errors import PayloadTooLarge, RequestTimeout, TransferCodingNotImplemented
from .request import AppRequest
from .runtime import RouteRuntime

_MAX_CONTENT_LENGTH = 2**63 - 1  # beyond, signed 64-bit parsers upstream overflow


def framed(headers: CIMultiDict[str], request: AppRequest) -> CIMultiDict[str]:
    """The app's Content-Length re-serialised from the parsed value: the proxy's own framing."""
    if "Content-Length" in headers and request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    return headers


async def request_body(
    request: AppRequest, route: RouteRuntime, idle_s: float
) -> tuple[bytes | StreamReader | None, bool]:
    """The body to send and whether it can be sent twice. Streams unless the injector must hash
    it (bounded: 413 beyond) or it is small enough to keep for one replay."""
    codings = ",".join(request.headers.getall("Transfer-Encoding", ())).lower()
    if codings and [c.strip() for c in codings.split(",") if c.strip() != "identity"] != [
        "chunked"
    ]:
        raise TransferCodingNotImplemented(f"Transfer-Encoding {codings[:60]!r}")
    if not request.body_exists:
        return None, True
    length = request.content_length
    if length is not None and length > _MAX_CONTENT_LENGTH:
        raise PayloadTooLarge(f"Content-Length {length}")
    bound = route.injector.body_max_bytes
    if route.injector.needs_body and length is not None and length > bound:
        raise PayloadTooLarge(f"body of {length} bytes, route limit {bound}")
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        request.send_continue()
    if route.injector.needs_body:
        return await _read_body(request.body, bound, idle_s), True
    if length is not None and length <= route.config.retry_body_max_bytes:
        return await _read_body(request.body, length, idle_s), True
    return request.body, False


async def _read_body(body: StreamReader, bound: int, idle_s: float) -> bytes:
    """The whole body, at most ``bound`` bytes (413 beyond), each read within ``idle_s`` (408)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await body.readany()
        except TimeoutError:
            raise RequestTimeout(f"no request body byte for {idle_s:g}s") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > bound:
            raise PayloadTooLarge(f"body over the route limit of {bound} bytes")
        chunks.append(chunk)
