"""Reading a config file: YAML (duplicate keys refused) → ``model.Config``, with every error
named by its path and offending value, all at once, plus cross-section checks and warnings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError
from yarl import URL

from ..errors import ConfigError
from .base import is_loopback
from .credential import CREDENTIAL_CONFIGS, DEFAULT_INJECT, CredentialConfig, injectors_with
from .issuers import (
    ISSUER_CONFIGS,
    AWSIssuerConfig,
    IssuerConfig,
    OAuth2IssuerConfig,
    OpenBaoIssuerConfig,
    StaticIssuerConfig,
)
from .model import AnyCredentialConfig, AnyIssuerConfig, Config, parse_address


def _shown(name: object) -> str:
    """A name the user wrote: as is when plain, else quoted with control characters escaped."""
    text = str(name)
    return text if re.fullmatch(r"[\w.@/-]+", text) else repr(text)


def _names(keys: Any) -> str:
    return ", ".join(sorted(_shown(k) for k in keys)) or "none"


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _cross_checks(data: dict[str, Any]) -> list[str]:
    """Checks that span sections. They read the raw document, defensively, so they run (and
    report) even when pydantic found shape errors elsewhere: all errors come at once."""
    errors: list[str] = []
    remote_ok = data.get("allow_non_loopback")
    remote_named = (
        {v for v in remote_ok if isinstance(v, str)} if isinstance(remote_ok, list) else set()
    )
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
        if (
            address.host
            and not is_loopback(address.host)
            and remote_ok is not True
            and value not in remote_named
        ):
            errors.append(
                f"{where}: {value!r} is not a loopback address; credproxy serves only the local "
                f"workload unless allow_non_loopback lists it: allow_non_loopback: [{value!r}]"
            )
        if str(address) in addresses and address.port != 0:
            errors.append(f"{where}: {value!r} is already used by {addresses[str(address)]}")
        addresses[str(address)] = where
    raw_issuers = data.get("issuers")
    issuers: dict[Any, Any] = raw_issuers if isinstance(raw_issuers, dict) else {}
    identity = data.get("identity")
    default_token = isinstance(identity, dict) and identity.get("token_file") is not None
    for name, issuer in issuers.items():
        auth = issuer.get("auth") if isinstance(issuer, dict) else None
        if (
            isinstance(auth, dict)
            and issuer.get("type") in ("openbao", "vault")
            and auth.get("token_file") is None
            and not default_token
        ):
            errors.append(
                f"issuers.{_shown(name)}.auth.token_file: needed to log in with the workload's "
                "token (or set identity.token_file)"
            )
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
            errors.append(f"routes[{i}].name: {name!r} is also routes[{seen_names[name]}]")
        if isinstance(name, str):
            seen_names.setdefault(name, i)
        host = route.get("host")
        prefix = route.get("path_prefix")
        match = (host.lower() if isinstance(host, str) else None, prefix)
        if not isinstance(prefix, str | None):
            match = (match[0], repr(prefix))  # pydantic reports the type; keep this hashable
        if match in seen_matches:
            errors.append(
                f"routes[{i}]: host and path_prefix are the same as routes[{seen_matches[match]}]; "
                "the second route could never match"
            )
        seen_matches.setdefault(match, i)
        rules = route.get("allow")
        for j, rule in enumerate(rules if isinstance(rules, list) else []):
            names = rule.get("callers") if isinstance(rule, dict) else None
            for name in names if isinstance(names, list) else []:
                if isinstance(name, str) and name not in callers:
                    errors.append(
                        f"routes[{i}].allow[{j}].callers: {name!r} is not defined under callers "
                        f"(defined: {_names(callers)})"
                    )
        errors.extend(_client_cert_checks(i, route, issuers))
        credential = route.get("credential")
        issuer = credential.get("issuer") if isinstance(credential, dict) else None
        if isinstance(issuer, str) and issuer not in issuers:
            known = _names(issuers)
            errors.append(
                f"routes[{i}].credential.issuer: {issuer!r} is not defined "
                f"under issuers (defined: {known})"
            )
        elif isinstance(credential, dict) and isinstance(issuer, str):
            if isinstance(issuers.get(issuer), dict):
                where = f"routes[{i}].credential"
                errors.extend(_credential_checks(where, route, credential, issuers[issuer]))
    return errors


def _is_openbao(issuer: dict[str, Any]) -> bool:
    kind = issuer.get("type")
    model = ISSUER_CONFIGS.get(kind) if isinstance(kind, str) else None
    return model is not None and issubclass(model, OpenBaoIssuerConfig)


def _client_cert_checks(i: int, route: dict[str, Any], issuers: dict[Any, Any]) -> list[str]:
    """``client_cert.issuer`` names an OpenBao issuer with ``pki``; an OpenBao issuer named
    as a route's credential has a ``secret``."""
    errors = []
    wanted = route.get("client_cert")
    name = wanted.get("issuer") if isinstance(wanted, dict) else None
    if isinstance(name, str):
        issuer = issuers.get(name)
        if not isinstance(issuer, dict):
            errors.append(
                f"routes[{i}].client_cert.issuer: {name!r} is not defined under issuers "
                f"(defined: {_names(issuers)})"
            )
        elif not _is_openbao(issuer) or issuer.get("pki") is None:
            errors.append(
                f"routes[{i}].client_cert.issuer: issuers.{_shown(name)} issues no client "
                "certificates (an openbao issuer with pki: {role, common_name} does)"
            )
    credential = route.get("credential")
    name = credential.get("issuer") if isinstance(credential, dict) else None
    issuer = issuers.get(name) if isinstance(name, str) else None
    if isinstance(issuer, dict) and _is_openbao(issuer) and issuer.get("secret") is None:
        errors.append(
            f"routes[{i}].credential.issuer: issuers.{_shown(name)} has no secret to inject "
            "(it has only pki: name it under client_cert, or give it secret: {path, field})"
        )
    return errors


