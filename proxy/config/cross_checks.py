"""Checks that span config sections (addresses, names that refer to other sections, a route's
credential against its issuer, the control plane), run on the raw document so that they
report even when pydantic found shape errors elsewhere: all errors come at once."""

from __future__ import annotations

import re
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .base import is_loopback
from .credential import CREDENTIAL_CONFIGS, DEFAULT_INJECT, CredentialConfig
from .issuers import ISSUER_CONFIGS, IssuerConfig, OpenBaoIssuerConfig
from .model import AnyCredentialConfig, AnyIssuerConfig, parse_address


def check(data: dict[str, Any]) -> list[str]:
    """Every cross-section problem of a raw config document, each named by its path."""
    return _section_checks(data) + _control_checks(data)


def shown(name: object) -> str:
    """A name the user wrote: as is when plain, else quoted with control characters escaped."""
    text = str(name)
    return text if re.fullmatch(r"[\w.@/-]+", text) else repr(text)


def _names(keys: Any) -> str:
    return ", ".join(sorted(shown(k) for k in keys)) or "none"


def _items(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _section_checks(data: dict[str, Any]) -> list[str]:
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
            and auth.get("identity", "token_file") == "token_file"
            and auth.get("token_file") is None
            and not default_token
        ):
            errors.append(
                f"issuers.{shown(name)}.auth.token_file: needed to log in with the workload's "
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
                f"routes[{i}].client_cert.issuer: issuers.{shown(name)} issues no client "
                "certificates (an openbao issuer with pki: {role, common_name} does)"
            )
    credential = route.get("credential")
    name = credential.get("issuer") if isinstance(credential, dict) else None
    issuer = issuers.get(name) if isinstance(name, str) else None
    if isinstance(issuer, dict) and _is_openbao(issuer) and issuer.get("secret") is None:
        errors.append(
            f"routes[{i}].credential.issuer: issuers.{shown(name)} has no secret to inject "
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
