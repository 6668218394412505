"""The deployment's fingerprint key (``audit.fingerprint_key_file``): a credential keeps its
fingerprint across restarts, the key file is made 0600 and refused when others may read it, and
without a usable file the run says so and keys its fingerprints for itself alone."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import fingerprint_key
from tests.counterparts import PREAMBLE

SECRET = "legacy-key-0123456789abcdef"


def _static(tmp_path: Path, audit_extra: str = "") -> str:
    key_file = tmp_path / "api-key"
    if not key_file.exists():
        key_file.write_text(SECRET + "\n")
        key_file.chmod(0o600)
    return f"""\
{PREAMBLE}issuers:
  legacy-key: {{type: static, secret_file: {key_file}}}
routes:
  - name: r
    path_prefix: /r/
    upstream: http://127.0.0.1:9
    credential: {{issuer: legacy-key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
audit: {{file: "{{audit}}"{audit_extra}}}
log: {{format: json}}
"""


def _run_once(credproxy, text: str, name: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(audit.started, credential.issued, log) of one run, stopped."""
    proc = credproxy(text, name=name)
    assert proc.stop() == 0
    [started] = proc.audit("audit.started")
    [issued] = proc.audit("credential.issued")
    return started, issued, proc.log()


def test_a_restart_keeps_the_fingerprint_and_the_key_file_is_0600(tmp_path, credproxy):
    """Two runs of one deployment name the same static key by the same fingerprint, under a key
    made on the first start beside the audit file (0600, 32 bytes), which the fingerprint is
    the HMAC of — so without that file a guess cannot be checked."""
    first, issued_1, log = _run_once(credproxy, _static(tmp_path), "first")
    second, issued_2, _ = _run_once(credproxy, _static(tmp_path), "second")
    assert issued_1["fingerprint"] == issued_2["fingerprint"]
    assert first["instance"] != second["instance"]  # two runs
    assert first["fingerprint_key"] == second["fingerprint_key"]
    assert first["fingerprint_key_scope"] == "deployment"
    path = tmp_path / fingerprint_key.DEFAULT_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == os.geteuid()
    key = path.read_bytes()
    assert len(key) == 32
    expected = hmac.new(key, SECRET.encode(), hashlib.sha256).hexdigest()[:12]
    assert issued_1["fingerprint"] == expected
    assert issued_1["fingerprint"] != hashlib.sha256(SECRET.encode()).hexdigest()[:12]
    assert "fingerprint key created" in log and "fingerprints are per run" not in log
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(path.name + ".")]  # no temp


def test_a_configured_key_file_is_used_and_workers_share_it(tmp_path, credproxy):
    """``audit.fingerprint_key_file`` names the key; two workers of a run fingerprint alike."""
    key_path = tmp_path / "keys" / "fp.key"
    key_path.parent.mkdir()
    text = _static(tmp_path, f', fingerprint_key_file: "{key_path}"')
    proc = credproxy(text, args=("--workers", "2"))
    assert proc.stop() == 0
    issued = proc.audit("credential.issued")
    assert len(issued) == 2 and len({e["fingerprint"] for e in issued}) == 1
    key = key_path.read_bytes()
    assert issued[0]["fingerprint"] == hmac.new(key, SECRET.encode(), "sha256").hexdigest()[:12]
    assert {e["fingerprint_key_scope"] for e in proc.audit("audit.started")} == {"deployment"}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_file_others_may_read_is_refused(tmp_path, credproxy, mode):
    """A key file group or others may read is not used (they could check guesses with it): the
    run warns and keys its fingerprints for itself; the file is left as it was."""
    key_path = tmp_path / fingerprint_key.DEFAULT_NAME
    key_path.write_bytes(os.urandom(32))
    key_path.chmod(mode)
    started, issued, log = _run_once(credproxy, _static(tmp_path), "exposed")
    assert started["fingerprint_key_scope"] == "run"
    assert "fingerprints are per run" in log and f"mode {mode:04o}" in log
    key = key_path.read_bytes()
    assert issued["fingerprint"] != hmac.new(key, SECRET.encode(), "sha256").hexdigest()[:12]
    assert stat.S_IMODE(key_path.stat().st_mode) == mode


def test_no_key_file_can_be_made_warns_and_keys_the_run(tmp_path, credproxy):
    """A key file that can be neither read nor created (its directory does not exist): the run
    starts, warns that fingerprints are per run, and two runs name the key differently."""
    text = _static(tmp_path, ', fingerprint_key_file: "/nonexistent/credproxy/fp.key"')
    first, issued_1, log = _run_once(credproxy, text, "first")
    second, issued_2, _ = _run_once(credproxy, text, "second")
    assert first["fingerprint_key_scope"] == second["fingerprint_key_scope"] == "run"
    assert "fingerprints are per run" in log and "cannot create /nonexistent" in log
    assert issued_1["fingerprint"] != issued_2["fingerprint"]


def test_key_file_checks(tmp_path):
    """Created with O_EXCL aside then linked (0600 whatever the umask); read back the same;
    refused: a symlink, another size, a directory."""
    path = tmp_path / "fp.key"
    old_umask = os.umask(0)
    try:
        key = fingerprint_key.load_or_create(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fingerprint_key.load_or_create(path) == key and len(key) == 32
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(fingerprint_key.KeyFileError, match="symbolic link"):
        fingerprint_key.load_or_create(link)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(fingerprint_key.KeyFileError, match="16 bytes"):
        fingerprint_key.load_or_create(short)
    with pytest.raises(fingerprint_key.KeyFileError, match="not a regular file"):
        fingerprint_key.load_or_create(tmp_path)
    assert fingerprint_key.default_path("-") is None
    assert fingerprint_key.default_path("/var/log/credproxy/audit.jsonl") == Path(
        "/var/log/credproxy/.credproxy-fingerprint.key"
    )
