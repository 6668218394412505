"""Who is calling: the kernel's account of the process at the other end of a connection.

Resolved once, when the connection is accepted and before any byte of it is read:

- Unix sockets: ``SO_PEERCRED`` (pid, uid, gid as they were at ``connect()``).
- TCP loopback: the peer's socket found by its exact 4-tuple with ``NETLINK_SOCK_DIAG`` (falling
  back to ``/proc/net/tcp{,6}``) gives its owner uid and inode. The kernel's answer is trusted only
  when it is positive: the socket ESTABLISHED, a non-zero inode, the very 4-tuple asked for. A peer
  that already closed its end (inode 0, reported as uid 0), any other state or a mismatch is
  *unknown*, and an unknown caller never matches a rule.

Process attributes (gid on TCP, executable, its sha256, cgroup) are resolved only when a rule
asks, from **every** process of the socket's owner uid that holds the peer's socket
(``/proc/<pid>/fd``, at most ``kernel.SCAN_MAX_FDS`` descriptors read, else unknown): an attribute is
known only when all holders agree, so ``connect(); fork(); exec(approved)`` in one process and
sending from the other matches nothing. ``recheck()`` scans the holders again (per request on
routes whose rules name such attributes). Nothing the caller sends is consulted.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Final, TypeVar

from . import kernel


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET: Final = _Unset.UNSET  # not looked up yet (None: looked up, unknown)
T = TypeVar("T")
_PEERCRED = struct.Struct("3i")


def _overflow_uid() -> int | None:
    """In a user namespace that does not map every uid, the kernel reports each unmapped one as
    the overflow uid: it names no one in particular, so it identifies no caller."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as uid_map:
            if uid_map.read().split() == ["0", "0", "4294967295"]:
                return None  # the initial namespace: every uid is itself
        with open("/proc/sys/kernel/overflowuid", encoding="ascii") as overflow:
            return int(overflow.read())
    except (OSError, ValueError):
        return 65534


_OVERFLOW_UID = _overflow_uid()


