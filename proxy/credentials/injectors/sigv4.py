"""AWS Signature Version 4 on every request, with botocore's signer (``credproxy[aws]``, behind
``proxy.aws_sdk``).

Only the host, ``x-amz-*``, ``content-type`` and ``content-md5`` headers are signed, so the rest
of the app's headers can pass unchanged. Bodies stream unsigned (``UNSIGNED-PAYLOAD``, S3), stream
with a CRC32 trailer computed on the way (``STREAMING-UNSIGNED-PAYLOAD-TRAILER``, S3
``aws-chunked``: integrity without buffering), or are buffered, bounded, and hashed into the
signature (services that require it). An answer that the request time is skewed corrects the
clock offset once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import zlib
from collections.abc import AsyncIterator

from aiohttp import StreamReader

from ...aws_sdk import SigV4Signer, service_protocol
from ...config.credential import SigV4Credential
from ...config.issuers import sigv4_scope
from ...config.model import RouteConfig
from ...errors import AnswerFormat, LengthRequired
from ..issuers.base import Issuer
from ..token import Token
from .base import Body, Injector, Outbound, Signing, injector

_SIGNED = ("content-type", "content-md5")
# Services that accept (S3) or require (VPC Lattice) UNSIGNED-PAYLOAD: bodies stream unhashed.
_UNSIGNED_BY_DEFAULT = frozenset({"s3", "vpc-lattice-svcs"})
_SKEW_MARKERS = (b"RequestTimeTooSkewed", b"Signature expired", b"InvalidSignatureException")
_CHUNK = 64 * 1024  # aws-chunked frame size; fixed, so the encoded length is known up front
_TRAILER = "x-amz-checksum-crc32"


def _answer_format(service: str) -> AnswerFormat:
    """credproxy's own answers on the route in the service's error format, which the app's AWS
    SDK parses into a code and message (problem+json would reach it as a bare status)."""
    if service == "s3":
        return "s3_xml"
    protocol = service_protocol(service)
    if protocol in ("json", "rest-json"):
        return "aws_json"
    if protocol in ("query", "ec2", "rest-xml"):
        return "aws_xml"
    return "problem"


class SigV4Injector(Injector):
    strip = frozenset(
        {
            "x-amz-date",
            "x-amz-security-token",
            "x-amz-content-sha256",
            "x-amz-trailer",
            "x-amz-decoded-content-length",
        }
    )
    clock_sensitive = True

    def __init__(
        self,
        service: str,
        region: str,
        *,
        sign_payload: bool,
        body_max_bytes: int,
        checksum_trailer: bool = False,
    ) -> None:
        self.service = service
        self.region = region
        self.needs_body = sign_payload
        self.checksum_trailer = checksum_trailer
        self.body_max_bytes = body_max_bytes
        self._signer = SigV4Signer(service, region, sign_payload=sign_payload)
        self.answer_as = _answer_format(service)
        self._offset = datetime.timedelta(0)

    @classmethod
    def for_route(
        cls, credential: SigV4Credential, upstream: str, issuer_region: str | None
    ) -> SigV4Injector:
        """Service and region as configured, else from the upstream host, else the issuer's."""
        service, region = sigv4_scope(
            credential.service, credential.region, upstream, issuer_region
        )
        assert service and region, "the loader checks that sigv4 routes resolve both"
        payload = credential.payload or (
            "unsigned" if service in _UNSIGNED_BY_DEFAULT else "signed"
        )
        return cls(
            service,
            region,
            sign_payload=payload == "signed",
            body_max_bytes=credential.payload_max_bytes,
            checksum_trailer=payload == "streaming",
        )

    async def apply(self, outbound: Outbound, token: Token) -> None:
        assert token.key_id is not None and token.signing_secret is not None
        chunked = self._frame_chunked(outbound)
        session_token = None if token.legacy else token.value.reveal()
        outbound.secret = session_token or ""  # the secret key itself never travels
        signed: dict[str, str] = {
            name: value
            for name, value in outbound.headers.items()
            if name.lower().startswith("x-amz-") or name.lower() in _SIGNED
        }
        signature = self._signer.sign(
            outbound.method,
            str(outbound.url),
            signed,
            outbound.body if self.needs_body else None,
            key_id=token.key_id,
            secret_key=token.signing_secret,
            session_token=session_token,
            now=datetime.datetime.now(datetime.UTC) + self._offset,  # corrected for skew
            crc32_trailer=_TRAILER if chunked else None,
        )
        for name, value in signature.items():
            outbound.headers[name] = value

    def _frame_chunked(self, outbound: Outbound) -> bool:
        """Set the aws-chunked headers when this body gets a checksum trailer. Not when the app
        sent its own checksum (it protects the body already) or there is no body."""
        headers = outbound.headers
        if not self.checksum_trailer or not outbound.has_body:
            return False
        if "X-Amz-Trailer" in headers:
            return True  # framed on the first attempt; this is the replay
        if any(name.lower().startswith("x-amz-checksum-") for name in headers):
            return False
        length = headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise LengthRequired("aws-chunked needs the decoded length up front")
        encodings = [e for e in headers.getall("Content-Encoding", []) if e]
        del headers["Content-Length"]
        headers.popall("Content-Encoding", None)
        headers["Content-Encoding"] = ",".join(["aws-chunked", *encodings])
        headers["Content-Length"] = str(_chunked_length(int(length)))
        headers["X-Amz-Decoded-Content-Length"] = length
        headers["X-Amz-Trailer"] = _TRAILER
        headers["X-Amz-Sdk-Checksum-Algorithm"] = "CRC32"
        return True

    def encode(self, outbound: Outbound, body: Body) -> Body:
        if "X-Amz-Trailer" not in outbound.headers or body is None:  # the app's is stripped
            return body
        assert isinstance(body, bytes | StreamReader), "the handler passes what it read"
        return _aws_chunked(body)

    def corrects_clock(self, status: int, body: bytes, date: str | None) -> bool:
        if status != 403 or date is None or not any(m in body for m in _SKEW_MARKERS):
            return False
        try:
            server_now = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return False
        offset = server_now - datetime.datetime.now(datetime.UTC)
        if abs(offset - self._offset) < datetime.timedelta(seconds=60):
            return False  # not a clock problem we can fix
        self._offset = offset
        return True


