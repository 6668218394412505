"""Configuration: every error names its path and offending value, all errors at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import cross_checks, loader
from proxy.config.issuers import OAuth2IssuerConfig
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

VALID = """\
listen: 127.0.0.1:15001
issuers:
  idp:
    type: oauth2
    issuer_url: https://idp.example.com
    client_id: orders
    client_key_file: /secrets/client.pem
routes:
  - name: payments
    path_prefix: /payments/
    upstream: https://payments.example.com
    credential: {issuer: idp, audience: https://payments.example.com, scope: payments.write}
"""


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        loader.parse(text)
    return caught.value.errors


def test_valid_config_parses_into_frozen_models_with_defaults():
    """A minimal config gets secure defaults and cannot be mutated after loading."""
    loaded = loader.parse(VALID)
    assert loaded.admin == "127.0.0.1:15090"
    assert loaded.routes[0].credential.inject == "dpop"
    issuer = loaded.issuers["idp"]
    assert isinstance(issuer, OAuth2IssuerConfig) and issuer.client_auth == "private_key_jwt"
    with pytest.raises(ValueError):
        loaded.routes[0].credential.inject = "bearer"  # type: ignore[misc]


BAD = [
    ("unknown key", VALID + "bogus: 1\n", "bogus: unknown key"),
    ("missing section", VALID.split("routes:")[0], "routes: field required"),
    (
        "missing upstream",
        VALID.replace("    upstream: https://payments.example.com\n", ""),
        "routes[0].upstream: field required",
    ),
    (
        "undefined issuer",
        VALID.replace("{issuer: idp,", "{issuer: nope,"),
        "routes[0].credential.issuer: 'nope' is not defined under issuers (defined: idp)",
    ),
    (
        "inline secret",
        VALID.replace(
            "    client_key_file:", "    client_secret: hunter2hunter2\n    client_key_file:"
        ),
        "issuers.idp: 'client_secret' must not be written inline",
    ),
    (
        "plain http to a remote IdP",
        VALID.replace("https://idp.example.com", "http://idp.example.com"),
        "issuers.idp: issuer_url uses plain http to a non-loopback host",
    ),
    (
        "plain http to a remote upstream",
        VALID.replace("upstream: https://", "upstream: http://"),
        "routes[0]: upstream uses plain http to a non-loopback host",
    ),
    (
        "non-loopback listener",
        VALID.replace("127.0.0.1:15001", "0.0.0.0:15001"),
        "listen[0]: '0.0.0.0:15001' is not a loopback address",
    ),
    (
        "malformed listener",
        VALID.replace("127.0.0.1:15001", "localhost"),
        "listen[0]: 'localhost' is not host:port",
    ),
    (
        "listener port in non-ASCII digits",
        VALID.replace("127.0.0.1:15001", "127.0.0.1:\u0661\u0665001"),
        "is not host:port",
    ),
    (
        "static secret signing without a keyid",
        VALID.replace(
            "scope: payments.write}", "scope: payments.write, inject: http_signature}"
        ).replace(
            VALID[VALID.index("    type: oauth2") : VALID.index("routes:")],
            "    type: static\n    secret_file: /secrets/hmac-key\n",
        ),
        "routes[0].credential.signature.key_id: required to sign with a static (HMAC) secret",
    ),
    (
        "unknown derived signature component",
        VALID.replace(
            "scope: payments.write}",
            "scope: payments.write, inject: http_signature, "
            "signature: {key_id: k1, components: ['@body']}}",
        ).replace(
            VALID[VALID.index("    type: oauth2") : VALID.index("routes:")],
            "    type: static\n    secret_file: /secrets/hmac-key\n",
        ),
        "routes[0].credential.signature.components[0]: '@body' is not a derived component",
    ),
    (
        "signature parameters on a route that does not sign",
        VALID.replace(
            "scope: payments.write}",
            "scope: payments.write, inject: dpop, signature: {components: ['@method']}}",
        ),
        "routes[0].credential.signature: only for inject: http_signature",
    ),
    (
        "unknown injector",
        VALID.replace("scope: payments.write}", "scope: payments.write, inject: magic}"),
        "routes[0].credential.inject: 'magic' is not a supported injector (expected one of "
        "'bearer', 'dpop', 'sigv4', 'header', 'query', 'http_signature', 'jwt_svid')",
    ),
    (
        "unknown issuer type",
        VALID.replace("type: oauth2", "type: gcp"),
        "issuers.idp.type: 'gcp' is not a supported type (expected one of 'oauth2', 'token_exchange', 'aws', 'static', 'openbao', 'vault', 'self_signed_jwt', 'spiffe')",
    ),
    (
        "assertion too long-lived",
        VALID.replace(
            "    client_id: orders\n", "    client_id: orders\n    assertion_lifetime_s: 600\n"
        ),
        "issuers.idp.assertion_lifetime_s: Input should be less than or equal to 60 (got 600)",
    ),
    (
        "key file missing for private_key_jwt",
        VALID.replace("    client_key_file: /secrets/client.pem\n", ""),
        "issuers.idp: client_auth private_key_jwt needs client_key_file",
    ),
    (
        "route matches nothing",
        VALID.replace("    path_prefix: /payments/\n", ""),
        "routes[0]: a route needs path_prefix, host, or both",
    ),
    (
        "negative timeout",
        VALID.replace("    credential:", "    timeouts: {connect_s: -1}\n    credential:"),
        "routes[0].timeouts.connect_s: Input should be greater than 0 (got -1)",
    ),
    (
        "duplicate route",
        VALID + VALID[VALID.index("  - name") :],
        "routes[1].name: 'payments' is also routes[0]",
    ),
    ("duplicate YAML key", VALID + "listen: 127.0.0.1:15002\n", "duplicate key 'listen'"),
    ("a list as a YAML key", VALID + "? [a]\n: 1\n", "not valid YAML: a key must be text"),
    (
        "a header prefix that would forge a header",
        VALID.replace(
            "scope: payments.write}",
            'inject: header, header: X-Api-Key, header_prefix: "Token\\r\\nX-Forged: 1 "}',
        ),
        "routes[0].credential.header_prefix: String should match pattern",
    ),
    (
        "a keyid that would end its Signature-Input string early",
        VALID.replace(
            "scope: payments.write}",
            "scope: payments.write, inject: http_signature, "
            """signature: {key_id: 'k1";alg="none'}}""",
        ).replace(
            VALID[VALID.index("    type: oauth2") : VALID.index("routes:")],
            "    type: static\n    secret_file: /secrets/hmac-key\n",
        ),
        "routes[0].credential.signature.key_id: String should match pattern",
    ),
    ("not YAML", "listen: [unclosed\n", "not valid YAML"),
    ("not a mapping", "- just\n- a list\n", "the top level must be a mapping"),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD]
)
def test_bad_config_error_names_path_and_value(text, expected):
    """Each kind of mistake is reported with the path of the bad key (and its value where useful)."""
    errors = _errors(text)
    assert any(expected in line for line in errors), errors


def test_inline_secret_value_is_never_echoed():
    """An inline secret is refused without repeating the secret in the error."""
    errors = _errors(
        VALID.replace(
            "    client_key_file:", "    client_secret: hunter2hunter2\n    client_key_file:"
        )
    )
    assert "hunter2" not in "\n".join(errors)


def test_all_errors_are_reported_at_once():
    """Several independent mistakes come back together, not one per run."""
    text = VALID.replace("127.0.0.1:15001", "0.0.0.0:1").replace("inject", "x") + "bogus: 1\n"
    text = text.replace("scope: payments.write}", "scope: payments.write, inject: magic}")
    errors = _errors(text)
    assert len(errors) >= 2, errors
    assert any(line.startswith("bogus") for line in errors)
    assert any(line.startswith("routes[0].credential.inject") for line in errors)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_check_config_accepts_the_example():
    """config/example.yaml, the reference users copy, passes check-config."""
    result = _cli("check-config", "config/example.yaml")
    assert result.returncode == 0, result.stderr
    assert "valid (8 route(s), 7 issuer(s))" in result.stdout


def test_check_config_rejects_with_exit_1_and_errors_on_stderr(tmp_path):
    """An invalid file exits 1 and lists each error with its path on stderr."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("{issuer: idp,", "{issuer: nope,") + "bogus: 1\n")
    result = _cli("check-config", str(bad))
    assert result.returncode == 1
    assert "2 error(s)" in result.stderr
    assert "routes[0].credential.issuer" in result.stderr and "bogus: unknown key" in result.stderr
    assert result.stdout == ""


def test_check_config_missing_file(tmp_path):
    """A config path that does not exist is a clear error, not a traceback."""
    result = _cli("check-config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 1 and "cannot read the config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    """A config file in another encoding is a ConfigError naming the file and the byte, not a
    UnicodeDecodeError (which check-config would print as a traceback)."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(VALID.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as raised:
        loader.load(latin1)
    assert raised.value.errors == [f"{latin1}: not UTF-8 text (byte {len(VALID) + 5})"]


def test_schema_is_json_schema_of_the_config():
    """`credproxy schema` prints a JSON Schema that knows the public field names."""
    result = _cli("schema")
    schema = json.loads(result.stdout)
    assert {"listen", "admin", "issuers", "routes", "audit"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_usage_error_exits_2():
    """No command is a usage error (exit 2)."""
    assert _cli().returncode == 2


def test_callers_and_allow_rules_are_checked():
    """Allow rules must name defined callers and use whole-segment '**' globs."""
    text = VALID.replace("routes:", "callers:\n  app: {uid: 1000}\nroutes:") + (
        '    allow: [{callers: [app, ghost], paths: ["/v1/a**"]}]\n'
    )
    errors = _errors(text)
    assert any(
        "routes[0].allow[0].callers: 'ghost' is not defined under callers" in e for e in errors
    )
    assert any(
        e.startswith("routes[0].allow[0].paths[0]: '**' must be a whole path segment")
        for e in errors
    )


def test_route_without_allow_rules_is_flagged_by_check_config(tmp_path):
    """check-config warns that a route with no allow rules refuses every request (default deny)."""
    path = tmp_path / "c.yaml"
    path.write_text(VALID)
    result = _cli("check-config", str(path))
    assert result.returncode == 0
    assert "routes[0].allow: empty, so every request on this route is refused" in result.stderr


AWS = """\
listen: 127.0.0.1:15001
issuers:
  aws:
    type: aws
    role_arn: arn:aws:iam::123456789012:role/app
    token_file: /var/run/secrets/eks.amazonaws.com/serviceaccount/token
    region: eu-west-1
routes:
  - name: s3
    path_prefix: /s3/
    upstream: https://s3.eu-west-1.amazonaws.com
    credential: {issuer: aws, inject: sigv4}
"""

AWS_BAD = [
    (
        "unknown service",
        AWS.replace("inject: sigv4}", "inject: sigv4, service: nosuchservice}"),
        "routes[0].credential.service: 'nosuchservice' is not an AWS service botocore knows",
    ),
    (
        "no service",
        AWS.replace("https://s3.eu-west-1.amazonaws.com", "https://storage.internal"),
        "routes[0].credential.service: required for sigv4",
    ),
    (
        "streaming payload for a service that needs a hash",
        AWS.replace("s3.eu-west-1", "dynamodb.eu-west-1").replace(
            "inject: sigv4}", "inject: sigv4, payload: streaming}"
        ),
        "routes[0].credential.payload: streaming (aws-chunked with a checksum trailer) is for s3",
    ),
    ("no region", AWS.replace("    region: eu-west-1\n", ""), "issuers.aws.region: field required"),
    (
        "bad region",
        AWS.replace("inject: sigv4}", "inject: sigv4, region: moon-1}"),
        "routes[0].credential.region: String should match pattern",
    ),
    (
        "sigv4 with an oauth2 issuer",
        VALID.replace("scope: payments.write}", "scope: payments.write, inject: sigv4}"),
        "routes[0].credential.inject: 'sigv4' does not go with an issuer of type oauth2",
    ),
    (
        "role and static keys",
        AWS.replace("    region:", "    static_credentials_file: /k.json\n    region:"),
        "issuers.aws: set exactly one of role_arn (web identity) or static_credentials_file",
    ),
    (
        "bad role arn",
        AWS.replace("role/app", "user/app"),
        "issuers.aws.role_arn: String should match pattern",
    ),
    (
        "session name with non-ASCII letters (STS accepts ASCII only)",
        AWS.replace("    region:", "    session_name: caf\u00e9-app\n    region:"),
        "issuers.aws.session_name: String should match pattern",
    ),
    (
        "role arn with non-ASCII digits",
        AWS.replace("123456789012", "\u0661\u0662\u0663456789012"),
        "issuers.aws.role_arn: String should match pattern",
    ),
    (
        "region with a non-ASCII digit",
        AWS.replace("eu-west-1\n", "eu-west-\u0661\n"),
        "issuers.aws.region: String should match pattern",
    ),
    (
        "too short a session",
        AWS.replace("    region:", "    duration_s: 60\n    region:"),
        "issuers.aws.duration_s: Input should be greater than or equal to 900 (got 60)",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in AWS_BAD], ids=[n for n, _, _ in AWS_BAD]
)
def test_bad_aws_config_names_path(text, expected):
    """AWS issuer and sigv4 route mistakes are reported with their config path."""
    errors = _errors(text)
    assert any(expected in line for line in errors), errors


def test_aws_service_and_region_derive_from_the_upstream_host():
    """s3.eu-west-1.amazonaws.com needs no explicit service or region."""
    from proxy.config.issuers import sigv4_scope

    loader.parse(AWS)
    assert sigv4_scope(None, None, "https://dynamodb.us-east-2.amazonaws.com", None) == (
        "dynamodb",
        "us-east-2",
    )
    assert sigv4_scope(None, None, "https://bucket.s3.eu-west-1.amazonaws.com", "us-east-1") == (
        "s3",
        "eu-west-1",
    )
    assert sigv4_scope("sqs", None, "http://127.0.0.1:4566", "us-east-1") == ("sqs", "us-east-1")


STATIC = """\
listen: 127.0.0.1:15001
issuers:
  key: {type: static, secret_file: /secrets/api-key}
  self: {type: self_signed_jwt, iss: orders, sub: orders}
routes:
  - name: api
    path_prefix: /api/
    upstream: https://api.example.com
    credential: {issuer: key, inject: header, header: X-Api-Key}
"""


def test_static_and_self_signed_configs():
    """Static secrets need a header or query name; schemes must fit their issuer; JWTs live ≤ 60 s."""
    loader.parse(STATIC)
    cases = {
        STATIC.replace(
            ", header: X-Api-Key", ""
        ): "routes[0].credential.header: required with inject: header",
        STATIC.replace(
            "inject: header, header: X-Api-Key", "inject: query"
        ): "routes[0].credential.query_param: required",
        STATIC.replace(
            "inject: header, header: X-Api-Key", "inject: dpop"
        ): "'dpop' does not go with an issuer of type static",
        STATIC.replace(
            "{issuer: key, inject: header, header: X-Api-Key}", "{issuer: self, inject: sigv4}"
        ): "'sigv4' does not go with an issuer of type self_signed_jwt",
        STATIC.replace(
            "sub: orders}", "sub: orders, lifetime_s: 600}"
        ): "issuers.self.lifetime_s: Input should be less than or equal to 60",
        STATIC.replace(
            "secret_file: /secrets/api-key", "secret: hunter2"
        ): "issuers.key: 'secret' must not be written inline",
    }
    for text, expected in cases.items():
        errors = _errors(text)
        assert any(expected in line for line in errors), (expected, errors)


def test_check_config_warns_about_plain_http_to_loopback(tmp_path):
    """Invariant 8: plain http is accepted only for loopback, and check-config still says so."""
    path = tmp_path / "c.yaml"
    path.write_text(
        VALID.replace("https://idp.example.com", "http://127.0.0.1:8080").replace(
            "upstream: https://payments.example.com", "upstream: http://localhost:9000"
        )
    )
    result = _cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "issuers.idp: plain http to http://127.0.0.1:8080" in result.stderr
    assert "routes[0].upstream: plain http" in result.stderr


CROSS = """\
listen: 127.0.0.1:15001
issuers:
  idp: {type: oauth2, issuer_url: https://idp.example.com, client_id: o, client_key_file: /k.pem}
  aws: {type: aws, role_arn: "arn:aws:iam::123456789012:role/app", token_file: /t, region: eu-west-1}
  key: {type: static, secret_file: /secrets/hmac-key}
routes:
  - {name: a, path_prefix: /a/, upstream: https://a.example.com,
     credential: {issuer: idp, inject: sigv4}}
  - {name: b, path_prefix: /b/, upstream: https://storage.internal,
     credential: {issuer: aws, inject: sigv4, payload: streaming}}
  - {name: c, path_prefix: /c/, upstream: https://c.example.com,
     credential: {issuer: key, inject: http_signature}}
bogus: 1
"""


def test_cross_reference_errors_come_all_at_once_with_their_paths():
    """Credential-versus-issuer problems of every route, several in one credential, come back
    together with shape errors elsewhere, each naming its path."""
    errors = _errors(CROSS)
    for expected in (
        "bogus: unknown key",
        "routes[0].credential.inject: 'sigv4' does not go with an issuer of type oauth2 "
        "(use bearer or dpop)",
        "routes[1].credential.service: required for sigv4",
        "routes[1].credential.payload: streaming (aws-chunked with a checksum trailer) is for s3",
        "routes[2].credential.signature.key_id: required to sign with a static (HMAC) secret",
    ):
        assert any(line.startswith(expected) for line in errors), (expected, errors)


PLACEMENT = [
    ("inject: dpop, header: X-Api-Key", "routes[0].credential.header: only for inject: header"),
    (
        "inject: bearer, query_param: key",
        "routes[0].credential.query_param: only for inject: query",
    ),
    ("service: s3", "routes[0].credential.service: only for inject: sigv4"),
    (
        "inject: bearer, header_prefix: 'Token '",
        "routes[0].credential.header_prefix: only for inject: header",
    ),
    (
        "payload_max_bytes: 1024",
        "routes[0].credential.payload_max_bytes: only for inject: sigv4 or http_signature",
    ),
    ("inject: dpop, hedaer: X", "routes[0].credential.hedaer: unknown key"),
]


@pytest.mark.parametrize(("options", "expected"), PLACEMENT, ids=[e for _, e in PLACEMENT])
def test_an_option_given_to_the_wrong_injector_names_the_right_one(options, expected):
    """Each injector takes only its own options; another's is named with the injectors it is for."""
    errors = _errors(VALID.replace("scope: payments.write}", f"scope: payments.write, {options}}}"))
    assert any(line.startswith(expected) for line in errors), errors
    assert not any("Extra inputs" in line for line in errors), errors


def test_schema_shows_each_injector_with_its_options():
    """`credproxy schema`: a route's credential is one shape per inject, each with its options
    only, and every issuer type says which injectors it supports."""
    from proxy.config.credential import CREDENTIAL_CONFIGS
    from proxy.config.issuers import ISSUER_CONFIGS

    schema = loader.json_schema()
    defs = schema["$defs"]
    credential = defs["RouteConfig"]["properties"]["credential"]
    mapping = credential["discriminator"]["mapping"]
    assert credential["discriminator"]["propertyName"] == "inject"
    assert sorted(mapping) == sorted(CREDENTIAL_CONFIGS)
    options = {tag: set(defs[ref.split("/")[-1]]["properties"]) for tag, ref in mapping.items()}
    common = {"issuer", "audience", "scope", "inject"}
    assert options["dpop"] == options["bearer"] == common
    assert options["header"] == common | {"header", "header_prefix"}
    assert options["query"] == common | {"query_param"}
    assert options["sigv4"] == common | {"service", "region", "payload", "payload_max_bytes"}
    assert options["http_signature"] == common | {"signature", "payload_max_bytes"}
    dpop = defs[mapping["dpop"].split("/")[-1]]
    assert dpop["properties"]["inject"]["default"] == "dpop" and "inject" not in dpop["required"]
    issuers = schema["properties"]["issuers"]["patternProperties"]
    [issuer_union] = issuers.values()
    assert sorted(issuer_union["discriminator"]["mapping"]) == sorted(ISSUER_CONFIGS)
    for model in ISSUER_CONFIGS.values():
        injects = ", ".join(model.supported_injectors)
        assert defs[model.__name__]["description"].endswith(f"may inject: {injects}")


def test_registries_and_checks_are_derived_from_the_plugins_declarations():
    """The runtime tables pair every config model with an implementation, and the inject check
    follows each issuer model's supported_injectors: no table of its own to keep in step."""
    from proxy.config.credential import CREDENTIAL_CONFIGS
    from proxy.config.issuers import ISSUER_CONFIGS
    from proxy.credentials.injectors import INJECTORS
    from proxy.credentials.issuers import ISSUERS

    assert set(ISSUERS) == set(ISSUER_CONFIGS.values())
    assert set(INJECTORS) == set(CREDENTIAL_CONFIGS.values())
    for kind, model in ISSUER_CONFIGS.items():
        assert model.supported_injectors
        for inject in CREDENTIAL_CONFIGS:
            errors = cross_checks._credential_checks(
                "r", {"upstream": "https://u.example"}, {"issuer": "i", "inject": inject},
                {"type": kind},
            )  # fmt: skip
            refused = any("does not go with an issuer" in e for e in errors)
            assert refused == (inject not in model.supported_injectors), (kind, inject, errors)


NEW_ISSUER = """
from typing import Literal
from proxy.config.issuers import IssuerConfig

class VaultIssuerConfig(IssuerConfig):
    type: Literal["vault"]
    supported_injectors = ("bearer",)
    address: str

from proxy.config import loader
from proxy.errors import ConfigError

text = '''
listen: 127.0.0.1:15001
issuers: {v: {type: vault, address: https://vault.example}}
routes: [{name: r, path_prefix: /r/, upstream: https://u.example, credential: {issuer: v, INJECT}}]
'''
assert loader.parse(text.replace("INJECT", "inject: bearer")).issuers["v"].address
try:
    loader.parse(text.replace("INJECT", "inject: dpop"))
except ConfigError as exc:
    print(exc.errors)
print("vault" in loader.json_schema()["properties"]["issuers"]["patternProperties"]["^[A-Za-z0-9][A-Za-z0-9_.-]*$"]["discriminator"]["mapping"])
try:
    import proxy.credentials.issuers
except ImportError as exc:
    print(exc)
"""


def test_a_new_issuer_needs_only_its_config_model_and_its_module():
    """A new issuer config model joins the config union, the inject check and the schema by being
    defined; without its module under credentials/issuers/, the runtime refuses to import."""
    result = subprocess.run(
        [sys.executable, "-c", NEW_ISSUER], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    refused, in_schema, no_module = result.stdout.splitlines()
    assert "'dpop' does not go with an issuer of type vault (use bearer)" in refused
    assert in_schema == "True"
    assert "issuer types without an implementation" in no_module and "vault" in no_module


@pytest.mark.parametrize(
    ("upstream", "protocol", "expected"),
    [
        ("http://127.0.0.1:50051", "h2", "upstream_protocol h2 negotiates HTTP/2 by TLS ALPN"),
        ("http://127.0.0.1:50051", "auto", "upstream_protocol auto negotiates HTTP/2 by TLS ALPN"),
        ("https://grpc.example.com", "h2c", "upstream_protocol h2c is cleartext HTTP/2"),
    ],
)
def test_upstream_protocol_must_fit_the_upstream_scheme(upstream, protocol, expected):
    """h2 and auto negotiate by ALPN (https only); h2c is cleartext prior knowledge (http only):
    a mismatch is refused at load with the route's path."""
    text = VALID.replace(
        "    upstream: https://payments.example.com\n",
        f"    upstream: {upstream}\n    upstream_protocol: {protocol}\n",
    )
    errors = _errors(text)
    assert len(errors) == 1 and errors[0].startswith("routes[0]") and expected in errors[0]
    assert loader.parse(VALID).routes[0].upstream_protocol == "http1.1"


def _routes(count: int, upstream: str) -> str:
    return "".join(
        f"  - {{name: r{i}, path_prefix: /r{i}/, upstream: {upstream},"
        f" credential: {{issuer: idp, audience: {upstream}}}}}\n"
        for i in range(count)
    )


def test_a_warning_shared_by_many_routes_is_one_line_naming_the_first_and_the_count():
    """Two plain-http routes get a line each; 1,000 get one line, so other warnings stay seen."""
    head = VALID.split("routes:")[0] + "routes:\n"
    two = loader.warnings(loader.parse(head + _routes(2, "http://127.0.0.1:8080")))
    assert [w for w in two if "plain http" in w] == [
        "routes[0].upstream: plain http; the credential crosses unencrypted",
        "routes[1].upstream: plain http; the credential crosses unencrypted",
    ]
    many = head + _routes(1, "https://a.example.com") + _routes(1000, "http://127.0.0.1:8080")
    many = many.replace("name: r0, path_prefix: /r0/", "name: tls, path_prefix: /tls/", 1)
    notes = loader.warnings(
        loader.parse(
            many + "  - {name: x, path_prefix: /x/, upstream: "
            "https://x.example.com, allow: [], credential: "
            "{issuer: idp, audience: https://x.example.com}}\n"
        )
    )
    assert [w for w in notes if "plain http" in w] == [
        "routes[1].upstream, routes[2].upstream, routes[3].upstream and 997 more routes: "
        "plain http; the credential crosses unencrypted"
    ]
    assert "routes[1001].allow: empty, so every request on this route is refused" in notes
