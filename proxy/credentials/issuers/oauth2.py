"""OAuth2 ``client_credentials`` (RFC 6749 §4.4) with discovery (OIDC / RFC 8414).

Client authentication: ``private_key_jwt`` (RFC 7523 assertion, fresh ``jti``, lifetime ≤ 60 s),
``tls_client_auth`` (RFC 8705: a client certificate, re-read on rotation; the IdP may bind the
tokens to it), ``jwt_svid`` (a JWT-SVID from the SPIFFE Workload API as the client assertion:
RFC 7523 ``jwt-bearer`` or the OAuth SPIFFE draft's ``jwt-spiffe``) or, as the legacy fallback, ``client_secret`` read from a file (HTTP Basic). Tokens can be bound
to the sidecar's DPoP key (RFC 9449): the token request then carries a proof, and an IdP's
``use_dpop_nonce`` answer is honoured with exactly one retry.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from ...config.base import is_loopback
from ...config.issuers import OAuth2IssuerConfig
from ...config.model import IdentityConfig
from ...errors import IssuerError
from ...log import credentials_log
from ...outbound.spiffe_tls import SVIDClientTLS
from ...outbound.tls import ClientTLS
from ...secret import Secret
from ..dpop import DPoPKey
from ..identity import load_signing_key, read_secret_file
from ..jose import Signer
from ..token import CacheKey, Token, sendable
from . import exchange
from .base import issuer
from .spiffe import jwt_svid, workload_api_for

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ...spiffe.workload_api import WorkloadAPI

_DEFAULT_LIFETIME_S = 300.0
_ASSERTION_TYPES = {
    "jwt-bearer": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",  # RFC 7523
    "jwt-spiffe": "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",  # OAuth SPIFFE draft
}


@dataclass(frozen=True, slots=True)
class Metadata:
    issuer: str
    token_endpoint: str
    revocation_endpoint: str | None


@issuer(OAuth2IssuerConfig)
class OAuth2Issuer:
    """One configured OAuth2 client; ``fetch()`` performs one token request."""

    shared_by_workers = True  # fetched over the network

    def __init__(
        self,
        name: str,
        config: OAuth2IssuerConfig,
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
        workload_api: WorkloadAPI | None = None,
    ) -> None:
        del identity  # the client key or secret file (or the JWT-SVID) is this issuer's identity
        self.name = name
        self.region: str | None = None
        self.revoke_on_shutdown = config.revoke_on_shutdown
        self.config = config
        self._session = session
        self._dpop_key = dpop_key
        self._where = f"issuers.{name}"
        mtls = config.client_auth == "tls_client_auth"
        self._tls: ClientTLS
        if mtls and config.client_cert == "svid":  # RFC 8705 with the X.509-SVID, in memory
            self._tls = SVIDClientTLS(
                workload_api_for(workload_api, f"{self._where}.client_cert"),
                ca_file=config.ca_file,
                present_svid=True,
                upstream_spiffe_id=None,
                where=self._where,
            )
        else:
            self._tls = ClientTLS(
                config.ca_file,
                config.client_cert_file if mtls else None,
                config.client_key_file if mtls else None,
                where=self._where,
            )
        self._metadata: Metadata | None = None
        self._discovery_lock = asyncio.Lock()
        self._dpop_nonce: str | None = None
        self._signer: Signer | None = None
        self._client_secret: Secret | None = None
        self._workload_api: WorkloadAPI | None = None
        self._narrowed: set[tuple[CacheKey, tuple[str, ...]]] = set()  # scopes not granted, told
        if config.client_auth == "jwt_svid":
            self._workload_api = workload_api_for(workload_api, self._where)
        if config.client_auth == "private_key_jwt":
            assert config.client_key_file is not None
            key = load_signing_key(config.client_key_file, what=f"{self._where}.client_key_file")
            header = {
                "typ": "JWT",
                **({"kid": config.client_key_id} if config.client_key_id else {}),
            }
            self._signer = Signer(key, header)
        elif config.client_auth == "client_secret":
            assert config.client_secret_file is not None
            self._client_secret = read_secret_file(
                config.client_secret_file, what=f"{self._where}.client_secret_file"
            )

    async def fetch(self, key: CacheKey) -> Token:
        audience, scope, bound = key.audience, key.scope, key.bound
        metadata = await self.metadata()
        form = await self._grant()
        if scope:
            form["scope"] = scope
        if audience:
            form[self.config.audience_param] = audience
        answer = await self._token_request(metadata, form, bound=bound)
        if answer is None:  # use_dpop_nonce: the nonce is stored, retry exactly once
            answer = await self._token_request(metadata, form, bound=bound)
            if answer is None:
                raise self._error(f"{metadata.token_endpoint} asked for a DPoP nonce twice")
        token = self._token(answer, bound=bound, endpoint=metadata.token_endpoint)
        if scope:
            self._check_granted_scope(key, answer.get("scope"))
        return token

    def _check_granted_scope(self, key: CacheKey, granted: object) -> None:
        """An IdP may grant fewer scopes than asked and say so only in the answer's ``scope``
        (RFC 6749 §5.1; absent means as asked): the token still works for what was granted,
        so it is used, and the operator is told once per narrowing which scopes are missing,
        before the upstream refuses the requests that need them."""
        if not isinstance(granted, str) or key.scope is None:
            return
        missing = tuple(sorted(set(key.scope.split()) - set(granted.split())))
        if not missing or (key, missing) in self._narrowed:
            return
        self._narrowed.add((key, missing))
        credentials_log.warning(
            "%s: the IdP granted scope %r for audience %s where %r was asked; missing %s: "
            "requests that need them will be refused upstream. Allow them to client %s at the "
            "IdP, or ask only for what the route needs",
            self._where,
            granted[:200],
            key.audience or "-",
            key.scope,
            " ".join(missing)[:200],
            self.config.client_id,
        )

    async def _grant(self) -> dict[str, str]:
        """The grant-specific part of the token request form."""
        return {"grant_type": "client_credentials"}

    async def metadata(self) -> Metadata:
        if self._metadata is None:
            async with self._discovery_lock:
                if self._metadata is None:
                    self._metadata = await self._discover()
        return self._metadata

    async def _discover(self) -> Metadata:
        issuer = self.config.issuer_url.rstrip("/")
        url = URL(issuer)
        candidates = [
            f"{issuer}/.well-known/openid-configuration",
            str(url.with_path("/.well-known/oauth-authorization-server" + url.path.rstrip("/"))),
        ]
        document: dict[str, Any] | None = None
        for candidate in candidates:
            status, body, _ = await self._call("GET", candidate)
            if status == 200:
                document = exchange.json_object(body, candidate, self._error)
                break
            if status != 404:
                raise self._error(f"discovery at {candidate} answered HTTP {status}")
        if document is None:
            raise self._error(f"no discovery document at {' or '.join(candidates)}")
        if str(document.get("issuer", "")).rstrip("/") != issuer:
            raise self._error(
                f"discovery document names issuer {document.get('issuer')!r}, "
                f"expected {self.config.issuer_url!r} (mix-up protection)"
            )
        token_endpoint = document.get("token_endpoint")
        if not isinstance(token_endpoint, str) or not self._acceptable_url(token_endpoint):
            raise self._error(
                f"discovery document has no usable token_endpoint: {token_endpoint!r}"
            )
        revocation = document.get("revocation_endpoint")
        return Metadata(
            issuer=issuer,
            token_endpoint=token_endpoint,
            revocation_endpoint=revocation if isinstance(revocation, str) else None,
        )

    async def _token_request(
        self, metadata: Metadata, form: dict[str, str], *, bound: bool
    ) -> dict[str, Any] | None:
        """POST to the token endpoint; None means 'retry with the nonce just received'."""
        endpoint = metadata.token_endpoint
        body, headers = await self._authenticated(metadata, form)
        if bound:
            headers["DPoP"] = self._dpop_key.proof("POST", endpoint, nonce=self._dpop_nonce)
        status, raw, response_headers = await self._call(
            "POST", endpoint, data=urlencode(body), headers=headers
        )
        if nonce := response_headers.get("DPoP-Nonce"):
            self._dpop_nonce = nonce
        if status == 200:
            return exchange.json_object(raw, endpoint, self._error)
        error = self._oauth_error(raw)
        if bound and error.startswith("use_dpop_nonce") and nonce:
            return None
        self._metadata = None  # the endpoint may have moved: discover again next time
        raise IssuerError(
            f"{self._where}: token endpoint {endpoint} answered HTTP {status}: "
            f"{error or 'no error code'}",
            asked_delay_s=exchange.retry_after_s(response_headers.get("Retry-After")),
        )

    async def revoke(self, token: Token) -> str:
        """RFC 7009 revocation: "revoked", or "unsupported" where the issuer advertises no
        revocation endpoint or refuses the token type (e.g. structured JWT access tokens)."""
        metadata = await self.metadata()
        endpoint = metadata.revocation_endpoint
        if endpoint is None:
            return "unsupported"
        form = {"token": token.value.reveal(), "token_type_hint": "access_token"}
        body, headers = await self._authenticated(metadata, form)
        status, raw, _ = await self._call("POST", endpoint, data=urlencode(body), headers=headers)
        if status == 200:
            return "revoked"
        error = self._oauth_error(raw)
        if error.startswith("unsupported_token_type"):
            return "unsupported"
        raise self._error(f"revocation endpoint {endpoint} answered HTTP {status}: {error or '?'}")

    async def _authenticated(
        self, metadata: Metadata, form: dict[str, str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The form and headers of a request authenticated as this client."""
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        body = dict(form)
        if self.config.client_auth == "tls_client_auth":
            body["client_id"] = self.config.client_id  # RFC 8705 §2: the certificate proves it
        elif self.config.client_auth == "jwt_svid":
            assert self._workload_api is not None
            body["client_id"] = self.config.client_id
            body["client_assertion_type"] = _ASSERTION_TYPES[self.config.client_assertion_type]
            svid = await jwt_svid(
                self._workload_api, self._assertion_audience(metadata), where=self._where
            )
            body["client_assertion"] = svid.token.reveal()
        elif self._signer is not None:
            body["client_id"] = self.config.client_id
            body["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            body["client_assertion"] = self._client_assertion(metadata)
        else:
            assert self._client_secret is not None
            basic = f"{quote(self.config.client_id, safe='')}:{quote(self._client_secret.reveal(), safe='')}"
            headers["Authorization"] = "Basic " + _b64(basic)
        return body, headers

    def _client_assertion(self, metadata: Metadata) -> str:
        assert self._signer is not None
        now = int(time.time())
        audience = self._assertion_audience(metadata)
        return self._signer.sign(
            {
                "iss": self.config.client_id,
                "sub": self.config.client_id,
                "aud": audience,
                "jti": secrets.token_urlsafe(24),
                "iat": now,
                "exp": now + int(self.config.assertion_lifetime_s),
            }
        )

    def _assertion_audience(self, metadata: Metadata) -> str:
        if self.config.assertion_audience == "issuer":
            return metadata.issuer
        return metadata.token_endpoint

    def _token(self, answer: dict[str, Any], *, bound: bool, endpoint: str) -> Token:
        value = answer.get("access_token")
        if not isinstance(value, str) or not value or not sendable(value):
            raise self._error(f"{endpoint} answered without a usable access_token")
        token_type = str(answer.get("token_type", ""))
        expected = "DPoP" if bound else "Bearer"
        if token_type.lower() != expected.lower():
            raise self._error(
                f"{endpoint} issued token_type {token_type!r}, expected {expected!r}"
                + (" (the IdP did not bind the token to the DPoP key)" if bound else "")
            )
        expires_in = answer.get("expires_in", _DEFAULT_LIFETIME_S)
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if (
            not isinstance(expires_in, int | float)
            or isinstance(expires_in, bool)
            or expires_in <= 0
        ):
            raise self._error(f"{endpoint} answered an unusable expires_in: {expires_in!r}")
        lifetime_s = min(float(expires_in), self.config.max_lifetime_s)
        return Token(value=Secret(value), token_type=expected, lifetime_s=lifetime_s)

    async def _call(self, method: str, url: str, **kwargs: Any) -> exchange.Answer:
        return await exchange.call(
            self._session,
            method,
            url,
            timeout_s=self.config.request_timeout_s,
            tls=self._tls.current(),
            error=self._error,
            **kwargs,
        )

    @staticmethod
    def _oauth_error(raw: bytes) -> str:
        try:
            document = json.loads(raw)
        except ValueError:
            return ""
        if not isinstance(document, dict):
            return ""
        code = str(document.get("error", ""))[:64]
        description = str(document.get("error_description", ""))[:200]
        text = f"{code}: {description}" if description else code
        return "".join(c if c.isprintable() else "?" for c in text)

    def _acceptable_url(self, value: str) -> bool:
        url = URL(value)
        if url.scheme == "https":
            return bool(url.host)
        return url.scheme == "http" and (
            self.config.allow_insecure_http or is_loopback(url.host or "")
        )

    def _error(self, detail: str) -> IssuerError:
        return IssuerError(f"{self._where}: {detail}")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")
