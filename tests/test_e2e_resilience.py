"""Outages and large bodies, end to end: the IdP stops and returns; 100 MiB each way; a stalled
upstream."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
import pytest

from tests.counterparts import config, idp_and_upstream, rss_peak_during, wait_until

MIB = 1024 * 1024


@pytest.fixture(params=["oidc-provider", "keycloak"])
def private_idp(request, tmp_path):
    """An IdP + resource server pair to stop and start: oidc-provider of this test's own, so
    stopping it disturbs nobody; the session's Keycloak (its database keeps realm and keys)."""
    if request.param == "keycloak":
        yield request.getfixturevalue("keycloak"), request.getfixturevalue("keycloak_upstream")
        return
    with idp_and_upstream(tmp_path, ttls_s=(60, 6)) as pair:
        yield pair


async def test_idp_outage_serves_until_expiry_then_503_then_recovers(
    private_idp, credproxy, client
):
    """IdP down: the cached token serves until it expires (6 s: max_lifetime_s), then 503 +
    Retry-After; IdP back: recovery without restart."""
    idp, server = private_idp
    text = config(idp=idp, upstream=server.origin, audience=server.audience).replace(
        "    client_auth:", "    backoff_max_s: 1\n    max_lifetime_s: 6\n    client_auth:"
    )
    proc = credproxy(text)
    idp.stop()
    statuses: list[int] = []
    while not statuses or statuses[-1] == 200:
        async with client.get(proc.url + "/payments/v1/charges") as response:
            statuses.append(response.status)
            if response.status != 200:
                problem = await response.json()
                retry_after = int(response.headers["Retry-After"])
        await asyncio.sleep(0.1)
        assert len(statuses) < 200, "the token never expired"
    assert statuses.count(200) >= 20  # served from cache for ~5 s while the IdP was down
    assert statuses[-1] == 503 and problem["code"] == "credential_unavailable"
    assert 1 <= retry_after <= 2
    async with client.get(proc.admin_url + "/readyz") as response:
        assert response.status == 503
    async with client.get(proc.admin_url + "/metrics") as response:
        metrics = await response.text()
    assert 'credproxy_credential_issued_total{issuer="test-idp",outcome="failure"}' in metrics

    idp.start()
    recovered: list[int] = []
    for _ in range(100):
        async with client.get(proc.url + "/payments/v1/charges") as response:
            recovered.append(response.status)
        if recovered[-1] == 200:
            break
        await asyncio.sleep(0.1)
    assert recovered[-1] == 200, recovered
    async with client.get(proc.admin_url + "/readyz") as response:
        assert response.status == 200


