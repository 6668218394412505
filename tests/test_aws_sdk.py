"""aws_sdk.py: botocore behind one adapter, its errors translated there into the exception tree
without quoting a secret."""

from __future__ import annotations

import ast
import datetime
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from proxy import aws_sdk
from proxy.errors import CredentialUnavailable, IssuerError
from proxy.secret import Secret

WEB_IDENTITY = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3b3JrbG9hZCJ9.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
WHERE = "issuers.aws: STS at https://sts.example.com"


def _refusal(message: str) -> ClientError:
    answer = {"Error": {"Code": "InvalidIdentityToken", "Message": message}}
    return ClientError(answer, "AssumeRoleWithWebIdentity")


def test_a_client_error_becomes_an_issuer_error_with_code_and_message_but_no_secret():
    """AWS's refusal becomes IssuerError (503 credential_unavailable) naming the code and the
    message, with the web identity token masked where AWS quoted it and botocore's exception
    not chained (its text quotes the request)."""
    quoted = f"Token {WEB_IDENTITY} is not valid for this role"
    with pytest.raises(IssuerError) as raised:
        with aws_sdk.sts_errors(WHERE, Secret(WEB_IDENTITY)):
            raise _refusal(quoted)
    error = raised.value
    assert isinstance(error, CredentialUnavailable) and error.status == 503
    assert (
        str(error) == f"{WHERE} refused: InvalidIdentityToken: Token … is not valid for this role"
    )
    assert WEB_IDENTITY not in str(error) and WEB_IDENTITY[:40] not in repr(error)
    assert error.__cause__ is None and error.__suppress_context__
    assert WEB_IDENTITY not in error.problem()[1].decode()


def test_a_long_aws_message_is_cut_short():
    """AWS's message is kept to 200 characters in the log line."""
    with pytest.raises(IssuerError) as raised:
        with aws_sdk.sts_errors(WHERE):
            raise _refusal("x" * 1000)
    assert str(raised.value).endswith(": InvalidIdentityToken: " + "x" * 200)


@pytest.mark.parametrize(
    "failure",
    [
        EndpointConnectionError(endpoint_url=f"https://sts.example.com/?t={WEB_IDENTITY}"),
        ReadTimeoutError(endpoint_url=f"https://sts.example.com/?t={WEB_IDENTITY}"),
    ],
)
def test_a_botocore_error_becomes_an_issuer_error_naming_only_its_class(failure):
    """No answer from STS (connection, timeout) becomes IssuerError that names the error's class
    and not its text, which may quote the request."""
    with pytest.raises(IssuerError) as raised:
        with aws_sdk.sts_errors(WHERE, Secret(WEB_IDENTITY)):
            raise failure
    assert str(raised.value) == f"{WHERE} failed: {type(failure).__name__}"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_other_errors_pass_through():
    """Only botocore's errors are translated: a bug in between stays what it is."""
    with pytest.raises(KeyError), aws_sdk.sts_errors(WHERE):
        raise KeyError("Credentials")


def test_known_service_knows_api_names_and_signing_names():
    """botocore's service list, plus signing names it does not list; other names are unknown."""
    assert aws_sdk.known_service("dynamodb") is True
    assert aws_sdk.known_service("execute-api") is True
    assert aws_sdk.known_service("vpc-lattice-svcs") is True  # VPC Lattice services (gRPC too)
    assert aws_sdk.known_service("nosuchservice") is False


def test_the_signer_signs_at_the_time_it_is_given():
    """The signature headers for a given time, with the session token and the CRC32 trailer
    mode; the secret key itself is not among them."""
    signer = aws_sdk.SigV4Signer("s3", "eu-west-1", sign_payload=False)
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    headers = signer.sign(
        "PUT",
        "https://bucket.s3.eu-west-1.amazonaws.com/key",
        {"Content-Type": "text/plain"},
        None,
        key_id="AKIDEXAMPLE",
        secret_key=Secret("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        session_token="session-token",
        now=now,
        crc32_trailer="x-amz-checksum-crc32",
    )
    assert set(headers) == {
        "Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256"
    }  # fmt: skip
    assert headers["X-Amz-Date"] == "20260102T030405Z"
    assert headers["X-Amz-Content-SHA256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert headers["Authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260102/eu-west-1/s3/aws4_request"
    )
    assert "wJalrXUtnFEMI" not in "".join(headers.values())


@pytest.mark.parametrize("service", ["s3", "vpc-lattice-svcs"])
def test_an_unsigned_payload_is_declared_and_signed(service):
    """An unsigned payload is signed as ``UNSIGNED-PAYLOAD`` and said in X-Amz-Content-SHA256,
    for S3 and for other services alike (botocore's plain SigV4 would hash an empty body)."""
    signer = aws_sdk.SigV4Signer(service, "eu-west-1", sign_payload=False)
    headers = signer.sign(
        "POST",
        "http://127.0.0.1:8443/pkg.Service/Method",
        {"Content-Type": "application/grpc"},
        None,
        key_id="AKIDEXAMPLE",
        secret_key=Secret("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        session_token=None,
        now=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    )
    assert headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert (
        "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date,"
        in (headers["Authorization"])
    )


def test_only_the_adapter_imports_botocore():
    """Every use of botocore in proxy/ goes through proxy/aws_sdk.py."""
    root = Path(__file__).resolve().parent.parent / "proxy"
    importers = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name == "botocore" or name.startswith("botocore.") for name in names):
                importers.append(path.relative_to(root).as_posix())
    assert set(importers) == {"aws_sdk.py"}
