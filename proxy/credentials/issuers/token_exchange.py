"""RFC 8693 token exchange: the workload's identity token — a Kubernetes projected service-account
token re-read from its file for every exchange so rotation is picked up and an expired one is
never reused, or a JWT-SVID fetched from the SPIFFE Workload API (``subject_token: jwt_svid``) —
is exchanged for an access token for the route's audience and scope. With ``grant: jwt_bearer``
the identity token is sent as an RFC 7523 authorization grant instead.
Everything else (discovery, client authentication, DPoP binding, nonces) is the OAuth2 issuer's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from ...config.issuers import TokenExchangeIssuerConfig
from ...config.model import IdentityConfig
from ...errors import IdentityError, IssuerError
from ...secret import Secret
from ..dpop import DPoPKey
from ..identity import read_secret_file
from .base import issuer
from .oauth2 import OAuth2Issuer
from .spiffe import jwt_svid, workload_api_for

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ...spiffe.workload_api import WorkloadAPI

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
        workload_api: WorkloadAPI | None = None,
    ) -> None:
        super().__init__(
            name,
            config,
            session=session,
            dpop_key=dpop_key,
            identity=identity,
            workload_api=workload_api,
        )
        self.config: TokenExchangeIssuerConfig = config
        self._subject_type = config.subject_token_type
        self._jwt_bearer = config.grant == "jwt_bearer"
        self._subject_file = config.subject_token_file or identity.token_file
        if config.subject_token == "jwt_svid":
            self._subject_svid = workload_api_for(workload_api, f"issuers.{name}.subject_token")
            self._subject_audience = config.subject_audience or config.issuer_url
            return
        if self._subject_file is None:
            raise IdentityError(
                f"issuers.{name}.subject_token_file: needed for token exchange (or set identity.token_file)"
            )

    async def _grant(self) -> dict[str, str]:
        if self.config.subject_token == "jwt_svid":
            svid = await jwt_svid(
                self._subject_svid, self._subject_audience, where=f"{self._where}.subject_token"
            )
            subject = svid.token
        else:
            subject = self._subject_from_file()
        if self._jwt_bearer:
            return {"grant_type": JWT_BEARER_GRANT_TYPE, "assertion": subject.reveal()}
        return {
            "grant_type": GRANT_TYPE,
            "subject_token": subject.reveal(),
            "subject_token_type": self._subject_type,
            "requested_token_type": ACCESS_TOKEN_TYPE,
        }

    def _subject_from_file(self) -> Secret:
        assert self._subject_file is not None
        try:
            subject = read_secret_file(
                self._subject_file, what=f"issuers.{self.name}.subject_token_file"
            )
        except IdentityError as exc:
            raise IssuerError(str(exc)) from None  # mid-rotation the file may be missing: retry
        return subject
