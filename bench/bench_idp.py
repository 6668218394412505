"""The IdP of the benchmark: credproxy's demo IdP, standalone on a loopback port, counting tokens.

    .venv/bin/python bench/bench_idp.py --port P --client-key FILE --client-secret-file FILE

``proxy.demo.idp.DemoIdP`` (``private_key_jwt``, DPoP-bound tokens) serves credproxy's oauth2
issuer. For Envoy's OAuth2 credential injector, which only knows ``client_secret`` (HTTP Basic
or form body), a second client authenticates with a shared secret and gets plain Bearer tokens.
``GET /__stats`` answers ``{"token_requests": N, "by_client": {...}}``; every ``POST /token``
counts, whether it succeeds or not.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import uvloop
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.demo.idp import DemoIdP  # noqa: E402

KEY_CLIENT_ID = "orders-service"  # private_key_jwt (credproxy)
SECRET_CLIENT_ID = "envoy-bench"  # client_secret_basic / client_secret_post (Envoy)


class BenchIdP(DemoIdP):
    def __init__(
        self,
        issuer: str,
        *,
        client_key: ec.EllipticCurvePublicKey,
        client_secret: str,
        token_lifetime_s: int,
    ) -> None:
        super().__init__(
            issuer,
            client_id=KEY_CLIENT_ID,
            client_key=client_key,
            token_lifetime_s=token_lifetime_s,
        )
        self._client_secret = client_secret
        self.by_client: dict[str, int] = {}

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/__stats", self._stats)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"token_requests": self.token_requests, "by_client": self.by_client}
        )

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id, secret = _secret_credentials(request.headers.get("Authorization", ""), form)
        if client_id is None:
            self.by_client[KEY_CLIENT_ID] = self.by_client.get(KEY_CLIENT_ID, 0) + 1
            return await super()._token(request)
        self.token_requests += 1
        self.by_client[client_id] = self.by_client.get(client_id, 0) + 1
        if client_id != SECRET_CLIENT_ID or not hmac.compare_digest(
            secret.encode(), self._client_secret.encode()
        ):
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": client_id,
            "client_id": client_id,
            "aud": str(form.get("resource", "")) or self.issuer,
            "iat": now,
            "exp": now + self._lifetime_s,
            "jti": secrets.token_urlsafe(16),
            "scope": str(form.get("scope", "")),
        }
        return web.json_response(
            {
                "access_token": self._signer.sign(claims),
                "token_type": "Bearer",
                "expires_in": self._lifetime_s,
            },
            headers={"Cache-Control": "no-store"},
        )


def _secret_credentials(authorization: str, form: Any) -> tuple[str | None, str]:
    """(client_id, secret) from HTTP Basic (RFC 6749 §2.3.1: form-urlencoded parts) or the body;
    (None, "") when the request uses neither (a private_key_jwt client)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
        client_id, _, secret = decoded.partition(":")
        return unquote(client_id), unquote(secret)
    if "client_secret" in form:
        return str(form.get("client_id", "")), str(form["client_secret"])
    return None, ""


async def _serve(args: argparse.Namespace) -> None:
    key = serialization.load_pem_private_key(args.client_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    idp = BenchIdP(
        f"http://127.0.0.1:{args.port}",
        client_key=key.public_key(),
        client_secret=args.client_secret_file.read_text().strip(),
        token_lifetime_s=args.token_ttl,
    )
    runner = web.AppRunner(idp.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"bench IdP at {idp.issuer}", flush=True)
    try:
        await asyncio.Event().wait()  # until SIGTERM
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-key", type=Path, required=True, help="PEM EC private key")
    parser.add_argument("--client-secret-file", type=Path, required=True)
    parser.add_argument("--token-ttl", type=int, default=10, help="expires_in of tokens (s)")
    args = parser.parse_args()
    try:
        uvloop.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
