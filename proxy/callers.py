"""Who is calling: the kernel's account of the process at the other end of a connection.

Unix sockets: ``SO_PEERCRED`` (pid, uid, gid). TCP loopback: the peer's socket in
``/proc/net/tcp{,6}`` gives its owner uid and inode; where the PID namespace is shared the inode
leads to the pid via ``/proc/<pid>/fd``, and the pid to gid, executable and cgroup. Nothing the
caller sends is consulted. Attributes beyond uid are resolved lazily (only when a policy asks) and
cached per connection; an attribute that cannot be determined is ``None`` and fails closed.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import Hashable
from typing import Any

_UNSET: Any = object()
_PEERCRED = struct.Struct("3i")
_sha256_by_file: dict[tuple[int, int, int, int], str] = {}
_recent_pids: dict[int, None] = {}  # insertion-ordered: most recent last


class Caller:
    """One connection's peer. ``uid`` is always known for a usable caller; the rest may be None."""

    __slots__ = (
        "transport", "uid", "_gid", "_pid", "_inode", "_exe", "_exe_sha256", "_cgroup", "_known"
    )  # fmt: skip

    def __init__(
        self,
        transport: str,
        uid: int | None,
        *,
        gid: int | None = None,
        pid: int | None = None,
        inode: int | None = None,
    ) -> None:
        self.transport = transport
        self.uid = uid
        self._gid = gid if gid is not None else _UNSET
        self._pid = pid if pid else _UNSET
        self._inode = inode
        self._exe: Any = _UNSET
        self._exe_sha256: Any = _UNSET
        self._cgroup: Any = _UNSET
        self._known: tuple[tuple[str, object], ...] | None = None  # attributes(), until a lookup

    @property
    def pid(self) -> int | None:
        if self._pid is _UNSET:
            self._pid = _pid_of_socket(self._inode, self.uid) if self._inode else None
            self._known = None
        return self._pid

    @property
    def gid(self) -> int | None:
        if self._gid is _UNSET:
            self._gid = _status_gid(self.pid) if self.pid else None
            self._known = None
        return self._gid

    @property
    def exe(self) -> str | None:
        if self._exe is _UNSET:
            self._exe = _readlink(f"/proc/{self.pid}/exe") if self.pid else None
            if self._exe is not None and self._exe.endswith(" (deleted)"):
                self._exe = None  # replaced on disk: what runs is not what the path names
            self._known = None
        return self._exe  # type: ignore[no-any-return]

    @property
    def exe_sha256(self) -> str | None:
        if self._exe_sha256 is _UNSET:
            self._exe_sha256 = _file_sha256(f"/proc/{self.pid}/exe") if self.pid else None
            self._known = None
        return self._exe_sha256  # type: ignore[no-any-return]

    @property
    def cgroup(self) -> str | None:
        if self._cgroup is _UNSET:
            self._cgroup = _cgroup_v2(self.pid) if self.pid else None
            self._known = None
        return self._cgroup  # type: ignore[no-any-return]

    @classmethod
    def recorded(cls, attributes: dict[str, Any]) -> Caller:
        """A caller as an audit event recorded it: what was not recorded is unknown (never
        matches a rule), and nothing is looked up again."""
        caller = cls(str(attributes.get("transport", "unknown")), attributes.get("uid"))
        for name in ("gid", "pid", "exe", "exe_sha256", "cgroup"):
            setattr(caller, "_" + name, attributes.get(name))
        return caller

    def known(self) -> tuple[tuple[str, object], ...]:
        """``attributes()`` as a hashable tuple, kept until a lookup learns more: the usage
        tally's key, built once per connection rather than per request."""
        if self._known is None:
            self._known = tuple(self.attributes().items())
        return self._known

    def attributes(self) -> dict[str, object]:
        """For audit events and logs: what is already known, without new lookups."""
        known: dict[str, object] = {"transport": self.transport, "uid": self.uid}
        for name in ("gid", "pid", "exe", "exe_sha256", "cgroup"):
            value = getattr(self, "_" + name)
            if value is not _UNSET and value is not None:
                known[name] = value
        return known


UNKNOWN = Caller("unknown", None)


def from_socket(sock: socket.socket | None) -> Caller:
    """Resolve the peer of an accepted connection; anything unexpected yields ``UNKNOWN``."""
    if sock is None:
        return UNKNOWN
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            return Caller("unix", uid, gid=gid, pid=pid)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return _from_tcp(sock.getsockname(), sock.getpeername())
    except OSError:
        pass
    return UNKNOWN


