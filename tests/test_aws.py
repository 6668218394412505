"""AWS end to end: the app sends plain, unsigned requests; credproxy signs each with SigV4 using
STS web-identity credentials it obtained itself; moto verifies every signature.

What moto cannot verify, said here rather than weakened: it does not check the web identity
token against the OIDC provider, nor X-Amz-Date freshness (the 15-minute window), nor that a
body matches a signed x-amz-content-sha256 header (it trusts the header), so body tampering is
tested on DynamoDB, whose payload hash moto computes itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
import urllib.request

import aiohttp
import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config

from tests.aws_counterparts import REGION, Relay, aws_config
from tests.counterparts import LEDGER, ThreadedApp, rss_peak_during

MIB = 1024 * 1024
APP_CONFIG = Config(
    signature_version=UNSIGNED,
    s3={"addressing_style": "path"},
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    retries={"max_attempts": 1},
)


def app_client(proc, service: str, **kwargs):
    """The app: boto3 pointed at credproxy, sending no credentials at all."""
    return boto3.client(
        service,
        endpoint_url=f"{proc.url}/{service}",
        region_name=REGION,
        config=APP_CONFIG,
        **kwargs,
    )


def _aws_code(body: bytes, content_type: str) -> str:
    """The error code of a credproxy answer on a sigv4 route, in the service's own format."""
    if "json" in content_type:
        return str(json.loads(body)["__type"])
    assert content_type == "application/xml", content_type
    return body.split(b"<Code>", 1)[1].split(b"</Code>", 1)[0].decode()


def _audit(proc) -> list[dict[str, object]]:
    events = proc.audit()
    return [e for e in events if e["event"].startswith("credential.")]


def test_s3_put_get_list_with_no_app_credentials(moto, sts_relay, credproxy):
    """PutObject, GetObject and ListObjects work through credproxy; moto verified each signature."""
    proc = credproxy(aws_config(moto, sts_relay.url))
    app = app_client(proc, "s3")
    app.put_object(Bucket=moto.bucket, Key="hello.txt", Body=b"hello from an app with no keys")
    assert (
        app.get_object(Bucket=moto.bucket, Key="hello.txt")["Body"].read()
        == b"hello from an app with no keys"
    )
    assert "hello.txt" in [o["Key"] for o in app.list_objects_v2(Bucket=moto.bucket)["Contents"]]
    admin = moto.client("s3").get_object(Bucket=moto.bucket, Key="hello.txt")["Body"].read()
    assert admin == b"hello from an app with no keys"
    issued = _audit(proc)
    assert issued and issued[0]["issuer"] == "aws" and "legacy" not in issued[0]


def test_app_that_signs_with_dummy_keys_still_works(moto, sts_relay, credproxy):
    """An app's own SigV4 headers (dummy keys) are stripped and replaced by credproxy's."""
    proc = credproxy(aws_config(moto, sts_relay.url))
    app = boto3.client(
        "s3", endpoint_url=f"{proc.url}/s3", region_name=REGION,
        aws_access_key_id="AKIADUMMYDUMMYDUMMY0", aws_secret_access_key="dummy", aws_session_token="dummy",
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"),
    )  # fmt: skip
    app.put_object(Bucket=moto.bucket, Key="dummy.txt", Body=b"x")
    assert moto.client("s3").head_object(Bucket=moto.bucket, Key="dummy.txt")["ContentLength"] == 1


def test_dynamodb_json_protocol_through_credproxy(moto, sts_relay, credproxy):
    """A JSON-protocol service (DynamoDB) works with a signed, hashed payload."""
    proc = credproxy(aws_config(moto, sts_relay.url))
    app = app_client(proc, "dynamodb")
    app.create_table(
        TableName="orders", KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST",
    )  # fmt: skip
    app.put_item(TableName="orders", Item={"id": {"S": "o-1"}, "total": {"N": "42"}})
    assert app.get_item(TableName="orders", Key={"id": {"S": "o-1"}})["Item"]["total"] == {
        "N": "42"
    }
    assert moto.client("dynamodb").get_item(TableName="orders", Key={"id": {"S": "o-1"}})["Item"][
        "total"
    ] == {"N": "42"}


