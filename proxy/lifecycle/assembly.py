"""Assembly: one config into a ``Runtime`` — the DPoP key, issuers, token sources and every
route's facts. On a reload, what did not change (the DPoP key, issuers, their sources and
tokens) is carried over from the previous runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from ..access.policy import Admission, RoutePolicy
from ..audit.trail import Audit
from ..config.issuers import IssuerConfig, OAuth2IssuerConfig, OpenBaoIssuerConfig
from ..config.model import Config, RouteConfig
from ..credentials.dpop import DPoPKey
from ..credentials.injectors import Signing, make_injector
from ..credentials.issuers import Issuer, SelfSignedJWTIssuer, SessionIssuer, make_issuer
from ..credentials.minting import MintingSource
from ..credentials.signing import SignatureBatch
from ..credentials.token import CacheKey, Token
from ..credentials.token_cache import TokenSource
from ..credentials.token_share import LeaderClient
from ..errors import IdentityError
from ..inbound.guard import Guard
from ..inbound.routing import RouteTable, Target
from ..inbound.runtime import RouteRuntime, Runtime
from ..metrics import Metrics
from ..outbound.hygiene import CREDENTIAL_HEADERS, HOP_BY_HOP, OVERRIDE_HEADERS
from ..outbound.origin import Origin, Timeouts
from ..outbound.spiffe_tls import SVIDClientTLS
from ..outbound.tls import ClientTLS

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ..spiffe.workload_api import WorkloadAPI


def build(
    config: Config,
    *,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    audit: Audit,
    previous: Runtime | None = None,
    dpop_key: DPoPKey | None = None,
    leader: LeaderClient | None = None,
    workload_api: WorkloadAPI | None = None,
) -> Runtime:
    """Raise ``IdentityError`` (naming the config path) when a key or secret file is unusable.

    On a reload, ``previous`` lends what did not change: the DPoP key (cached tokens are bound to
    it), issuers whose config is the same, and their token sources with the tokens they hold."""
    if previous is not None and previous.config.identity == config.identity:
        same, dpop_key = previous.issuers, previous.signing.dpop_key
    else:
        same, dpop_key = {}, dpop_key or DPoPKey(config.identity.dpop_alg)
    signing = Signing(dpop_key, previous.signing.batch if previous else SignatureBatch())
    issuers: dict[str, Issuer] = {
        name: same[name]
        if name in same and same[name].config == issuer
        else make_issuer(
            name,
            issuer,
            session=session,
            dpop_key=dpop_key,
            identity=config.identity,
            workload_api=workload_api,
        )
        for name, issuer in config.issuers.items()
    }
    sources: dict[CacheKey, TokenSource | MintingSource] = {}

    def source_for(key: CacheKey) -> TokenSource | MintingSource:
        """The source for ``key``: shared by the routes that ask for it; on a reload, the
        previous runtime's while its issuer is kept."""
        issuer = issuers[key.issuer]
        kept = previous.sources.get(key) if previous is not None else None
        if kept is not None and issuer is same.get(key.issuer):
            sources[key] = kept
        elif key not in sources:
            sources[key] = (
                MintingSource(key, key_id=issuer.kid, audit=audit)
                if isinstance(issuer, SelfSignedJWTIssuer)
                else _source(
                    key,
                    issuer,
                    metrics=metrics,
                    audit=audit,
                    leader=leader,
                    revoke_min_interval_s=config.control.revoke_min_interval_s,
                )
            )
        return sources[key]

    routes: list[RouteRuntime] = []
    for i, route in enumerate(config.routes):
        credential = route.credential
        issuer = issuers[credential.issuer]
        injector = make_injector(route, issuer, signing)
        key = CacheKey(
            credential.issuer,
            credential.cache_audience(route.upstream),
            credential.scope,
            injector.binds_token,
        )
        source = source_for(key)
        tls = _tls(
            route,
            issuer,
            workload_api,
            where=f"routes[{i}]",
            alpn={"h2": ("h2",), "auto": ("h2", "http/1.1")}.get(route.upstream_protocol, ()),
        )
        certificate = None
        if route.client_cert is not None and route.client_cert != "svid":
            cert_source = source_for(
                CacheKey(route.client_cert.issuer, None, None, False, "client_cert")
            )
            assert isinstance(cert_source, TokenSource)  # an OpenBao issuer's (config checks)
            certificate = cert_source
        routes.append(
            RouteRuntime(
                name=route.name,
                config=route,
                target=Target.of(route.upstream),
                source=source,
                injector=injector,
                strip=HOP_BY_HOP
                | CREDENTIAL_HEADERS
                | injector.strip
                | {h.lower() for h in route.strip_headers}
                | (frozenset() if route.allow_method_override else OVERRIDE_HEADERS),
                origin=Origin.of(route.upstream),
                timeouts=Timeouts(
                    connect_s=route.timeouts.connect_s,
                    idle_s=route.timeouts.idle_s,
                    total_s=route.timeouts.total_s,
                    streams_outlive_total=route.timeouts.streams_outlive_total,
                ),
                tls=tls,
                policy=RoutePolicy(route.allow, config.callers),
                certificate=certificate,
            )
        )
    for source in sources.values():
        source.routes = tuple(r.name for r in routes if source in (r.source, r.certificate))
    if leader is None:  # a follower worker holds no session: the leader's issuers log in
        for name, issuer in issuers.items():
            users = tuple(r.name for r in routes if name in r.issuer_names)
            if isinstance(issuer, SessionIssuer) and users:
                source_for(CacheKey(name, None, None, False, "session")).routes = users
    guard = Guard(
        [*config.local_names, *(route.host for route in config.routes if route.host)],
        config.local_names,
    )
    return Runtime(
        guard,
        Admission(config.callers),
        RouteTable(config.routes),
        routes,
        sources,
        issuers,
        signing,
        config,
    )


