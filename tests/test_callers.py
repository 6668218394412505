"""Caller binding with real processes: another uid, another executable, another cgroup, and
connection churn. The tests run as root so a child can setuid (invariant 2)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest

from tests.counterparts import config

CLIENT = Path(__file__).with_name("caller_client.py")
NOBODY = 65534


def _shared_dir() -> Path:
    """A directory other uids can traverse, for the socket and the client script."""
    directory = Path(tempfile.mkdtemp(prefix="credproxy-callers-"))
    directory.chmod(0o755)
    shutil.copy(CLIENT, directory / CLIENT.name)
    (directory / CLIENT.name).chmod(0o644)
    return directory


def _run_client(
    interpreter: str,
    script: Path,
    *target: str,
    user: int | None = None,
    wrap: list[str] | None = None,
) -> dict[str, object]:
    command = [*(wrap or []), interpreter, str(script), *target]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=30, user=user, check=False
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


@pytest.fixture
def shared_dir():
    directory = _shared_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _listen_both(text: str, socket_path: Path) -> str:
    return (
        text.replace("listen: 127.0.0.1:0", f"listen: [127.0.0.1:0, 'unix:{socket_path}']")
        + "unix_socket_mode: '0666'\n"
    )


def test_other_uid_is_refused_on_tcp_and_unix_socket(idp, upstream, credproxy, shared_dir):
    """A process running as nobody is refused on both listeners; the same program as root succeeds."""
    assert os.getuid() == 0, "caller-binding tests need root to start a child as another uid"
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    assert system_python, "a system python3 that another uid can execute"
    socket_path = shared_dir / "app.sock"
    proc = credproxy(
        _listen_both(
            config(idp=idp, upstream=upstream.origin, audience=upstream.audience), socket_path
        )
    )
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    script = shared_dir / CLIENT.name
    for target in (
        ("tcp", host, port, "/payments/v1/charges"),
        ("unix", str(socket_path), "/payments/v1/charges"),
    ):
        assert _run_client(system_python, script, *target) == {"status": 200, "code": None}, target
        refused = _run_client(system_python, script, *target, user=NOBODY)
        assert refused == {"status": 403, "code": "caller_not_allowed"}, target
    denied = proc.audit("request.denied")
    assert [(d["reason"], d["caller"]["uid"], d["caller"]["transport"]) for d in denied] == [
        ("caller_not_allowed", NOBODY, "tcp"),
        ("caller_not_allowed", NOBODY, "unix"),
    ]


async def test_other_executable_with_same_uid_is_refused_by_exe_rule(
    idp, upstream, credproxy, shared_dir, client
):
    """With a rule naming the executable, a copy of the same interpreter at another path is refused."""
    exe = os.path.realpath(sys.executable)
    text = config(idp=idp, upstream=upstream.origin, audience=upstream.audience).replace(
        "test-suite: {uid: 0}", f'test-suite: {{uid: 0, exe: "{exe}"}}'
    )
    proc = credproxy(text)
    async with client.get(proc.url + "/payments/v1/charges") as response:
        assert response.status == 200  # this test process: the approved executable
    other = shared_dir / "other-python"
    shutil.copy2(exe, other)
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    result = await asyncio.to_thread(
        _run_client, str(other), shared_dir / CLIENT.name, "tcp", host, port, "/payments/v1/charges"
    )
    assert result == {"status": 403, "code": "caller_not_allowed"}


def test_cgroup_rule_admits_only_processes_in_that_cgroup(idp, upstream, credproxy, shared_dir):
    """A rule on a cgroup v2 path admits a process placed in that cgroup and refuses the same program outside it."""
    unified = (
        Path("/sys/fs/cgroup/unified")
        if Path("/sys/fs/cgroup/unified/cgroup.procs").exists()
        else Path("/sys/fs/cgroup")
    )
    name = f"credproxy-test-{secrets.token_hex(4)}"
    group = unified / name
    group.mkdir()  # fails loudly where the machine does not allow cgroups to be created
    try:
        text = config(idp=idp, upstream=upstream.origin, audience=upstream.audience).replace(
            "test-suite: {uid: 0}", f"test-suite: {{cgroup: /{name}}}"
        )
        proc = credproxy(text, expect_ready=True)
        host, port = proc.url.removeprefix("http://").rsplit(":", 1)
        target = ("tcp", host, port, "/payments/v1/charges")
        script = shared_dir / CLIENT.name
        inside = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"']
        assert _run_client(sys.executable, script, *target, wrap=inside) == {
            "status": 200,
            "code": None,
        }
        assert _run_client(sys.executable, script, *target) == {
            "status": 403,
            "code": "caller_not_allowed",
        }
    finally:
        group.rmdir()


async def test_policy_methods_and_path_globs(idp, upstream, credproxy, client):
    """Only the allowed methods and path globs pass; the rest is 403 path_not_allowed, checked on the normalized path."""
    text = config(idp=idp, upstream=upstream.origin, audience=upstream.audience).replace(
        "    allow: [{callers: [test-suite]}]",
        '    allow: [{callers: [test-suite], methods: [GET], paths: ["/v1/charges/**", "/v1/*/status"]}]',
    )
    proc = credproxy(text)
    cases = [
        ("GET", "/payments/v1/charges", 200, None),
        ("GET", "/payments/v1/charges/ch_1/refund", 200, None),
        ("GET", "/payments/v1/refunds/status", 200, None),
        ("GET", "/payments/v1/refunds/x/status", 403, "path_not_allowed"),
        ("GET", "/payments/v1/refunds", 403, "path_not_allowed"),
        ("POST", "/payments/v1/charges", 403, "path_not_allowed"),
        ("GET", "/payments/v1/charges/../refunds", 403, "path_not_allowed"),
    ]
    results = [await _raw(proc.url, method, path) for method, path, _, _ in cases]
    assert [(r[0], r[1]) for r in results] == [(s, c) for _, _, s, c in cases]


async def _raw(
    url: str, method: str, target: str, headers: str = ""
) -> tuple[int, str | None, dict[str, object]]:
    """Send an exact request line (clients normalize paths; attackers do not)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    host_header = "" if "Host:" in headers else f"Host: {host}:{port}\r\n"
    writer.write(
        f"{method} {target} HTTP/1.1\r\n{host_header}{headers}Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    document = json.loads(body) if body.startswith(b"{") else {}
    return status, document.get("code"), document


async def test_path_traversal_variants_are_refused_or_normalized(idp, upstream, credproxy):
    """Encoded separators, empty segments, backslashes and NUL are refused; '..' may not leave the route; the rest is normalized before forwarding."""
    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=upstream.audience))
    refused = {
        "/payments/../admin": "path_escapes_route",
        "/payments/%2e%2e/admin": "path_escapes_route",
        "/payments/%2E%2e/%2e%2e/etc/passwd": "path_escapes_route",
        "/payments/v1%2f..%2f..%2fadmin": "invalid_path",
        "/payments/v1%5cadmin": "invalid_path",
        "/payments//v1": "invalid_path",
        "/payments/v1\\admin": "invalid_path",
        "/payments/v1%00": "invalid_path",
        "/payments/%zz": "invalid_path",
    }
    for target, code in refused.items():
        status, got, _ = await _raw(proc.url, "GET", target)
        assert (status, got) == (400, code), target
    normalized = {
        "/payments/v1/./charges": "/v1/charges",
        "/payments/v1/x/../charges": "/v1/charges",
        "/payments/%7Euser/%41": "/~user/A",
        "/payments/caf%c3%a9": "/caf%C3%A9",
    }
    for target, forwarded in normalized.items():
        status, _, body = await _raw(proc.url, "GET", target)
        assert status == 200 and body["path"] == forwarded, target


