"""A demo OAuth2 authorization server: ``client_credentials`` with ``private_key_jwt`` client
authentication, DPoP-bound JWT access tokens (``typ`` at+jwt, ``cnf.jkt``). For the demo only:
the test suite runs against the real ``oidc-provider``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from ..credentials.jose import Signer, public_jwk
from .verify import JtiCache, Rejected, verify_proof

_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class DemoIdP:
    def __init__(
        self,
        issuer: str,
        *,
        client_id: str,
        client_key: ec.EllipticCurvePublicKey,
        token_lifetime_s: int = 60,
    ) -> None:
        self.issuer = issuer
        self.token_endpoint = issuer + "/token"
        self.client_id = client_id
        self.token_requests = 0
        self._client_key = client_key
        self._lifetime_s = token_lifetime_s
        signing_key = ec.generate_private_key(ec.SECP256R1())
        self._jwk = {**public_jwk(signing_key), "kid": "demo-1", "use": "sig", "alg": "ES256"}
        self._signer = Signer(signing_key, {"typ": "at+jwt", "kid": "demo-1"})
        self._jtis = JtiCache(300)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/token", self._token)
        return app

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._jwk]}

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "token_endpoint": self.token_endpoint,
                "jwks_uri": self.issuer + "/jwks",
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "dpop_signing_alg_values_supported": ["ES256", "EdDSA"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.jwks())

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        try:
            if form.get("grant_type") != "client_credentials":
                raise Rejected("unsupported_grant_type", "only client_credentials")
            self._authenticate(
                str(form.get("client_assertion_type", "")), str(form.get("client_assertion", ""))
            )
            jkt = None
            if proof := request.headers.get("DPoP"):
                _, jkt = verify_proof(proof, htm="POST", htu=self.token_endpoint, jtis=self._jtis)
        except Rejected as exc:
            status = 401 if exc.error == "invalid_client" else 400
            return web.json_response(
                {"error": exc.error, "error_description": exc.description}, status=status
            )
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.client_id,
            "client_id": self.client_id,
            "aud": str(form.get("resource", "")) or self.issuer,
            "iat": now,
            "exp": now + self._lifetime_s,
            "jti": secrets.token_urlsafe(16),
            "scope": str(form.get("scope", "")),
        }
        if jkt:
            claims["cnf"] = {"jkt": jkt}
        return web.json_response(
            {
                "access_token": self._signer.sign(claims),
                "token_type": "DPoP" if jkt else "Bearer",
                "expires_in": self._lifetime_s,
            },
            headers={"Cache-Control": "no-store"},
        )

    def _authenticate(self, assertion_type: str, assertion: str) -> None:
        if assertion_type != _ASSERTION_TYPE or not assertion:
            raise Rejected("invalid_client", "private_key_jwt client assertion required")
        try:
            claims = jwt.decode(
                assertion,
                self._client_key,
                algorithms=["ES256"],
                audience=[self.issuer, self.token_endpoint],
                issuer=self.client_id,
                options={"require": ["exp", "iat", "jti", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise Rejected("invalid_client", f"client assertion rejected: {exc}") from None
        if claims["sub"] != self.client_id or claims["exp"] - claims["iat"] > 300:
            raise Rejected("invalid_client", "client assertion sub or lifetime invalid")
        if not self._jtis.first_use(str(claims["jti"])):
            raise Rejected("invalid_client", "client assertion replayed")
