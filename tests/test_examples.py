"""The deployment examples users copy: valid YAML, a credproxy config that passes the same
checks as `check-config`, and the sidecar shape DESIGN.md promises."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import yaml
from aiohttp import web

from proxy.config import loader
from proxy.metrics import Metrics
from tests.counterparts import LEDGER, ThreadedApp, config, free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _documents() -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes.yaml").read_text()))
    return {doc["kind"]: doc for doc in documents}


def test_kubernetes_example_config_is_valid():
    """The ConfigMap's config.yaml loads with no error."""
    loaded = loader.parse(_documents()["ConfigMap"]["data"]["config.yaml"])
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
    env = {e["name"]: e["value"] for e in app["env"]}
    assert all("127.0.0.1:15001" in v for n, v in env.items() if n.lower() != "no_proxy")
    assert env["HTTP_PROXY"] == env["http_proxy"]  # curl reads only the lower-case one
    for name in ("NO_PROXY", "no_proxy"):  # base URLs go direct, not to a proxy elsewhere
        assert {"127.0.0.1", "localhost"} <= set(env[name].split(","))
    [token] = [v for v in pod["volumes"] if v["name"] == "tokens"][0]["projected"]["sources"]
    assert (
        token["serviceAccountToken"]["audience"]
        and token["serviceAccountToken"]["expirationSeconds"] <= 86400
    )
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True


