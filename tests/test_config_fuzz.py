"""Generated configs never crash the loader: every document is either a valid ``Config`` or a
``ConfigError`` whose every line names where (a config path, or the file) and what."""

from __future__ import annotations

import re
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import loader
from proxy.config.model import Config
from proxy.errors import ConfigError
from tests.test_config import VALID

KEYS = [
    "listen", "admin", "issuers", "routes", "callers", "identity", "audit", "log", "type",
    "issuer_url", "client_id", "client_auth", "client_key_file", "name", "path_prefix", "host",
    "upstream", "credential", "issuer", "audience", "scope", "inject", "allow", "methods",
    "paths", "uid", "exe", "cgroup", "any_local", "timeouts", "signature", "components",
    "payload", "region", "service", "role_arn", "secret_file", "local_names", "warm_up",
    "allow_non_loopback", "client_secret", "owner", "purpose", "used", "strip_headers",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["127.0.0.1:0", "unix:/tmp/x.sock", "https://idp.example", "oauth2", "dpop",
                     "static", "aws", "sigv4", "/p/", "*", "**", "GET", "http_signature"]),
)  # fmt: skip
KEY = st.one_of(st.sampled_from(KEYS), st.text(max_size=12))
NODES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(KEY, children, max_size=6)
    ),
    max_leaves=40,
)
# An error line starts with a location — a config path (routes[0].credential.inject, a key as
# written, "(top level)") or the source name — then ": " and the explanation; one line each.
LOCATED = re.compile(r"^\S[^\n]*?: \S[^\n]*$")


def _check(text: str) -> None:
    try:
        loaded = loader.parse(text)
    except ConfigError as exc:
        assert exc.errors, "an error without a line"
        for line in exc.errors:
            assert LOCATED.match(line), f"error line without its location: {line!r}"
        return
    assert isinstance(loaded, Config)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEY, NODES, max_size=8))
def test_generated_documents_load_or_fail_with_located_errors(document: dict[str, Any]) -> None:
    """Random mappings built from the config's own vocabulary (and junk keys)."""
    _check(yaml.safe_dump(document, allow_unicode=True))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutations_of_a_valid_config_load_or_fail_with_located_errors(data: st.DataObject) -> None:
    """One value of the valid config replaced by a generated one, at any depth."""
    document = yaml.safe_load(VALID)
    node: Any = document
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, dict | list) or not child or data.draw(st.booleans()):
            node[key] = data.draw(NODES)
            break
        node = child
    _check(yaml.safe_dump(document, allow_unicode=True))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_loads_or_fails_with_located_errors(text: str) -> None:
    """Whatever bytes are in the file, YAML syntax errors included."""
    _check(text)
