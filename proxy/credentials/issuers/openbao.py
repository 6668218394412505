"""OpenBao (or HashiCorp Vault) as a source of legacy secrets and client certificates, reached
the secretless way: the sidecar logs in with the workload's own token (its token file, or a
JWT-SVID from the SPIFFE Workload API) at a JWT or Kubernetes auth role, holds the
Vault token in memory only, renews it ahead of its TTL (logging in again when renewal is
refused), revokes it at shutdown and on the control plane's revoke. It serves one field of a KV
v2 secret as a static secret re-read every ``reread_s`` (a new version is picked up without
restart), and short-lived client certificates from the PKI engine for mTLS, revoked by serial.

Vault API paths relied on (the same in OpenBao and HashiCorp Vault):
``POST /v1/auth/<mount>/login`` {role, jwt} (JWT or Kubernetes auth method); ``POST /v1/auth/token/renew-self``;
``POST /v1/auth/token/revoke-self``; ``GET /v1/<kv mount>/data/<path>`` (KV version 2);
``POST /v1/<pki mount>/sign/<role>`` {csr, common_name, alt_names, uri_sans, ttl},
``POST /v1/<pki mount>/issue/<role>``, ``POST /v1/<pki mount>/revoke`` {serial_number};
headers ``X-Vault-Token``, ``X-Vault-Namespace``, ``X-Vault-Request``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict

from ...config.issuers import OpenBaoIssuerConfig, VaultIssuerConfig
from ...config.model import IdentityConfig
from ...errors import IdentityError, IssuerError
from ...log import credentials_log
from ...outbound.tls import ClientTLS
from ...secret import Secret
from ..dpop import DPoPKey
from ..identity import read_secret_file
from ..token import CacheKey, Token, sendable
from . import exchange
from .base import issuer
from .pki import issued_certificate, new_key, signing_request
from .spiffe import jwt_svid, workload_api_for

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ...spiffe.workload_api import WorkloadAPI

_RENEW_AHEAD_MAX_S = 300.0


@dataclass(frozen=True, slots=True)
class Login:
    """The Vault client token and when to stop trusting it."""

    token: Secret
    lease_s: float
    renewable: bool
    obtained_mono: float = field(default_factory=time.monotonic)

    @property
    def expires_mono(self) -> float:
        return self.obtained_mono + self.lease_s


@issuer(VaultIssuerConfig)
@issuer(OpenBaoIssuerConfig)
class OpenBaoIssuer:
    shared_by_workers = True  # with --workers, worker 0 logs in and reads for all
    holds_session = True  # the Vault token: a session source renews, audits and revokes it
    region: str | None = None

    def __init__(
        self,
        name: str,
        config: OpenBaoIssuerConfig,
        *,
        session: aiohttp.ClientSession,
        dpop_key: DPoPKey,
        identity: IdentityConfig,
        workload_api: WorkloadAPI | None = None,
    ) -> None:
        del dpop_key  # KV values are static secrets: nothing to bind
        self.name = name
        self.config = config
        self.revoke_on_shutdown = config.revoke_on_shutdown
        self._session = session
        self._where = f"issuers.{name}"
        self._workload_api: WorkloadAPI | None = None
        self._token_file: Path | None = None
        if config.auth.identity == "jwt_svid":
            self._workload_api = workload_api_for(workload_api, f"{self._where}.auth.identity")
            self._svid_audience = config.auth.audience or config.address
        else:
            self._token_file = config.auth.token_file or identity.token_file
            if self._token_file is None:
                raise IdentityError(
                    f"{self._where}.auth.token_file: needed to log in to OpenBao with the "
                    "workload's token (or set identity.token_file)"
                )
        self._tls = ClientTLS(config.ca_file, None, None, where=self._where)
        self._base = config.address.rstrip("/") + "/v1/"
        self._login: Login | None = None
        self._lock = asyncio.Lock()  # one login, renewal or revocation at a time

    async def fetch(self, key: CacheKey) -> Token:
        """The KV secret; (``key.kind`` client_cert) a new client certificate; (session) the
        Vault token, logged in or renewed when due."""
        if key.kind == "client_cert":
            return await self._certificate()
        if key.kind == "session":
            login = await self._current_login()
            return Token(
                value=login.token,
                token_type="vault",
                lifetime_s=max(login.expires_mono - time.monotonic(), 0.0),
            )
        secret = self.config.secret
        assert secret is not None  # config checks: a route's credential names one with secret
        path = f"{secret.mount}/data/{secret.path}"
        status, body, headers = await self._authorized("GET", path)
        if status == 200:
            return self._kv_token(body, path)
        if status == 404:
            raise self._error(
                f"no KV v2 secret at {path} (deleted, or mount {secret.mount!r} "
                "is not KV version 2)",
                headers,
                at="secret",
            )
        raise self._error(
            f"reading {path} answered {self._vault_error(status, body)}", headers, at="secret"
        )

    async def revoke(self, token: Token) -> str:
        """A client certificate is revoked by its serial (``<pki mount>/revoke``: it goes on
        the CRL); the Vault token by ``revoke-self`` (the next call logs in again). A KV value
        cannot be revoked by its reader (its owner rotates it in OpenBao): "unsupported".
        Revoking the Vault token ends the session: whichever token it holds by then too."""
        if token.serial is not None:
            return await self._revoke_certificate(token.serial)
        if token.token_type != "vault":
            return "unsupported"
        async with self._lock:  # and the login in use, if it has replaced that one since
            login, self._login = self._login, None
            if login is not None and login.token.reveal() != token.value.reveal():
                await self._revoke_login(login.token, why="revoke")
            return await self._revoke_login(token.value, why="revoke")

    async def _certificate(self) -> Token:
        """``pki/sign/<role>`` with a CSR for a key made here (``key: memory``), or
        ``pki/issue/<role>`` (``key: openbao``)."""
        pki = self.config.pki
        assert pki is not None  # config checks: client_cert names an issuer with pki
        payload: dict[str, Any] = {"common_name": pki.common_name, "format": "pem"}
        if pki.alt_names:
            payload["alt_names"] = ",".join(pki.alt_names)
        if pki.uri_sans:
            payload["uri_sans"] = ",".join(pki.uri_sans)
        if pki.ttl_s is not None:
            payload["ttl"] = f"{pki.ttl_s:.0f}s"
        key = None
        if pki.key == "memory":
            key = new_key(pki.key_type)
            payload["csr"] = signing_request(key, pki.common_name)
            path = f"{pki.mount}/sign/{pki.role}"
        else:
            payload["key_type"] = pki.key_type
            payload["key_bits"] = 2048 if pki.key_type == "rsa" else 256
            path = f"{pki.mount}/issue/{pki.role}"
        status, body, headers = await self._authorized("POST", path, payload)
        if status != 200:
            raise self._error(
                f"{path} answered {self._vault_error(status, body)}", headers, at="pki"
            )
        data = exchange.json_object(body, path, self._error).get("data")
        if not isinstance(data, dict):
            raise self._error(f"{path} answered without data", at="pki")
        token = issued_certificate(data, key, path, lambda d: self._error(d, at="pki"))
        credentials_log.info(
            "issuer %s: client certificate %s issued by %s, valid %.0fs",
            self.name,
            token.serial,
            path,
            token.lifetime_s,
        )
        return token

    async def _revoke_certificate(self, serial: str) -> str:
        pki = self.config.pki
        assert pki is not None
        path = f"{pki.mount}/revoke"
        status, body, _ = await self._authorized("POST", path, {"serial_number": serial})
        if status != 200:
            raise self._error(
                f"revoking certificate {serial} at {path} answered "
                f"{self._vault_error(status, body)}",
                at="pki",
            )
        return "revoked"

    async def _authorized(
        self, method: str, path: str, payload: dict[str, Any] | None = None
    ) -> tuple[int, bytes, CIMultiDict[str]]:
        """A call with the Vault token (logging in or renewing first when due); a 403 means
        the token is no longer good (revoked, expired, a restarted server): log in again once."""
        for attempt in (1, 2):
            login = await self._current_login(force_login=attempt == 2)
            answer = await self._call(method, path, token=login.token, payload=payload)
            if answer[0] != 403:
                break
        return answer

    async def _current_login(self, *, force_login: bool = False) -> Login:
        async with self._lock:
            login = self._login
            now = time.monotonic()
            if login is not None and not force_login:
                if now < login.expires_mono - self._renew_ahead_s(login):
                    return login
                if login.renewable and now < login.expires_mono:  # refused if it just expired
                    renewed = await self._renew(login)
                    if renewed is not None:
                        self._login = renewed
                        return renewed
            if login is not None and not force_login and now < login.expires_mono:
                await self._revoke_login(login.token, why="replaced")  # no live spares
            self._login = None
            self._login = await self._log_in()
            return self._login

    def _renew_ahead_s(self, login: Login) -> float:
        if self.config.renew_ahead_s is not None:
            return min(self.config.renew_ahead_s, 0.5 * login.lease_s)
        return min(_RENEW_AHEAD_MAX_S, login.lease_s / 3)

    async def _workload_token(self) -> Secret:
        """What the login presents: a JWT-SVID fetched now, or the token file read now (a
        rotated projected token is picked up; an expired one is never reused)."""
        if self._workload_api is not None:
            where = f"{self._where}.auth.identity"
            return (await jwt_svid(self._workload_api, self._svid_audience, where=where)).token
        assert self._token_file is not None
        try:
            return read_secret_file(self._token_file, what=f"{self._where}.auth.token_file")
        except IdentityError as exc:
            raise IssuerError(str(exc)) from None  # mid-rotation the file may be missing: retry

    async def _log_in(self) -> Login:
        auth = self.config.auth
        jwt = await self._workload_token()
        path = auth.path
        status, body, headers = await self._call(
            "POST", path, payload={"role": auth.role, "jwt": jwt.reveal()}
        )
        if status != 200:
            raise self._error(
                f"OpenBao refused the login at {path} as role {auth.role!r}: "
                f"{self._vault_error(status, body)}",
                headers,
                at="auth",
            )
        login = self._auth(body, path)
        credentials_log.info(
            "issuer %s logged in to OpenBao as role %s (%s): vault token %s, ttl %.0fs",
            self.name,
            auth.role,
            auth.identity,
            login.token.fingerprint,
            login.lease_s,
        )
        return login

    async def _renew(self, login: Login) -> Login | None:
        """``renew-self``; None when refused or when the TTL can no longer be extended (the
        token's max TTL is near): the caller logs in again."""
        path = "auth/token/renew-self"
        try:
            status, body, _ = await self._call("POST", path, token=login.token, payload={})
        except IssuerError as exc:
            credentials_log.warning("%s: renewing the vault token failed: %s", self._where, exc)
            return None
        if status != 200:
            credentials_log.info(
                "%s: OpenBao refused to renew vault token %s (%s); logging in again",
                self._where,
                login.token.fingerprint,
                self._vault_error(status, body),
            )
            return None
        renewed = self._auth(body, path)
        if renewed.lease_s <= self._renew_ahead_s(login):
            return None  # at its max TTL: a fresh login, not a dwindling token
        credentials_log.info(
            "%s: vault token %s renewed, ttl %.0fs",
            self._where,
            login.token.fingerprint,
            renewed.lease_s,
        )
        return Login(login.token, renewed.lease_s, renewed.renewable)

    async def _revoke_login(self, token: Secret, *, why: str) -> str:
        """``revoke-self``: "revoked", or "failed" (logged: the token then ends at its TTL)."""
        try:
            status, body, _ = await self._call(
                "POST", "auth/token/revoke-self", token=token, payload={}
            )
        except IssuerError as exc:
            credentials_log.warning(
                "%s: revoking vault token %s failed: %s", self._where, token.fingerprint, exc
            )
            return "failed"
        if status in (200, 204):
            credentials_log.info(
                "%s: vault token %s revoked (%s)", self._where, token.fingerprint, why
            )
            return "revoked"
        credentials_log.warning(
            "%s: revoking vault token %s answered %s",
            self._where,
            token.fingerprint,
            self._vault_error(status, body),
        )
        return "failed"

    def _auth(self, body: bytes, path: str) -> Login:
        auth = exchange.json_object(body, path, self._error).get("auth")
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(auth, dict) or not isinstance(token, str) or not sendable(token):
            raise self._error(f"{path} answered without a usable auth.client_token")
        lease = auth.get("lease_duration")
        if not isinstance(lease, int | float) or isinstance(lease, bool) or lease < 0:
            raise self._error(f"{path} answered an unusable auth.lease_duration: {lease!r}")
        # lease 0: a token that never expires (root-like); still renew-checked now and then
        return Login(Secret(token), float(lease) or 3600.0, bool(auth.get("renewable")))

    def _kv_token(self, body: bytes, path: str) -> Token:
        secret = self.config.secret
        assert secret is not None
        data = exchange.json_object(body, path, self._error).get("data")
        values = data.get("data") if isinstance(data, dict) else None
        metadata = data.get("metadata") if isinstance(data, dict) else None
        if not isinstance(values, dict):
            raise self._error(f"{path} holds no KV v2 data (deleted version?)", at="secret")
        value = values.get(secret.field)
        if not isinstance(value, str) or not value:
            raise self._error(
                f"{path} has no non-empty string field {secret.field!r}"
                f" (fields: {', '.join(sorted(map(str, values))) or 'none'})",
                at="secret.field",
            )
        if not sendable(value):
            raise self._error(
                f"{path} field {secret.field!r} holds non-ASCII or control characters; a "
                "secret sent in an HTTP header or query must be printable ASCII",
                at="secret.field",
            )
        version = metadata.get("version") if isinstance(metadata, dict) else None
        return Token(
            value=Secret(value),
            token_type="static",
            lifetime_s=self.config.reread_s + self.config.serve_stale_s,
            legacy=True,
            secret_version=version if isinstance(version, int) else None,
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        token: Secret | None = None,
        payload: dict[str, Any] | None = None,
    ) -> tuple[int, bytes, CIMultiDict[str]]:
        url = self._base + path
        headers = {"Accept": "application/json", "X-Vault-Request": "true"}
        if token is not None:
            headers["X-Vault-Token"] = token.reveal()
        if self.config.namespace:
            headers["X-Vault-Namespace"] = self.config.namespace
        return await exchange.call(
            self._session,
            method,
            url,
            timeout_s=self.config.request_timeout_s,
            tls=self._tls.current(),
            error=self._error,
            headers=headers,
            data=None if payload is None else json.dumps(payload),
        )

    @staticmethod
    def _vault_error(status: int, raw: bytes) -> str:
        """``HTTP <status>: <Vault's errors>``, trimmed to printable text."""
        try:
            errors = json.loads(raw).get("errors")
        except (ValueError, AttributeError):
            errors = None
        text = "; ".join(str(e) for e in errors)[:300] if isinstance(errors, list) else ""
        text = "".join(c if c.isprintable() else "?" for c in text)
        return f"HTTP {status}: {text}" if text else f"HTTP {status}"

    def _error(
        self, detail: str, headers: CIMultiDict[str] | None = None, *, at: str = ""
    ) -> IssuerError:
        """An error naming the config path it concerns (``issuers.<name>.<at>``)."""
        asked = exchange.retry_after_s(headers.get("Retry-After")) if headers is not None else None
        where = f"{self._where}.{at}" if at else self._where
        return IssuerError(f"{where}: {detail}", asked_delay_s=asked)
