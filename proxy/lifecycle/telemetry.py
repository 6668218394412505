"""The telemetry listener (``admin:``): ``/metrics``, ``/healthz``, ``/readyz`` and the public JWKS.

Read-only and free of credentials, so it may face the pod network (Prometheus, kubelet probes);
inventory, revocation and break-glass are on the control plane (``control``), never here.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..access.callers import Caller
from ..credentials.issuers import SelfSignedJWTIssuer
from .admin_http import Endpoint, Sidecar


def endpoints(sidecar: Sidecar) -> Mapping[str, Mapping[str, Endpoint]]:
    async def metrics(request: web.BaseRequest, caller: Caller) -> web.StreamResponse:
        sidecar.sample_gauges()
        body = sidecar.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.BaseRequest, caller: Caller) -> web.StreamResponse:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.BaseRequest, caller: Caller) -> web.StreamResponse:
        waiting = sorted(
            route.name
            for route in sidecar.runtime.routes
            if sidecar.config.warm_up and not route.source.ready
        )
        # No X.509-SVID yet (or it expired): the agent has not attested this process
        svid_missing = sidecar.workload_api is not None and not sidecar.workload_api.ready
        ready = not sidecar.draining and not waiting and not svid_missing
        body: dict[str, object] = {
            "ready": ready,
            "draining": sidecar.draining,
            "routes_without_credential": waiting,
        }
        if sidecar.workload_api is not None:
            body["svid"] = "missing" if svid_missing else "current"
        return web.json_response(body, status=200 if ready else 503)

    async def jwks(request: web.BaseRequest, caller: Caller) -> web.StreamResponse:
        """Public keys of the self_signed_jwt issuers, for upstreams to verify their JWTs."""
        keys = [
            key
            for issuer in sidecar.runtime.issuers.values()
            if isinstance(issuer, SelfSignedJWTIssuer)
            for key in issuer.jwks()["keys"]
        ]
        return web.json_response({"keys": keys}, headers={"Cache-Control": "max-age=60"})

    return {
        "/metrics": {"GET": metrics},
        "/healthz": {"GET": healthz},
        "/readyz": {"GET": readyz},
        "/.well-known/jwks.json": {"GET": jwks},
    }
