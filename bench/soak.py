"""Soak: credproxy at saturation for a bounded time with mixed schemes and injected faults.

    .venv/bin/python bench/soak.py [--duration 600] [--concurrency 32]

Starts the test suite's real counterparts on loopback (oidc-provider, the verifying resource
server) plus a plain upstream for the static-key and self-signed-JWT routes, and credproxy with
four routes: DPoP and bearer tokens from the IdP, a static header, a per-request JWT. Faults
during the run: admin revocation (forces fresh tokens) every 20 s, the IdP stopped for 5 s
every 60 s (cached tokens must carry the traffic). Passes when no answer is unexpected (only
2xx), and RSS (±5 %), open fds and event-loop tasks are flat between the end of the warm-up
and the end. Writes bench/results/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.counterparts import (  # noqa: E402
    PREAMBLE,
    Credproxy,
    IdP,
    ResourceServer,
    ThreadedApp,
    environment_ok,
    idp_and_upstream,
)

WARM_UP_S = 30.0
SAMPLE_EVERY_S = 5.0


class PlainUpstream(ThreadedApp):
    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def _config(idp: IdP, upstream: ResourceServer, plain: PlainUpstream, key_file: Path) -> str:
    return f"""\
{PREAMBLE}issuers:
  idp:
    type: oauth2
    issuer_url: {idp.issuer}
    client_id: {idp.CLIENT_ID}
    client_key_file: {idp.client_key_file}
  key: {{type: static, secret_file: {key_file}}}
  self: {{type: self_signed_jwt, iss: soak, sub: soak}}
routes:
  - name: dpop
    path_prefix: /dpop/
    upstream: {upstream.origin}
    credential: {{issuer: idp, audience: "{upstream.audience}", scope: payments.write}}
    allow: [{{callers: [test-suite]}}]
  - name: bearer
    path_prefix: /bearer/
    upstream: {upstream.origin}
    credential: {{issuer: idp, audience: "{upstream.audience}", inject: bearer}}
    allow: [{{callers: [test-suite]}}]
  - name: static
    path_prefix: /static/
    upstream: {plain.origin}
    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
  - name: jwt
    path_prefix: /jwt/
    upstream: {plain.origin}
    credential: {{issuer: self, inject: bearer}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json, access: false}}
"""


def _sample(proc: Credproxy, metrics: str) -> dict[str, float]:
    assert proc.process is not None
    pid = proc.process.pid
    tasks = re.search(r"^credproxy_event_loop_tasks (\S+)$", metrics, re.M)
    return {
        "rss_mib": proc.rss_bytes() / 2**20,
        "fds": float(len(os.listdir(f"/proc/{pid}/fd"))),
        "tasks": float(tasks[1]) if tasks else -1.0,
    }


async def _load(
    proc: Credproxy, idp: IdP, duration_s: float, concurrency: int
) -> dict[str, object]:
    paths = ["/dpop/api/x", "/bearer/api/x", "/static/x", "/jwt/x"]
    statuses: Counter[int] = Counter()
    series: list[dict[str, float]] = []
    started = time.monotonic()
    stop_at = started + duration_s

    async def metrics(session: aiohttp.ClientSession) -> str:
        async with session.get(proc.admin_url + "/metrics") as response:
            return await response.text()

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        i = n
        while time.monotonic() < stop_at:
            async with session.get(proc.url + paths[i % len(paths)]) as response:
                await response.read()
                statuses[response.status] += 1
            i += 1

    async def faults(session: aiohttp.ClientSession) -> None:
        tick = 0
        while time.monotonic() < stop_at - 10:
            await asyncio.sleep(20)
            tick += 1
            async with (
                proc.control() as control,
                control.post("http://localhost/credentials/revoke"),
            ):
                pass
            if tick % 3 == 0:
                await asyncio.to_thread(idp.stop)
                await asyncio.sleep(5)
                await asyncio.to_thread(idp.start)

    async def sampler(session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(min(WARM_UP_S, duration_s / 4))
        while time.monotonic() < stop_at - 1:
            series.append(_sample(proc, await metrics(session)))
            await asyncio.sleep(SAMPLE_EVERY_S)

    # The admin calls get their own session: on the load's, every freed connection goes back
    # to a load worker first, and a revocation waited out its timeout for one.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        aiohttp.ClientSession() as admin,
    ):
        await asyncio.gather(
            *(worker(session, n) for n in range(concurrency)), faults(admin), sampler(admin)
        )
        elapsed = time.monotonic() - started
    return {"statuses": statuses, "elapsed_s": elapsed, "series": series}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    environment_ok()
    with tempfile.TemporaryDirectory(prefix="credproxy-soak-") as tmp:
        work = Path(tmp)
        key_file = work / "api-key"
        key_file.write_text("soak-static-key-0123456789\n")
        plain = PlainUpstream()
        plain.start()
        try:
            with idp_and_upstream(work, ttls_s=(60, 5)) as (idp, upstream):
                proc = Credproxy(work, _config(idp, upstream, plain, key_file)).start()
                try:
                    result = asyncio.run(_load(proc, idp, args.duration, args.concurrency))
                finally:
                    code = proc.stop()
        finally:
            plain.stop()
    return _report(result, args, code)


def _mean(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(s[key] for s in samples) / len(samples) for key in samples[0]}


def _report(result: dict[str, object], args: argparse.Namespace, code: int) -> int:
    statuses: Counter[int] = result["statuses"]  # type: ignore[assignment]
    series: list[dict[str, float]] = result["series"]  # type: ignore[assignment]
    total = sum(statuses.values())
    unexpected = sum(n for status, n in statuses.items() if not 200 <= status < 300)
    # flat: the last third of the samples (after warm-up) averages no higher than the first
    # third; pools fill early and then hold, a leak keeps growing
    third = max(1, len(series) // 3)
    start, end = _mean(series[:third]), _mean(series[-third:])
    rss_change = (end["rss_mib"] - start["rss_mib"]) / start["rss_mib"]
    checks = {
        "0 unexpected answers": unexpected == 0,
        "RSS flat (±5 %)": abs(rss_change) <= 0.05,
        "open fds flat": end["fds"] <= start["fds"] * 1.05 + 1,
        "event-loop tasks flat": end["tasks"] <= start["tasks"] * 1.05 + 1,
        "clean exit (0)": code == 0,
    }
    elapsed = float(result["elapsed_s"])  # type: ignore[arg-type]
    lines = [
        f"# credproxy soak: {args.duration:.0f} s, {args.concurrency} concurrent, mixed schemes",
        "",
        "Routes: DPoP and bearer (oidc-provider tokens), static header, per-request JWT. Faults:",
        "admin revocation every 20 s; IdP stopped for 5 s every 60 s.",
        "",
        f"- requests: {total} ({total / elapsed:.0f}/s); statuses: {dict(sorted(statuses.items()))}",
        f"- {len(series)} samples every {SAMPLE_EVERY_S:g} s after a {WARM_UP_S:g} s warm-up; "
        "first third → last third (means):",
        f"- RSS MiB: {start['rss_mib']:.1f} → {end['rss_mib']:.1f} ({rss_change:+.1%})",
        f"- open fds: {start['fds']:.1f} → {end['fds']:.1f}",
        f"- event-loop tasks: {start['tasks']:.1f} → {end['tasks']:.1f}",
        "",
        *(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = ROOT / "bench" / "results" / "soak.md"
    out.write_text(text)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
