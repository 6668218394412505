"""botocore, the AWS SDK core (the optional extra ``credproxy[aws]``), in one place: which
services exist, STS calls, the SigV4 signer, and what its errors may say.

What is relied on, and why:

- ``botocore.session.get_session()``: ``get_available_services()`` checks a sigv4 route's
  service at load time; ``get_service_model(name).protocol`` says which error format the
  route's SDK clients parse; ``create_client("sts", ...)`` speaks STS (its endpoint, timeouts,
  retries off, the CA bundle; ``botocore.UNSIGNED`` for ``AssumeRoleWithWebIdentity``) for the
  ``aws`` issuer, with botocore's own HTTP client and trust store.
- ``botocore.exceptions.ClientError`` (AWS answered with an error: its ``Code`` and
  ``Message``) and ``BotoCoreError`` (no answer: connection, timeout, parsing): both become
  ``IssuerError`` in ``sts_errors``, and nowhere else.
- ``botocore.auth.SigV4Auth`` / ``S3SigV4Auth`` with ``botocore.awsrequest.AWSRequest`` and
  ``botocore.credentials.Credentials``: the signature of the ``sigv4`` injector. Its internal
  steps ``_modify_request_before_signing`` and ``_inject_signature_to_request`` are called one by
  one, instead of ``add_auth``, so that the time signed is the sidecar's clock corrected for the
  skew an upstream reported; the request ``context`` keys ``timestamp``, ``client_config`` (S3
  payload signing) and ``checksum`` (a CRC32 trailer: ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``)
  steer it. An unsigned payload is said in an ``X-Amz-Content-SHA256: UNSIGNED-PAYLOAD``
  header set before signing, which both signers then sign as the payload hash (``SigV4Auth``
  alone would hash the absent body). These are internal to botocore (``>=1.34`` in pyproject.toml): when botocore moves
  them, this module is the one to adapt.

botocore is imported when first needed, so that the sidecar runs without the extra for routes
that do not use AWS; ``known_service`` says None when it is missing.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import IssuerError
from .secret import Secret

# signing names that are not in botocore's list of services (it lists API names)
_SIGNING_NAMES_NOT_IN_BOTOCORE_LIST = frozenset(
    {"execute-api", "es", "aoss", "s3-object-lambda", "vpc-lattice-svcs"}
)
_MESSAGE_MAX = 200  # of an AWS error message kept for the log
_SIGNATURE_HEADERS = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256")


def known_service(name: str) -> bool | None:
    """Whether botocore knows the service; None when botocore (credproxy[aws]) is not installed."""
    try:
        import botocore.session
    except ImportError:
        return None
    services = botocore.session.get_session().get_available_services()
    return name in services or name in _SIGNING_NAMES_NOT_IN_BOTOCORE_LIST


def service_protocol(name: str) -> str | None:
    """The wire protocol botocore's model gives a service (``rest-xml``, ``query``, ``ec2``,
    ``json``, ``rest-json``…); None when the name is not a service model botocore has (a
    signing name such as ``execute-api``) or botocore is missing."""
    try:
        import botocore.session
        from botocore.exceptions import UnknownServiceError
    except ImportError:
        return None
    try:
        protocol = botocore.session.get_session().get_service_model(name).protocol
    except UnknownServiceError:
        return None
    return protocol if isinstance(protocol, str) else None


@contextmanager
def sts_errors(what: str, *secrets: Secret) -> Iterator[None]:
    """botocore's errors as ``IssuerError``: ``what`` (where, which endpoint) refused, with AWS's
    code and message (``secrets`` masked in it, then cut short), or failed, with the error's
    class only. Raised from None: botocore's own text may quote the request."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        message = str(error.get("Message", ""))
        for secret in secrets:
            if secret.reveal():
                message = message.replace(secret.reveal(), "…")
        raise IssuerError(
            f"{what} refused: {error.get('Code', '?')}: {message[:_MESSAGE_MAX]}"
        ) from None
    except BotoCoreError as exc:
        raise IssuerError(f"{what} failed: {type(exc).__name__}") from None


@dataclass(frozen=True, slots=True)
class STSCredentials:
    """Temporary AWS credentials as STS returned them."""

    access_key_id: str
    secret_access_key: Secret
    session_token: Secret
    expiration: datetime.datetime  # aware, UTC


