"""One HTTP exchange with an identity service (an OAuth2 IdP, OpenBao): bounded in time and in
size, TLS as the issuer configures it, never following a redirect. The one place where
aiohttp's and the OS's errors on that boundary become ``IssuerError``; an issuer passes how it
names itself in errors (``error``)."""

from __future__ import annotations

import email.utils
import json
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from multidict import CIMultiDict

from ...errors import IssuerError

_MAX_RESPONSE_BYTES = 64 * 1024

Answer = tuple[int, bytes, CIMultiDict[str]]  # status, body, headers


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    timeout_s: float,
    tls: ssl.SSLContext | bool,
    error: Callable[[str], IssuerError],
    **kwargs: Any,
) -> Answer:
    """The answer to one request, or ``error(what went wrong)`` raised: no quoted body."""
    try:
        async with session.request(
            method,
            url,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            ssl=tls,
            allow_redirects=False,
            **kwargs,
        ) as response:
            body = await _read_limited(response)
            return response.status, body, response.headers.copy()
    except TimeoutError:
        raise error(f"{url} did not answer within {timeout_s:g}s") from None
    except aiohttp.ClientSSLError as exc:
        raise error(f"TLS to {url} failed: {exc.__class__.__name__}") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise error(f"{url} unreachable: {exc.__class__.__name__}: {exc}") from None


def json_object(raw: bytes, where: str, error: Callable[[str], IssuerError]) -> dict[str, Any]:
    """``raw`` as a JSON object, or ``error`` naming ``where`` (a URL or an API path)."""
    try:
        document = json.loads(raw)
    except ValueError:
        raise error(f"{where} answered something that is not JSON") from None
    if not isinstance(document, dict):
        raise error(f"{where} answered JSON that is not an object")
    return document


def retry_after_s(value: str | None) -> float | None:
    """RFC 9110 §10.2.3: delay seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - time.time())


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > _MAX_RESPONSE_BYTES:
            raise aiohttp.ClientPayloadError(f"response larger than {_MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
