"""A long-lived secret (API key) read from a file: the legacy scheme, kept so the app never holds
it, and audited as legacy so owners can find and retire it. The file is re-read every
``reread_s`` (one "token" lifetime), so rotation needs no restart."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from ...config.issuers import StaticIssuerConfig
from ...config.model import IdentityConfig
from ...errors import IdentityError, IssuerError
from ..dpop import DPoPKey
from ..identity import read_secret_file
from ..token import CacheKey, Token, sendable
from .base import issuer

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ...spiffe.workload_api import WorkloadAPI


@issuer(StaticIssuerConfig)
class StaticIssuer:
    shared_by_workers = False  # each worker reads the file
    region: str | None = None
    revoke_on_shutdown = False

    def __init__(
        self,
        name: str,
        config: StaticIssuerConfig,
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
        workload_api: WorkloadAPI | None = None,
    ) -> None:
        del session, dpop_key, identity  # the secret file is the whole identity
        self.name = name
        self.config = config
        self._where = f"issuers.{name}.secret_file"

    async def fetch(self, key: CacheKey) -> Token:
        del key
        try:
            secret = read_secret_file(self.config.secret_file, what=self._where)
        except IdentityError as exc:
            raise IssuerError(str(exc)) from None  # mid-rotation the file may be missing: retry
        if not sendable(secret.reveal()):
            raise IssuerError(
                f"{self._where}: {self.config.secret_file} holds non-ASCII or control characters "
                "(a line break?); a secret sent in an HTTP header or query must be printable ASCII"
            )
        return Token(
            value=secret, token_type="static", lifetime_s=self.config.reread_s, legacy=True
        )

    async def revoke(self, token: Token) -> str:
        del token
        return "unsupported"  # only its owner can revoke a static secret