class _BotocoreSTS(Protocol):
    """The calls made on a botocore STS client; each answers STS's response as a dict."""

    def assume_role_with_web_identity(self, **parameters: object) -> dict[str, Any]: ...

    def assume_role(self, **parameters: object) -> dict[str, Any]: ...


class STSClient:
    """STS at one endpoint, without retries (the token cache owns retries and backoff).
    Blocking: call it from a worker thread. Errors escape as botocore's: wrap calls in
    ``sts_errors``."""

    def __init__(
        self, endpoint_url: str, *, region: str | None, timeout_s: float, ca_file: Path | None
    ) -> None:
        import botocore.session
        from botocore.config import Config

        self._endpoint_url = endpoint_url
        self._botocore = botocore.session.get_session()
        self._config = Config(
            region_name=region,
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 1},
        )
        self._verify: str | bool = str(ca_file) if ca_file else True

    def assume_role_with_web_identity(
        self, role_arn: str, session_name: str, web_identity: Secret, duration_s: int
    ) -> STSCredentials:
        from botocore import UNSIGNED
        from botocore.config import Config

        sts = self._client(self._config.merge(Config(signature_version=UNSIGNED)))
        return _credentials(
            sts.assume_role_with_web_identity(
                RoleArn=role_arn,
                RoleSessionName=session_name,
                WebIdentityToken=web_identity.reveal(),
                DurationSeconds=duration_s,
            )
        )

    def assume_role(
        self, credentials: STSCredentials, role_arn: str, session_name: str, duration_s: int
    ) -> STSCredentials:
        sts = self._client(
            self._config,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key.reveal(),
            aws_session_token=credentials.session_token.reveal(),
        )
        return _credentials(
            sts.assume_role(
                RoleArn=role_arn, RoleSessionName=session_name, DurationSeconds=duration_s
            )
        )

    def _client(self, config: object, **credentials: str) -> _BotocoreSTS:
        client: _BotocoreSTS = self._botocore.create_client(
            "sts",
            endpoint_url=self._endpoint_url,
            config=config,
            verify=self._verify,
            **credentials,
        )
        return client


def _credentials(answer: dict[str, Any]) -> STSCredentials:
    credentials = answer["Credentials"]
    return STSCredentials(
        access_key_id=credentials["AccessKeyId"],
        secret_access_key=Secret(credentials["SecretAccessKey"]),
        session_token=Secret(credentials["SessionToken"]),
        expiration=credentials["Expiration"],
    )


class SigV4Signer:
    """botocore's SigV4 for one service and region (its S3 variant for ``s3``)."""

    def __init__(self, service: str, region: str, *, sign_payload: bool) -> None:
        from botocore.auth import S3SigV4Auth, SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.config import Config
        from botocore.credentials import Credentials

        self.service = service
        self.region = region
        self._auth_class = S3SigV4Auth if service == "s3" else SigV4Auth
        self._request_class = AWSRequest
        self._credentials_class = Credentials
        self._client_config = Config(s3={"payload_signing_enabled": sign_payload})
        self._sign_payload = sign_payload

    def sign(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        key_id: str,
        secret_key: Secret,
        session_token: str | None,
        now: datetime.datetime,
        crc32_trailer: str | None = None,
    ) -> dict[str, str]:
        """The headers that carry the signature of this request at ``now``: ``headers`` are
        the ones to sign, ``body`` is hashed into it when given. ``crc32_trailer``: the body
        travels ``aws-chunked`` with a CRC32 checksum in this trailer."""
        credentials = self._credentials_class(key_id, secret_key.reveal(), session_token)
        auth = self._auth_class(credentials, self.service, self.region)
        request = self._request_class(method=method, url=url, headers=dict(headers), data=body)
        if not self._sign_payload and crc32_trailer is None:
            request.headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"
        request.context["client_config"] = self._client_config
        if crc32_trailer is not None:
            request.context["checksum"] = {
                "request_algorithm": {"in": "trailer", "algorithm": "crc32", "name": crc32_trailer}
            }
        # add_auth's steps, with our time instead of botocore's clock
        request.context["timestamp"] = now.strftime("%Y%m%dT%H%M%SZ")
        auth._modify_request_before_signing(request)
        canonical_request = auth.canonical_request(request)
        string_to_sign = auth.string_to_sign(request, canonical_request)
        auth._inject_signature_to_request(request, auth.signature(string_to_sign, request))
        signed: Mapping[str, str] = request.headers
        return {name: signed[name] for name in _SIGNATURE_HEADERS if name in signed}