async def test_guards_against_rebinding_browsers_tunnels_and_open_proxying(
    idp, upstream, credproxy
):
    """Foreign Host, browser Origin / Sec-Fetch-Site, CONNECT and forward-proxy to unnamed hosts are refused; a named host works."""
    extra = f"""\
  - name: by-host
    host: payments.internal
    upstream: {upstream.origin}
    credential: {{issuer: test-idp, audience: "{upstream.audience}", scope: payments.read}}
    allow: [{{callers: [test-suite]}}]
"""
    proc = credproxy(
        config(idp=idp, upstream=upstream.origin, audience=upstream.audience, extra_route=extra)
    )
    vectors = [
        ("GET", "/payments/v1", "Host: evil.example\r\n", 403, "host_not_allowed"),
        ("GET", "/payments/v1", "Host: evil.example:15001\r\n", 403, "host_not_allowed"),
        ("GET", "/payments/v1", "Origin: https://evil.example\r\n", 403, "browser_request_refused"),
        ("GET", "/payments/v1", "Origin: null\r\n", 403, "browser_request_refused"),
        ("GET", "/payments/v1", "Sec-Fetch-Site: cross-site\r\n", 403, "browser_request_refused"),
        ("CONNECT", "payments.internal:443", "", 405, "method_not_allowed"),
        (
            "GET",
            "http://unlisted.example/payments/v1",
            "Host: unlisted.example\r\n",
            403,
            "destination_not_allowed",
        ),
        (
            "GET",
            "http://169.254.169.254/latest/meta-data/",
            "Host: 169.254.169.254\r\n",
            403,
            "destination_not_allowed",
        ),
        (
            "GET",
            "http://127.0.0.1/payments/v1",
            "Host: 127.0.0.1\r\n",
            403,
            "destination_not_allowed",
        ),
    ]
    for method, target, headers, status, code in vectors:
        assert (await _raw(proc.url, method, target, headers))[:2] == (status, code), (
            method,
            target,
            headers,
        )
    status, _, body = await _raw(
        proc.url, "GET", "http://payments.internal/v1/x?q=1", "Host: payments.internal\r\n"
    )
    assert status == 200 and body["path"] == "/v1/x" and body["authorization_schemes"] == ["DPoP"]
    status, _, _ = await _raw(proc.url, "GET", "/v1/y", "Host: payments.internal\r\n")
    assert status == 200
    async with aiohttp.ClientSession() as client:
        async with client.get(proc.admin_url + "/metrics") as response:
            metrics = await response.text()
    assert 'credproxy_denied_total{reason="host_not_allowed"} 2.0' in metrics
    assert 'credproxy_denied_total{reason="destination_not_allowed"} 3.0' in metrics