def _from_tcp(local: tuple[Any, ...], peer: tuple[Any, ...]) -> Caller:
    # The peer's socket is the one whose local end is the peer's address and remote end ours.
    wanted = (_address_key(peer[0], peer[1]), _address_key(local[0], local[1]))
    found = _sock_diag(*wanted)
    if found is not None:
        return Caller("tcp", found[0], inode=found[1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        found = _find_socket(table, wanted)
        if found is not None:
            uid, inode = found
            return Caller("tcp", uid, inode=inode)
    return UNKNOWN


def _address_key(host: str, port: int) -> tuple[bytes, int]:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.packed, port


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_DIAG_REQUEST = struct.Struct("=IHHII BBBB I HH16s16sI8s")
_DIAG_REPLY = struct.Struct("=IHHII BBBB HH16s16sI8s IIIII")
_diag_socket: socket.socket | None = None


def _sock_diag(src: tuple[bytes, int], dst: tuple[bytes, int]) -> tuple[int, int] | None:
    """Exact lookup of one TCP socket by its 4-tuple with NETLINK_SOCK_DIAG (what ``ss`` uses):
    (uid, inode), or None when netlink is unavailable or the socket is not found."""
    global _diag_socket
    family = socket.AF_INET if len(src[0]) == 4 else socket.AF_INET6
    request = _DIAG_REQUEST.pack(
        _DIAG_REQUEST.size, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0,
        family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF,
        socket.htons(src[1]), socket.htons(dst[1]), src[0].ljust(16, b"\0"), dst[0].ljust(16, b"\0"),
        0, b"\xff" * 8,  # no interface, INET_DIAG_NOCOOKIE
    )  # fmt: skip
    try:
        if _diag_socket is None:
            _diag_socket = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
            atexit.register(_diag_socket.close)
        _diag_socket.send(request)
        reply = _diag_socket.recv(65536)
    except OSError:
        return None
    if (
        len(reply) < _DIAG_REPLY.size
        or struct.unpack_from("=H", reply, 4)[0] != _SOCK_DIAG_BY_FAMILY
    ):
        return None  # NLMSG_ERROR: not found
    fields = _DIAG_REPLY.unpack_from(reply)
    return fields[-2], fields[-1]


def _parse_proc_address(text: str) -> tuple[bytes, int]:
    host_hex, port_hex = text.split(":")
    raw = bytes.fromhex(host_hex)
    # /proc prints each 32-bit word in host (little-endian) order
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":
        packed = packed[12:]  # IPv4-mapped
    return packed, int(port_hex, 16)


def _find_socket(
    table: str, wanted: tuple[tuple[bytes, int], tuple[bytes, int]]
) -> tuple[int, int] | None:
    local_port_hex = f":{wanted[0][1]:04X} "
    try:
        with open(table, encoding="ascii") as lines:
            next(lines, None)
            for line in lines:
                if local_port_hex not in line:  # cheap filter before parsing
                    continue
                fields = line.split()
                if (_parse_proc_address(fields[1]), _parse_proc_address(fields[2])) == wanted:
                    return int(fields[7]), int(fields[9])
    except OSError:
        return None
    return None


def _pid_of_socket(inode: int, uid: int | None) -> int | None:
    """Find the process holding socket ``inode`` among processes of its owner uid. Processes
    that held earlier callers' sockets are searched first: a workload reconnects from the same
    process, so the usual cost is one process's fd table, not a scan of /proc."""
    target = f"socket:[{inode}]"
    for pid in reversed(list(_recent_pids)):
        if _holds(pid, target, uid):
            return _remember(pid)
    try:
        candidates = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for pid in candidates:
        if pid not in _recent_pids and _holds(pid, target, uid):
            return _remember(pid)
    return None


def _remember(pid: int) -> int:
    _recent_pids.pop(pid, None)
    _recent_pids[pid] = None
    while len(_recent_pids) > 32:
        del _recent_pids[next(iter(_recent_pids))]
    return pid


def _holds(pid: int, target: str, uid: int | None) -> bool:
    try:
        if uid is not None and os.stat(f"/proc/{pid}").st_uid != uid:
            return False
        fd_dir = f"/proc/{pid}/fd"
        return any(_readlink(f"{fd_dir}/{fd}") == target for fd in os.listdir(fd_dir))
    except OSError:
        return False  # exited, or not ours to read


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _status_gid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("Gid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_v2(pid: int) -> str | None:
    """The unified (v2) hierarchy path, e.g. ``/kubepods.slice/…``; None on v1-only hosts."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as cgroups:
            for line in cgroups:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def _file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as binary:
            info = os.fstat(binary.fileno())
            key = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
            if key not in _sha256_by_file:
                _sha256_by_file[key] = hashlib.file_digest(binary, "sha256").hexdigest()
            return _sha256_by_file[key]
    except OSError:
        return None


class CallerCache:
    """Callers resolved once per connection, dropped when the connection closes."""

    def __init__(self) -> None:
        self.callers: dict[Hashable, Caller] = {}

    def get(self, connection: Hashable, transport: asyncio.BaseTransport) -> Caller:
        """The connection's caller; the socket is looked at only on its first request."""
        caller = self.callers.get(connection)
        if caller is None:
            caller = self.callers[connection] = from_socket(transport.get_extra_info("socket"))
        return caller

    def forget(self, connection: Hashable) -> None:
        self.callers.pop(connection, None)