def _send_raw(port: int, raw: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
            if b"\r\n\r\n" in response and _complete(response):
                break
    return int(response.split()[1]), response


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def test_signed_request_replayed_with_changes_is_rejected(moto, sts_relay, credproxy):
    """Requests credproxy signed, captured on the wire: with another path (S3) or another body
    (DynamoDB) moto refuses the signature; unchanged, moto accepts the replay (no time window)."""
    recorder = Relay(moto.port)  # sits between credproxy and moto and keeps what crossed
    extra = "".join(
        f"""\
  - name: recorded-{service}
    path_prefix: /recorded-{service}/
    upstream: {recorder.url}
    credential: {{issuer: aws, inject: sigv4, service: {service}, region: {REGION}}}
    allow: [{{callers: [test-suite]}}]
"""
        for service in ("s3", "dynamodb")
    )
    try:
        proc = credproxy(aws_config(moto, sts_relay.url, extra_route=extra))
        app_s3 = boto3.client(
            "s3", endpoint_url=f"{proc.url}/recorded-s3", region_name=REGION, config=APP_CONFIG
        )
        app_s3.put_object(Bucket=moto.bucket, Key="a.txt", Body=b"a")
        app_s3.put_object(Bucket=moto.bucket, Key="b.txt", Body=b"b")
        app_s3.get_object(Bucket=moto.bucket, Key="a.txt")
        boto3.client("dynamodb", endpoint_url=f"{proc.url}/recorded-dynamodb", region_name=REGION,
                     config=APP_CONFIG).list_tables()  # fmt: skip
        get = next(r for r in recorder.requests if r.startswith(b"GET /") and b"a.txt" in r)
        ddb = next(r for r in recorder.requests if b"DynamoDB_20120810" in r)
        assert b"AWS4-HMAC-SHA256" in get and b"AWS4-HMAC-SHA256" in ddb

        assert _send_raw(moto.port, get)[0] == 200  # moto does not enforce the 15-minute window
        status, response = _send_raw(moto.port, get.replace(b"a.txt", b"b.txt", 1))
        assert status == 403 and b"SignatureDoesNotMatch" in response

        head, _, body = ddb.partition(b"\r\n\r\n")
        assert _send_raw(moto.port, ddb)[0] == 200
        changed = body.replace(b"{", b"{ ", 1)
        tampered = (
            head.replace(
                f"Content-Length: {len(body)}".encode(), f"Content-Length: {len(changed)}".encode()
            )
            + b"\r\n\r\n"
            + changed
        )
        status, response = _send_raw(moto.port, tampered)
        assert status in (400, 403) and b"Signature" in response, response[:300]
    finally:
        recorder.close()


async def test_256_mib_upload_streams_with_flat_memory(moto, sts_relay, credproxy):
    """256 MiB go to S3 as UNSIGNED-PAYLOAD while credproxy's RSS stays flat; moto stores them intact."""
    proc = credproxy(aws_config(moto, sts_relay.url))
    total = 256 * MIB
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    md5 = hashlib.md5(usedforsecurity=False)
    for _ in range(total // len(block)):
        md5.update(block)

    async def chunks():
        for _ in range(total // len(block)):
            yield block

    async def upload() -> None:
        async with aiohttp.ClientSession() as client:
            url = f"{proc.url}/s3/{moto.bucket}/big.bin"
            headers = {"Content-Length": str(total), "Content-Type": "application/octet-stream"}
            timeout = aiohttp.ClientTimeout(total=600)
            async with client.put(url, data=chunks(), headers=headers, timeout=timeout) as response:
                assert response.status == 200, await response.text()

    before, peak = await rss_peak_during(proc, upload)
    head = await asyncio.to_thread(moto.client("s3").head_object, Bucket=moto.bucket, Key="big.bin")
    assert head["ContentLength"] == total and head["ETag"].strip('"') == md5.hexdigest()
    print(f"256 MiB upload: credproxy RSS {before / MIB:.1f} → peak {peak / MIB:.1f} MiB")
    assert peak - before < 40 * MIB, f"RSS {before / MIB:.0f} → {peak / MIB:.0f} MiB"


def test_short_lived_credentials_refresh_without_failed_requests(moto, sts_relay, credproxy):
    """Credentials capped at 6 s rotate under steady traffic with every request verified and accepted.

    STS's minimum DurationSeconds is 900, so the lifetime is capped by max_lifetime_s."""
    text = aws_config(moto, sts_relay.url).replace(
        "    region: us-east-1\n", "    region: us-east-1\n    max_lifetime_s: 6\n", 1
    )
    proc = credproxy(text)
    app = app_client(proc, "s3")
    started, calls = time.monotonic(), 0
    while time.monotonic() - started < 20:
        app.list_objects_v2(Bucket=moto.bucket)  # raises on any failure
        calls += 1
        time.sleep(0.1)
    fingerprints = {e["fingerprint"] for e in _audit(proc)}
    assert calls > 50 and len(fingerprints) >= 4, (calls, len(fingerprints))


async def test_sts_down_serves_until_expiry_then_503_then_recovers(
    moto, sts_relay, credproxy, client
):
    """STS unreachable: cached credentials serve until they expire, then 503 + Retry-After; STS back: recovery."""
    text = aws_config(moto, sts_relay.url).replace(
        "    region: us-east-1\n",
        "    region: us-east-1\n    max_lifetime_s: 6\n    backoff_max_s: 1\n",
        1,
    )
    proc = credproxy(text)
    sts_relay.cut()
    url = f"{proc.url}/s3/{moto.bucket}?list-type=2"
    statuses: list[int] = []
    while not statuses or statuses[-1] == 200:
        async with client.get(url) as response:
            statuses.append(response.status)
            if response.status != 200:
                code = _aws_code(await response.read(), response.content_type)
                retry_after = int(response.headers["Retry-After"])
        await asyncio.sleep(0.1)
        assert len(statuses) < 150
    assert statuses.count(200) >= 20 and statuses[-1] == 503
    assert code == "credential_unavailable" and retry_after >= 1
    sts_relay.restore()
    for _ in range(60):
        async with client.get(url) as response:
            if response.status == 200:
                break
        await asyncio.sleep(0.1)
    assert response.status == 200


async def test_signed_payload_over_bound_is_413(moto, sts_relay, credproxy, client):
    """A body the route must hash but may not buffer (over payload_max_bytes) gets 413, in
    DynamoDB's JSON error format (``__type``) that its SDKs parse."""
    proc = credproxy(aws_config(moto, sts_relay.url))
    async with client.post(f"{proc.url}/dynamodb/", data=b"x" * 70000) as response:
        code = _aws_code(await response.read(), response.content_type)
        assert response.status == 413 and code == "payload_too_large"
        assert response.headers["x-amzn-ErrorType"] == "payload_too_large"


class SkewedAWS(ThreadedApp):
    """Fault injector: answers the first request 403 RequestTimeTooSkewed with a clock one hour
    ahead (no real server here is skewed), then records the X-Amz-Date of the replay."""

    def __init__(self) -> None:
        super().__init__()
        self.dates: list[str] = []

    def app(self):
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            self.dates.append(request.headers["X-Amz-Date"])
            ahead = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 3600))
            if len(self.dates) == 1:
                body = b"<Error><Code>RequestTimeTooSkewed</Code></Error>"
                return web.Response(status=403, body=body, headers={"Date": ahead})
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def test_clock_skew_answer_adjusts_offset_and_retries_once(
    moto, sts_relay, credproxy, client
):
    """RequestTimeTooSkewed: credproxy shifts its signing clock to the server's and replays once."""
    skewed = SkewedAWS()
    skewed.start()
    extra = f"""\
  - name: skewed
    path_prefix: /skewed/
    upstream: {skewed.origin}
    credential: {{issuer: aws, inject: sigv4, service: s3, region: {REGION}}}
    allow: [{{callers: [test-suite]}}]
"""
    try:
        proc = credproxy(aws_config(moto, sts_relay.url, extra_route=extra))
        async with client.get(f"{proc.url}/skewed/b/k") as response:
            assert response.status == 200
        first, second = (time.mktime(time.strptime(d, "%Y%m%dT%H%M%SZ")) for d in skewed.dates)
        assert len(skewed.dates) == 2 and 3500 < second - first < 3700
    finally:
        skewed.stop()


def test_static_legacy_keys_work_and_are_audited_as_legacy(moto, sts_relay, credproxy, tmp_path):
    """Static keys from a file still sign (legacy mode) and every issuance is marked legacy."""
    keys = tmp_path / "static-keys.json"
    keys.write_text(json.dumps({"access_key_id": moto.admin["aws_access_key_id"],
                                "secret_access_key": moto.admin["aws_secret_access_key"]}))  # fmt: skip
    text = aws_config(moto, sts_relay.url).replace(
        f"    role_arn: {moto.role_arn}\n    token_file: {moto.token_file}\n",
        f"    static_credentials_file: {keys}\n",
    )
    proc = credproxy(text)
    app_client(proc, "s3").list_objects_v2(Bucket=moto.bucket)
    assert all(event.get("legacy") is True for event in _audit(proc))
    LEDGER.secret(moto.admin["aws_secret_access_key"])


def test_chained_assume_role(moto, sts_relay, credproxy):
    """With assume_role_arn, the web-identity credentials assume a second role and those sign."""
    text = aws_config(moto, sts_relay.url).replace(
        "    region: us-east-1\n",
        f"    region: us-east-1\n    assume_role_arn: {moto.chained_role_arn}\n",
        1,
    )
    proc = credproxy(text)
    app_client(proc, "s3").put_object(Bucket=moto.bucket, Key="chained.txt", Body=b"c")
    assert (
        moto.client("s3").head_object(Bucket=moto.bucket, Key="chained.txt")["ContentLength"] == 1
    )
    with urllib.request.urlopen(moto.url + "/moto-api/data.json", timeout=10) as response:
        roles = json.load(response)["sts"]["AssumedRole"]
    assert any(r["role_arn"] == moto.chained_role_arn for r in roles), [
        r["role_arn"] for r in roles
    ]


STREAMING_ROUTE = f"""\
  - name: s3-trailer
    path_prefix: /s3t/
    upstream: {{url}}
    credential: {{{{issuer: aws, inject: sigv4, service: s3, region: {REGION}, payload: streaming}}}}
    allow: [{{{{callers: [test-suite]}}}}]
"""


def _crc32_b64(data: bytes) -> str:
    import base64
    import zlib

    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


async def test_s3_streaming_with_checksum_trailer(moto, sts_relay, credproxy, client):
    """payload: streaming sends S3 bodies aws-chunked as STREAMING-UNSIGNED-PAYLOAD-TRAILER with a
    CRC32 trailer computed on the way: moto verifies the signature and decodes the frames, the
    object is intact (boto3) and its stored checksum is the body's (computed here). Memory stays
    flat; a body without Content-Length gets 411. moto does not check the trailer against the
    body itself, so this test does."""
    route = STREAMING_ROUTE.format(url=moto.url)
    proc = credproxy(aws_config(moto, sts_relay.url, extra_route=route))
    admin = moto.client("s3")
    small = b"small body, buffered for a replay"
    app = boto3.client("s3", endpoint_url=f"{proc.url}/s3t", region_name=REGION, config=APP_CONFIG)
    await asyncio.to_thread(app.put_object, Bucket=moto.bucket, Key="small.txt", Body=small)
    total = 32 * MIB + 17  # frames of 64 KiB and a short last one
    block = hashlib.sha256(b"trailer").digest() * 2048  # 64 KiB
    body = (block * (total // len(block) + 1))[:total]

    async def chunks():
        for offset in range(0, total, 100_000):  # not aligned with the 64 KiB frames
            yield body[offset : offset + 100_000]

    async def upload() -> None:
        headers = {"Content-Length": str(total), "Content-Type": "application/octet-stream"}
        url = f"{proc.url}/s3t/{moto.bucket}/trailer.bin"
        async with client.put(url, data=chunks(), headers=headers) as response:
            assert response.status == 200, await response.text()

    before, peak = await rss_peak_during(proc, upload)
    print(
        f"32 MiB aws-chunked upload: credproxy RSS {before / MIB:.1f} → peak {peak / MIB:.1f} MiB"
    )
    assert peak - before < 20 * MIB
    for key, data in [("small.txt", small), ("trailer.bin", body)]:
        stored = await asyncio.to_thread(
            admin.get_object, Bucket=moto.bucket, Key=key, ChecksumMode="ENABLED"
        )
        assert stored["Body"].read() == data
        assert stored["ChecksumCRC32"] == _crc32_b64(data)

    async def unsized():
        yield b"no length"

    async with client.put(f"{proc.url}/s3t/{moto.bucket}/unsized", data=unsized()) as response:
        code = _aws_code(await response.read(), response.content_type)
        assert response.status == 411 and code == "length_required"


# -- paths: forward what the app sent, or refuse in S3's own words (issue 18, defect 3) ---------

ODD_KEYS = [
    "dir/../dots.txt",
    "dir//double.txt",
    "a%2Fb.txt",  # a literal '%2F' in the key: sent as %252F
    "with space and+plus.txt",
    "unicode/café/日本語.txt",
    "./leading-dot",
    "trailing/..",
]
NORMALIZED_ROUTE = f"""\
  - name: s3-normalized
    path_prefix: /s3n/
    upstream: {{url}}
    path: normalized
    credential: {{{{issuer: aws, inject: sigv4, service: s3, region: {REGION}}}}}
    allow: [{{{{callers: [test-suite]}}}}]
"""


def test_odd_keys_round_trip_byte_for_byte_through_the_opaque_s3_route(moto, sts_relay, credproxy):
    """boto3 keys with '..', '//', '%2F', spaces and unicode are stored under exactly the key
    the app named (the S3 route defaults to path: opaque), read back byte for byte, and no
    other object appears or is overwritten."""
    proc = credproxy(aws_config(moto, sts_relay.url))
    app, admin = app_client(proc, "s3"), moto.client("s3")
    admin.put_object(Bucket=moto.bucket, Key="dots.txt", Body=b"must not be overwritten")
    for i, key in enumerate(ODD_KEYS):
        body = f"object {i}: {key}".encode()
        app.put_object(Bucket=moto.bucket, Key=key, Body=body)
        assert app.get_object(Bucket=moto.bucket, Key=key)["Body"].read() == body, key
        assert admin.get_object(Bucket=moto.bucket, Key=key)["Body"].read() == body, key
    stored = {o["Key"] for o in admin.list_objects_v2(Bucket=moto.bucket)["Contents"]}
    assert set(ODD_KEYS) <= stored
    dots = admin.get_object(Bucket=moto.bucket, Key="dots.txt")["Body"].read()
    assert dots == b"must not be overwritten"


def test_keys_a_normalized_route_would_rewrite_are_refused_in_s3_xml(moto, sts_relay, credproxy):
    """On an S3 route with path: normalized, keys normalizing would change are refused with an
    S3 XML error whose code boto3 surfaces; nothing reaches S3; plain odd keys still work."""
    from botocore.exceptions import ClientError

    proc = credproxy(
        aws_config(moto, sts_relay.url, extra_route=NORMALIZED_ROUTE.format(url=moto.url))
    )
    app = boto3.client("s3", endpoint_url=f"{proc.url}/s3n", region_name=REGION, config=APP_CONFIG)
    refused = {
        "dir/../rewritten.txt": "path_not_canonical",
        "dir/./rewritten.txt": "path_not_canonical",
        "dir//rewritten.txt": "invalid_path",
        "a%2Frewritten.txt": "invalid_path",
    }
    for key, code in refused.items():
        with pytest.raises(ClientError) as error:
            app.put_object(Bucket=moto.bucket, Key=key, Body=b"x")
        answer = error.value.response
        assert answer["ResponseMetadata"]["HTTPStatusCode"] == 400, key
        assert answer["Error"]["Code"] == code, key
        assert "path" in answer["Error"]["Message"], key
        assert code in str(error.value)  # what the app's log shows
    keys = {o["Key"] for o in moto.client("s3").list_objects_v2(Bucket=moto.bucket)["Contents"]}
    assert not {k for k in keys if "rewritten" in k}
    for key in ("with space.txt", "unicode/日本.txt"):
        app.put_object(Bucket=moto.bucket, Key=key, Body=key.encode())
        assert app.get_object(Bucket=moto.bucket, Key=key)["Body"].read() == key.encode()


def test_boto3_with_http_proxy_beside_its_endpoint_url_is_proxied(
    moto, sts_relay, credproxy, monkeypatch
):
    """boto3 with HTTP_PROXY at credproxy and endpoint_url at credproxy sends the absolute form
    to credproxy itself, which serves it as the route (not 403)."""
    proc = credproxy(aws_config(moto, sts_relay.url))
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proc.url)
    monkeypatch.setenv("http_proxy", proc.url)
    app = app_client(proc, "s3")
    app.put_object(Bucket=moto.bucket, Key="via-http-proxy.txt", Body=b"proxied")
    assert app.get_object(Bucket=moto.bucket, Key="via-http-proxy.txt")["Body"].read() == b"proxied"
