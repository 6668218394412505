"""Unix sockets (issue 16, finding 11): created with their final mode, in a directory no other
user can write to, never chmod-ed through a path; the server's app, admin and token-share
sockets all go through ``bind_unix``."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.audit.trail import Audit
from proxy.config import loader
from proxy.errors import StartError
from proxy.lifecycle.server import Server
from proxy.lifecycle.unix_socket import bind_unix
from tests.counterparts import ROOT


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _ban_chmod(monkeypatch) -> None:
    """Any chmod through a path fails the test: the mode must be right from bind on."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"chmod through a path: {args}")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(Path, "chmod", refuse)


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_the_socket_has_its_mode_from_bind_whatever_the_umask(tmp_path, monkeypatch, mode):
    """Right after bind, before listen, the socket already has exactly ``mode`` (under umask 0
    too), and the process umask is as it was."""
    _ban_chmod(monkeypatch)
    previous = os.umask(0)
    try:
        sock = bind_unix(str(tmp_path / "app.sock"), mode, where="listen")
        assert _mode(tmp_path / "app.sock") == mode
        assert os.umask(0) == 0
    finally:
        os.umask(previous)
    sock.close()


@pytest.mark.parametrize("dir_mode", [0o777, 0o770, 0o757])
def test_a_directory_others_can_write_to_is_refused(tmp_path, dir_mode):
    """A socket directory writable by group or others without the sticky bit is refused, naming
    the directory, its mode and the fix; nothing is created there."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(dir_mode)
    with pytest.raises(StartError) as caught:
        bind_unix(str(directory / "app.sock"), 0o660, where="listen")
    message = str(caught.value)
    assert message.startswith(f"listen: socket directory {directory} is writable by")
    assert f"(mode {dir_mode:04o})" in message and f"chmod go-w {directory}" in message
    assert list(directory.iterdir()) == []


def test_a_sticky_world_writable_directory_is_accepted(tmp_path):
    """A /tmp-like directory (1777) is accepted: others may not remove or rename our socket."""
    directory = tmp_path / "tmp-like"
    directory.mkdir()
    directory.chmod(0o1777)
    bind_unix(str(directory / "app.sock"), 0o660, where="listen").close()


def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    """A directory owned by a uid other than root or the sidecar's own is refused: its owner
    could replace the socket."""
    assert os.getuid() == 0, "needs root to give a directory to another uid"
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, 65534, 65534)
    with pytest.raises(StartError, match="belongs to uid 65534"):
        bind_unix(str(directory / "app.sock"), 0o660, where="admin")


def test_a_symlink_or_file_at_the_path_is_refused_and_left_alone(tmp_path):
    """A symlink planted at the socket path (to a file elsewhere) or a regular file there is
    refused; neither it nor its target is touched. A stale socket is replaced."""
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    link = tmp_path / "app.sock"
    link.symlink_to(target)
    with pytest.raises(StartError, match="exists and is not a socket"):
        bind_unix(str(link), 0o660, where="listen")
    assert link.is_symlink() and target.read_text() == "precious\n"
    link.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(link))
    stale.close()  # the file stays, as after a crash
    bind_unix(str(link), 0o600, where="listen").close()
    assert _mode(link) == 0o600


def _config(tmp_path: Path, socket_dir: Path) -> str:
    secret = tmp_path / "api-key"
    secret.write_text("key-for-the-socket-test-0123\n")
    secret.chmod(0o600)
    return f"""\
listen: ['unix:{socket_dir}/app.sock']
admin: 'unix:{socket_dir}/admin.sock'
unix_socket_mode: '0600'
callers: {{test-suite: {{uid: 0}}}}
issuers:
  key: {{type: static, secret_file: {secret}}}
routes:
  - name: api
    path_prefix: /api/
    upstream: http://127.0.0.1:9
    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: '{tmp_path}/audit.jsonl'}}
"""


async def test_server_app_and_admin_sockets_have_their_mode_without_chmod(tmp_path, monkeypatch):
    """The app and admin sockets of a started server have unix_socket_mode (0600) with chmod
    banned, and answer on them."""
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o755)
    loaded = loader.parse(_config(tmp_path, socket_dir))
    _ban_chmod(monkeypatch)
    async with Server(loaded, audit=Audit(loaded.audit.file)):
        assert _mode(socket_dir / "app.sock") == 0o600
        assert _mode(socket_dir / "admin.sock") == 0o600
        admin = aiohttp.UnixConnector(path=str(socket_dir / "admin.sock"))
        async with aiohttp.ClientSession(connector=admin) as session:
            async with session.get("http://localhost/healthz") as response:
                assert response.status == 200


def test_run_refuses_a_world_writable_socket_directory(tmp_path):
    """``credproxy run`` with its socket in a 0777 directory (an emptyDir as mounted) exits 1
    naming the directory, before serving anything."""
    socket_dir = tmp_path / "run"
    socket_dir.mkdir()
    socket_dir.chmod(0o777)
    config = tmp_path / "credproxy.yaml"
    config.write_text(_config(tmp_path, socket_dir))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    assert f"listen: socket directory {socket_dir} is writable by others (mode 0777)" in (
        result.stdout + result.stderr
    )
    assert list(socket_dir.iterdir()) == []


def test_every_listener_that_cannot_bind_says_so_in_one_wording(tmp_path):
    """An OSError at bind becomes StartError "cannot listen on <address>: <the system's words>",
    with the config key first when given; asyncio's repetition of the address is dropped."""
    import errno

    from proxy.lifecycle.unix_socket import cannot_listen

    asyncio_error = OSError(
        errno.EADDRINUSE, "error while attempting to bind on address ('127.0.0.1', 80): in use"
    )
    error = cannot_listen("127.0.0.1:80", asyncio_error)
    assert isinstance(error, StartError)
    assert str(error) == f"cannot listen on 127.0.0.1:80: {os.strerror(errno.EADDRINUSE)}"
    error = cannot_listen("unix:/x.sock", OSError("no errno"), where="admin")
    assert str(error) == "admin: cannot listen on unix:/x.sock: no errno"
    long_path = str(tmp_path / ("d" * 120) / "app.sock")  # longer than sun_path
    (tmp_path / ("d" * 120)).mkdir(mode=0o700)
    with pytest.raises(StartError, match=r"^listen: cannot listen on unix:/.*app\.sock: "):
        bind_unix(long_path, 0o660, where="listen")
