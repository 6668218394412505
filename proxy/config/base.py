"""What every config model shares: frozen models, governance fields, URL and inline-secret
checks, durations. ``model`` (the whole file), ``issuers`` and ``credential`` build on it.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from yarl import URL

REGION = r"^[a-z]{2}(?:-[a-z]+)+-[0-9]$"
_INLINE_SECRET_KEYS = ("client_secret", "secret", "token", "password", "private_key", "api_key")
_LOCAL_NAMES = ("localhost",)


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Owned(Model):
    """Governance fields: who answers for a credential or route, and what it is for. Shown in
    the inventory (``GET /credentials``, ``credproxy inventory``); never used for decisions."""

    owner: str | None = Field(None, max_length=200, description="team or person accountable")
    purpose: str | None = Field(None, max_length=500, description="why the workload needs it")


@functools.lru_cache(maxsize=1024)  # consulted per request for the Host header
def is_loopback(host: str) -> bool:
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_http_url(value: str, *, insecure_ok: bool, what: str) -> URL:
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


def reject_inline_secrets(data: Any) -> Any:
    if isinstance(data, dict):
        for key in _INLINE_SECRET_KEYS:
            if key in data:
                raise ValueError(
                    f"'{key}' must not be written inline: put the value in a file only the "
                    f"sidecar can read and name it with '{key}_file'"
                )
    return data


Duration = Annotated[float, Field(gt=0)]
