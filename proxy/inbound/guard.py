"""Request checks before routing (invariant 6): no tunnels, no browsers, no foreign Host names.

No I/O: a ``Guard`` is built once per config and consulted per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..config.base import is_loopback
from ..errors import BrowserRefused, HostNotAllowed, MethodRefused


class Guard:
    def __init__(self, local_names: Iterable[str], own_names: Iterable[str] = ()) -> None:
        """``local_names``: configured names plus every route's ``host``; ``own_names``: the
        configured ``local_names`` alone, names of this sidecar (never a route's host)."""
        self._local_names = frozenset(name.lower() for name in local_names) | {"localhost"}
        self._own_names = frozenset(name.lower() for name in own_names) | {"localhost"}

    def is_listener(self, scheme: str, host: str, port: int | None, sockname: Any) -> bool:
        """Whether an absolute-form target names the listener it arrived on: an app with
        ``HTTP_PROXY`` pointing at credproxy and a base URL at credproxy too sends
        ``GET http://127.0.0.1:15001/payments/…``, an ordinary request in absolute form.
        ``host`` as sent (``URL.raw_host``), ``sockname`` the accepting socket's address (a
        Unix socket's is a path: never named by an authority)."""
        if scheme != "http" or not isinstance(sockname, tuple) or port != sockname[1]:
            return False
        return host in self._own_names or is_loopback(host)

    def check(
        self, method: str, host: str | None, headers: Mapping[str, str], *, forward_proxy: bool
    ) -> None:
        """``host`` is the Host header's name part (``routing.request_host``). In forward-proxy
        mode the target's host is checked against the routes instead (by the route table)."""
        if method == "CONNECT":
            raise MethodRefused()
        if "Origin" in headers:
            raise BrowserRefused(f"Origin {headers['Origin'][:100]!r}")
        if headers.get("Sec-Fetch-Site", "none") != "none":
            raise BrowserRefused(f"Sec-Fetch-Site {headers['Sec-Fetch-Site'][:20]!r}")
        if forward_proxy:
            return
        if host is None or (host not in self._local_names and not is_loopback(host)):
            raise HostNotAllowed(f"Host {host!r} is not a local name (DNS rebinding guard)")
