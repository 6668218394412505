"""``inject: jwt_svid``: the JWT-SVID the ``spiffe`` issuer obtained for the upstream's audience,
as ``Authorization: Bearer`` (SPIFFE service-to-service authentication)."""

from __future__ import annotations

from ...config.credential import JWTSVIDCredential
from ...config.model import RouteConfig
from ..issuers.base import Issuer
from .base import Injector, Signing, injector
from .bearer import BearerInjector


@injector(JWTSVIDCredential)
def _jwt_svid(
    credential: JWTSVIDCredential, route: RouteConfig, issuer: Issuer, signing: Signing
) -> Injector:
    del credential, route, issuer, signing
    return BearerInjector()