def test_kubernetes_example_exposes_only_telemetry_on_the_pod_network():
    """admin (0.0.0.0:15090) is telemetry; the control plane is a Unix socket in a volume only
    the sidecar mounts; a NetworkPolicy lets only Prometheus reach the pod, on 15090 alone."""
    documents = _documents()
    loaded = loader.parse(documents["ConfigMap"]["data"]["config.yaml"])
    assert loaded.admin == "0.0.0.0:15090"
    assert loaded.allow_non_loopback == ("0.0.0.0:15090",)  # the app listener stays loopback
    # emptyDirs are 0777: the socket goes in a directory credproxy makes (0700) inside it
    assert loaded.control.listen == "unix:/run/credproxy/control/control.sock"
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    [sidecar], [app] = pod["initContainers"], pod["containers"]
    assert {"name": "control", "mountPath": "/run/credproxy"} in sidecar["volumeMounts"]
    assert "control" not in {m["name"] for m in app.get("volumeMounts", [])}
    assert [p["containerPort"] for p in sidecar["ports"]] == [15090]
    policy = documents["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == pod_labels(documents)
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 15090}]
    [source] = rule["from"]
    assert source["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def pod_labels(documents: dict[str, dict[str, Any]]) -> dict[str, str]:
    return dict(documents["Deployment"]["spec"]["template"]["metadata"]["labels"])


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bcredproxy_[a-z_]+", expr))


def _exported_names() -> set[str]:
    """Every series name credproxy's registry can expose (counters as _total, histograms with
    _bucket/_sum/_count), from the code itself."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_example_yaml_passes_yamllint():
    """Every YAML users copy (config/, examples/) is lint-clean under the repository's rules."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("yamllint")), "--strict", "examples", "config"],
        cwd=EXAMPLES.parent, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_example_is_a_sidecar_holding_the_secret_alone():
    """The app shares credproxy's network namespace, calls loopback, and mounts no secret; the
    credproxy config in the example is valid and names the app's uid."""
    compose = yaml.safe_load((EXAMPLES / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"idp", "api", "credproxy", "app", "prometheus"} <= set(services)
    app, sidecar = services["app"], services["credproxy"]
    assert app["network_mode"] == "service:credproxy"
    assert "secrets" not in app and "volumes" not in app
    assert {"127.0.0.1", "localhost"} <= set(app["environment"]["no_proxy"].split(","))
    assert "127.0.0.1:15001" in " ".join(app["command"])
    assert sidecar["read_only"] is True and sidecar["secrets"][0]["source"] == "client_secret"
    loaded = loader.load(EXAMPLES / "compose" / "credproxy.yaml")
    assert loaded.callers["app"].uid == int(app["user"].split(":")[0])
    realm = json.loads((EXAMPLES / "compose" / "realm.json").read_text())
    clients = {client["clientId"]: client for client in realm["clients"]}
    client = clients[loaded.issuers["keycloak"].client_id]  # type: ignore[attr-defined]
    assert client["clientAuthenticatorType"] == "client-secret"
    secrets = [c["secret"] for c in realm["clients"] if "secret" in c]
    assert set(secrets) == {"${CREDPROXY_CLIENT_SECRET}"}  # never a literal secret


class RecordingAPI(ThreadedApp):
    """The compose example's echo container, as far as the test needs it: keeps what it got."""

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list[str] = []

    def app(self) -> web.Application:
        async def echo(request: web.Request) -> web.Response:
            self.authorizations.append(request.headers.get("Authorization", ""))
            return web.json_response({"path": request.path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo)
        return app


async def test_compose_example_runs_against_keycloak_with_its_realm(keycloak, credproxy, client):
    """The compose example's credproxy.yaml, against the session's Keycloak (which imported the
    example's realm.json) — only addresses, files and the app's uid moved: the app's GET gets a
    Keycloak token of the example's client with the example's scope; a POST is refused."""
    api = RecordingAPI()
    api.start()
    try:
        text = (EXAMPLES / "compose" / "credproxy.yaml").read_text()
        for old, new in [
            ("127.0.0.1:15001", "127.0.0.1:0"),
            ("admin: 0.0.0.0:15090", "admin: 127.0.0.1:0"),
            ("allow_non_loopback: ['0.0.0.0:15090']", ""),
            ("{uid: 1000}", "{uid: 0}"),
            ("http://idp:8080/realms/credproxy", keycloak.issuer),
            ("/run/secrets/credproxy/client_secret", str(keycloak.client_secret_file)),
            ("http://api:8080", api.origin),
            ("/var/run/credproxy/audit.jsonl", '"{audit}"'),
        ]:
            assert old in text, old
            text = text.replace(old, new)
        proc = credproxy(text)
        async with client.get(proc.url + "/api/orders") as response:
            assert response.status == 200 and (await response.json())["path"] == "/orders"
        async with client.post(proc.url + "/api/orders") as response:
            assert response.status == 403
    finally:
        api.stop()
    [authorization] = api.authorizations
    scheme, _, token = authorization.partition(" ")
    LEDGER.secret(token)
    with urllib.request.urlopen(keycloak.jwks_uri, timeout=10) as answer:
        keys = jwt.PyJWKSet.from_dict(json.load(answer))
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k.key for k in keys.keys if k.key_id == kid)
    claims = jwt.decode(token, key, algorithms=["RS256"], options={"verify_aud": False})
    assert scheme == "Bearer" and claims["iss"] == keycloak.issuer
    assert claims["azp"] == keycloak.LEGACY_CLIENT_ID and claims["scope"] == "profile"


def test_alerts_and_dashboard_use_only_exported_metrics():
    """Each credproxy_* name in the alert rules and the Grafana dashboard is one credproxy
    exports; promtool (Prometheus' own checker) accepts the scrape config and the rules."""
    exported = _exported_names()
    rules = yaml.safe_load((EXAMPLES / "prometheus" / "alerts.yml").read_text())
    used = {
        n for group in rules["groups"] for r in group["rules"] for n in _metric_names(r["expr"])
    }
    dashboard = json.loads((EXAMPLES / "grafana" / "credproxy-dashboard.json").read_text())
    panels = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used_by_dashboard = {name for expr in panels for name in _metric_names(expr)}
    assert used and used_by_dashboard
    assert used - exported == set() and used_by_dashboard - exported == set()
    assert len(used_by_dashboard) >= 10  # the dashboard covers the metric set, not a sample
    for args in (["check", "config"], ["check", "rules"]):
        target = "prometheus.yml" if args[1] == "config" else "alerts.yml"
        result = subprocess.run(
            ["promtool", *args, target], cwd=EXAMPLES / "prometheus", capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


async def test_prometheus_scrapes_credproxy_with_the_example_config(
    idp, upstream, credproxy, client, tmp_path
):
    """Real Prometheus, with the example scrape config and rules aimed at a running credproxy,
    ingests credproxy_* series with their labels and types: valid for a real scraper."""
    proc = credproxy(config(idp=idp, upstream=upstream.origin, audience=upstream.audience))
    async with client.get(proc.url + "/payments/api/x") as response:
        assert response.status == 200
    admin = proc.admin_url.removeprefix("http://")
    scrape = yaml.safe_load((EXAMPLES / "prometheus" / "prometheus.yml").read_text())
    scrape["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    scrape["scrape_configs"][0]["static_configs"] = [{"targets": [admin]}]
    scrape["rule_files"] = [str(EXAMPLES / "prometheus" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1"
    prom = aiohttp.ClientSession()  # decompressing, unlike the app's client
    try:
        series: list[dict[str, Any]] = []
        for _ in range(300):
            try:
                async with prom.get(api + "/query", params={"query": QUERY}) as response:
                    series = (await response.json())["data"]["result"]
            except (aiohttp.ClientError, KeyError):
                pass
            if series:
                break
            await asyncio.sleep(0.1)
        by_name = {s["metric"]["__name__"]: s["metric"] for s in series}
        assert by_name["credproxy_requests_total"]["route"] == "payments"
        assert by_name["credproxy_credential_issued_total"]["issuer"] == "test-idp"
        assert "credproxy_request_duration_seconds_bucket" in by_name
        async with prom.get(api + "/metadata") as response:
            metadata = (await response.json())["data"]
        assert metadata["credproxy_requests_total"][0]["type"] == "counter"
        assert metadata["credproxy_credential_expiry_seconds"][0]["type"] == "gauge"
        health: set[str] = set()
        for _ in range(100):  # until the rules have been evaluated once
            async with prom.get(api + "/rules") as response:
                groups = (await response.json())["data"]["groups"]
            health = {r["health"] for g in groups for r in g["rules"]}
            if "unknown" not in health:
                break
            await asyncio.sleep(0.1)
        assert health == {"ok"}
    finally:
        await prom.close()
        server.terminate()
        server.wait(10)
        log.close()


QUERY = '{__name__=~"credproxy_.+", job="credproxy"}'


CONFIGS = Path(__file__).resolve().parent.parent / "config"
_WITHOUT_AWS_EXTRA = (
    "import sys\n"
    "sys.modules['botocore'] = sys.modules['boto3'] = None  # as on a plain `pip install .`\n"
    "from proxy.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _check_config(name: str, *, aws_extra: bool) -> subprocess.CompletedProcess[str]:
    command = ["-m", "proxy"] if aws_extra else ["-c", _WITHOUT_AWS_EXTRA]
    return subprocess.run(
        [sys.executable, *command, "check-config", str(CONFIGS / name)],
        capture_output=True, text=True, cwd=CONFIGS.parent, timeout=60,
    )  # fmt: skip


def test_check_config_passes_on_both_shipped_configs():
    """`check-config` exits 0 on config/example.yaml with the aws extra (what scripts/setup
    installs) and on config/local.yaml without it; without the extra, the reference config's
    refusal names the extra to install, as the README says."""
    assert _check_config("example.yaml", aws_extra=True).returncode == 0
    local = _check_config("local.yaml", aws_extra=False)
    assert local.returncode == 0, local.stderr
    assert "valid (1 route(s), 1 issuer(s))" in local.stdout
    bare = _check_config("example.yaml", aws_extra=False)
    assert bare.returncode == 1 and "pip install 'credproxy[aws]'" in bare.stderr


async def test_local_config_runs_as_is(credproxy, client):
    """config/local.yaml runs as written (only its ports moved to free ones, its audit file into
    the test's directory): a request reaches the upstream — credproxy's own telemetry — with a
    self-signed JWT, and nothing needs /var, /run or a secret file."""
    text = (CONFIGS / "local.yaml").read_text()
    for port in ("15001", "15090", "15091"):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    text = text.replace("credproxy-audit.jsonl", '"{audit}"')
    assert "/var/" not in text and "/run/" not in text
    proc = credproxy(text)
    async with client.get(proc.url + "/local/healthz") as response:
        assert response.status == 200 and (await response.json())["status"] == "alive"
    async with client.post(proc.url + "/local/healthz") as response:
        assert response.status == 403  # GET and HEAD only
    assert [e["route"] for e in proc.audit("credential.used")] in ([], ["local"])


def test_kubernetes_spiffe_example_holds_no_identity_file_and_only_the_sidecar_has_the_socket():
    """The SPIFFE example's config loads and roots every issuer in an SVID; the Workload API
    socket (CSI driver) is mounted into the sidecar only; no secret or token volume exists."""
    documents = {
        doc["kind"]: doc
        for doc in yaml.safe_load_all((EXAMPLES / "kubernetes-spiffe.yaml").read_text())
    }
    loaded = loader.parse(documents["ConfigMap"]["data"]["config.yaml"])
    assert loaded.identity.spiffe is not None and loaded.identity.token_file is None
    assert all(issuer.uses_svid for issuer in loaded.issuers.values())
    payments = next(route for route in loaded.routes if route.name == "payments")
    assert payments.client_cert == "svid" and payments.upstream_spiffe_id
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    [sidecar], [app] = pod["initContainers"], pod["containers"]
    socket = {"name": "spiffe-workload-api", "mountPath": "/spiffe-workload-api", "readOnly": True}
    assert socket in sidecar["volumeMounts"]
    assert "spiffe-workload-api" not in {m["name"] for m in app.get("volumeMounts", [])}
    [volume] = [v for v in pod["volumes"] if v["name"] == "spiffe-workload-api"]
    assert volume["csi"]["driver"] == "csi.spiffe.io"
    assert not [v for v in pod["volumes"] if "secret" in v or "projected" in v]
    assert documents["ClusterSPIFFEID"]["spec"]["workloadSelectorTemplates"] == [
        "k8s:container-name:credproxy"
    ]
