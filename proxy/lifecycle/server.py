"""The server: the app, telemetry and control listeners, warm-up, reload and graceful shutdown.
The app listeners are bound by ``app_listen``, the telemetry endpoints are in ``telemetry``, the
control plane's in ``control``; ``process`` runs a server under uvloop and its signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from ..access.break_glass import BreakGlass
from ..audit.trail import Audit
from ..audit.usage import Usage
from ..config import loader
from ..config.model import Address, Config, parse_address
from ..credentials.dpop import DPoPKey
from ..credentials.token_share import LeaderClient, leader_app
from ..errors import ConfigError, CredentialUnavailable, IdentityError, StartError
from ..inbound.handler import Handler
from ..inbound.listener import AppListener
from ..inbound.runtime import Runtime
from ..log import server_log
from ..metrics import Metrics
from ..outbound.h2_upstream import H2Upstreams
from ..outbound.upstream import Upstreams
from ..tasks import spawn
from . import control, telemetry
from .admin_http import AdminServer, remove_socket, unix_socket
from .app_listen import connection_limits, listen_app
from .assembly import build
from .unix_socket import bind_unix, cannot_listen, os_reason

if TYPE_CHECKING:  # grpc is imported only where SPIFFE is used
    from ..spiffe.workload_api import WorkloadAPI

_GAUGE_INTERVAL_S = 5.0


def new_session() -> aiohttp.ClientSession:
    """The client for identity providers and the token leader: no cookies, no added headers."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),  # never carry cookies between calls
        trust_env=False,  # the app's HTTP_PROXY may point at us: never loop back
    )


