"""The control plane: the credential inventory, revocation and break-glass grants, on a Unix
socket or loopback, answered only to callers the kernel identifies and ``control.allow`` names
(default: the sidecar's own uid). Refusals are decided from the head, before any body is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from aiohttp import web

from ..access.callers import Caller
from ..access.policy import CallerMatcher
from ..errors import (
    BrowserRefused,
    ControlCallerNotAllowed,
    InvalidControlRequest,
    ProblemError,
    UnknownName,
)
from ..governance.inventory import inventory
from ..log import server_log
from .admin_http import AdminServer, Endpoint, Sidecar, json_response, read_body


def allowed(sidecar: Sidecar, caller: Caller) -> bool:
    """``control.allow`` names callers (under ``callers``); without it, the sidecar's own uid."""
    config = sidecar.config
    names = config.control.allow
    if not names:
        return caller.identified and caller.uid == os.getuid()
    return any(CallerMatcher(name, config.callers[name]).matches(caller) for name in names)


def control_server(sidecar: Sidecar) -> AdminServer:
    def check(request: web.BaseRequest, caller: Caller) -> None:
        headers = request.headers
        if "Origin" in headers:
            raise BrowserRefused(f"Origin {headers['Origin'][:100]!r}")
        if headers.get("Sec-Fetch-Site", "none") != "none":
            raise BrowserRefused(f"Sec-Fetch-Site {headers['Sec-Fetch-Site'][:20]!r}")
        if not allowed(sidecar, caller):  # again: a reload may have changed control.allow
            raise ControlCallerNotAllowed("caller not in control.allow")

    def admit(caller: Caller) -> ProblemError | None:
        if allowed(sidecar, caller):
            return None
        return ControlCallerNotAllowed("caller not in control.allow")

    config = sidecar.config
    return AdminServer(
        "control",
        endpoints(sidecar),
        local_names=config.local_names,
        head_timeout_s=config.control.head_timeout_s,
        audit=sidecar.audit,
        metrics=sidecar.metrics,
        check=check,
        admit=admit,
    )


def endpoints(sidecar: Sidecar) -> Mapping[str, Mapping[str, Endpoint]]:
    async def credentials(request: web.BaseRequest, caller: Caller) -> web.StreamResponse:
        """The inventory: each credential held or to be held, with its governance fields and
        life so far — never a value."""
        return json_response({
            "credentials": inventory(sidecar.runtime, sidecar.usage, sidecar.workload_api),
            "break_glass": sidecar.break_glass.active(),
        })  # fmt: skip

    async def revoke(request: web.BaseRequest, caller: Caller) -> web.StreamResponse:
        """Revoke cached credentials (``?issuer=``, ``?route=`` narrow it): each is replaced
        first, then revoked; see ``TokenSource.revoke`` for joined, recent and deferred."""
        runtime = sidecar.runtime
        route = request.query.get("route")
        issuer = request.query.get("issuer")
        if route is not None and route not in {r.name for r in runtime.routes}:
            raise UnknownName(f"no route named {route[:100]!r}")
        if issuer is not None and issuer not in runtime.issuers:
            raise UnknownName(f"no issuer named {issuer[:100]!r}")
        sidecar.audit.emit(
            "control.revoke_requested", issuer=issuer, route=route, caller=caller.attributes()
        )
        results = await runtime.revoke(reason="control", issuer=issuer, route=route)
        server_log.info("revocation requested on the control plane: %s", results)
        return json_response({"revoked": results})

    async def grants(request: web.BaseRequest, caller: Caller) -> web.StreamResponse:
        return json_response({"break_glass": sidecar.break_glass.active()})

    async def grant(request: web.BaseRequest, caller: Caller) -> web.StreamResponse:
        """A break-glass grant: JSON ``{route, caller, for, reason, methods?, paths?}``."""
        if sidecar.workers > 1:  # grants live in one process: they would reach 1/N of requests
            raise InvalidControlRequest(
                "break-glass grants are held by one process; run with --workers 1 to grant one"
            )
        control = sidecar.config.control
        body = await read_body(
            request, max_bytes=control.body_max_bytes, timeout_s=control.head_timeout_s
        )
        try:
            wanted = json.loads(body)
        except ValueError:
            raise InvalidControlRequest("the body is not JSON") from None
        if not isinstance(wanted, dict):
            raise InvalidControlRequest("the body is a JSON object")
        runtime = sidecar.runtime
        granted = sidecar.break_glass.grant(
            wanted,
            routes={r.name for r in runtime.routes},
            callers=runtime.config.callers,
            granted_by=caller,
        )
        return json_response({"grant": granted.describe()}, status=201)

    return {
        "/credentials": {"GET": credentials},
        "/credentials/revoke": {"POST": revoke},
        "/break-glass": {"GET": grants, "POST": grant},
    }
