"""The AWS counterpart: moto's server with signature verification on (after set-up), an IAM role
for web identity, an admin user whose boto3 clients verify results independently, and a relay
in front of STS that a test can cut (fault injector: "STS unreachable")."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import boto3

from tests.counterparts import LEDGER, PREAMBLE, _wait_http, free_port

ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": ["s3:*", "dynamodb:*", "sts:AssumeRole"], "Resource": "*"}
    ],
}
REGION = "us-east-1"


class Moto:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.admin: dict[str, Any] = {}
        self.role_arn = ""
        self.chained_role_arn = ""
        self.bucket = "credproxy-test"
        self.token_file = workdir / "web-identity-token"

    def start(self) -> None:
        log = open(self.workdir / "moto.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("moto_server.py")), "-H", "127.0.0.1",
             "-p", str(self.port)],
            stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        _wait_http(self.url + "/moto-api/")
        self._prepare()

    def _prepare(self) -> None:
        """While moto still accepts unsigned set-up calls: an OIDC provider, a role it may
        assume with web identity, an admin user for verification; then authentication on."""
        setup = {"endpoint_url": self.url, "region_name": REGION,
                 "aws_access_key_id": "AKIASETUP00000000000", "aws_secret_access_key": "setup"}  # fmt: skip
        iam = boto3.client("iam", **setup)
        iam.create_open_id_connect_provider(
            Url="https://oidc.test.local",
            ClientIDList=["sts.amazonaws.com"],
            ThumbprintList=["0" * 40],
        )
        trust = {
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.test.local"},
                "Action": "sts:AssumeRoleWithWebIdentity",
            }],
        }  # fmt: skip
        self.role_arn = iam.create_role(RoleName="app", AssumeRolePolicyDocument=json.dumps(trust))[
            "Role"
        ]["Arn"]
        iam.put_role_policy(
            RoleName="app", PolicyName="app", PolicyDocument=json.dumps(ROLE_POLICY)
        )
        chain_trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "sts:AssumeRole",
                    # a role-session principal: valid in AWS, and the form moto matches exactly
                    "Principal": {"AWS": "arn:aws:sts::123456789012:assumed-role/app/credproxy"},
                }
            ],
        }
        self.chained_role_arn = iam.create_role(
            RoleName="cross-account", AssumeRolePolicyDocument=json.dumps(chain_trust)
        )["Role"]["Arn"]
        iam.put_role_policy(
            RoleName="cross-account", PolicyName="s3", PolicyDocument=json.dumps(ROLE_POLICY)
        )
        iam.create_user(UserName="admin")
        admin_policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="admin", PolicyName="admin", PolicyDocument=json.dumps(admin_policy)
        )
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        self.admin = {"endpoint_url": self.url, "region_name": REGION,
                      "aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}  # fmt: skip
        LEDGER.secret(key["SecretAccessKey"])
        self.token_file.write_text(
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YXBwIn0.c2ln\n"
        )
        request = urllib.request.Request(
            self.url + "/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"},
        )  # fmt: skip
        urllib.request.urlopen(request, timeout=10).close()
        self.client("s3").create_bucket(Bucket=self.bucket)  # now signed and verified

    def client(self, service: str) -> Any:
        return boto3.client(service, **self.admin)

    def record_secrets(self) -> None:
        """Enter every credential STS issued during the run in the leak ledger."""
        with urllib.request.urlopen(self.url + "/moto-api/data.json", timeout=10) as response:
            state = json.load(response)
        for role in state.get("sts", {}).get("AssumedRole", []):
            LEDGER.secret(role.get("secret_access_key"))
            LEDGER.secret(role.get("session_token"))

    def stop(self) -> None:
        if self.process is not None:
            self.record_secrets()
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


async def _first_request(reader: asyncio.StreamReader) -> bytes:
    """The first request's bytes, its head and its Content-Length body whole (one read may
    hold only the head), bounded to 1 MiB; what a closed connection sent, as it is."""
    data = await reader.read(65536)
    while data and b"\r\n\r\n" not in data and len(data) < 1 << 20:
        more = await reader.read(65536)
        if not more:
            return data
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < min(length, 1 << 20):
        more = await reader.read(65536)
        if not more:
            break
        data += more
        body += more
    return data


class Relay:
    """Fault injector: a TCP relay to a real server that a test can cut and restore."""

    def __init__(self, target_port: int) -> None:
        self.requests: list[bytes] = []  # the first bytes each client sent, for replay tests
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._target = target_port
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="relay")
        self._thread.start()
        self.restore()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, up_writer}
        first = await _first_request(reader)
        self.requests.append(first)
        up_writer.write(first)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def restore(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        self._run(start())

    def cut(self) -> None:
        """Refuse new connections and reset the open ones: the service is unreachable."""

        async def stop() -> None:
            if self._server is None:
                return
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()
            await self._server.wait_closed()
            self._server = None

        self._run(stop())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def aws_config(
    moto: Moto, sts_url: str, *, extra_issuer: str = "", extra_route: str = "", top: str = ""
) -> str:
    return f"""\
{PREAMBLE}issuers:
  aws:
    type: aws
    role_arn: {moto.role_arn}
    token_file: {moto.token_file}
    region: {REGION}
    sts_endpoint: {sts_url}
{extra_issuer}
routes:
  - name: s3
    path_prefix: /s3/
    upstream: {moto.url}
    credential: {{issuer: aws, inject: sigv4, service: s3, region: {REGION}}}
    allow: [{{callers: [test-suite]}}]
  - name: dynamodb
    path_prefix: /dynamodb/
    upstream: {moto.url}
    credential: {{issuer: aws, inject: sigv4, service: dynamodb, payload_max_bytes: 65536}}
    allow: [{{callers: [test-suite]}}]
{extra_route}
audit: {{file: "{{audit}}"}}
log: {{format: json}}
{top}
"""
