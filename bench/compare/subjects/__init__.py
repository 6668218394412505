"""The paths under test, as one table: a ``Subject`` per ``--only`` key, each started by its own
module (``direct``, ``nginx``, ``envoy``, ``mitmproxy``, ``aiohttp_proxy``, ``credproxy``), whose
nginx, Envoy or mitmproxy configuration is the template file beside it."""

from __future__ import annotations

from ..constants import ENVOY, MITMDUMP
from . import aiohttp_proxy, direct, envoy, mitmproxy, nginx, protocol_proxy
from .credproxy import VARIANTS
from .subject import Started, Subject

__all__ = ["SUBJECTS", "Started", "Subject", "available"]

SUBJECTS: list[Subject] = [
    Subject("direct", "direct to upstream", direct.start, note="wrk sends the key itself"),
    Subject("nginx", "nginx reverse proxy, static header", nginx.start),
    Subject("envoy", "Envoy, static header", envoy.start_static, tool=ENVOY),
    Subject(
        "envoy-oauth2",
        "Envoy, OAuth2 credential injector",
        envoy.start_oauth2,
        idp=True,
        tool=ENVOY,
        note="client_secret_basic at the IdP; Bearer",
    ),
    Subject(
        "mitmproxy",
        "mitmproxy (mitmdump reverse), header addon",
        mitmproxy.start,
        tool=MITMDUMP,
    ),
    Subject(
        "aiohttp",
        "bare aiohttp proxy, static header",
        aiohttp_proxy.start,
        note="reference: credproxy's HTTP stack alone (bench/aiohttp_proxy.py)",
    ),
    Subject(
        "floor",
        "protocol floor: credproxy's HTTP/1.1 machinery, none of its logic",
        protocol_proxy.start,
        instructions=True,
        note="reference: uvloop, raw protocols and aiohttp's C parsers, one header added, "
        "GET only (bench/protocol_proxy.py)",
    ),
    Subject(
        "cp-static",
        "credproxy static header",
        VARIANTS["cp-static"].start,
        credproxy=True,
        startup=VARIANTS["cp-static"].startup,
        instructions=True,
    ),
    Subject(
        "cp-static-1000",
        "credproxy static header, 1,000 routes",
        VARIANTS["cp-static-1000"].start,
        credproxy=True,
        startup=VARIANTS["cp-static-1000"].startup,
        instructions=True,
        note="the measured route declared last, 500 others under its prefix",
    ),
    Subject(
        "cp-bearer",
        "credproxy bearer (token cache)",
        VARIANTS["cp-bearer"].start,
        credproxy=True,
        idp=True,
        upload=True,
        instructions=True,
    ),
    Subject(
        "cp-bearer-defaults",
        "credproxy bearer, shipped defaults",
        VARIANTS["cp-bearer-defaults"].start,
        credproxy=True,
        idp=True,
        note="no log or audit settings: access log on, audit on stdout",
    ),
    Subject(
        "cp-dpop",
        "credproxy DPoP per request",
        VARIANTS["cp-dpop"].start,
        credproxy=True,
        idp=True,
        instructions=True,
    ),
    Subject(
        "cp-jwt",
        "credproxy self-signed JWT per request",
        VARIANTS["cp-jwt"].start,
        credproxy=True,
        instructions=True,
    ),
    Subject(
        "cp-bearer-2w",
        "credproxy bearer, 2 workers",
        VARIANTS["cp-bearer-2w"].start,
        credproxy=True,
        idp=True,
        needs_workers=True,
        note="not pinned: all CPUs",
    ),
]


def available(workers_supported: bool) -> list[Subject]:
    """The paths this credproxy can run (``cp-bearer-2w`` needs ``credproxy run --workers``)."""
    return [s for s in SUBJECTS if workers_supported or not s.needs_workers]
