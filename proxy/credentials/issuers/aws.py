"""AWS credentials from STS: ``AssumeRoleWithWebIdentity`` with the workload's projected token
(EKS IRSA / Pod Identity style) or a JWT-SVID from the SPIFFE Workload API, optionally chained into ``AssumeRole``; or static keys from a
file, as a marked legacy mode. botocore (``credproxy[aws]``, behind ``proxy.aws_sdk``) speaks STS,
in a worker thread: one call per refresh window, off the request path.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from ...aws_sdk import STSClient, sts_errors
from ...config.issuers import AWSIssuerConfig
from ...config.model import IdentityConfig
from ...errors import IdentityError, IssuerError
from ...secret import Secret
from ..dpop import DPoPKey
from ..identity import read_secret_file
from ..token import CacheKey, Token, sendable
from .base import issuer
from .spiffe import jwt_svid, workload_api_for

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ...spiffe.workload_api import WorkloadAPI

_STATIC_REREAD_S = 300.0  # static keys never expire; re-read the file this often (rotation)


@issuer(AWSIssuerConfig)
class AWSIssuer:
    shared_by_workers = True  # fetched over the network

    def __init__(
        self,
        name: str,
        config: AWSIssuerConfig,
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
        workload_api: WorkloadAPI | None = None,
    ) -> None:
        del session, dpop_key  # botocore brings its own HTTP client and trust store
        self.name = name
        self.config = config
        self.region: str | None = config.region
        self._where = f"issuers.{name}"
        self._token_file = config.token_file or identity.token_file
        self._workload_api: WorkloadAPI | None = None
        if config.web_identity == "jwt_svid":
            self._workload_api = workload_api_for(workload_api, f"{self._where}.web_identity")
        elif config.role_arn is not None and self._token_file is None:
            raise IdentityError(
                f"{self._where}.token_file: needed for web identity (or set identity.token_file)"
            )
        self._sts = STSClient(
            config.sts_url,
            region=config.region,
            timeout_s=config.request_timeout_s,
            ca_file=config.ca_file,
        )

    revoke_on_shutdown = False

    async def revoke(self, token: Token) -> str:
        del token  # STS sessions cannot be revoked one by one; they expire
        return "unsupported"

    async def fetch(self, key: CacheKey) -> Token:
        del key  # one set of AWS credentials per issuer
        svid = None
        if self._workload_api is not None:
            where = f"{self._where}.web_identity"
            audience = self.config.web_identity_audience
            svid = (await jwt_svid(self._workload_api, audience, where=where)).token
        return await asyncio.to_thread(self._fetch, svid)

    def _fetch(self, svid: Secret | None) -> Token:
        if self.config.static_credentials_file is not None:
            return self._static(self.config.static_credentials_file)
        assert self.config.role_arn is not None
        web_identity = svid if svid is not None else self._web_identity_file()
        with sts_errors(f"{self._where}: STS at {self.config.sts_url}", web_identity):
            answer = self._sts.assume_role_with_web_identity(
                self.config.role_arn, self.config.session_name, web_identity, self.config.duration_s
            )
            if self.config.assume_role_arn is not None:
                answer = self._sts.assume_role(
                    answer,
                    self.config.assume_role_arn,
                    self.config.session_name,
                    min(self.config.duration_s, 3600),  # AWS caps role chaining
                )
        lifetime_s = (answer.expiration - datetime.datetime.now(datetime.UTC)).total_seconds()
        if lifetime_s <= 0:
            raise IssuerError(f"{self._where}: STS returned credentials that already expired")
        if not (sendable(answer.session_token.reveal()) and sendable(answer.access_key_id)):
            raise IssuerError(f"{self._where}: STS returned credentials with control characters")
        return Token(
            value=answer.session_token,
            token_type="AWS4",
            lifetime_s=min(lifetime_s, self.config.max_lifetime_s),
            key_id=answer.access_key_id,
            signing_secret=answer.secret_access_key,
        )

    def _web_identity_file(self) -> Secret:
        assert self._token_file is not None
        try:
            return read_secret_file(self._token_file, what=f"{self._where}.token_file")
        except IdentityError as exc:
            raise IssuerError(str(exc)) from None  # a rotating file may be briefly missing: retry

    def _static(self, path: Path) -> Token:
        where = f"{self._where}.static_credentials_file"
        try:
            document = json.loads(read_secret_file(path, what=where).reveal())
            key_id, secret = document["access_key_id"], document["secret_access_key"]
        except IdentityError as exc:
            raise IssuerError(str(exc)) from None
        except (ValueError, KeyError, TypeError):
            raise IssuerError(
                f"{where}: {path} must be JSON with access_key_id and secret_access_key"
            ) from None
        if not (isinstance(key_id, str) and sendable(key_id)):
            raise IssuerError(f"{where}: {path}: access_key_id must be printable ASCII text")
        return Token(
            value=Secret(secret),
            token_type="AWS4",
            lifetime_s=_STATIC_REREAD_S,
            key_id=str(key_id),
            signing_secret=Secret(secret),
            legacy=True,
        )
