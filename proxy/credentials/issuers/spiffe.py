"""JWT-SVIDs from the SPIFFE Workload API as credentials: one per audience, through the token
cache (single-flight, refresh ahead of expiry, backoff, served while valid, then 503). The agent
attests this process and signs them; nothing is read from or written to a file."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from ...config.issuers import SPIFFEIssuerConfig
from ...config.model import IdentityConfig
from ...errors import IdentityError, IssuerError
from ...spiffe.svid import JWTSVID
from ..dpop import DPoPKey
from ..token import CacheKey, Token, sendable
from .base import issuer

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ...spiffe.workload_api import WorkloadAPI


def workload_api_for(workload_api: WorkloadAPI | None, where: str) -> WorkloadAPI:
    """The server's Workload API client, or an error saying what to configure."""
    if workload_api is None:
        raise IdentityError(
            f"{where}: needs an SVID from the SPIFFE Workload API: set identity.spiffe.socket "
            "(or SPIFFE_ENDPOINT_SOCKET)"
        )
    return workload_api


async def jwt_svid(
    workload_api: WorkloadAPI, audience: str, *, where: str, spiffe_id: str | None = None
) -> JWTSVID:
    """A JWT-SVID for ``audience`` with time left to use it; ``IssuerError`` otherwise."""
    svid = await workload_api.fetch_jwt_svid(audience, spiffe_id=spiffe_id, where=where)
    if svid.lifetime_s <= 1.0:
        raise IssuerError(f"{where}: the Workload API answered a JWT-SVID that has expired")
    return svid


@issuer(SPIFFEIssuerConfig)
class SPIFFEIssuer:
    shared_by_workers = False  # each process asks its local agent, which attests it
    region: str | None = None
    revoke_on_shutdown = False

    def __init__(
        self,
        name: str,
        config: SPIFFEIssuerConfig,
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
        workload_api: WorkloadAPI | None = None,
    ) -> None:
        del session, dpop_key, identity  # the attested process is the whole identity
        self.name = name
        self.config = config
        self._where = f"issuers.{name}"
        self._workload_api = workload_api_for(workload_api, self._where)

    async def fetch(self, key: CacheKey) -> Token:
        if not key.audience:
            raise IssuerError(f"{self._where}: a JWT-SVID needs an audience (credential.audience)")
        svid = await jwt_svid(
            self._workload_api, key.audience, where=self._where, spiffe_id=self.config.spiffe_id
        )
        if not sendable(svid.token.reveal()):
            raise IssuerError(f"{self._where}: the SPIRE agent's JWT-SVID is not printable ASCII")
        return Token(value=svid.token, token_type="Bearer", lifetime_s=svid.lifetime_s)

    async def revoke(self, token: Token) -> str:
        del token  # a JWT-SVID cannot be revoked; it expires within minutes
        return "unsupported"
