"""The audit file (issue 16, finding 11): never opened through a symlink planted at its path,
created 0600 (or ``audit.file_mode``), an existing one narrowed, the same on SIGUSR1 reopen."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.audit.trail import Audit
from proxy.config import loader
from proxy.errors import StartError
from tests.counterparts import ROOT


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask():
    """The most permissive umask: the mode must come from credproxy, not from the umask."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    """An audit path that is a symlink to someone else's file."""
    target = tmp_path / "elsewhere" / "passwd"
    target.parent.mkdir()
    target.write_text("root:x:0:0\n")
    target.chmod(0o644)
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    return link, target


def test_a_symlink_at_the_audit_path_is_refused_and_its_target_untouched(tmp_path):
    """A symlink planted at audit.file is refused at start with a message saying so; the file
    it points to keeps its content and mode."""
    link, target = _planted(tmp_path)
    with pytest.raises(StartError) as caught:
        Audit(str(link))
    assert str(caught.value).startswith(f"audit.file: {link} is a symbolic link")
    assert target.read_text() == "root:x:0:0\n" and _mode(target) == 0o644


@pytest.mark.parametrize("file_mode", [0o600, 0o640])
def test_the_audit_file_is_created_with_file_mode(tmp_path, open_umask, file_mode):
    """A new audit file has exactly audit.file_mode, even under umask 0."""
    path = tmp_path / "audit.jsonl"
    Audit(str(path), file_mode=file_mode).aclose()
    assert _mode(path) == file_mode


def test_an_existing_wider_audit_file_is_narrowed(tmp_path):
    """An audit file left readable by others (0644) is narrowed to 0600 when opened, keeping
    what it holds."""
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event":"earlier"}\n')
    path.chmod(0o644)
    audit = Audit(str(path))
    audit.emit("later")
    audit.aclose()
    assert _mode(path) == 0o600
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()][0] == "earlier"


def test_a_fifo_at_the_audit_path_is_refused_without_blocking(tmp_path):
    """A FIFO planted at the path (no reader) is refused at once, not waited on forever."""
    path = tmp_path / "audit.jsonl"
    os.mkfifo(path)
    with pytest.raises(StartError, match="cannot append"):
        Audit(str(path))


def test_reopen_refuses_a_symlink_planted_after_rotation(tmp_path, open_umask, caplog):
    """On SIGUSR1 (reopen) a symlink planted at the path after logrotate moved the file is
    refused and logged; events keep going to the file already open; the target is untouched."""
    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path))
    audit.emit("before")
    rotated = tmp_path / "audit.jsonl.1"
    path.rename(rotated)
    link, target = _planted(tmp_path)
    assert link == path
    audit.reopen()
    audit.emit("after")
    audit.aclose()
    assert target.read_text() == "root:x:0:0\n" and _mode(target) == 0o644
    events = [json.loads(line)["event"] for line in rotated.read_text().splitlines()]
    assert events[-2:] == ["before", "after"]
    assert any(
        r.levelno == logging.ERROR and "is a symbolic link" in r.getMessage()
        for r in caplog.records
    )


def test_reopen_creates_the_new_file_with_file_mode(tmp_path, open_umask):
    """The file created at the path on reopen (after logrotate) has audit.file_mode too."""
    path = tmp_path / "audit.jsonl"
    audit = Audit(str(path), file_mode=0o640)
    audit.emit("before")
    path.rename(tmp_path / "audit.jsonl.1")
    audit.reopen()
    audit.emit("after")
    audit.aclose()
    assert _mode(path) == 0o640


def test_file_mode_config_takes_quoted_or_unquoted_octal_and_refuses_wider():
    """audit.file_mode is 0600 by default; 0640 is accepted quoted or not (YAML reads an
    unquoted 0640 as a number); 0644 is refused with its path."""
    text = (
        "listen: 127.0.0.1:0\n"
        "issuers: {k: {type: static, secret_file: /k}}\n"
        "routes: [{name: r, path_prefix: /r/, upstream: 'https://a.example',"
        " credential: {issuer: k, inject: bearer}}]\n"
    )
    assert loader.parse(text).audit.file_mode == "0600"
    assert loader.parse(text + "audit: {file_mode: 0640}\n").audit.file_mode == "0640"
    assert loader.parse(text + "audit: {file_mode: '0640'}\n").audit.file_mode == "0640"
    with pytest.raises(ValueError, match=r"audit\.file_mode"):
        loader.parse(text + "audit: {file_mode: '0644'}\n")


def test_run_refuses_a_symlinked_audit_file(tmp_path):
    """``credproxy run`` whose audit.file is a planted symlink exits 1 with the reason, leaving
    the target alone."""
    link, target = _planted(tmp_path)
    secret = tmp_path / "key"
    secret.write_text("key-for-the-audit-test-0123\n")
    secret.chmod(0o600)
    config = tmp_path / "credproxy.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nadmin: null\n"
        f"issuers: {{k: {{type: static, secret_file: {secret}}}}}\n"
        "routes: [{name: r, path_prefix: /r/, upstream: 'https://a.example',"
        " credential: {issuer: k, inject: bearer}}]\n"
        f"audit: {{file: '{link}'}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"audit.file: {link} is a symbolic link" in result.stdout + result.stderr
    assert target.read_text() == "root:x:0:0\n" and _mode(target) == 0o644
