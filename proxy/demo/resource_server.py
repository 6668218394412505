"""A resource server that really verifies DPoP-bound JWT access tokens (RFC 9449 §7, RFC 9068).

Checks: the token's signature against the IdP's JWKS, ``typ`` at+jwt, ``iss``, ``aud``, ``exp``
(an opaque token: the IdP's introspection, RFC 7662, where one is given); the ``DPoP`` scheme; the
proof (signature, ``htm``, ``htu``, ``iat``, ``ath``, unique ``jti``, nonce when demanded); and
``cnf.jkt`` = the proof key's thumbprint.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import jwt
from aiohttp import web

from .verify import JtiCache, Rejected, verify_proof

JwksLoader = Callable[[], Awaitable[dict[str, Any]]]
Introspection = Callable[[str], Awaitable[dict[str, Any]]]
TOKEN_ALGORITHMS = ("ES256", "RS256", "PS256", "EdDSA")
CLAIMS_KEY = web.RequestKey("credential_claims", dict)


class Verifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str | list[str],
        jwks: JwksLoader,
        origin: str,
        iat_window_s: float = 60,
        accept_bearer: bool = False,
        introspect: Introspection | None = None,
    ) -> None:
        self.issuer = issuer
        self._introspect = introspect
        self.accept_bearer = accept_bearer
        self.audience = audience
        self.origin = origin  # scheme://host:port this server is reached at, for htu
        self.require_nonce = False
        self.nonce = secrets.token_urlsafe(16)
        self.seen: deque[tuple[str, str]] = deque(maxlen=100_000)  # (token, proof) received
        self.revoked: set[str] = set()  # tokens this server has learned are revoked
        self.accepted = 0
        self._jwks_loader = jwks
        self._keys: dict[str, Any] = {}
        self._jtis = JtiCache(iat_window_s)
        self._iat_window_s = iat_window_s

    async def verify(
        self, method: str, path: str, authorization: str, proof: str
    ) -> dict[str, Any]:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token and self.accept_bearer:
            self.seen.append((token, ""))
            claims = await self._token_claims(token)
            if "cnf" in claims:  # RFC 9449 §7.2: a bound token must not be accepted as bearer
                raise Rejected("invalid_token", "DPoP-bound token presented as a bearer token")
            self.accepted += 1
            return claims
        if scheme.lower() != "dpop" or not token:
            raise Rejected("invalid_token", "expected Authorization: DPoP <token>")
        if not proof:
            raise Rejected("invalid_dpop_proof", "missing DPoP proof header")
        self.seen.append((token, proof))
        claims = await self._token_claims(token)
        _, jkt = verify_proof(
            proof,
            htm=method,
            htu=self.origin + path,
            jtis=self._jtis,
            access_token=token,
            nonce=self.nonce if self.require_nonce else None,
            iat_window_s=self._iat_window_s,
        )
        if claims.get("cnf", {}).get("jkt") != jkt:
            raise Rejected("invalid_token", "token is not bound to the proof's key (cnf.jkt)")
        self.accepted += 1
        return claims

    async def _token_claims(self, token: str) -> dict[str, Any]:
        if token in self.revoked:
            raise Rejected("invalid_token", "access token revoked")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            if self._introspect is None:
                raise Rejected("invalid_token", "access token is not a JWT") from None
            return await self._introspected(token)
        if header.get("typ", "").lower() not in ("at+jwt", "application/at+jwt"):
            raise Rejected("invalid_token", "access token typ is not at+jwt")
        key = await self._key(str(header.get("kid", "")))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(TOKEN_ALGORITHMS),
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "aud", "iss"]},
            )
        except jwt.PyJWTError as exc:
            raise Rejected("invalid_token", f"access token rejected: {exc}") from None
        return claims

    async def _introspected(self, token: str) -> dict[str, Any]:
        assert self._introspect is not None
        claims = await self._introspect(token)
        audiences = claims.get("aud", [])
        audiences = [audiences] if isinstance(audiences, str) else audiences
        accepted = [self.audience] if isinstance(self.audience, str) else self.audience
        if claims.get("active") is not True:
            raise Rejected("invalid_token", "access token inactive at the issuer")
        if claims.get("iss") != self.issuer or not set(audiences) & set(accepted):
            raise Rejected("invalid_token", "access token is for another issuer or audience")
        return claims

    async def load_keys(self) -> None:
        keys = jwt.PyJWKSet.from_dict(await self._jwks_loader()).keys
        self._keys = {str(k.key_id or ""): k.key for k in keys}

    async def _key(self, kid: str) -> Any:
        if kid not in self._keys:
            await self.load_keys()
        if kid not in self._keys:
            raise Rejected("invalid_token", "signing key unknown to the issuer's JWKS")
        return self._keys[kid]


def _challenge(exc: Rejected, verifier: Verifier) -> web.Response:
    headers = {
        "WWW-Authenticate": f'DPoP error="{exc.error}", error_description="{exc.description}"',
        "Content-Type": "application/json",
    }
    if exc.error == "use_dpop_nonce":
        headers["DPoP-Nonce"] = verifier.nonce
    return web.Response(status=401, headers=headers, text=f'{{"error": "{exc.error}"}}')


def resource_app(
    verifier: Verifier, extra_routes: Iterable[web.AbstractRouteDef] = ()
) -> web.Application:
    """Every request is verified by a middleware; ``extra_routes`` come before the echo route."""

    @web.middleware
    async def verify(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        try:
            claims = await verifier.verify(
                request.method,
                request.rel_url.raw_path,
                request.headers.get("Authorization", ""),
                request.headers.get("DPoP", ""),
            )
        except Rejected as exc:
            return _challenge(exc, verifier)
        request[CLAIMS_KEY] = claims
        response: web.StreamResponse = await handler(request)
        return response

    async def echo(request: web.Request) -> web.Response:
        claims = request[CLAIMS_KEY]
        private = ("authorization", "dpop")  # shown by scheme only: never echo a credential
        return web.json_response(
            {
                "ok": True,
                "method": request.method,
                "path": request.rel_url.raw_path,
                "query": request.rel_url.raw_query_string,
                "client_id": claims.get("client_id", claims.get("azp", claims.get("sub"))),
                "scope": claims.get("scope"),
                "aud": claims.get("aud"),
                "sub": claims.get("sub"),
                "jkt": claims.get("cnf", {}).get("jkt"),
                "authorization_schemes": [
                    v.partition(" ")[0] for v in request.headers.getall("Authorization", ())
                ],
                "headers": [[k, v] for k, v in request.headers.items() if k.lower() not in private],
            }
        )

    app = web.Application()
    app.middlewares.append(verify)
    app.router.add_routes(extra_routes)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