class Server:
    """Owns the upstream session, the runtime and the listeners; an async context manager."""

    def __init__(
        self,
        config: Config,
        *,
        audit: Audit | None = None,
        dpop_key: DPoPKey | None = None,
        inherited: dict[str, socket.socket] | None = None,
        reuse_port: bool = False,
        leader_socket: str | None = None,
        is_leader: bool = False,
        workers: int = 1,
    ) -> None:
        """``dpop_key``, ``inherited`` (listening sockets by listen address), ``reuse_port`` and
        ``leader_socket`` are for workers: one DPoP key for all, Unix sockets and TCP ports
        shared, tokens fetched by the leader (``is_leader``) and shared over that socket."""
        self.config = config
        self._leader_socket = leader_socket
        self._is_leader = is_leader
        self.workers = workers  # how many processes serve the listeners (``--workers``)
        self._leader: LeaderClient | None = None
        self._dpop_key = dpop_key
        self._inherited = inherited or {}
        self._reuse_port = reuse_port
        self.metrics = Metrics()
        self.audit = audit or Audit(
            config.audit.file,
            queue_size=config.audit.queue_size,
            file_mode=int(config.audit.file_mode, 8),
        )
        self.audit.on_drop = self.metrics.audit_dropped.inc
        self.usage = Usage(
            self.audit, mode=config.audit.used, interval_s=config.audit.used_interval_s
        )
        self.draining = False
        caps = config.control.break_glass
        self.break_glass = BreakGlass(
            self.audit, self.metrics, max_duration_s=caps.max_duration_s, max_grants=caps.max_grants
        )
        self._runners: list[web.BaseRunner] = []
        self._app_servers: list[asyncio.Server] = []
        self._listener: AppListener | None = None
        self._upstreams = Upstreams()
        self._h2_upstreams = H2Upstreams()
        self._runtime: Runtime | None = None
        self._handler: Handler | None = None
        self._retiring: dict[asyncio.Task[None], Runtime] = {}  # replaced by reloads
        self._reload_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.workload_api: WorkloadAPI | None = None  # the SPIFFE Workload API, when used
        self._gauges: asyncio.Task[None] | None = None
        self.app_addresses: list[Address] = []
        self.admin_address: Address | None = None
        self.control_address: Address | None = None
        self._admin_servers: list[AdminServer] = []  # telemetry and control
        self._socket_files: list[str] = []  # theirs, removed at exit

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("server not started")
        return self._session

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("server not started")
        return self._runtime

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        self._session = new_session()
        if self._leader_socket is not None and not self._is_leader:
            self._leader = LeaderClient(self._leader_socket)
        self._runtime = build(
            self.config,
            session=self._session,
            metrics=self.metrics,
            audit=self.audit,
            dpop_key=self._dpop_key,
            leader=self._leader,
            workload_api=self._workload_api_for(self.config),
        )
        if self._leader_socket is not None and self._is_leader:
            shared = web.AppRunner(leader_app(lambda: self.runtime.sources), access_log=None)
            await self._setup(shared)
            leader = bind_unix(self._leader_socket, 0o600, where="--workers token socket")
            await web.SockSite(shared, leader).start()
        if self.config.warm_up:
            await self._warm_up()
        self._gauges = spawn(self._sample_gauges_every(_GAUGE_INTERVAL_S), name="gauges")
        handler = self._handler = Handler(
            self._runtime,
            self._upstreams,
            metrics=self.metrics,
            audit=self.audit,
            usage=self.usage,
            body_idle_s=self.config.app_timeouts.body_idle_s,
            break_glass=self.break_glass,
            h2_upstreams=self._h2_upstreams,
        )
        self._listener = AppListener(
            handler,
            handler.admit,
            self.config.app_timeouts.keepalive_s,
            connection_limits(self.config.app_limits),
        )
        for value in self.config.listen:
            address = parse_address(value)
            self.app_addresses += await self._listen(address, self._inherited.get(value))
        if self.config.admin:
            await self._listen_admin(parse_address(self.config.admin))
        if self.config.control.listen:
            await self._listen_control(self.config.control.listen)
        server_log.info(
            "credproxy serving %s; admin %s; control %s; %d route(s)",
            ", ".join(map(str, self.app_addresses)),
            self.admin_address,
            self.control_address,
            len(self._runtime.routes),
        )

    def _workload_api_for(self, config: Config) -> WorkloadAPI | None:
        """The SPIFFE Workload API client, started on first need and kept for the process (a
        changed socket takes effect on restart); None when nothing uses an SVID."""
        if self.workload_api is not None:
            return self.workload_api
        socket = config.identity.spiffe_socket()
        if socket is None or (config.identity.spiffe is None and not loader.svid_users(config)):
            return None
        from ..spiffe.workload_api import WorkloadAPI  # grpc: loaded only when SPIFFE is used

        spiffe = config.identity.spiffe
        self.workload_api = WorkloadAPI(
            socket,
            metrics=self.metrics,
            audit=self.audit,
            timeout_s=spiffe.timeout_s if spiffe else 10.0,
            backoff_max_s=spiffe.backoff_max_s if spiffe else 30.0,
        )
        self.workload_api.start()
        server_log.info("SPIFFE Workload API: %s", socket)
        return self.workload_api

    async def _warm_up(self) -> None:
        for source in self.runtime.sources.values():
            source.start()
        if self.config.on_start_failure != "exit":
            return
        for source in self.runtime.sources.values():
            try:
                await source.get()
            except CredentialUnavailable as exc:
                raise StartError(f"cannot obtain a credential at start: {exc}") from None

    async def _setup(self, runner: web.BaseRunner) -> None:
        await runner.setup()
        self._runners.append(runner)

    async def _listen(self, address: Address, inherited: socket.socket | None) -> list[Address]:
        assert self._listener is not None
        servers, bound = await listen_app(
            self._listener,
            address,
            inherited,
            unix_mode=int(self.config.unix_socket_mode, 8),
            both_loopbacks=self.config.bind_both_loopbacks,
            reuse_port=self._reuse_port,
        )
        self._app_servers += servers
        return bound

    async def _listen_admin(self, address: Address) -> AdminServer:
        """The telemetry listener (``admin:``): read-only, may face the pod network."""
        server = AdminServer(
            "admin",
            telemetry.endpoints(self),
            local_names=self.config.local_names,
            head_timeout_s=self.config.control.head_timeout_s,
            audit=self.audit,
            metrics=self.metrics,
        )
        self._admin_servers.append(server)
        try:
            mode = int(self.config.unix_socket_mode, 8)
            self.admin_address = await self._serve_on(server, address, mode, "admin")
        except OSError as exc:
            raise cannot_listen(address, exc) from None
        return server

    async def _serve_on(
        self, server: AdminServer, address: Address, mode: int, where: str
    ) -> Address:
        """``server`` listening on ``address``: a Unix socket made with ``mode``, or TCP."""
        if address.path:
            await server.listen_unix(unix_socket(address.path, mode, where=where))
            self._socket_files.append(address.path)
            return address
        port = await server.listen_tcp(address.host, address.port)
        return Address(host=address.host, port=port)

    async def _listen_control(self, value: str) -> None:
        """The control plane; at its default address, a socket that cannot be made is logged
        and credproxy runs without it (existing configs keep starting)."""
        address = parse_address(value)
        server = control.control_server(self)
        self._admin_servers.append(server)
        try:
            mode = int(self.config.control.socket_mode, 8)
            self.control_address = await self._serve_on(server, address, mode, "control.listen")
        except (OSError, StartError) as exc:
            reason = str(exc) if isinstance(exc, StartError) else os_reason(exc)
            if "listen" in self.config.control.model_fields_set:
                raise StartError(f"control.listen: cannot listen on {address}: {reason}") from None
            server_log.warning(
                "control plane off: cannot listen on %s (%s); set control.listen to a socket "
                "in a directory only credproxy may write, or control: {listen: null} to silence this",
                address,
                reason,
            )

    def sample_gauges(self) -> None:
        connections = self._listener.connections if self._listener is not None else ()
        self.metrics.app_connections.set(len(connections))
        self.metrics.tasks.set(len(asyncio.all_tasks()))

    async def _sample_gauges_every(self, interval_s: float) -> None:
        """Also in workers without the admin listener, whose values /metrics aggregates."""
        while True:
            self.sample_gauges()
            self.metrics.save()
            await asyncio.sleep(interval_s)

    async def reload(self, path: Path) -> bool:
        """SIGHUP: the new config whole, or not at all — an invalid one is logged with its
        path-named errors and the running one keeps serving. Unchanged issuers keep their
        tokens; listeners, admin and audit settings need a restart."""
        async with self._reload_lock:
            try:
                config = loader.load(path)
                runtime = build(
                    config,
                    session=self.session,
                    metrics=self.metrics,
                    audit=self.audit,
                    previous=self.runtime,
                    leader=self._leader,
                    workload_api=self._workload_api_for(config),
                )
            except Exception as exc:  # whatever failed, the running config keeps serving
                errors = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
                if not isinstance(exc, ConfigError | IdentityError):
                    server_log.error("reload of %s failed unexpectedly", path, exc_info=exc)
                    errors = [f"unexpected {type(exc).__name__} (traceback in the log)"]
                for line in errors:
                    server_log.error("reload of %s rejected: %s", path, line)
                self.metrics.config_reloads.labels("rejected").inc()
                self.audit.emit("config.reloaded", outcome="rejected", errors=errors[:20])
                return False
            for source in runtime.sources.values():
                source.start()
            old, self._runtime = self.runtime, runtime
            assert self._handler is not None
            self._handler.runtime = runtime
            previous_config, self.config = self.config, config
            retire = spawn(self._retire(old, runtime), name="retire-runtime")
            self._retiring[retire] = old
            needs_restart = [
                name
                for name in ("listen", "admin", "allow_non_loopback", "unix_socket_mode", "audit")
                if getattr(config, name) != getattr(previous_config, name)
            ]
            if config.control.listen != previous_config.control.listen:
                needs_restart.append("control.listen")  # control.allow applies at once
            socket = config.identity.spiffe_socket()
            if self.workload_api is not None and socket != self.workload_api.socket:
                needs_restart.append("identity.spiffe.socket")  # the agent connection stays
            for name in needs_restart:
                server_log.warning("reload: %s changed; it takes effect on restart", name)
            kept = sum(source in old.sources.values() for source in runtime.sources.values())
            server_log.info(
                "reloaded %s: %d route(s), %d issuer(s), %d credential(s) kept",
                path,
                len(runtime.routes),
                len(runtime.issuers),
                kept,
            )
            self.metrics.config_reloads.labels("applied").inc()
            self.audit.emit(
                "config.reloaded",
                outcome="applied",
                routes=[r.name for r in runtime.routes],
                issuers=sorted(runtime.issuers),
                needs_restart=needs_restart,
            )
            return True

    async def _retire(self, old: Runtime, new: Runtime) -> None:
        """Requests already routed by the old config finish with it; then its sources stop."""
        await asyncio.sleep(self.config.shutdown_timeout_s)
        await old.aclose(keep=new)
        self._retiring.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        self.draining = True  # /readyz answers 503 from now on
        if self._gauges is not None:
            self._gauges.cancel()
            await asyncio.gather(self._gauges, return_exceptions=True)
        for server in self._app_servers:
            server.close()  # stops accepting
        if self._listener is not None:  # in-flight requests finish, up to the timeout
            await self._listener.drain(self.config.shutdown_timeout_s)
        self.metrics.save()  # the last requests' counts, for the other workers' /metrics
        self._app_servers.clear()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.break_glass.close()
        for admin in self._admin_servers:  # telemetry and control last
            await admin.aclose()
        self._admin_servers.clear()
        for path in self._socket_files:
            remove_socket(path)
        for task, old in list(self._retiring.items()):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await old.aclose(keep=self._runtime)
        self._retiring.clear()
        await self.usage.aclose()  # the last uses are audited before any revocation
        if self._runtime is not None:
            try:
                async with asyncio.timeout(self.config.revoke_timeout_s):
                    results = await self._runtime.revoke(reason="shutdown")
                server_log.info("revoked at shutdown: %s", results)
            except TimeoutError:
                server_log.warning(
                    "revocations at shutdown exceeded %gs; exiting anyway",
                    self.config.revoke_timeout_s,
                )
            await self._runtime.aclose()
        if self._leader is not None:
            await self._leader.aclose()
        if self.workload_api is not None:
            await self.workload_api.aclose()
        self._upstreams.close()
        self._h2_upstreams.close()
        if self._session is not None:
            await self._session.close()
        for address in self.app_addresses:
            if address.path and str(address) not in self._inherited:  # only sockets it made
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address.path)
        self.audit.aclose()