async def test_100_mib_upload_and_download_stream_with_flat_memory(idp, upstream, credproxy):
    """100 MiB each way pass intact while credproxy's RSS grows by far less than the body."""
    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=upstream.audience))
    total = 100 * MIB
    block = bytes(range(256)) * 256  # 64 KiB

    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(proc.url + "/payments/v1/warm") as response:
            assert response.status == 200  # the pool and the token exist before measuring

        async def chunks():
            for _ in range(total // len(block)):
                yield block

        async def upload() -> None:
            async with client.post(proc.url + "/payments/api/upload", data=chunks()) as response:
                assert response.status == 200
                assert await response.json() == {
                    "bytes": total,
                    "sha256": hashlib.sha256(block * (total // len(block))).hexdigest(),
                }

        before, peak = await rss_peak_during(proc, upload)
        print(f"100 MiB upload: credproxy RSS {before / MIB:.1f} → peak {peak / MIB:.1f} MiB")
        assert peak - before < 30 * MIB, f"upload: RSS {before / MIB:.0f} → {peak / MIB:.0f} MiB"

        async def download() -> None:
            digest, size = hashlib.sha256(), 0
            async with client.get(proc.url + f"/payments/api/download?bytes={total}") as response:
                assert response.status == 200
                assert int(response.headers["Content-Length"]) == total
                async for chunk in response.content.iter_chunked(MIB):
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.sleep(0)
            assert size == total
            pattern = b"0123456789abcdef" * 4096
            assert (
                digest.hexdigest() == hashlib.sha256(pattern * (total // len(pattern))).hexdigest()
            )

        before, peak = await rss_peak_during(proc, download)
        print(f"100 MiB download: credproxy RSS {before / MIB:.1f} → peak {peak / MIB:.1f} MiB")
        assert peak - before < 30 * MIB, f"download: RSS {before / MIB:.0f} → {peak / MIB:.0f} MiB"


class StalledUpstream:
    """Fault injector: accepts connections and reads the request, then never answers."""

    async def __aenter__(self) -> str:
        self._writers: list[asyncio.StreamWriter] = []

        async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.append(writer)
            await reader.read(65536)

        self._server = await asyncio.start_server(stall, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
            await writer.wait_closed()
        await self._server.wait_closed()


async def test_stalled_upstream_is_504_problem_and_proxy_keeps_serving(
    idp, upstream, credproxy, client
):
    """An upstream that never answers gets 504 upstream_timeout after the route's idle timeout."""
    async with StalledUpstream() as stalled:
        extra = f"""\
  - name: stalled
    path_prefix: /stalled/
    upstream: {stalled}
    timeouts: {{connect_s: 1, idle_s: 1, total_s: 5}}
    credential: {{issuer: test-idp, audience: "{upstream.audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
"""
        proc = credproxy(
            config(idp=idp, upstream=upstream.origin, audience=upstream.audience, extra_route=extra)
        )
        async with client.get(proc.url + "/stalled/x") as response:
            problem = await response.json()
            assert response.status == 504, problem
            assert problem["code"] == "upstream_timeout" and problem["route"] == "stalled"
            assert json.dumps(problem).count("Bearer") == 0
        async with client.get(proc.url + "/payments/x") as response:
            assert response.status == 200
    wait_until(lambda: "upstream_timeout" in proc.log(), what="the timeout in the operator log")


async def test_tls_upstream_verified_with_route_ca_bundle(tmp_path, credproxy, client):
    """An https upstream is verified: with the route's ca_file it works, without it → 502 upstream_tls_error."""
    from tests.tls import make_ca_and_server_cert

    ca_file, server_tls = make_ca_and_server_cert(tmp_path)
    with idp_and_upstream(tmp_path, tls=server_tls) as (idp, server):
        extra = f"""\
  - name: untrusted
    path_prefix: /untrusted/
    upstream: {server.origin}
    credential: {{issuer: test-idp, audience: "{server.audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
"""
        text = config(idp=idp, upstream=server.origin, audience=server.audience, extra_route=extra)
        text = text.replace(
            "    strip_headers: [X-Api-Key]\n",
            f"    strip_headers: [X-Api-Key]\n    ca_file: {ca_file}\n",
        )
        proc = credproxy(text)
        async with client.get(proc.url + "/payments/v1/charges") as response:
            body = await response.json()
            assert response.status == 200, body
            assert body["authorization_schemes"] == ["DPoP"]
        async with client.get(proc.url + "/untrusted/v1/charges") as response:
            problem = await response.json()
            assert response.status == 502 and problem["code"] == "upstream_tls_error"
        assert server.verifier.accepted == 1  # nothing reached the server over the untrusted route
        proc.stop()  # close credproxy's TLS connections before the server goes away


async def test_sigterm_drains_in_flight_response_then_exits_0(idp, upstream, credproxy):
    """A response being streamed when SIGTERM arrives completes in full while /readyz says 503
    (draining); then the process exits 0."""
    import signal

    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=upstream.audience))
    total = 64 * MIB
    async with aiohttp.ClientSession() as client:
        async with client.get(proc.url + f"/payments/api/download?bytes={total}") as response:
            assert response.status == 200
            received = len(await response.content.readexactly(MIB))
            proc.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with client.get(proc.admin_url + "/readyz") as ready:
                assert ready.status == 503 and (await ready.json())["draining"] is True
            async for chunk in response.content.iter_chunked(MIB):
                received += len(chunk)
    assert received == total
    assert await asyncio.to_thread(proc.process.wait, 20) == 0
