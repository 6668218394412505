"""AWS credentials from STS: ``AssumeRoleWithWebIdentity`` with the workload's projected token
(EKS IRSA / Pod Identity style), optionally chained into ``AssumeRole``; or static keys from a
file, as a marked legacy mode. botocore (``credproxy[aws]``) speaks STS, in a worker thread: one
call per refresh window, off the request path.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path
from typing import Any

import aiohttp

from ...config.issuers import AWSIssuerConfig
from ...config.model import IdentityConfig
from ...errors import IdentityError, IssuerError
from ...secret import Secret
from ..dpop import DPoPKey
from ..identity import read_secret_file
from ..token_cache import CacheKey, Token
from .base import issuer

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
    ) -> None:
        del session, dpop_key  # botocore brings its own HTTP client and trust store
        import botocore.session
        from botocore.config import Config

        self.name = name
        self.config = config
        self.region: str | None = config.region
        self._where = f"issuers.{name}"
        self._token_file = config.token_file or identity.token_file
        if config.role_arn is not None and self._token_file is None:
            raise IdentityError(
                f"{self._where}.token_file: needed for web identity (or set identity.token_file)"
            )
        self._botocore = botocore.session.get_session()
        self._client_config = Config(
            region_name=config.region,
            connect_timeout=config.request_timeout_s,
            read_timeout=config.request_timeout_s,
            retries={"max_attempts": 1},  # the token cache owns retries and backoff
        )
        self._verify: str | bool = str(config.ca_file) if config.ca_file else True

    revoke_on_shutdown = False

    async def revoke(self, token: Token) -> str:
        del token  # STS sessions cannot be revoked one by one; they expire
        return "unsupported"

    async def fetch(self, key: CacheKey) -> Token:
        del key  # one set of AWS credentials per issuer
        return await asyncio.to_thread(self._fetch)

    def _fetch(self) -> Token:
        if self.config.static_credentials_file is not None:
            return self._static(self.config.static_credentials_file)
        from botocore import UNSIGNED
        from botocore.exceptions import BotoCoreError, ClientError

        assert self._token_file is not None and self.config.role_arn is not None
        try:
            web_identity = read_secret_file(self._token_file, what=f"{self._where}.token_file")
        except IdentityError as exc:
            raise IssuerError(str(exc)) from None  # a rotating file may be briefly missing: retry
        try:
            sts = self._client(signature_version=UNSIGNED)
            answer = sts.assume_role_with_web_identity(
                RoleArn=self.config.role_arn,
                RoleSessionName=self.config.session_name,
                WebIdentityToken=web_identity.reveal(),
                DurationSeconds=self.config.duration_s,
            )["Credentials"]
            if self.config.assume_role_arn is not None:
                chained = self._client(
                    aws_access_key_id=answer["AccessKeyId"],
                    aws_secret_access_key=answer["SecretAccessKey"],
                    aws_session_token=answer["SessionToken"],
                )
                answer = chained.assume_role(
                    RoleArn=self.config.assume_role_arn,
                    RoleSessionName=self.config.session_name,
                    DurationSeconds=min(self.config.duration_s, 3600),  # AWS caps role chaining
                )["Credentials"]
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise IssuerError(
                f"{self._where}: STS at {self.config.sts_url} refused: "
                f"{error.get('Code', '?')}: {str(error.get('Message', ''))[:200]}"
            ) from None
        except BotoCoreError as exc:
            raise IssuerError(
                f"{self._where}: STS at {self.config.sts_url} failed: {type(exc).__name__}"
            ) from None
        expires: datetime.datetime = answer["Expiration"]
        lifetime_s = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        if lifetime_s <= 0:
            raise IssuerError(f"{self._where}: STS returned credentials that already expired")
        return Token(
            value=Secret(answer["SessionToken"]),
            token_type="AWS4",
            lifetime_s=min(lifetime_s, self.config.max_lifetime_s),
            key_id=answer["AccessKeyId"],
            signing_secret=Secret(answer["SecretAccessKey"]),
        )

    def _client(self, **kwargs: Any) -> Any:
        from botocore.config import Config

        signature = kwargs.pop("signature_version", None)
        config = (
            self._client_config.merge(Config(signature_version=signature))
            if signature
            else self._client_config
        )
        return self._botocore.create_client(
            "sts", endpoint_url=self.config.sts_url, config=config, verify=self._verify, **kwargs
        )

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
        return Token(
            value=Secret(secret),
            token_type="AWS4",
            lifetime_s=_STATIC_REREAD_S,
            key_id=str(key_id),
            signing_secret=Secret(secret),
            legacy=True,
        )
