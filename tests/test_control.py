"""The control plane and the telemetry listener under attack (issue 16, finding 2, invariant 10):
another uid on the control socket or loopback port, DNS rebinding, half-sent heads; and the CLI
that talks to the control socket."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import loader
from proxy.errors import ConfigError
from tests.counterparts import NOBODY, ROOT, attacker_command, config

ATTACK = """\
import http.client, json, socket, sys
kind, where, method, path = sys.argv[1:5]
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(where)
if kind == "unix":
    connection = Unix("localhost", timeout=20)
else:
    host, port = where.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
connection.request(method, path)
response = connection.getresponse()
body = json.loads(response.read() or b"null")
print(json.dumps({"status": response.status, "code": body.get("code") if body else None}))
"""


def _attack(kind: str, where: str, method: str, path: str, *, as_nobody: bool) -> dict[str, object]:
    """One request from a separate process, as nobody (setpriv) or as root."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python, "a system python3 that another uid can execute"
    wrap = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    result = subprocess.run(
        [*(wrap if as_nobody else []), python, "-c", ATTACK, kind, where, method, path],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other uids can traverse, so that only credproxy's own check stops them."""
    directory = Path(tempfile.mkdtemp(prefix="credproxy-control-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _opaque(idp, upstream, *, top: str = "") -> str:
    return config(
        idp=idp, upstream=upstream.origin, audience=upstream.opaque_audience, inject="bearer",
        top=top,
    )  # fmt: skip


def _control_address(proc) -> str:
    match = re.search(r"; control (\S+?);", proc.log())
    assert match, proc.log()
    return match[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT,
        timeout=60, check=False,
    )  # fmt: skip


def _revocations_since(idp, before: int) -> list[dict[str, object]]:
    return [r for r in idp.records()[before:] if "revocation" in r or "access_token" in r]


def test_other_uid_on_the_control_socket_is_refused_and_nothing_is_revoked(
    idp, upstream, credproxy, shared_dir
):
    """Nobody, though the socket file lets it connect (0666), is refused 403 on inventory and revoke (SO_PEERCRED, default: the sidecar's uid only), audited, and nothing reaches the IdP; root succeeds."""
    socket_path = shared_dir / "control.sock"
    proc = credproxy(
        _opaque(
            idp, upstream,
            top=f'control: {{listen: "unix:{socket_path}", socket_mode: "0666"}}',
        )
    )  # fmt: skip
    before = len(idp.records())
    for method, path in (("POST", "/credentials/revoke"), ("GET", "/credentials")):
        refused = _attack("unix", str(socket_path), method, path, as_nobody=True)
        assert refused == {"status": 403, "code": "control_caller_not_allowed"}, path
    assert _revocations_since(idp, before) == []
    assert proc.audit("credential.revoked") == []
    denied = proc.audit("request.denied")
    assert [(d["reason"], d["listener"], d["caller"]["uid"], d["caller"]["transport"])
            for d in denied] == [("control_caller_not_allowed", "control", NOBODY, "unix")] * 2  # fmt: skip
    assert _attack("unix", str(socket_path), "GET", "/credentials", as_nobody=False) == {
        "status": 200, "code": None,
    }  # fmt: skip


def test_loopback_control_answers_only_the_callers_control_allow_names(idp, upstream, credproxy):
    """On a loopback control port (sock_diag), a caller named in control.allow (here nobody) is served and anyone else, root included, is refused without anything being revoked."""
    text = _opaque(idp, upstream, top="control: {listen: 127.0.0.1:0, allow: [ops]}").replace(
        "callers:\n", f"callers:\n  ops: {{uid: {NOBODY}}}\n"
    )
    proc = credproxy(text)
    where = _control_address(proc)
    before = len(idp.records())
    refused = _attack("tcp", where, "POST", "/credentials/revoke", as_nobody=False)
    assert refused == {"status": 403, "code": "control_caller_not_allowed"}
    assert _revocations_since(idp, before) == []
    assert proc.audit("credential.revoked") == []
    allowed = _attack("tcp", where, "GET", "/credentials", as_nobody=True)
    assert allowed == {"status": 200, "code": None}
    [denied] = proc.audit("request.denied")
    assert (denied["caller"]["uid"], denied["caller"]["transport"]) == (0, "tcp")


async def test_dns_rebinding_host_is_refused_on_telemetry_and_control(
    idp, upstream, credproxy, client
):
    """A Host that is a DNS name (a rebinding page's) is refused 403 on the admin and control listeners; IP literals, localhost and local_names are served."""
    proc = credproxy(_opaque(idp, upstream, top="local_names: [sidecar.local]"))
    port = proc.admin_url.rsplit(":", 1)[1]
    evil = {"Host": f"attacker.example:{port}"}
    for path in ("/metrics", "/readyz", "/healthz"):
        async with client.get(proc.admin_url + path, headers=evil) as response:
            assert response.status == 403
            assert (await response.json())["code"] == "host_not_allowed"
    for host in (f"127.0.0.1:{port}", "localhost", "sidecar.local", "[::1]:80", "10.1.2.3"):
        async with client.get(proc.admin_url + "/healthz", headers={"Host": host}) as response:
            assert response.status == 200, host
    async with proc.control() as control:
        async with control.get("http://attacker.example/credentials") as response:
            assert response.status == 403
            assert (await response.json())["code"] == "host_not_allowed"
        async with control.post("http://attacker.example/credentials/revoke") as response:
            assert response.status == 403
        async with control.get("http://localhost/credentials") as response:
            assert response.status == 200
    assert proc.audit("credential.revoked") == []
    denied = proc.audit("request.denied")
    assert {(d["listener"], d["reason"]) for d in denied} == {
        ("admin", "host_not_allowed"), ("control", "host_not_allowed"),
    }  # fmt: skip


async def test_half_sent_heads_are_closed_on_both_listeners(idp, upstream, credproxy, client):
    """Connections that send half a head, trickle one, or send nothing are closed by the head bound (control.head_timeout_s) on the admin and control listeners, and both keep serving."""
    proc = credproxy(
        _opaque(
            idp, upstream, top=f'control: {{listen: "unix:{_short_socket()}", head_timeout_s: 1}}'
        )
    )
    host, port = proc.admin_url.removeprefix("http://").rsplit(":", 1)
    control_path = _control_address(proc).removeprefix("unix:")
    opened = []
    for i in range(10):
        if i % 2:
            opened.append(await asyncio.open_unix_connection(control_path))
        else:
            opened.append(await asyncio.open_connection(host, int(port)))
    half = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
    for i, (_, writer) in enumerate(opened):
        if i < 8:  # the last two send nothing at all
            writer.write(half)
    trickled = await asyncio.open_connection(host, int(port))

    async def trickle() -> None:
        reader, writer = trickled
        writer.write(half)
        while not reader.at_eof():
            writer.write(b"a")  # a byte at a time never completes the head
            try:
                await asyncio.wait_for(reader.read(1), 0.2)
            except TimeoutError:
                pass

    await asyncio.wait_for(trickle(), 60)
    for reader, writer in opened:
        assert await asyncio.wait_for(reader.read(), 60) == b""  # closed, no answer
        writer.close()
    trickled[1].close()
    async with client.get(proc.admin_url + "/healthz") as response:
        assert response.status == 200
    async with proc.control() as control, control.get("http://localhost/credentials") as response:
        assert response.status == 200


def _short_socket() -> str:
    """A socket path shorter than sun_path's 108 bytes, in a private directory."""
    return os.path.join(tempfile.mkdtemp(prefix="cp-"), "control.sock")


def test_cli_revoke_and_inventory_use_the_control_socket(idp, upstream, credproxy):
    """`credproxy revoke` and `credproxy inventory` talk to the control socket named in the config; a wrong route or a sidecar that is down is a clear error, exit 1."""
    proc = credproxy(_opaque(idp, upstream))
    file = str(proc.config_file)
    revoked = _cli("revoke", "-c", file, "--route", "payments", "--json")
    assert revoked.returncode == 0, revoked.stderr
    [result] = json.loads(revoked.stdout)["revoked"]
    assert result["outcome"] == "revoked"
    again = _cli("revoke", "-c", file, "--issuer", "test-idp")
    assert again.returncode == 0 and "revoked (revoked recently)" in again.stdout
    unknown = _cli("revoke", "-c", file, "--route", "nope")
    assert unknown.returncode == 1 and "unknown_name: no route named 'nope'" in unknown.stderr
    listed = _cli("inventory", "-c", file, "--json")
    assert json.loads(listed.stdout)["live"] is True
    proc.stop()
    down = _cli("revoke", "-c", file)
    assert down.returncode == 1 and "not answering" in down.stderr
    assert str(proc.control_path) in down.stderr


def test_an_unusable_explicit_control_socket_fails_the_start(idp, upstream, credproxy):
    """An explicit control.listen that cannot be made stops the start with exit 1, naming the key."""
    proc = credproxy(
        _opaque(idp, upstream, top='control: {listen: "unix:/proc/credproxy/control.sock"}'),
        expect_ready=False,
    )
    assert proc.process is not None and proc.process.wait(30) == 1
    assert "control.listen: cannot listen on unix:/proc/credproxy/control.sock" in proc.log()


def test_control_config_is_checked_with_paths():
    """control.listen must be a Unix socket or loopback, control.allow must name callers; the default is a Unix socket."""
    base = "listen: 127.0.0.1:0\ncallers: {app: {uid: 1}}\nissuers: {}\nroutes: []\n"
    with pytest.raises(ConfigError) as raised:
        loader.parse(base + "control: {listen: 0.0.0.0:15091, allow: [app, ghost]}\n")
    errors = "\n".join(raised.value.errors)
    assert "control.listen: '0.0.0.0:15091' is not a loopback address" in errors
    assert "control.allow[1]: 'ghost' is not defined under callers" in errors
    assert "control.allow[0]" not in errors
    text = (ROOT / "config" / "example.yaml").read_text()
    assert loader.parse(text).control.listen == "unix:/run/credproxy/control.sock"


async def test_another_uid_cannot_hold_the_telemetry_listener(idp, upstream, credproxy, client):
    """40 connections from another uid to the telemetry listener: past 8 per uid each is
    answered 503 at accept and closed, the rest by the head bound, and /healthz keeps answering
    the sidecar's own probes meanwhile."""
    proc = credproxy(
        _opaque(
            idp, upstream, top=f'control: {{listen: "unix:{_short_socket()}", head_timeout_s: 1}}'
        )
    )
    host, port = proc.admin_url.removeprefix("http://").rsplit(":", 1)
    holder = subprocess.Popen(
        attacker_command("hold", host, port, "40"), stdout=subprocess.PIPE, text=True, user=NOBODY
    )
    try:
        async with client.get(proc.admin_url + "/healthz") as response:
            assert response.status == 200
    finally:
        output, _ = await asyncio.to_thread(holder.communicate, timeout=120)
    assert json.loads(output) == {"opened": 40, "closed": 40}
    refused = [
        e for e in proc.audit("request.denied")
        if e.get("listener") == "admin" and e["reason"] == "too_many_connections"
    ]  # fmt: skip
    assert len(refused) >= 32
    assert {e["caller"]["uid"] for e in refused} == {NOBODY}
