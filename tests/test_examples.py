"""The deployment examples users copy: valid YAML, a credproxy config that passes the same
checks as `check-config`, and the sidecar shape DESIGN.md promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from proxy import config_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _documents() -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes.yaml").read_text()))
    return {doc["kind"]: doc for doc in documents}


def test_kubernetes_example_config_is_valid():
    """The ConfigMap's config.yaml loads with no error."""
    loaded = config_file.parse(_documents()["ConfigMap"]["data"]["config.yaml"])
    assert {route.name for route in loaded.routes} == {"payments", "s3"}


def test_kubernetes_example_is_a_native_sidecar_holding_the_identity_alone():
    """credproxy is an always-restarting init container with probes; only it mounts identity."""
    pod = _documents()["Deployment"]["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    [app] = pod["containers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    identity_volumes = {"client-key", "tokens"}
    assert identity_volumes <= {m["name"] for m in sidecar["volumeMounts"]}
    assert not identity_volumes & {m["name"] for m in app.get("volumeMounts", [])}
    assert all("127.0.0.1:15001" in env["value"] for env in app["env"])
    [token] = [v for v in pod["volumes"] if v["name"] == "tokens"][0]["projected"]["sources"]
    assert (
        token["serviceAccountToken"]["audience"]
        and token["serviceAccountToken"]["expirationSeconds"] <= 86400
    )
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
