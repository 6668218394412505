"""Files others may read or write (issue 16, finding 11): ``run`` and ``check-config`` warn about
a secret file readable by group or others and a config others may write; ``--strict`` refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.counterparts import ROOT


def _cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout_s,
    )


def _files(tmp_path: Path, key_mode: int) -> tuple[Path, Path]:
    """A config (mode 0600) naming a static secret file of ``key_mode``."""
    key = tmp_path / "key.txt"
    key.write_text("a-static-key-0123456789\n")
    key.chmod(key_mode)
    config = tmp_path / "credproxy.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"
        "callers: {test-suite: {uid: 0}}\n"
        f"issuers: {{corp-key: {{type: static, secret_file: {key}}}}}\n"
        "routes: [{name: r, path_prefix: /r/, upstream: 'https://a.example',"
        " credential: {issuer: corp-key, inject: bearer}, allow: [{callers: [test-suite]}]}]\n"
        f"audit: {{file: '{tmp_path}/audit.jsonl'}}\n"
    )
    config.chmod(0o600)
    return config, key


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        (0o644, "is readable by others (mode 0644)"),
        (0o640, "is readable by its group (mode 0640)"),
        (0o620, "is writable by its group (mode 0620)"),
        (0o666, "is readable and writable by others (mode 0666)"),
    ],
)
def test_a_secret_file_others_may_read_is_a_warning_and_refused_with_strict(tmp_path, mode, said):
    """check-config warns, naming the config path of the key, the mode and the fix; with
    --strict it refuses with exit 1."""
    config, key = _files(tmp_path, mode)
    line = f"issuers.corp-key.secret_file: {key} {said}; chmod 600 {key}"
    relaxed = _cli("check-config", str(config))
    assert relaxed.returncode == 0 and f"credproxy: warning: {line}" in relaxed.stderr
    strict = _cli("check-config", "--strict", str(config))
    assert (
        strict.returncode == 1 and line in strict.stderr and "refused (--strict)" in strict.stderr
    )
    assert strict.stdout == ""


def test_a_private_secret_file_passes_strict(tmp_path):
    """A 0600 secret file owned by credproxy's uid and a 0600 config pass --strict silently."""
    config, _ = _files(tmp_path, 0o600)
    result = _cli("check-config", "--strict", str(config))
    assert result.returncode == 0, result.stderr
    assert "secret_file" not in result.stderr and "the config" not in result.stderr


def test_a_secret_file_owned_by_another_user_is_flagged(tmp_path):
    """A 0600 key owned by another uid (the app's, say) is readable by that user: flagged."""
    assert os.getuid() == 0, "needs root to give a file to another uid"
    config, key = _files(tmp_path, 0o600)
    os.chown(key, 65534, 65534)
    result = _cli("check-config", "--strict", str(config))
    assert (
        result.returncode == 1 and f"{key} belongs to uid 65534, who can read it" in result.stderr
    )


@pytest.mark.parametrize(
    ("mode", "gid", "flagged"),
    [
        (0o602, 0, "the config is writable by others (mode 0602)"),
        (0o620, 65534, "the config is writable by group 65534"),
        (0o620, 0, ""),  # root:root, root's group: accepted (documented)
        (0o644, 65534, ""),
    ],
)
def test_a_config_others_may_write_is_flagged(tmp_path, mode, gid, flagged):
    """A config writable by others, or by a group other than its owner's own, is flagged and
    refused with --strict; root's group on a root-owned file is accepted."""
    assert os.getuid() == 0, "needs root to give a file to another group"
    config, _ = _files(tmp_path, 0o600)
    os.chown(config, 0, gid)
    config.chmod(mode)
    result = _cli("check-config", "--strict", str(config))
    if flagged:
        assert result.returncode == 1 and f"{config}: {flagged}" in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_run_warns_and_serves_but_refuses_with_strict(tmp_path, credproxy):
    """`credproxy run` with a 0644 key warns and serves; `run --strict` exits 1 before serving."""
    config, key = _files(tmp_path, 0o644)
    line = f"issuers.corp-key.secret_file: {key} is readable by others (mode 0644); chmod 600"
    strict = _cli("run", "--strict", "-c", str(config), timeout_s=30)
    assert strict.returncode == 1 and line in strict.stderr
    assert "credproxy serving" not in strict.stdout + strict.stderr
    proc = credproxy(config.read_text(), expect_ready=False)
    assert proc.url and f"credproxy: warning: {line}" in proc.log()