def _tls(
    route: RouteConfig,
    issuer: Issuer,
    workload_api: WorkloadAPI | None,
    *,
    where: str,
    alpn: tuple[str, ...],
) -> ClientTLS:
    """The route's TLS: from the X.509-SVID when it presents one or checks the upstream's SPIFFE
    ID, else from files (its own client certificate, or its issuer's)."""
    config = issuer.config
    issuers_svid = (  # RFC 8705 §3: present the certificate the issuer's tokens may be bound to
        isinstance(config, OAuth2IssuerConfig)
        and config.client_auth == "tls_client_auth"
        and config.client_cert == "svid"
        and route.client_cert is None
        and route.client_cert_file is None
    )
    if not route.uses_svid and not issuers_svid:
        return ClientTLS(route.ca_file, *_client_certificate(route, issuer), where=where, alpn=alpn)
    if workload_api is None:
        raise IdentityError(
            f"{where}: client_cert svid / upstream_spiffe_id need the SPIFFE Workload API: set "
            "identity.spiffe.socket (or SPIFFE_ENDPOINT_SOCKET)"
        )
    return SVIDClientTLS(
        workload_api,
        ca_file=route.ca_file,
        present_svid=route.client_cert == "svid" or issuers_svid,
        upstream_spiffe_id=route.upstream_spiffe_id,
        where=where,
        alpn=alpn,
    )


def _client_certificate(route: RouteConfig, issuer: Issuer) -> tuple[Path | None, Path | None]:
    """The route's own client certificate; else, when its issuer authenticates with one
    (tls_client_auth), that one: the issuer's tokens may be bound to it (RFC 8705 §3)."""
    if route.client_cert_file is not None:
        return route.client_cert_file, route.client_key_file
    config = issuer.config
    if isinstance(config, OAuth2IssuerConfig) and config.client_auth == "tls_client_auth":
        return config.client_cert_file, config.client_key_file
    return None, None


def _refresh_ahead_s(key: CacheKey, config: IssuerConfig) -> float | None:
    """How long before expiry a source renews: the issuer's setting for what ``key`` is."""
    if isinstance(config, OpenBaoIssuerConfig) and key.kind != "token":
        return (
            config.pki.renew_ahead_s
            if config.pki and key.kind == "client_cert"
            else (config.renew_ahead_s)
        )
    return getattr(config, "refresh_ahead_s", None)


def _source(
    key: CacheKey,
    issuer: Issuer,
    *,
    metrics: Metrics,
    audit: Audit,
    leader: LeaderClient | None,
    revoke_min_interval_s: float,
) -> TokenSource:
    follower = leader is not None and issuer.shared_by_workers

    async def fetch() -> Token:
        if follower:
            assert leader is not None
            return await leader.fetch(key)
        return await issuer.fetch(key)

    return TokenSource(
        key,
        fetch,
        revoke=issuer.revoke,
        owns_tokens=not follower,  # the leader revokes what it fetched
        metrics=metrics,
        audit=audit,
        refresh_ahead_s=_refresh_ahead_s(key, issuer.config),
        backoff_max_s=getattr(issuer.config, "backoff_max_s", 30.0),
        revoke_min_interval_s=revoke_min_interval_s,
        # a token request may take discovery and a token call, each within the issuer's timeout
        wait_max_s=max(60.0, 2 * getattr(issuer.config, "request_timeout_s", 0.0) + 5.0),
    )
