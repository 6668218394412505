"""The upstream's answer on its way to the app: relayed with its head cleaned and any echo of
the credential scrubbed (``stream_back``), and what in it the handler acts on: a content
coding the scrubber cannot read, a small error body to inspect, an error after which one
replay can succeed."""

from __future__ import annotations

from http import HTTPStatus

from ..errors import ProblemError, UpstreamTimeout
from ..log import server_log
from ..outbound.hygiene import Scrubber, mask_echoes, response_head_lines
from ..outbound.upstream import Answer
from .request import AppRequest

REASONS = {status.value: status.phrase for status in HTTPStatus}


async def stream_back(
    request: AppRequest, answer: Answer, secret: str, where: str, prefetched: bytes | None
) -> str:
    """Relay the answer; return the outcome: ``proxied``, or how it was cut short
    (``upstream_timeout``, ``upstream_cut``: the app saw the status, not the whole body)."""
    lines, has_length = response_head_lines(answer.message.raw_headers, secret)
    reason = answer.message.reason
    if secret and reason and reason != REASONS.get(answer.status):  # the upstream's own text
        reason = mask_echoes(reason.encode(), secret).decode(errors="replace")
    request.start(answer.status, reason, lines, has_length=has_length)
    outcome = "proxied"
    try:
        scrubber = Scrubber(secret)
        if prefetched is not None:
            request.write(scrubber.feed(prefetched) + scrubber.flush())
        else:
            body = answer.body
            if not has_length and not body.is_eof():  # a stream: its head goes out at once
                request.flush_head()
            while chunk := await body.readany():  # the upstream's errors are UpstreamError
                # The last bytes take the tail held back with them (a small answer leaves in
                # one write), and end the loop without asking for the end it knows of.
                last = body.at_eof()
                request.write(scrubber.last(chunk) if last else scrubber.feed(chunk))
                if request.writing_paused:
                    await request.drain()
                if last:
                    break
        request.write(scrubber.flush())
        trailers = answer.trailers
        request.end(response_head_lines(trailers, secret)[0] if trailers else b"")
    except ProblemError as exc:
        # Headers are already sent: the only honest signal left is a cut connection.
        server_log.warning("%s: response cut mid-body: %s", where, exc)
        outcome = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_cut"
        request.abort()
    except ConnectionError:
        server_log.info("%s: the app closed the connection mid-response", where)
        outcome = "app_closed"
        request.keep_alive = False
    finally:
        answer.release()
    return outcome


def compressed(answer: Answer, method: str) -> bool:
    """Whether the answer has a body in a content coding the scrubber cannot read."""
    headers = answer.message.headers
    if "Content-Encoding" not in headers or method == "HEAD" or answer.status in (204, 304):
        return False
    codings = ",".join(headers.getall("Content-Encoding", ()))
    return any(c.strip().lower() not in ("", "identity") for c in codings.split(","))


async def small_body(answer: Answer) -> bytes | None:
    """An error body worth inspecting: small and of known length; None leaves it streaming."""
    length = answer.message.headers.get("Content-Length")
    if length is None or int(length) > 65536:
        return None
    return await answer.body.read()


def retry_reason(answer: Answer) -> str | None:
    """RFC 6750 / RFC 9449 errors after which one replay with a new token or nonce can succeed."""
    if answer.status != 401:
        return None
    headers = answer.message.headers
    challenge = ",".join(headers.getall("WWW-Authenticate", ()))
    if 'error="use_dpop_nonce"' in challenge and "DPoP-Nonce" in headers:
        return "use_dpop_nonce"
    if 'error="invalid_token"' in challenge:
        return "invalid_token"
    return None