def _control_checks(data: dict[str, Any]) -> list[str]:
    """control.listen is a Unix socket or loopback (never the pod network, whatever
    allow_non_loopback says); control.allow names callers."""
    control = data.get("control")
    if not isinstance(control, dict):
        return []
    errors: list[str] = []
    listen = control.get("listen")
    if isinstance(listen, str):
        try:
            address = parse_address(listen)
        except ValueError as exc:
            errors.append(f"control.listen: {exc}")
        else:
            if address.host and not is_loopback(address.host):
                errors.append(
                    f"control.listen: {listen!r} is not a loopback address; the control plane "
                    "listens on a Unix socket or loopback only"
                )
    raw_callers = data.get("callers")
    callers = raw_callers if isinstance(raw_callers, dict) else {}
    allow = control.get("allow")
    for i, name in enumerate(allow if isinstance(allow, list) else []):
        if isinstance(name, str) and name not in callers:
            errors.append(
                f"control.allow[{i}]: {name!r} is not defined under callers "
                f"(defined: {_names(callers)})"
            )
    return errors


_CREDENTIAL: TypeAdapter[CredentialConfig] = TypeAdapter(AnyCredentialConfig)
_ISSUER: TypeAdapter[IssuerConfig] = TypeAdapter(AnyIssuerConfig)


def _credential_checks(
    where: str, route: dict[str, Any], credential: dict[str, Any], issuer: dict[str, Any]
) -> list[str]:
    """A route's credential against its issuer, from the plug-ins' declarations: ``inject`` among
    the issuer type's ``supported_injectors``, then every problem the credential's model finds
    (``cross_checks``). Each part is validated on its own, so the checks run even when pydantic
    finds shape errors elsewhere in the file; a part that is itself invalid is pydantic's to report."""
    kind = issuer.get("type")
    model = ISSUER_CONFIGS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return []  # pydantic reports the type
    inject = credential.get("inject", DEFAULT_INJECT)
    if not isinstance(inject, str) or inject not in CREDENTIAL_CONFIGS:
        return []  # pydantic reports an unknown injector
    if inject not in model.supported_injectors:
        return [
            f"{where}.inject: {inject!r} does not go with an issuer of type {kind} "
            f"(use {' or '.join(model.supported_injectors)})"
        ]
    upstream = route.get("upstream")
    if not isinstance(upstream, str):
        return []
    try:
        checked = _CREDENTIAL.validate_python(credential)
        issuer_config = _ISSUER.validate_python(issuer)
    except ValidationError:
        return []
    return [
        f"{where}.{field}: {message}" if field else f"{where}: {message}"
        for field, message in checked.cross_checks(issuer_config, upstream)
    ]


