"""AWS Signature Version 4 on every request, with botocore's signer (``credproxy[aws]``).

Only the host, ``x-amz-*``, ``content-type`` and ``content-md5`` headers are signed, so the rest
of the app's headers can pass unchanged. Bodies stream unsigned (``UNSIGNED-PAYLOAD``, S3) or are
buffered, bounded, and hashed into the signature (services that require it). An answer that the
request time is skewed corrects the clock offset once.
"""

from __future__ import annotations

import datetime
import email.utils
from typing import Any

from ..config import Route, sigv4_scope
from ..token_cache import Token
from .base import Injector, Outbound

_SIGNED = ("content-type", "content-md5")
_SKEW_MARKERS = (b"RequestTimeTooSkewed", b"Signature expired", b"InvalidSignatureException")


class SigV4Injector(Injector):
    strip = frozenset({"x-amz-date", "x-amz-security-token", "x-amz-content-sha256"})
    clock_sensitive = True

    def __init__(
        self, service: str, region: str, *, sign_payload: bool, body_max_bytes: int
    ) -> None:
        from botocore.auth import S3SigV4Auth, SigV4Auth
        from botocore.config import Config

        self.service = service
        self.region = region
        self.needs_body = sign_payload
        self.body_max_bytes = body_max_bytes
        self._auth_class = S3SigV4Auth if service == "s3" else SigV4Auth
        self._client_config = Config(s3={"payload_signing_enabled": sign_payload})
        self._offset = datetime.timedelta(0)

    @classmethod
    def for_route(cls, route: Route, issuer_region: str | None) -> SigV4Injector:
        """Service and region as configured, else from the upstream host, else the issuer's."""
        credential = route.credential
        service, region = sigv4_scope(
            credential.service, credential.region, route.upstream, issuer_region
        )
        assert service and region, "config_file checks that sigv4 routes resolve both"
        payload = credential.payload or ("unsigned" if service == "s3" else "signed")
        return cls(
            service,
            region,
            sign_payload=payload == "signed",
            body_max_bytes=credential.payload_max_bytes,
        )

    def apply(self, outbound: Outbound, token: Token) -> None:
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        assert token.key_id is not None and token.signing_secret is not None
        session_token = None if token.legacy else token.value.reveal()
        outbound.secret = session_token or ""  # the secret key itself never travels
        credentials = Credentials(token.key_id, token.signing_secret.reveal(), session_token)
        signed: dict[str, str] = {
            name: value
            for name, value in outbound.headers.items()
            if name.lower().startswith("x-amz-") or name.lower() in _SIGNED
        }
        request = AWSRequest(
            method=outbound.method,
            url=str(outbound.url),
            headers=signed,
            data=outbound.body if self.needs_body else None,
        )
        request.context["client_config"] = self._client_config
        self._sign(self._auth_class(credentials, self.service, self.region), request)
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256"):
            if name in request.headers:
                outbound.headers[name] = request.headers[name]

    def _sign(self, auth: Any, request: Any) -> None:
        """botocore's ``add_auth`` steps, with our clock (corrected for skew) as the time."""
        now = datetime.datetime.now(datetime.UTC) + self._offset
        request.context["timestamp"] = now.strftime("%Y%m%dT%H%M%SZ")
        auth._modify_request_before_signing(request)
        canonical_request = auth.canonical_request(request)
        string_to_sign = auth.string_to_sign(request, canonical_request)
        auth._inject_signature_to_request(request, auth.signature(string_to_sign, request))

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
