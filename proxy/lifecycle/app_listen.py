"""The app listeners: TCP (on a loopback address, both loopback families), Unix sockets, or the
sockets a supervisor made for its workers; and how many connections they may hold under the
process's file-descriptor limit."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import socket
from collections.abc import Callable

from ..config.model import Address, AppLimits, loopback_twin
from ..errors import StartError
from ..inbound.listener import Limits
from ..log import server_log
from .admin_http import ADMIN_DESCRIPTORS
from .unix_socket import bind_unix, cannot_listen, os_reason

ProtocolFactory = Callable[[], asyncio.Protocol]


def connection_limits(limits: AppLimits) -> Limits:
    """``app_limits`` under this process's RLIMIT_NOFILE (raised to its hard limit first), with
    a quarter (at least 64) kept for upstream and issuer sockets and files, and what the
    telemetry and control listeners may hold at most."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    usable = max(1, soft - max(64, soft // 4) - 2 * ADMIN_DESCRIPTORS)
    if usable < limits.max_connections:
        server_log.warning(
            "app_limits.max_connections lowered from %d to %d: RLIMIT_NOFILE is %d",
            limits.max_connections,
            usable,
            soft,
        )
    return Limits(
        limits.max_head_bytes,
        min(limits.max_connections, usable),
        limits.max_connections_per_uid,
        limits.max_concurrent_streams,
    )


async def listen_app(
    protocol: ProtocolFactory,
    address: Address,
    inherited: socket.socket | None,
    *,
    unix_mode: int,
    both_loopbacks: bool,
    reuse_port: bool,
) -> tuple[list[asyncio.Server], list[Address]]:
    """Servers for ``address``, or for the socket a supervisor made for it, and the addresses
    bound; on a loopback address, also the other family's loopback (``bind_both_loopbacks``)."""
    loop = asyncio.get_running_loop()
    if address.path:
        sock = inherited or bind_unix(address.path, unix_mode, where="listen")
        return [await loop.create_unix_server(protocol, sock=sock)], [address]
    if inherited is not None:
        return [await loop.create_server(protocol, sock=inherited)], [address]
    twin = loopback_twin(address.host) if both_loopbacks else None
    for _ in range(8 if twin and address.port == 0 else 1):  # port 0: find one free in both
        server = await _bind(protocol, address.host, address.port, reuse_port=reuse_port)
        bound = Address(host=address.host, port=server.sockets[0].getsockname()[1])
        if twin is None:
            return [server], [bound]
        try:
            twin_server = await _bind(protocol, twin, bound.port, reuse_port=reuse_port, raw=True)
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                server_log.info("%s: no %s on this host; nothing can take it", bound, twin)
                return [server], [bound]
            server.close()
            if exc.errno == errno.EADDRINUSE and address.port == 0:
                continue
            raise StartError(
                f"cannot listen on {Address(host=twin, port=bound.port)} beside {bound}: "
                f"{os_reason(exc)}. Another process holds the other loopback family of this "
                "port and would receive the requests of apps that resolve 'localhost' to it; "
                "stop it, or set bind_both_loopbacks: false if no app uses 'localhost'"
            ) from None
        return [server, twin_server], [bound, Address(host=twin, port=bound.port)]
    raise StartError(f"cannot find a port free on both {address.host} and {twin}")


async def _bind(
    protocol: ProtocolFactory, host: str, port: int, *, reuse_port: bool, raw: bool = False
) -> asyncio.Server:
    """A TCP app listener; ``raw``: OSError is the caller's to interpret."""
    try:
        return await asyncio.get_running_loop().create_server(
            protocol, host, port, reuse_address=True, reuse_port=reuse_port
        )
    except OSError as exc:
        if raw:
            raise
        raise cannot_listen(Address(host=host, port=port), exc) from None