def warnings(config: Config) -> list[str]:
    """Things that are allowed but deserve a second look; ``check-config`` prints them."""
    notes: list[str] = []
    for name, issuer in config.issuers.items():
        url = issuer.issuer_url if isinstance(issuer, OAuth2IssuerConfig) else None
        url = issuer.sts_url if isinstance(issuer, AWSIssuerConfig) else url
        url = issuer.address if isinstance(issuer, OpenBaoIssuerConfig) else url
        if url is not None and URL(url).scheme == "http":
            notes.append(
                f"issuers.{name}: plain http to {url}; acceptable for a local service only"
            )
        if isinstance(issuer, AWSIssuerConfig) and issuer.static_credentials_file is not None:
            notes.append(f"issuers.{name}: static AWS keys (legacy); prefer role_arn + token_file")
        if isinstance(issuer, StaticIssuerConfig):
            notes.append(f"issuers.{name}: a static secret (legacy); audited so it can be retired")
        if isinstance(issuer, OpenBaoIssuerConfig):
            if issuer.secret is not None:
                notes.append(
                    f"issuers.{name}.secret: a KV secret is a static secret (legacy); audited "
                    "with its KV version so it can be retired"
                )
            token_file = issuer.auth.token_file or config.identity.token_file
            if token_file is not None and not token_file.is_file():
                where = "identity.token_file"
                if issuer.auth.token_file is not None:
                    where = f"issuers.{name}.auth.token_file"
                notes.append(f"{where}: {token_file} does not exist here")
        for field in (
            "client_key_file",
            "client_secret_file",
            "ca_file",
            "token_file",
            "static_credentials_file",
            "secret_file",
            "key_file",
        ):
            path = getattr(issuer, field, None)
            if path is not None and not path.is_file():
                notes.append(f"issuers.{name}.{field}: {path} does not exist here")
    for name, caller in config.callers.items():
        process = [f for f in ("exe", "exe_sha256", "cgroup") if getattr(caller, f) is not None]
        if process:
            notes.append(
                f"callers.{name}: {', '.join(process)} is checked on every process holding the "
                "connection, at accept and per request, but is not a kernel boundary between "
                "programs of one uid (ptrace, fd passing): "
                + ("uid is the boundary" if caller.uid is not None else "name a uid too")
            )
    if config.allow_non_loopback is True:
        notes.append(
            "allow_non_loopback: true lets every listener face the network; name the one "
            "address that must, e.g. allow_non_loopback: ['0.0.0.0:15090']"
        )
    elif isinstance(config.allow_non_loopback, tuple):
        addresses = {*config.listen, *([config.admin] if config.admin else [])}
        for value in sorted(set(config.allow_non_loopback) - addresses):
            notes.append(f"allow_non_loopback: {value!r} is not a listen or admin address")
    for i, route in enumerate(config.routes):
        if URL(route.upstream).scheme == "http":
            notes.append(f"routes[{i}].upstream: plain http; the credential crosses unencrypted")
        if not route.allow:
            notes.append(f"routes[{i}].allow: empty, so every request on this route is refused")
        for j, rule in enumerate(route.allow):
            for name in rule.callers:
                if name in config.callers and config.callers[name].any_local:
                    notes.append(
                        f"routes[{i}].allow[{j}]: caller {name!r} is any_local: every local "
                        "process may use this route's credential"
                    )
    return notes


def _untagged(loc: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], str | None]:
    """pydantic puts a union's tag in the path (issuers.idp.oauth2.client_id,
    routes[0].credential.header.header); users never wrote it. The path without it, and the
    ``inject`` when it was a credential's."""
    if len(loc) > 2 and loc[0] == "issuers" and loc[2] in ISSUER_CONFIGS:
        return loc[:2] + loc[3:], None
    if len(loc) > 3 and loc[0] == "routes" and loc[2] == "credential":
        tag = loc[3]
        if isinstance(tag, str) and tag in CREDENTIAL_CONFIGS:
            return loc[:3] + loc[4:], tag
    return loc, None


def _format_location(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if part == "[key]":  # pydantic: the key itself (not its value) is wrong
            out += part
            continue
        name = _shown(part)
        out += f".{name}" if out else name
    return out or "(top level)"


_TAGS = {"type": "type", "inject": "injector"}  # a discriminator → what its values are


def _format_error(error: Any) -> str:
    loc, inject = _untagged(tuple(error["loc"]))
    where = _format_location(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        owners = injectors_with(str(loc[-1])) if inject is not None and len(loc) == 4 else []
        if owners:
            return f"{where}: only for inject: {' or '.join(owners)}"
        return f"{where}: unknown key (check its spelling and indentation)"
    if error["type"] == "missing":
        if inject is not None and len(loc) == 4:
            return f"{where}: required with inject: {inject}"
        return f"{where}: field required"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        ctx = error.get("ctx", {})
        tag = str(ctx.get("discriminator", "'type'")).strip("'")
        expected, got = ctx.get("expected_tags", ""), ctx.get("tag", "nothing")
        return (
            f"{where}.{tag}: {got!r} is not a supported {_TAGS.get(tag, tag)} "
            f"(expected one of {expected})"
        )
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
                    None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(exc: yaml.YAMLError, source: str) -> str:
    """One line: ``file:line:column: not valid YAML: what``."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}: {problem}" if context else problem
    return f"{where}: not valid YAML: {' '.join(str(text).split())}"


def parse(text: str, *, source: str = "<config>") -> Config:
    """Parse YAML text into a ``Config``; raise ``ConfigError`` listing every problem."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc, source)]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping of keys (listen, routes…)"])
    errors = _cross_checks(data) + _control_checks(data)
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
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    return parse(text, source=str(path))


def json_schema() -> dict[str, Any]:
    return Config.model_json_schema()
