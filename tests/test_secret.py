"""Secrets and their fingerprints (issue 16, finding 11): a fingerprint correlates, and confirms
no guess to someone holding only the audit log."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from proxy.secret import INSTANCE, Secret, fingerprint
from tests.counterparts import ROOT


def test_a_fingerprint_is_not_the_plain_hash_of_the_value():
    """The fingerprint of a guessable key is not its SHA-256 prefix, so hashing a guess and
    comparing with the audit log confirms nothing; it is stable within the process."""
    key = "legacy-key-0123456789abcdef"
    assert fingerprint(key) != hashlib.sha256(key.encode()).hexdigest()[:12]
    assert fingerprint(key) == Secret(key).fingerprint == fingerprint(key.encode())
    assert len(fingerprint(key)) == 12 and int(fingerprint(key), 16) >= 0
    assert len(INSTANCE) == 16


def test_another_process_fingerprints_differently():
    """Another run (a fresh process) draws its own key: the same value gets another
    fingerprint, and another instance id names it."""
    code = "from proxy.secret import INSTANCE, fingerprint; print(INSTANCE, fingerprint('k'))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    instance, other = result.stdout.split()
    assert instance != INSTANCE and other != fingerprint("k")
