"""YAML → frozen typed models. Every error names its path and offending value, all at once.

Secrets never appear here: the config points at files that only the sidecar can read.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from yarl import URL

from .errors import ConfigError

_INLINE_SECRET_KEYS = ("client_secret", "secret", "token", "password", "private_key", "api_key")
_LOCAL_NAMES = ("localhost",)


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def is_loopback(host: str) -> bool:
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_http_url(value: str, *, insecure_ok: bool, what: str) -> URL:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{what} must be an absolute http(s) URL")
    if url.query_string or url.fragment:
        raise ValueError(f"{what} must not carry a query or fragment")
    if url.user or url.password:
        raise ValueError(f"{what} must not carry credentials; point at a secret file instead")
    if url.scheme == "http" and not insecure_ok and not is_loopback(url.host):
        raise ValueError(
            f"{what} uses plain http to a non-loopback host; use https "
            "or set allow_insecure_http: true"
        )
    return url


def _reject_inline_secrets(data: Any) -> Any:
    if isinstance(data, dict):
        for key in _INLINE_SECRET_KEYS:
            if key in data:
                raise ValueError(
                    f"'{key}' must not be written inline: put the value in a file only the "
                    f"sidecar can read and name it with '{key}_file'"
                )
    return data


Duration = Annotated[float, Field(gt=0)]


class Timeouts(Model):
    connect_s: Duration = 5.0
    idle_s: Duration = Field(60.0, gt=0, description="longest wait for the next upstream byte")
    total_s: Duration = Field(300.0, gt=0, description="whole exchange, headers and body")


class OAuth2Issuer(Model):
    """OAuth2 ``client_credentials`` with OIDC / RFC 8414 discovery."""

    type: Literal["oauth2"]
    issuer_url: str
    client_id: str = Field(min_length=1)
    client_auth: Literal["private_key_jwt", "client_secret"] = "private_key_jwt"
    client_key_file: Path | None = None
    client_key_id: str | None = Field(None, description="'kid' header of client assertions")
    client_secret_file: Path | None = None
    assertion_audience: Literal["issuer", "token_endpoint"] = "issuer"
    assertion_lifetime_s: float = Field(30.0, gt=0, le=60)
    audience_param: Literal["resource", "audience"] = Field(
        "resource", description="form parameter carrying a route's audience (RFC 8707: resource)"
    )
    ca_file: Path | None = None
    allow_insecure_http: bool = False
    refresh_ahead_s: Duration | None = Field(
        None, description="default: min(60 s, 20 % of the token lifetime)"
    )
    request_timeout_s: Duration = 10.0
    max_lifetime_s: Duration = Field(86400.0, description="cap on an issuer's expires_in")
    backoff_max_s: Duration = 30.0

    _no_inline = model_validator(mode="before")(_reject_inline_secrets)

    @model_validator(mode="after")
    def _check(self) -> OAuth2Issuer:
        _check_http_url(self.issuer_url, insecure_ok=self.allow_insecure_http, what="issuer_url")
        if self.client_auth == "private_key_jwt" and self.client_key_file is None:
            raise ValueError("client_auth private_key_jwt needs client_key_file")
        if self.client_auth == "client_secret" and self.client_secret_file is None:
            raise ValueError("client_auth client_secret needs client_secret_file")
        return self


class Credential(Model):
    issuer: str
    audience: str | None = None
    scope: str | None = None
    inject: Literal["bearer", "dpop"] = "dpop"


class CallerRule(Model):
    """Attributes the kernel reports for a caller; every attribute given must match."""

    uid: int | None = Field(None, ge=0)
    gid: int | None = Field(None, ge=0)
    exe: str | None = Field(None, pattern=r"^/", description="absolute path of the executable")
    exe_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    cgroup: str | None = Field(None, pattern=r"^/", description="cgroup v2 path prefix")
    any_local: bool = Field(False, description="any local process: only when written explicitly")

    @model_validator(mode="after")
    def _check(self) -> CallerRule:
        named = [
            f for f in ("uid", "gid", "exe", "exe_sha256", "cgroup") if getattr(self, f) is not None
        ]
        if self.any_local and named:
            raise ValueError(f"any_local: true cannot be combined with {', '.join(named)}")
        if not self.any_local and not named:
            raise ValueError(
                "name at least one of uid, gid, exe, exe_sha256, cgroup, or any_local: true"
            )
        return self


def _check_glob(pattern: str) -> str:
    if not pattern.startswith("/"):
        raise ValueError("a path glob starts with /")
    if any("**" in part and part != "**" for part in pattern.split("/")):
        raise ValueError("'**' must be a whole path segment, as in /v1/**")
    return pattern


class AllowRule(Model):
    """Who may use a route: callers (names under ``callers``), methods, and path globs matched
    against the path as forwarded (``*`` one segment, ``**`` any number of segments)."""

    callers: tuple[str, ...] = Field(min_length=1)
    methods: tuple[Annotated[str, Field(pattern=r"^[A-Z]+$")], ...] | None = Field(
        None, description="default: any method"
    )
    paths: tuple[Annotated[str, AfterValidator(_check_glob)], ...] = ("/**",)


class Route(Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    path_prefix: str | None = Field(None, pattern=r"^/")
    host: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]+$")
    strip_prefix: bool = True
    upstream: str
    ca_file: Path | None = None
    allow_insecure_http: bool = False
    credential: Credential
    strip_headers: tuple[str, ...] = Field(
        (), description="extra inbound headers that carry credentials and must not be forwarded"
    )
    timeouts: Timeouts = Timeouts()
    allow: tuple[AllowRule, ...] = Field(
        (), description="default deny: a request no rule allows is refused with 403"
    )
    retry_body_max_bytes: int = Field(
        65536,
        ge=0,
        le=1024 * 1024,
        description="bodies up to this size are buffered so a 401 can be retried",
    )

    @model_validator(mode="after")
    def _check(self) -> Route:
        if self.path_prefix is None and self.host is None:
            raise ValueError("a route needs path_prefix, host, or both")
        _check_http_url(self.upstream, insecure_ok=self.allow_insecure_http, what="upstream")
        return self


class Identity(Model):
    token_file: Path | None = Field(None, description="projected token / JWT-SVID (later issuers)")
    dpop_alg: Literal["ES256", "EdDSA"] = "ES256"


class Log(Model):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = Field(True, description="one line per proxied request")


class Audit(Model):
    file: str = Field("-", description="JSON-lines audit file; '-' is stdout")


def _as_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


class Config(Model):
    listen: Annotated[tuple[str, ...], BeforeValidator(_as_tuple)] = Field(min_length=1)
    admin: str | None = "127.0.0.1:15090"
    allow_non_loopback: bool = False
    unix_socket_mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")
    local_names: tuple[str, ...] = Field(
        (), description="Host names accepted besides localhost, loopback literals and route hosts"
    )
    identity: Identity = Identity()
    callers: dict[str, CallerRule] = {}
    issuers: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")], OAuth2Issuer]
    routes: tuple[Route, ...] = Field(min_length=1)
    audit: Audit = Audit()
    log: Log = Log()
    warm_up: bool = Field(True, description="obtain every route's credential at start")
    on_start_failure: Literal["not_ready", "exit"] = Field(
        "not_ready", description="when warm-up cannot get a credential: stay not-ready or exit 1"
    )
    shutdown_timeout_s: Duration = 10.0


@dataclass(frozen=True)
class Address:
    """A parsed ``listen``/``admin`` entry: TCP host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def parse_address(value: str) -> Address:
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"'{value}': a Unix socket path must be absolute")
        return Address(path=path)
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", value)
    if not match or int(match[2]) > 65535:
        raise ValueError(f"'{value}' is not host:port, [v6]:port or unix:/path")
    return Address(host=match[1], port=int(match[2]))


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _cross_checks(data: dict[str, Any]) -> list[str]:
    """Checks that span sections. They read the raw document, defensively, so they run (and
    report) even when pydantic found shape errors elsewhere: all errors come at once."""
    errors: list[str] = []
    allow_remote = data.get("allow_non_loopback") is True
    addresses: dict[str, str] = {}
    listen = [(f"listen[{i}]", v) for i, v in enumerate(_items(data.get("listen", [])))]
    admin = [("admin", data["admin"])] if isinstance(data.get("admin"), str) else []
    for where, value in [*listen, *admin]:
        if not isinstance(value, str):
            continue  # pydantic reports the type
        try:
            address = parse_address(value)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            continue
        if address.host and not is_loopback(address.host) and not allow_remote:
            errors.append(
                f"{where}: '{value}' is not a loopback address; credproxy serves only the local "
                "workload unless allow_non_loopback: true is set"
            )
        if str(address) in addresses and address.port != 0:
            errors.append(f"{where}: '{value}' is already used by {addresses[str(address)]}")
        addresses[str(address)] = where
    raw_issuers = data.get("issuers")
    issuers: dict[Any, Any] = raw_issuers if isinstance(raw_issuers, dict) else {}
    seen_names: dict[str, int] = {}
    seen_matches: dict[tuple[str | None, str | None], int] = {}
    raw_callers = data.get("callers")
    callers: dict[Any, Any] = raw_callers if isinstance(raw_callers, dict) else {}
    raw_routes = data.get("routes")
    routes: list[Any] = raw_routes if isinstance(raw_routes, list) else []
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str) and name in seen_names:
            errors.append(f"routes[{i}].name: '{name}' is also routes[{seen_names[name]}]")
        if isinstance(name, str):
            seen_names.setdefault(name, i)
        host = route.get("host")
        match = (host.lower() if isinstance(host, str) else None, route.get("path_prefix"))
        if match in seen_matches:
            errors.append(
                f"routes[{i}]: host and path_prefix are the same as routes[{seen_matches[match]}]; "
                "the second route could never match"
            )
        seen_matches.setdefault(match, i)
        for j, rule in enumerate(route.get("allow") or []):
            names = rule.get("callers") if isinstance(rule, dict) else None
            for name in names if isinstance(names, list) else []:
                if isinstance(name, str) and name not in callers:
                    errors.append(
                        f"routes[{i}].allow[{j}].callers: '{name}' is not defined under callers "
                        f"(defined: {', '.join(sorted(map(str, callers))) or 'none'})"
                    )
        credential = route.get("credential")
        issuer = credential.get("issuer") if isinstance(credential, dict) else None
        if isinstance(issuer, str) and issuer not in issuers:
            known = ", ".join(sorted(map(str, issuers))) or "none"
            errors.append(
                f"routes[{i}].credential.issuer: '{issuer}' is not defined "
                f"under issuers (defined: {known})"
            )
    return errors