async def test_caller_lookup_survives_connection_churn_without_leaks(idp, upstream, credproxy):
    """1000 short connections later, credproxy holds no extra fds and its memory is flat."""
    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=upstream.audience))

    def fds() -> int:
        return len(os.listdir(f"/proc/{proc.process.pid}/fd"))

    async def one() -> int:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as client:
            async with client.get(proc.url + "/payments/v1/charges") as response:
                await response.read()
                return response.status

    for _ in range(3):  # grow the upstream keep-alive pool to its working size first
        await asyncio.gather(*(one() for _ in range(50)))
    fds_before, rss_before = fds(), proc.rss_bytes()
    statuses = []
    for _ in range(20):
        statuses += await asyncio.gather(*(one() for _ in range(50)))
    assert statuses == [200] * 1000
    await asyncio.sleep(0.5)
    assert fds() <= fds_before + 5, (fds_before, fds())
    assert proc.rss_bytes() - rss_before < 8 * 1024 * 1024, (rss_before, proc.rss_bytes())
    async with aiohttp.ClientSession() as admin:
        async with admin.get(proc.admin_url + "/metrics") as response:
            assert "credproxy_app_connections 0.0" in await response.text()  # callers forgotten


@pytest.mark.parametrize("family_host", ["127.0.0.1", "::1"])
def test_sock_diag_and_proc_net_tcp_agree(family_host):
    """The netlink lookup and the /proc/net/tcp{,6} fallback find the same owner uid and inode."""
    import socket

    from proxy import callers

    family = socket.AF_INET6 if ":" in family_host else socket.AF_INET
    with socket.socket(family) as server:
        server.bind((family_host, 0))
        server.listen()
        with socket.create_connection(server.getsockname()[:2]) as client:
            conn, _ = server.accept()
            with conn:
                wanted = (
                    callers._address_key(*conn.getpeername()[:2]),
                    callers._address_key(*conn.getsockname()[:2]),
                )
                table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
                from_netlink = callers._sock_diag(*wanted)
                assert from_netlink == callers._find_socket(table, wanted)
                assert from_netlink is not None and from_netlink[0] == os.getuid()
                caller = callers.from_socket(conn)
                assert caller.pid == os.getpid()  # the client socket is ours
                assert client.fileno() > 0


def test_caller_executable_and_its_hash_come_from_proc():
    """exe is the running binary's path and exe_sha256 the hash of what actually runs."""
    import hashlib

    from proxy.callers import Caller

    caller = Caller("unix", os.getuid(), pid=os.getpid())
    exe = os.path.realpath(sys.executable)
    assert caller.exe == exe
    with open(exe, "rb") as binary:
        assert caller.exe_sha256 == hashlib.file_digest(binary, "sha256").hexdigest()
    assert Caller("unix", 0, pid=0).exe is None  # pid unknown (other PID namespace): fail closed
