"""Caller binding with real processes: another uid, another executable, another cgroup, and
connection churn. The tests run as root so a child can setuid (invariant 2)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest

from tests.counterparts import LEDGER, attack, attacker_command, config, wait_until
from tests.raw_upstream import RawUpstream

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
        ("GET", "/payments/v1/charges/../refunds", 400, "path_not_canonical"),
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


async def test_path_traversal_variants_are_refused_and_nothing_is_rewritten(
    idp, upstream, credproxy
):
    """Encoded separators, empty segments, backslashes and NUL are refused; '..' may not leave the route; what normalizing would change is refused too; escapes differing in hex case pass as sent."""
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
    for target in ("/payments/v1/./charges", "/payments/v1/x/../charges", "/payments/%7Euser/%41"):
        status, got, _ = await _raw(proc.url, "GET", target)
        assert (status, got) == (400, "path_not_canonical"), target
    as_sent = {"/payments/caf%c3%a9": "/caf%c3%a9", "/payments/v1/charges": "/v1/charges"}
    for target, forwarded in as_sent.items():
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
    for _ in range(100):  # closes finish asynchronously: wait for them, a leak stays
        if fds() <= fds_before + 5:
            break
        await asyncio.sleep(0.1)
    assert fds() <= fds_before + 5, (fds_before, fds())
    assert proc.rss_bytes() - rss_before < 8 * 1024 * 1024, (rss_before, proc.rss_bytes())
    async with aiohttp.ClientSession() as admin:
        async with admin.get(proc.admin_url + "/metrics") as response:
            assert "credproxy_app_connections 0.0" in await response.text()  # callers forgotten


@pytest.mark.parametrize("family_host", ["127.0.0.1", "::1"])
def test_sock_diag_and_proc_net_tcp_agree(family_host):
    """The netlink lookup and the /proc/net/tcp{,6} fallback find the same owner uid and inode."""
    import socket

    from proxy.access import callers, kernel

    family = socket.AF_INET6 if ":" in family_host else socket.AF_INET
    with socket.socket(family) as server:
        server.bind((family_host, 0))
        server.listen()
        with socket.create_connection(server.getsockname()[:2]) as client:
            conn, _ = server.accept()
            with conn:
                wanted = (
                    kernel.address_key(*conn.getpeername()[:2]),
                    kernel.address_key(*conn.getsockname()[:2]),
                )
                table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
                from_netlink = kernel.sock_diag(*wanted)
                assert from_netlink == kernel.find_socket(table, wanted)
                assert from_netlink is not None and from_netlink[0] == os.getuid()
                caller = callers.from_socket(conn)
                assert caller.pid == os.getpid()  # the client socket is ours
                assert client.fileno() > 0


def test_caller_executable_and_its_hash_come_from_proc():
    """exe is the running binary's path and exe_sha256 the hash of what actually runs."""
    import hashlib

    from proxy.access.callers import Caller, from_socket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        caller = from_socket(ours)
        exe = os.path.realpath(sys.executable)
        assert caller.exe == exe
        with open(exe, "rb") as binary:
            assert caller.exe_sha256 == hashlib.file_digest(binary, "sha256").hexdigest()
    # No socket to find holders of (other PID namespace, closed): fail closed.
    assert Caller("unix", 0, pid=os.getpid()).exe is None


# -- attacks on the binding (issue 16) ------------------------------------------------------------

SYSTEM_PYTHON = os.path.realpath(
    shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
)


def _static_config(origin: str, workdir: Path, caller: str = "{uid: 0}", top: str = ""):
    key = workdir / "api-key"
    key.write_text(STATIC_KEY)
    LEDGER.secret(STATIC_KEY)
    return f"""\
listen: 127.0.0.1:0
admin: 127.0.0.1:0
{top}
callers:
  approved: {caller}
issuers:
  key: {{type: static, secret_file: {key}}}
routes:
  - name: api
    path_prefix: /api/
    upstream: {origin}
    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [approved]}}]
audit: {{file: "{{audit}}"}}
log: {{format: json}}
"""


STATIC_KEY = "root-only-static-key-" + secrets.token_hex(12)


@pytest.fixture
def recorder():
    upstream = RawUpstream().start()
    yield upstream
    upstream.stop()


