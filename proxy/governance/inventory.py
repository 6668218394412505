"""The credential inventory governance asks for: each credential the sidecar holds or will hold
— issuer, audience, scope, routes, owner, purpose, expiry, last refresh, last use, use count,
legacy flag — never a value. Live from a runtime (``GET /credentials`` on the control plane), or
from the config alone when the sidecar is not running (``credproxy inventory``)."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from ..audit.usage import Usage
from ..config.issuers import (
    AWSIssuerConfig,
    IssuerConfig,
    OpenBaoIssuerConfig,
    StaticIssuerConfig,
)
from ..config.model import Config
from ..credentials.minting import MintingSource
from ..inbound.runtime import Runtime

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ..spiffe.workload_api import WorkloadAPI

COLUMNS = ("issuer", "audience", "scope", "routes", "owner", "expires_at", "last_refresh",
           "last_use", "use_count", "legacy")  # fmt: skip


def _legacy(issuer: IssuerConfig) -> bool:
    """Long-lived secrets an owner should retire: static API keys, KV secrets, static AWS
    keys."""
    return isinstance(issuer, StaticIssuerConfig | OpenBaoIssuerConfig) or (
        isinstance(issuer, AWSIssuerConfig) and issuer.static_credentials_file is not None
    )


Entries = dict[tuple[str, str | None, str | None, str], dict[str, Any]]


def _entries(config: Config) -> Entries:
    """One entry per (issuer, audience, scope, kind) the routes ask for, with the routes sharing
    it: their credential (kind token), their client certificate (kind client_cert) and the
    session their issuer logged in with (kind session: a Vault token)."""
    entries: Entries = {}

    def add(key: tuple[str, str | None, str | None, str], inject: str, route: Any) -> None:
        issuer = config.issuers[key[0]]
        entry = entries.setdefault(key, {
            "issuer": key[0], "type": issuer.type, "kind": key[3], "audience": key[1],
            "scope": key[2], "inject": inject, "routes": [], "owner": issuer.owner,
            "purpose": issuer.purpose, "legacy": _legacy(issuer) and key[3] == "token",
            "svid_rooted": issuer.uses_svid,
        })  # fmt: skip
        entry["routes"].append({"name": route.name, "owner": route.owner, "purpose": route.purpose})

    for route in config.routes:
        credential = route.credential
        audience = credential.cache_audience(route.upstream)
        key = (credential.issuer, audience, credential.scope, "token")
        add(key, credential.inject, route)
        issued = route.client_cert if not isinstance(route.client_cert, str) else None
        if issued is not None:  # (an X.509-SVID is listed as the sidecar's identity)
            add((issued.issuer, None, None, "client_cert"), "mtls", route)
        for name in {credential.issuer, *([issued.issuer] if issued else [])}:
            if isinstance(config.issuers[name], OpenBaoIssuerConfig):  # its Vault token
                add((name, None, None, "session"), "login", route)
    return entries


def from_config(config: Config) -> list[dict[str, Any]]:
    return list(_entries(config).values())


def svid_entry(workload_api: WorkloadAPI) -> dict[str, Any]:
    """The X.509-SVID the sidecar holds (from the SPIFFE Workload API): its ID, serial,
    certificate fingerprint and expiry, and the JWT authorities of the bundles it watches (key
    IDs); never its key."""
    svid = workload_api.x509
    return {
        "issuer": "spiffe-workload-api", "type": "x509_svid", "kind": "identity",
        "audience": None, "scope": None, "inject": None, "routes": [], "owner": None,
        "purpose": "workload identity", "legacy": False, "svid_rooted": True, "binding": "x509",
        "spiffe_id": svid.spiffe_id if svid else None,
        "serial": svid.serial if svid else None,
        "fingerprint": svid.fingerprint if svid else None,
        "expires_at": round(svid.expires_at, 3) if svid else None,
        "last_refresh": None, "rotations": workload_api.rotations,
        "socket": workload_api.socket, "jwt_authorities": workload_api.jwt_authorities,
    }  # fmt: skip


def inventory(
    runtime: Runtime, usage: Usage, workload_api: WorkloadAPI | None = None
) -> list[dict[str, Any]]:
    entries = _entries(runtime.config)
    out = [svid_entry(workload_api)] if workload_api is not None else []
    for key, source in runtime.sources.items():
        entry = dict(entries[(key.issuer, key.audience, key.scope, key.kind)])
        token = source.token
        entry.update(
            binding=key.binding,
            routes=[r for r in entry["routes"] if any(
                rt.name == r["name"] and source in (rt.source, rt.certificate)
                for rt in runtime.routes
            )],
            per_request=isinstance(source, MintingSource),
            fingerprint=token.fingerprint if token else None,
            **({"serial": token.serial} if token and token.serial else {}),
            expires_at=round(token.expires_at, 3) if token else None,
            last_refresh=round(token.obtained_at, 3) if token else None,
            **usage.snapshot(key.issuer, key.label),
        )  # fmt: skip
        out.append(entry)
    return out


def markdown(entries: list[dict[str, Any]], *, live: bool) -> str:
    lines = [
        "| issuer | audience | scope | routes | owner | expires | last refresh | last use "
        "| uses | legacy |",
        "|---|---|---|---|---|---|---|---|---:|---|",
    ]
    for e in entries:
        routes = ", ".join(
            r["name"] + (f" ({r['owner']})" if r.get("owner") else "") for r in e["routes"]
        )
        lines.append(
            f"| {e['issuer']} ({e['type']}{_kind(e)}) | {e.get('audience') or '-'} | {e.get('scope') or '-'} "
            f"| {routes} | {e.get('owner') or '-'} | {_when(e, 'expires_at', live)} "
            f"| {_when(e, 'last_refresh', live)} | {_when(e, 'last_use', live)} "
            f"| {e.get('use_count', '-') if live else '-'} | {'yes' if e['legacy'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _when(entry: dict[str, Any], field: str, live: bool) -> str:
    if not live:
        return "not running"
    if entry.get("per_request") and field != "last_use":
        return "per request"
    value = entry.get(field)
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _kind(entry: dict[str, Any]) -> str:
    kind = entry.get("kind")
    return {"client_cert": ", client certificate", "session": ", session"}.get(kind or "", "")
