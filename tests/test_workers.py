"""``credproxy run --workers N``: workers share the TCP port (SO_REUSEPORT) and Unix sockets,
bind tokens to one DPoP key, aggregate their metrics on worker 0's admin listener, restart when
one dies, and stop together on SIGTERM."""

from __future__ import annotations

import asyncio
import glob
import os
import re
import signal
import stat
import tempfile
import time

import aiohttp

from proxy.lifecycle.workers import RestartBackoff
from tests.counterparts import config, wait_until


def _workers(proc) -> list[int]:
    children = f"/proc/{proc.process.pid}/task/{proc.process.pid}/children"
    with open(children) as listing:
        return [int(pid) for pid in listing.read().split()]


def _restarted(proc, killed: int) -> bool:
    """Two workers again, ``killed`` not among them: one look at the children, since a killed
    worker is still listed until it is reaped (two looks can see it in neither)."""
    workers = _workers(proc)
    return len(workers) == 2 and killed not in workers


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def test_two_workers_share_the_listeners_and_one_dpop_key(idp, upstream, credproxy, tmp_path):
    """Both workers serve requests on the one TCP port and the Unix socket; the resource server
    sees a single DPoP key; /metrics counts every worker's requests; the IdP sees one token
    request: worker 0 fetches, the other takes the token from it."""
    socket_path = tmp_path / "app.sock"
    text = config(idp=idp, upstream=upstream.origin, audience=upstream.audience).replace(
        "listen: 127.0.0.1:0", f"listen: [127.0.0.1:0, 'unix:{socket_path}']"
    )
    before = len([r for r in idp.records() if r.get("access_token")])
    proc = credproxy(text, args=("--workers", "2"))
    workers = _workers(proc)
    assert len(workers) == 2
    ticks = {pid: _cpu_ticks(pid) for pid in workers}
    thumbprints: set[str] = set()
    async with aiohttp.ClientSession() as client:
        for _ in range(150):  # a fresh connection each: the kernel spreads them
            async with client.get(
                proc.url + "/payments/api/x", headers={"Connection": "close"}
            ) as response:
                assert response.status == 200
                thumbprints.add((await response.json())["jkt"])
    unix = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=unix) as client:
        for _ in range(10):
            async with client.get("http://localhost/payments/api/x") as response:
                assert response.status == 200
                thumbprints.add((await response.json())["jkt"])
    assert all(_cpu_ticks(pid) > ticks[pid] for pid in workers)  # both did work
    assert len(thumbprints) == 1  # every worker's tokens are bound to the one DPoP key
    # worker 0 counts its own requests live and the other's as last saved (every 5 s)
    pattern = r'credproxy_requests_total\{code="200",outcome="proxied",route="payments"\} (\S+)'
    served: list[float] = []
    async with aiohttp.ClientSession() as client:
        for _ in range(40):  # bounds the wait for the next save; asserts nothing about time
            async with client.get(proc.admin_url + "/metrics") as response:
                served = [float(n) for n in re.findall(pattern, await response.text())]
            if sum(served) >= 160:
                break
            await asyncio.sleep(0.25)
    assert served == [160]
    tokens = [r for r in idp.records() if r.get("access_token")][before:]
    assert len(tokens) == 1  # the leader's, shared with the other worker
    # invariant 1: the socket carrying token values is the sidecar user's alone
    [leader_socket] = glob.glob(f"{tempfile.gettempdir()}/credproxy-leader-*/tokens.sock")
    assert stat.S_IMODE(os.stat(os.path.dirname(leader_socket)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(leader_socket).st_mode) == 0o600


async def test_a_dead_worker_is_replaced_and_sigterm_stops_all(idp, upstream, credproxy):
    """A worker killed with SIGKILL is restarted and the service goes on; SIGTERM to the
    supervisor drains and stops every worker, exit 0."""
    proc = credproxy(
        config(idp=idp, upstream=upstream.origin, audience=upstream.audience),
        args=("--workers", "2"),
    )
    [first, second] = _workers(proc)
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: _restarted(proc, second), what="restart")
    assert "exited with -9; restarting it" in proc.log()
    async with aiohttp.ClientSession() as client:
        for _ in range(20):
            async with client.get(
                proc.url + "/payments/api/x", headers={"Connection": "close"}
            ) as response:
                assert response.status == 200
    workers = _workers(proc)
    assert proc.stop() == 0
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]


def test_a_worker_killed_again_and_again_is_restarted_ever_later(idp, upstream, credproxy):
    """A worker SIGKILLed four times in a row is restarted four times, each restart logged with
    its count and a jittered delay that doubles (0.25–0.5 s, 0.5–1, 1–2, 2–4), not at once."""
    proc = credproxy(
        config(idp=idp, upstream=upstream.origin, audience=upstream.audience),
        args=("--workers", "2"),
    )
    leader, victim = _workers(proc)  # forked in index order: worker 0 leads
    for _ in range(4):
        os.kill(victim, signal.SIGKILL)
        killed = victim
        wait_until(lambda: _restarted(proc, killed), timeout_s=15, what="the restart")  # noqa: B023
        [victim] = [pid for pid in _workers(proc) if pid != leader]
    restarts = re.findall(
        r"worker 1 \(pid \d+\) exited with -9; restarting it in ([0-9.]+)s \(crash (\d+) in a row\)",
        proc.log(),
    )
    assert [int(n) for _, n in restarts] == [1, 2, 3, 4]
    for delay_s, n in restarts:
        ceiling_s = 0.5 * 2 ** (int(n) - 1)
        assert ceiling_s / 2 - 0.01 <= float(delay_s) <= ceiling_s + 0.01, restarts
    assert leader in _workers(proc)  # the other worker was never touched


def test_restart_backoff_doubles_caps_and_starts_over_after_a_healthy_life():
    """Crashes in a row double the jittered delay up to the cap; a worker that lived long enough
    is back to the first delay; each worker index counts its own crashes."""
    backoff = RestartBackoff(base_s=1.0, max_s=8.0, healthy_after_s=60.0)
    delays = [backoff.next(0, lived_s=0.1) for _ in range(6)]
    assert [n for n, _ in delays] == [1, 2, 3, 4, 5, 6]
    for (_, delay_s), ceiling_s in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling_s / 2 <= delay_s <= ceiling_s
    assert backoff.next(1, lived_s=0.1)[0] == 1  # another worker's own count
    crashes, delay_s = backoff.next(0, lived_s=60.0)
    assert crashes == 1 and 0.5 <= delay_s <= 1.0


async def test_workers_refresh_short_tokens_through_the_leader(idp, upstream, credproxy):
    """5 s tokens under 12 s of traffic spread over two workers: no request fails, and the IdP
    sees about one token request per refresh window, not one per worker."""
    before = len([r for r in idp.records() if r.get("access_token")])
    proc = credproxy(
        config(idp=idp, upstream=upstream.origin, audience=upstream.short_audience),
        args=("--workers", "2"),
    )
    deadline = time.monotonic() + 12
    statuses: list[int] = []
    refusals: list[str] = []  # the problem details: why a request failed
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            async with client.get(
                proc.url + "/payments/api/x", headers={"Connection": "close"}
            ) as response:
                statuses.append(response.status)
                if response.status != 200:
                    refusals.append(await response.text())
            await asyncio.sleep(0.05)
    assert set(statuses) == {200} and len(statuses) > 50, refusals
    tokens = len([r for r in idp.records() if r.get("access_token")]) - before
    assert 3 <= tokens <= 5  # a refresh every ~4 s (1 s ahead of expiry): one source, not two
