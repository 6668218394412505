"""The paths under test: one table, and the configuration each writes from its template file."""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from yarl import URL

from bench import protocol_proxy
from bench.compare import templates
from bench.compare.constants import NGINX, SMALL_BODY
from bench.compare.counterparts import UPSTREAM_CONF
from bench.compare.results import Settings
from bench.compare.subjects import SUBJECTS, available, envoy, mitmproxy, nginx
from bench.compare.subjects.credproxy import VARIANTS
from bench.compare.templates import render_template
from bench.compare.workspace import Bench
from tests.counterparts import ThreadedApp

SUBJECT_DIR = Path(envoy.__file__).parent


@pytest.fixture
def bench(tmp_path):
    made = Bench(Settings(), tmp_path, pin=False)
    yield made
    shutil.rmtree(made.upload_dir, ignore_errors=True)


def test_the_table_has_one_subject_per_only_key():
    """Keys are unique, and the 2-worker path is offered only where --workers exists."""
    keys = [subject.key for subject in SUBJECTS]
    assert len(keys) == len(set(keys))
    assert keys[0] == "direct"
    assert "cp-bearer-2w" in {s.key for s in available(True)}
    assert "cp-bearer-2w" not in {s.key for s in available(False)}
    assert {s.key for s in SUBJECTS if s.credproxy} == set(VARIANTS)


def test_a_subject_whose_tool_is_missing_says_where_it_comes_from(tmp_path):
    """Envoy or mitmproxy not installed: the path fails with a pointer to bench/run."""
    [envoy_subject] = [s for s in SUBJECTS if s.key == "envoy"]
    missing = replace(envoy_subject, tool=tmp_path / "envoy")
    assert missing.missing_tool() == f"{tmp_path / 'envoy'} missing (bench/run installs it)"
    assert replace(envoy_subject, tool=None).missing_tool() is None


@pytest.mark.parametrize("oauth2", [False, True])
def test_envoy_configs_are_yaml_with_every_value_filled(bench, oauth2):
    """Both Envoy bootstraps parse, listen on the port given, and point at the bench's
    upstream; the static key stays a string even when it looks like a number."""
    bench.key = "12345"  # unquoted, YAML would make it a number
    config = yaml.safe_load(envoy.config(bench, 4321, oauth2=oauth2))
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 4321
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    upstream = clusters["upstream"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert upstream["endpoint"]["address"]["socket_address"]["port_value"] == bench.upstream_port
    text = yaml.safe_dump(config)
    if oauth2:
        assert set(clusters) == {"upstream", "idp"}
        assert str(bench.client_secret_file) in text
    else:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        [route] = manager["route_config"]["virtual_hosts"][0]["routes"]
        assert route["request_headers_to_add"][0]["header"] == {
            "key": "X-Api-Key",
            "value": "12345",
        }


def test_every_template_beside_the_subjects_is_used_with_all_its_values(bench):
    """Each template's placeholders are exactly the values its module passes (render_template
    refuses a missing or an extra one), so no ``{{name}}`` reaches a config file."""
    rendered = {
        "nginx.conf": render_template(
            nginx.CONF, prefix="/p", port=1, upstream_port=2, header="X-Api-Key", key="k"
        ),
        "mitmproxy_addon.py.template": render_template(
            mitmproxy.ADDON, header=repr("X-Api-Key"), key=repr("k")
        ),
        "envoy-static.yaml": envoy.config(bench, 1, oauth2=False),
        "envoy-oauth2.yaml": envoy.config(bench, 1, oauth2=True),
    }
    on_disk = {p.name for p in SUBJECT_DIR.iterdir() if p.suffix != ".py"}
    assert on_disk - {"__pycache__"} == set(rendered)
    for name, text in rendered.items():
        assert "{{" not in text, name
    compile(rendered["mitmproxy_addon.py.template"], "add_key.py", "exec")


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is installed by bench/run")
def test_both_nginx_configs_pass_nginx_t(bench, tmp_path):
    """The upstream's and the proxy's nginx.conf, rendered, are valid for nginx itself."""
    docroot = tmp_path / "www"
    docroot.mkdir()
    configs = {
        "upstream": render_template(
            UPSTREAM_CONF,
            prefix=tmp_path,
            port=bench.upstream_port,
            key=bench.key,
            docroot=docroot,
            upload_dir=bench.upload_dir,
            small=SMALL_BODY.rstrip(b"\n").decode(),
        ),
        "proxy": render_template(
            nginx.CONF,
            prefix=tmp_path,
            port=1,
            upstream_port=bench.upstream_port,
            header="X-Api-Key",
            key=bench.key,
        ),
    }
    for name, text in configs.items():
        path = tmp_path / f"{name}.conf"
        path.write_text(text)
        done = subprocess.run(
            [NGINX, "-t", "-p", str(tmp_path), "-c", str(path)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


def test_a_template_refuses_missing_and_extra_values(tmp_path):
    """A placeholder without a value, or a value without a placeholder, is an error naming both;
    nginx's own ``$variables`` and braces are left alone."""
    path = tmp_path / "t.conf"
    path.write_text("listen {{port}}; if ($x = 0) { return 401; }\n")
    assert render_template(path, port=8) == "listen 8; if ($x = 0) { return 401; }\n"
    with pytest.raises(
        ValueError, match=r"without a value \['port'\].*without a placeholder \['pot'\]"
    ):
        render_template(path, pot=8)
    assert templates.placeholders(path.read_text()) == {"port"}


def test_credproxy_variants_write_the_route_their_scheme_needs(bench):
    """Each credproxy variant's route carries its injection and the issuer it names."""
    for key, variant in VARIANTS.items():
        config = variant.config(bench, 1, 2, "/a/audit.jsonl")
        *others, route = config["routes"]
        assert route["name"] == "api" and route["path_prefix"] == "/api/", key
        assert route["credential"]["issuer"] == "bench-issuer", key
        assert "inject" in route["credential"], key
        assert len(others) == variant.other_routes, key
    assert len({r["path_prefix"] for r in VARIANTS["cp-static-1000"].config(bench, 1, 2, "/a")[
        "routes"
    ]}) == 1000  # fmt: skip
    assert VARIANTS["cp-bearer-2w"].workers == 2
    assert VARIANTS["cp-dpop"].credential(bench)["inject"] == "dpop"


class _Answers(ThreadedApp):
    """An upstream answering with the key it got, framed by Content-Length or chunked."""

    def app(self) -> web.Application:
        async def sized(request: web.Request) -> web.Response:
            return web.Response(text=request.headers.get("X-Api-Key", "none"))

        async def chunked(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"first,", b"second"):
                await response.write(part)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/sized", sized)
        app.router.add_get("/chunked", chunked)
        return app


async def test_the_protocol_floor_adds_its_header_and_relays_both_framings_on_one_connection():
    """The floor row's numbers count only if it proxies: its header reaches the upstream, and
    answers of known length and chunked ones come back whole, over one keep-alive connection."""
    upstream = _Answers()
    upstream.start()
    sock = socket.create_server(("127.0.0.1", 0))
    server = await protocol_proxy.serve(sock, URL(upstream.origin), b"X-Api-Key: k-123\r\n")
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    connector = aiohttp.TCPConnector(limit=1)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            for path, body in (
                ("/sized", "k-123"),
                ("/chunked", "first,second"),
                ("/sized", "k-123"),
            ):
                async with session.get(base + path) as response:
                    assert response.status == 200 and await response.text() == body
            assert connector._conns  # the app connection was kept open for the next request
    finally:
        server.close()
        upstream.stop()