def test_a_peer_that_closed_first_is_unknown_never_uid_0(monkeypatch):
    """The kernel reports a socket whose owner closed it as uid 0, inode 0 (and a half-closed
    one as FIN_WAIT): neither is an identified caller, by netlink or by the /proc fallback."""
    from proxy.access import callers, kernel

    def accepted(close_how: str):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
        server.close()
        if close_how == "close":
            client.close()
        else:
            client.shutdown(socket.SHUT_WR)
        return ours, client

    for fallback in (False, True):
        if fallback:  # netlink unavailable: the /proc tables must apply the same rules
            monkeypatch.setattr(kernel, "_diag", lambda _: (_ for _ in ()).throw(OSError()))
        for how in ("close", "shutdown"):
            ours, client = accepted(how)
            with ours, client:
                assert callers.from_socket(ours) is callers.UNKNOWN, (fallback, how)
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        with server, socket.create_connection(server.getsockname()) as client:
            ours, _ = server.accept()
            with ours:
                caller = callers.from_socket(ours)
                assert caller.identified and caller.uid == os.getuid(), fallback


def test_a_kernel_answer_for_another_4_tuple_is_unknown(monkeypatch):
    """A sock_diag reply that names another socket than the one asked for is not trusted."""
    from proxy.access import callers, kernel

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with server, socket.create_connection(server.getsockname()):
        ours, _ = server.accept()
        with ours:
            real = kernel._diag

            def other_port(request: bytes):  # fault injector: the reply for sport + 1
                payload = real(request)
                assert payload is not None
                sport = struct.unpack_from("=H", payload, 4)[0]
                return payload[:4] + struct.pack("=H", (sport + 1) & 0xFFFF) + payload[6:]

            monkeypatch.setattr(kernel, "_diag", other_port)
            assert callers.from_socket(ours) is callers.UNKNOWN


@pytest.mark.parametrize("workers", [1, 2])
def test_blind_posts_from_another_uid_closed_before_the_answer_never_reach_upstream(
    workers, credproxy, recorder, tmp_path
):
    """An unprivileged user sends whole POSTs and closes at once, hoping to be looked up as the
    uid 0 the kernel reports for closed sockets: every connection is refused at accept, audited,
    and the root-only static key never leaves the sidecar for them."""
    proc = credproxy(_static_config(recorder.origin, tmp_path), args=("--workers", str(workers)))
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    assert attack("blind", host, port, "50", "/api/charge", user=NOBODY) == {"sent": 50}

    def refused_at_accept() -> int:
        return sum(e.get("at") == "accept" for e in proc.audit("request.denied"))

    wait_until(lambda: refused_at_accept() >= 50, what="50 refusals at accept")
    denied = [e for e in proc.audit("request.denied") if e.get("at") == "accept"]
    assert {e["reason"] for e in denied} <= {"caller_not_identified", "caller_not_allowed"}
    assert all(e["caller"].get("uid") in (None, NOBODY) for e in denied)
    assert recorder.requests == []
    # the route itself works for the approved caller
    assert attack("get", f"{host}:{port}", "/api/ok") == {"status": 200, "code": None}
    assert [r.target for r in recorder.requests] == ["/ok"]