@injector(SigV4Credential)
def _sigv4(
    credential: SigV4Credential, route: RouteConfig, issuer: Issuer, signing: Signing
) -> Injector:
    return SigV4Injector.for_route(credential, route.upstream, issuer.region)


def _chunked_length(size: int) -> int:
    """Bytes of ``size`` decoded bytes framed in ``_CHUNK`` frames, plus the final frame and
    the checksum trailer (8 base64 characters of CRC32)."""
    full, rest = divmod(size, _CHUNK)
    frames = full * (len(f"{_CHUNK:x}") + _CHUNK + 4)
    if rest:
        frames += len(f"{rest:x}") + rest + 4
    return frames + len("0\r\n") + len(_TRAILER) + len(":") + 8 + len("\r\n\r\n")


async def _aws_chunked(body: bytes | StreamReader) -> AsyncIterator[bytes]:
    """S3 ``aws-chunked`` framing (as botocore's ``AwsChunkedWrapper``) with a CRC32 trailer,
    computed while the body streams."""
    crc = 0
    offset = 0
    while True:
        if isinstance(body, bytes):
            chunk, offset = body[offset : offset + _CHUNK], offset + _CHUNK
        else:
            try:
                chunk = await body.readexactly(_CHUNK)
            except asyncio.IncompleteReadError as exc:
                chunk = exc.partial
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        yield b"%x\r\n%b\r\n" % (len(chunk), chunk)
        if len(chunk) < _CHUNK:
            break
    checksum = base64.b64encode(crc.to_bytes(4, "big"))
    yield b"0\r\n%s:%s\r\n\r\n" % (_TRAILER.encode(), checksum)
