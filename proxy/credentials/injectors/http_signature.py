"""RFC 9421 HTTP Message Signatures on every request, with a ``Content-Digest`` (RFC 9530).

The key is a ``self_signed_jwt`` issuer's (Ed25519, ECDSA P-256 or RSA; ``keyid`` = the JWK
thumbprint in the admin JWKS) or a ``static`` secret (HMAC-SHA256). The digest header precedes the
body, so a covered body is buffered, bounded by ``payload_max_bytes`` (413 beyond); requests
without a body stream nothing and sign no digest.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from yarl import URL

from ...config.credential import HTTPSignature, HTTPSignatureCredential
from ...config.model import RouteConfig
from ...errors import UnsignableRequest
from ..issuers.base import Issuer, PerRequestIssuer
from ..signing import SignatureBatch
from ..token import Token
from .base import Injector, Outbound, Signing, injector

# the current key for a request: (keyid, algorithm, sign(bytes) → signature)
KeyFor = Callable[[Token], tuple[str, str, Callable[[bytes], bytes]]]


def hmac_key(key_id: str) -> KeyFor:
    """The static secret (the token) as an HMAC-SHA256 key named ``key_id``."""

    def key_for(token: Token) -> tuple[str, str, Callable[[bytes], bytes]]:
        secret = token.value.reveal().encode()
        return key_id, "hmac-sha256", lambda data: hmac.digest(secret, data, "sha256")

    return key_for


def content_digest(body: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


class HTTPSignatureInjector(Injector):
    strip = frozenset({"signature", "signature-input", "content-digest"})

    def __init__(
        self, key_for: KeyFor, config: HTTPSignature, batch: SignatureBatch, *, body_max_bytes: int
    ) -> None:
        self._key_for = key_for
        self._batch = batch
        self._config = config
        self.needs_body = "content-digest" in config.components
        self.body_max_bytes = body_max_bytes
        self._tag = f';tag="{config.tag}"' if config.tag else ""

    async def apply(self, outbound: Outbound, token: Token) -> None:
        headers = outbound.headers
        covered = self._config.components
        if self.needs_body:
            if outbound.body:
                headers["Content-Digest"] = content_digest(outbound.body)
            else:
                covered = tuple(c for c in covered if c != "content-digest")
        if "date" in covered and "Date" not in headers:
            headers["Date"] = email.utils.formatdate(usegmt=True)
        url = outbound.url  # built once for all the derived components
        lines = [f'"{name}": {self._value(outbound, url, name)}' for name in covered]
        created = int(time.time())
        params = f";created={created};expires={created + self._config.lifetime_s}"
        if self._config.nonce:
            params += f';nonce="{secrets.token_urlsafe(16)}"'
        inner = "(" + " ".join(f'"{name}"' for name in covered) + ")"
        key_id, alg, sign = self._key_for(token)
        signature_params = f'{inner}{params};keyid="{key_id}";alg="{alg}"{self._tag}'
        base = "\n".join([*lines, f'"@signature-params": {signature_params}'])
        data = base.encode("ascii")
        # HMAC is cheap and cache-light; a public-key signature goes into the request batch
        signature = sign(data) if alg == "hmac-sha256" else await self._batch.sign(sign, data)
        label = self._config.label
        outbound.secret = base64.b64encode(signature).decode()
        headers["Signature-Input"] = f"{label}={signature_params}"
        headers["Signature"] = f"{label}=:{outbound.secret}:"

    @staticmethod
    def _value(outbound: Outbound, url: URL, name: str) -> str:
        if name == "@method":
            return outbound.method.upper()
        if name == "@target-uri":
            return str(url)
        if name == "@authority":
            return url.raw_authority.lower()
        if name == "@scheme":
            return url.scheme
        if name == "@path":
            return url.raw_path
        if name == "@query":
            return "?" + url.raw_query_string
        if name == "@request-target":
            return url.raw_path_qs
        values = outbound.headers.getall(name, [])
        if not values:
            raise UnsignableRequest(f"signed header {name!r} is absent from the request")
        value = ", ".join(value.strip() for value in values)
        if not value.isascii():
            raise UnsignableRequest(f"signed header {name!r} is not ASCII")
        return value


@injector(HTTPSignatureCredential)
def _http_signature(
    credential: HTTPSignatureCredential, route: RouteConfig, issuer: Issuer, signing: Signing
) -> Injector:
    key_for = (
        issuer.signing_key
        if isinstance(issuer, PerRequestIssuer)
        else hmac_key(credential.signature.key_id or "")
    )
    return HTTPSignatureInjector(
        key_for, credential.signature, signing.batch, body_max_bytes=credential.payload_max_bytes
    )