def test_evidence_fails_a_use_whose_caller_was_not_positively_identified(tmp_path):
    """An audit log in which a use was recorded for uid 0 without the kernel's positive answer
    (as before the fix) fails the policy check of ``credproxy evidence``."""
    from proxy.config.loader import parse
    from proxy.governance import evidence

    config_text = _static_config("http://127.0.0.1:9", tmp_path).replace('"{audit}"', "'-'")
    use = {
        "event": "credential.used", "ts": 1.0, "route": "api", "issuer": "key",
        "fingerprint": "abc", "method": "POST", "path": "/charge", "count": 1,
    }  # fmt: skip
    lines = [
        json.dumps({**use, "caller": {"transport": "tcp", "uid": 0}}),  # no positive answer
        json.dumps({**use, "caller": {"transport": "tcp", "uid": 0, "identified": True}}),
    ]
    report = evidence.build(lines, config=parse(config_text))
    assert [u["caller"].get("identified") for u in report.outside_policy] == [None]
    assert [status for status, *_ in report.checks(2.0)][-1] == "FAIL"


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_connect_fork_exec_the_approved_binary_and_send_from_the_child_is_refused(
    transport, credproxy, recorder, tmp_path
):
    """connect(); fork(); the parent execs the approved binary keeping the socket, the child
    sends: every holder of the socket is checked, so the child's executable refuses it."""
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    socket_path = tmp_path / "app.sock"
    text = _static_config(recorder.origin, tmp_path, caller=f'{{uid: 0, exe: "{sleep}"}}')
    proc = credproxy(
        text.replace("listen: 127.0.0.1:0", f"listen: ['127.0.0.1:0', 'unix:{socket_path}']")
    )
    target = proc.url.removeprefix("http://") if transport == "tcp" else str(socket_path)
    answer = attack("fork-send", target, "/api/charge", sleep)
    assert answer["status"] in (403, None), answer  # refused at accept: 403, or closed
    assert recorder.requests == []


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_connection_handed_to_another_program_after_accept_is_refused(
    transport, credproxy, recorder, tmp_path
):
    """The approved program makes one request, then passes its open connection to a child
    running another executable: the holders are scanned again per request, so the child's
    request is refused while the first was forwarded."""
    socket_path = tmp_path / "app.sock"
    text = _static_config(recorder.origin, tmp_path, caller=f'{{uid: 0, exe: "{SYSTEM_PYTHON}"}}')
    proc = credproxy(
        text.replace("listen: 127.0.0.1:0", f"listen: ['127.0.0.1:0', 'unix:{socket_path}']")
    )
    target = proc.url.removeprefix("http://") if transport == "tcp" else str(socket_path)
    other = os.path.realpath(sys.executable)
    assert other != SYSTEM_PYTHON, "the test needs a second interpreter at another path"
    answer = attack("handoff", target, "/api/first", other)
    assert answer == {
        "first": {"status": 200},
        "second": {"status": 403, "code": "caller_not_allowed"},
    }
    assert [r.target for r in recorder.requests] == ["/first"]


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: 198.18.0.1 here, .2 there."""
    name = f"cpt{secrets.token_hex(3)}"
    here, there = f"cph{name[3:]}", f"cpn{name[3:]}"
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
        ["ip", "link", "set", there, "netns", name],
        ["ip", "addr", "add", "198.18.0.1/30", "dev", here],
        ["ip", "link", "set", here, "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", "198.18.0.2/30", "dev", there],
        ["ip", "netns", "exec", name, "ip", "link", "set", there, "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_any_local_never_matches_a_peer_from_another_network_namespace(
    netns, credproxy, recorder, tmp_path
):
    """On a listener allowed to face the network, a peer from another network namespace is not
    a local process the kernel can name: any_local refuses it at accept; local callers pass."""
    text = _static_config(recorder.origin, tmp_path, caller="{any_local: true}")
    text = text.replace(
        "listen: 127.0.0.1:0", "listen: 0.0.0.0:0\nallow_non_loopback: ['0.0.0.0:0']"
    )
    proc = credproxy(text)
    port = proc.url.rsplit(":", 1)[1]
    remote = attack(
        "blind", "198.18.0.1", port, "1", "/api/remote", wrap=["ip", "netns", "exec", netns]
    )
    assert remote == {"sent": 1}
    wait_until(lambda: proc.audit("request.denied"), what="the refusal")
    [denied] = proc.audit("request.denied")
    assert (denied["reason"], denied["at"]) == ("caller_not_identified", "accept")
    local = attack("get", f"127.0.0.1:{port}", "/api/local", user=NOBODY)
    assert local == {"status": 200, "code": None}
    assert [r.target for r in recorder.requests] == ["/local"]


def test_non_loopback_permission_is_per_listener():
    """allow_non_loopback naming the admin address does not let an app listener face the network."""
    from proxy.config.loader import parse
    from proxy.errors import ConfigError

    base = "issuers: {k: {type: static, secret_file: /k}}\nroutes: [{name: r, path_prefix: /, upstream: 'https://a.example', credential: {issuer: k, inject: header, header: X-K}}]\n"
    parse(
        base
        + "listen: 0.0.0.0:1\nadmin: 0.0.0.0:2\nallow_non_loopback: ['0.0.0.0:1', '0.0.0.0:2']\n"
    )
    with pytest.raises(ConfigError) as refused:
        parse(base + "listen: 0.0.0.0:1\nadmin: 0.0.0.0:2\nallow_non_loopback: ['0.0.0.0:2']\n")
    assert refused.value.errors == [
        "listen[0]: '0.0.0.0:1' is not a loopback address; credproxy serves only the local "
        "workload unless allow_non_loopback lists it: allow_non_loopback: ['0.0.0.0:1']"
    ]


def test_localhost_of_the_other_family_is_bound_too(credproxy, recorder, tmp_path):
    """A listener on 127.0.0.1 also holds [::1] on the same port, so 'localhost' reaches the
    sidecar whichever family a client resolves it to, and no one else can take it."""
    proc = credproxy(_static_config(recorder.origin, tmp_path))
    port = proc.url.rsplit(":", 1)[1]
    assert attack("get", f"[::1]:{port}", "/api/v6") == {"status": 200, "code": None}
    assert recorder.requests[0].values("X-Api-Key") == [STATIC_KEY]


def test_a_squatter_on_the_other_loopback_family_stops_the_start(credproxy, recorder, tmp_path):
    """When another user already holds [::1]:PORT, credproxy refuses to start on
    127.0.0.1:PORT and says who would get the requests, instead of serving half of localhost."""
    squatter = subprocess.Popen(
        attacker_command("squat", "::1"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, user=NOBODY,
    )  # fmt: skip
    try:
        assert squatter.stdout is not None
        port = json.loads(squatter.stdout.readline())["port"]
        text = _static_config(recorder.origin, tmp_path).replace(
            "127.0.0.1:0\nadmin", f"127.0.0.1:{port}\nadmin"
        )
        proc = credproxy(text, expect_ready=False)
        assert proc.process is not None and proc.process.wait(timeout=20) == 1
        assert f"cannot listen on [::1]:{port} beside 127.0.0.1:{port}" in proc.log()
        assert "bind_both_loopbacks" in proc.log()
    finally:
        squatter.kill()
        squatter.communicate()


def test_a_refusal_at_accept_is_readable_by_a_client_that_writes_late(
    credproxy, recorder, tmp_path
):
    """The refusal at accept is followed by a FIN, not a reset: a client of another uid that
    sends its request after the refusal still reads the 403 problem."""
    proc = credproxy(_static_config(recorder.origin, tmp_path))
    target = proc.url.removeprefix("http://")
    for _ in range(5):
        answer = attack("late", target, "/api/x", user=NOBODY)
        assert answer == {"status": 403, "code": "caller_not_allowed"}, answer


def test_a_dual_stack_client_talking_ipv4_is_identified(credproxy, recorder, tmp_path):
    """An AF_INET6 socket connected to ::ffff:127.0.0.1 (Java's default) is the same kernel
    socket owner as any other: the approved uid is served, not refused as unknown."""
    proc = credproxy(_static_config(recorder.origin, tmp_path))
    port = proc.url.rsplit(":", 1)[1]
    assert attack("get", f"[::ffff:127.0.0.1]:{port}", "/api/mapped") == {
        "status": 200,
        "code": None,
    }
    assert attack("get", f"[::ffff:127.0.0.1]:{port}", "/api/x", user=NOBODY) == {
        "status": 403,
        "code": "caller_not_allowed",
    }


def test_in_a_user_namespace_the_overflow_uid_identifies_no_one(credproxy, recorder, tmp_path):
    """Run in a user namespace mapping only root, the sidecar sees every other uid as the
    overflow uid: a rule naming it must not admit uid 1234 (or anyone) through it."""
    proc = credproxy(
        _static_config(recorder.origin, tmp_path, caller="{uid: 65534}"),
        wrap=("unshare", "--user", "--map-root-user", "--"),
    )
    target = proc.url.removeprefix("http://")
    for uid in (1234, NOBODY):
        answer = attack("get", target, "/api/x", user=uid)
        assert answer == {"status": 403, "code": "caller_not_identified"}, (uid, answer)
    assert recorder.requests == []


def test_the_holders_scan_reads_only_the_socket_owners_processes(monkeypatch):
    """Another uid's processes, however many descriptors they hold, are never read by the scan
    (no one else can make it slow), and a scan over budget is unknown rather than long."""
    from proxy.access import callers, kernel

    other = subprocess.Popen(["sleep", "30"], user=NOBODY)
    read: list[str] = []
    real_readlink = kernel.readlink

    def counted_readlink(path: str) -> str | None:
        read.append(path)
        return real_readlink(path)

    monkeypatch.setattr(kernel, "readlink", counted_readlink)
    try:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            caller = callers.from_socket(ours)
            assert caller.holders == (os.getpid(),)
            assert not [p for p in read if p.startswith(f"/proc/{other.pid}/")]
            monkeypatch.setattr(kernel, "SCAN_MAX_FDS", 1)
            assert callers.from_socket(ours).holders is None
    finally:
        other.kill()
        other.wait()