def warnings(config: Config) -> list[str]:
    """Things that are allowed but deserve a second look; ``check-config`` prints them."""
    notes: list[str] = []
    for name, issuer in config.issuers.items():
        if URL(issuer.issuer_url).scheme == "http":
            notes.append(f"issuers.{name}.issuer_url: plain http; acceptable for a local IdP only")
        for field in ("client_key_file", "client_secret_file", "ca_file"):
            path = getattr(issuer, field)
            if path is not None and not path.is_file():
                notes.append(f"issuers.{name}.{field}: {path} does not exist here")
    for i, route in enumerate(config.routes):
        if URL(route.upstream).scheme == "http":
            notes.append(f"routes[{i}].upstream: plain http; the credential crosses unencrypted")
        if not route.allow:
            notes.append(f"routes[{i}].allow: empty, so every request on this route is refused")
        for j, rule in enumerate(route.allow):
            for name in rule.callers:
                if name in config.callers and config.callers[name].any_local:
                    notes.append(
                        f"routes[{i}].allow[{j}]: caller '{name}' is any_local: every local "
                        "process may use this route's credential"
                    )
    return notes


def _format_location(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _format_error(error: Any) -> str:
    where = _format_location(tuple(error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (check its spelling and indentation)"
    if error["type"] == "missing":
        return f"{where}: field required"
    if not isinstance(error["input"], str | int | float | bool):
        return f"{where}: {message}"  # a whole section: repeating it helps nobody
    shown = repr(error["input"])
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{where}: {message} (got {shown})"


def _format_errors(exc: ValidationError) -> list[str]:
    errors = exc.errors()
    failed_inside = {tuple(e["loc"][:n]) for e in errors for n in range(1, len(e["loc"]))}
    # A list whose items failed also reports "too short"; only the items' errors help.
    return [
        _format_error(e)
        for e in errors
        if not (e["type"] == "too_short" and tuple(e["loc"]) in failed_inside)
    ]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A duplicate key in YAML silently wins in PyYAML; in a security config it is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (line {mark.line + 1})", mark
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def parse(text: str, *, source: str = "<config>") -> Config:
    """Parse YAML text into a ``Config``; raise ``ConfigError`` listing every problem."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of keys (listen, routes…)"])
    errors = _cross_checks(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc) + errors) from None
    if errors:
        raise ConfigError(errors)
    return config


def load(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror}"]) from None
    return parse(text, source=str(path))


def json_schema() -> dict[str, Any]:
    return Config.model_json_schema()
