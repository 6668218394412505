"""RFC 8693 token exchange: the workload's identity token — a Kubernetes projected service-account
token or a JWT-SVID, re-read from its file for every exchange so rotation is picked up and an
expired one is never reused — is exchanged for an access token for the route's audience and scope.
With ``grant: jwt_bearer`` the identity token is sent as an RFC 7523 authorization grant instead.
Everything else (discovery, client authentication, DPoP binding, nonces) is the OAuth2 issuer's."""

from __future__ import annotations

import aiohttp

from ...config.issuers import TokenExchangeIssuerConfig
from ...config.model import IdentityConfig
from ...errors import IdentityError, IssuerError
from ..dpop import DPoPKey
from ..identity import read_secret_file
from .base import issuer
from .oauth2 import OAuth2Issuer

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


@issuer(TokenExchangeIssuerConfig)
class TokenExchangeIssuer(OAuth2Issuer):
    def __init__(
        self,
        name: str,
        config: TokenExchangeIssuerConfig,
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
    ) -> None:
        super().__init__(
            name,
            config,
            session=session,
            dpop_key=dpop_key,
            identity=identity,
        )
        subject_file = config.subject_token_file or identity.token_file
        if subject_file is None:
            raise IdentityError(
                f"issuers.{name}.subject_token_file: needed for token exchange (or set identity.token_file)"
            )
        self._subject_file = subject_file
        self._subject_type = config.subject_token_type
        self._jwt_bearer = config.grant == "jwt_bearer"

    def _grant(self) -> dict[str, str]:
        try:
            subject = read_secret_file(
                self._subject_file, what=f"issuers.{self.name}.subject_token_file"
            )
        except IdentityError as exc:
            raise IssuerError(str(exc)) from None  # mid-rotation the file may be missing: retry
        if self._jwt_bearer:
            return {"grant_type": JWT_BEARER_GRANT_TYPE, "assertion": subject.reveal()}
        return {
            "grant_type": GRANT_TYPE,
            "subject_token": subject.reveal(),
            "subject_token_type": self._subject_type,
            "requested_token_type": ACCESS_TOKEN_TYPE,
        }