class Caller:
    """One connection's peer. ``identified``: the kernel positively named its owner (``uid``);
    an unidentified caller matches no rule. Process attributes may be None: unknown."""

    __slots__ = (
        "transport", "uid", "identified", "_gid", "_pid", "_inode", "_holders", "_exe",
        "_exe_sha256", "_cgroup", "_known",
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
        self.identified = uid is not None and uid != _OVERFLOW_UID and transport in ("tcp", "unix")
        self._gid: int | None | _Unset = gid if gid is not None else _UNSET
        self._pid = pid if pid else None
        self._inode = inode  # the peer's socket: its holders are the calling processes
        self._holders: tuple[int, ...] | None | _Unset = _UNSET
        self._exe: str | None | _Unset = _UNSET
        self._exe_sha256: str | None | _Unset = _UNSET
        self._cgroup: str | None | _Unset = _UNSET
        self._known: tuple[tuple[str, object], ...] | None = None  # attributes(), until a lookup

    @property
    def holders(self) -> tuple[int, ...] | None:
        """Pids of every process holding the peer's socket; None when that cannot be known
        (no inode, a process of the socket's owner whose fds are unreadable, none found)."""
        holders = self._holders
        if holders is _UNSET:
            holders = self._holders = (
                kernel.holders_of(self._inode, self.uid) if self._inode else None
            )
        return holders

    @property
    def pid(self) -> int | None:
        """The connecting process (Unix sockets), else the lowest holder: for the record only,
        decisions use every holder."""
        if self._pid is None and self.transport == "tcp" and self.holders:
            self._pid = self.holders[0]
        return self._pid

    @property
    def gid(self) -> int | None:
        gid = self._gid
        if gid is _UNSET:
            gid = self._gid = self._agreed(kernel.status_gid)
        return gid

    @property
    def exe(self) -> str | None:
        exe = self._exe
        if exe is _UNSET:
            exe = self._exe = self._agreed(kernel.exe_path)
        return exe

    @property
    def exe_sha256(self) -> str | None:
        exe_sha256 = self._exe_sha256
        if exe_sha256 is _UNSET:
            exe_sha256 = self._exe_sha256 = self._agreed(
                lambda pid: kernel.file_sha256(f"/proc/{pid}/exe")
            )
        return exe_sha256

    @property
    def cgroup(self) -> str | None:
        cgroup = self._cgroup
        if cgroup is _UNSET:
            cgroup = self._cgroup = self._agreed(kernel.cgroup_v2)
        return cgroup

    def _agreed(self, lookup: Callable[[int], T | None]) -> T | None:
        """``lookup(pid)`` when every holder gives the same known answer, else None."""
        self._known = None
        holders = self.holders
        if not holders:
            return None
        values = {lookup(pid) for pid in holders}
        return values.pop() if len(values) == 1 else None

    def recheck(self) -> None:
        """Scan the socket's holders again; when they changed, process attributes are looked
        up anew (a process that obtained the socket after accept is seen)."""
        if self._holders is _UNSET or self._inode is None:
            return
        holders = kernel.holders_of(self._inode, self.uid)
        if holders != self._holders:
            self._holders = holders
            self._pid = None
            self._exe = self._exe_sha256 = self._cgroup = _UNSET
            if self.transport == "tcp":
                self._gid = _UNSET
            self._known = None

    @classmethod
    def recorded(cls, attributes: dict[str, Any]) -> Caller:
        """A caller as an audit event recorded it: what was not recorded is unknown (never
        matches a rule), and nothing is looked up again. A record without ``identified: true``
        (older logs, unknown callers) is not identified."""
        caller = cls(str(attributes.get("transport", "unknown")), attributes.get("uid"))
        caller.identified = caller.identified and attributes.get("identified") is True
        caller._holders = None
        caller._pid = attributes.get("pid")
        for name in ("gid", "exe", "exe_sha256", "cgroup"):
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
        known: dict[str, object] = {
            "transport": self.transport,
            "uid": self.uid,
            "identified": self.identified,
        }
        pid = self._pid
        if pid is None and isinstance(self._holders, tuple):
            pid = self._holders[0]
        if pid is not None:
            known["pid"] = pid
        for name in ("gid", "exe", "exe_sha256", "cgroup"):
            value = getattr(self, "_" + name)
            if value is not _UNSET and value is not None:
                known[name] = value
        if isinstance(self._holders, tuple) and len(self._holders) > 1:
            known["holders"] = len(self._holders)
        return known


UNKNOWN = Caller("unknown", None)


def from_socket(sock: socket.socket | None) -> Caller:
    """Resolve the peer of an accepted connection; anything unexpected yields ``UNKNOWN``.
    ``sock``: a socket, or the socket-like object a transport's ``get_extra_info("socket")``
    hands out (uvloop's has the same methods)."""
    if sock is None:
        return UNKNOWN
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            own_inode = os.fstat(sock.fileno()).st_ino
            return Caller("unix", uid, gid=gid, pid=pid, inode=kernel.unix_peer_inode(own_inode))
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return _from_tcp(sock.getsockname(), sock.getpeername())
    except (OSError, ValueError):
        pass
    return UNKNOWN


_Address = tuple[str, int] | tuple[str, int, int, int]  # AF_INET, AF_INET6 socket names


def _from_tcp(local: _Address, peer: _Address) -> Caller:
    # The peer's socket is the one whose local end is the peer's address and remote end ours.
    wanted = (kernel.address_key(peer[0], peer[1]), kernel.address_key(local[0], local[1]))
    found = kernel.sock_diag(*wanted)
    if found is kernel.NO_NETLINK:
        found = None
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            found = kernel.find_socket(table, wanted)
            if found is not None:
                break
    if found is None:
        return UNKNOWN
    uid, inode = found
    return Caller("tcp", uid, inode=inode)
