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
(``/proc/<pid>/fd``, at most ``_SCAN_MAX_FDS`` descriptors read, else unknown): an attribute is
known only when all holders agree, so ``connect(); fork(); exec(approved)`` in one process and
sending from the other matches nothing. ``recheck()`` scans the holders again (per request on
routes whose rules name such attributes). Nothing the caller sends is consulted.
"""

from __future__ import annotations

import atexit
import enum
import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, Final, TypeVar


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET: Final = _Unset.UNSET  # not looked up yet (None: looked up, unknown)
T = TypeVar("T")
_PEERCRED = struct.Struct("3i")
_sha256_by_file: dict[tuple[int, int, int, int], str] = {}
_TCP_ESTABLISHED = 1
_SCAN_MAX_FDS = 20_000  # descriptors read per holders scan; beyond, the holders are unknown
_SHA256_CACHE_SIZE = 64


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
            holders = self._holders = _holders_of(self._inode, self.uid) if self._inode else None
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
            gid = self._gid = self._agreed(_status_gid)
        return gid

    @property
    def exe(self) -> str | None:
        exe = self._exe
        if exe is _UNSET:
            exe = self._exe = self._agreed(_exe_path)
        return exe

    @property
    def exe_sha256(self) -> str | None:
        exe_sha256 = self._exe_sha256
        if exe_sha256 is _UNSET:
            exe_sha256 = self._exe_sha256 = self._agreed(
                lambda pid: _file_sha256(f"/proc/{pid}/exe")
            )
        return exe_sha256

    @property
    def cgroup(self) -> str | None:
        cgroup = self._cgroup
        if cgroup is _UNSET:
            cgroup = self._cgroup = self._agreed(_cgroup_v2)
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
        holders = _holders_of(self._inode, self.uid)
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
            return Caller("unix", uid, gid=gid, pid=pid, inode=_unix_peer_inode(own_inode))
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            return _from_tcp(sock.getsockname(), sock.getpeername())
    except (OSError, ValueError):
        pass
    return UNKNOWN


_Address = tuple[str, int] | tuple[str, int, int, int]  # AF_INET, AF_INET6 socket names


def _from_tcp(local: _Address, peer: _Address) -> Caller:
    # The peer's socket is the one whose local end is the peer's address and remote end ours.
    wanted = (_address_key(peer[0], peer[1]), _address_key(local[0], local[1]))
    found = _sock_diag(*wanted)
    if found is _NO_NETLINK:
        found = None
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            found = _find_socket(table, wanted)
            if found is not None:
                break
    if found is None:
        return UNKNOWN
    uid, inode = found
    return Caller("tcp", uid, inode=inode)


def _address_key(host: str, port: int) -> tuple[bytes, int]:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.packed, port


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG = struct.Struct("=IHHII")
_INET_REQUEST = struct.Struct("=BBBB I HH16s16sI8s")
_INET_REPLY = struct.Struct("=BBBB HH16s16sI8s IIIII")
_UNIX_REQUEST = struct.Struct("=BBHIII8s")
_UNIX_REPLY = struct.Struct("=BBBBI8s")
_UDIAG_SHOW_PEER = 4
_UNIX_DIAG_PEER = 2
_NO_COOKIE = b"\xff" * 8


class _NoNetlink(enum.Enum):
    NO_NETLINK = enum.auto()


_NO_NETLINK: Final = _NoNetlink.NO_NETLINK
_diag_socket: socket.socket | None = None
_sequence = 0


def _diag(family_request: bytes) -> bytes | None:
    """One NETLINK_SOCK_DIAG exact lookup: the reply's payload, or None when the kernel says the
    socket does not exist. Raises OSError when netlink itself is unavailable."""
    global _diag_socket, _sequence
    _sequence = (_sequence + 1) & 0xFFFFFFFF
    request = _NLMSG.pack(
        _NLMSG.size + len(family_request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, _sequence, 0
    )
    if _diag_socket is None:
        _diag_socket = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
        atexit.register(_diag_socket.close)
    _diag_socket.send(request + family_request)
    for _ in range(8):  # a reply to an earlier, interrupted request is skipped
        reply = _diag_socket.recv(65536)
        if len(reply) < _NLMSG.size:
            return None
        length, kind, _, sequence, _ = _NLMSG.unpack_from(reply)
        if sequence == _sequence:
            return reply[_NLMSG.size : length] if kind == _SOCK_DIAG_BY_FAMILY else None
    return None


def _sock_diag(
    src: tuple[bytes, int], dst: tuple[bytes, int]
) -> tuple[int, int] | None | _NoNetlink:
    """(uid, inode) of the TCP socket with exactly this 4-tuple when the kernel positively says
    so: ESTABLISHED, a real inode, the same 4-tuple. None: unknown. ``_NO_NETLINK``: ask /proc."""
    family = socket.AF_INET if len(src[0]) == 4 else socket.AF_INET6
    id_ = (
        socket.htons(src[1]), socket.htons(dst[1]), src[0].ljust(16, b"\0"), dst[0].ljust(16, b"\0")
    )  # fmt: skip
    request = _INET_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF, *id_, 0, _NO_COOKIE)
    try:
        payload = _diag(request)
    except OSError:
        return _NO_NETLINK
    if payload is None or len(payload) < _INET_REPLY.size:
        return None
    fields = _INET_REPLY.unpack_from(payload)
    state, uid, inode = fields[1], fields[13], fields[14]
    # A dual-stack (AF_INET6) socket talking IPv4 is found by its IPv4 4-tuple, and reported
    # with IPv4-mapped addresses.
    reply_id = (fields[4], fields[5], _unmapped(fields[6]), _unmapped(fields[7]))
    if state != _TCP_ESTABLISHED or inode == 0 or reply_id != id_:
        return None
    return uid, inode


def _unmapped(address: bytes) -> bytes:
    """A 16-byte diag address with an IPv4-mapped one turned into the IPv4 form (zero-padded)."""
    if address[:12] == b"\0" * 10 + b"\xff\xff":
        return address[12:].ljust(16, b"\0")
    return address


def _unix_peer_inode(own_inode: int) -> int | None:
    """The inode of the socket at the other end of our Unix socket ``own_inode``."""
    request = _UNIX_REQUEST.pack(
        socket.AF_UNIX, 0, 0, 0xFFFFFFFF, own_inode, _UDIAG_SHOW_PEER, _NO_COOKIE
    )
    try:
        payload = _diag(request)
    except OSError:
        return None
    if payload is None or len(payload) < _UNIX_REPLY.size:
        return None
    if _UNIX_REPLY.unpack_from(payload)[4] != own_inode:
        return None
    offset = _UNIX_REPLY.size
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            return None
        if kind == _UNIX_DIAG_PEER and length >= 8:
            peer: int = struct.unpack_from("=I", payload, offset + 4)[0]
            return peer or None
        offset += (length + 3) & ~3
    return None


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
    """As ``_sock_diag``, from a /proc table: (uid, inode) of an ESTABLISHED socket with a real
    inode, else None."""
    local_port_hex = f":{wanted[0][1]:04X} "
    try:
        with open(table, encoding="ascii") as lines:
            next(lines, None)
            for line in lines:
                if local_port_hex not in line:  # cheap filter before parsing
                    continue
                fields = line.split()
                if (_parse_proc_address(fields[1]), _parse_proc_address(fields[2])) == wanted:
                    uid, inode = int(fields[7]), int(fields[9])
                    established = int(fields[3], 16) == _TCP_ESTABLISHED
                    return (uid, inode) if established and inode else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def _holders_of(inode: int, owner_uid: int | None) -> tuple[int, ...] | None:
    """Every process of the socket's owner uid whose fd table holds ``socket:[inode]``, sorted;
    None when unknown: none found, one of them unreadable, or more than ``_SCAN_MAX_FDS``
    descriptors to look at. Only the owner's processes are read: another uid holds the socket
    only if the owner handed it over, and no other uid can make this scan costly."""
    if owner_uid is None:
        return None
    target = f"socket:[{inode}]"
    holders: list[int] = []
    budget = _SCAN_MAX_FDS
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != owner_uid:
                continue
            fd_dir = f"/proc/{entry}/fd"
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue  # exited
        except OSError:
            return None  # could hold the socket and we cannot see
        budget -= len(fds)
        if budget < 0:
            return None
        for fd in fds:
            if _readlink(f"{fd_dir}/{fd}") == target:
                holders.append(int(entry))
                break
    return tuple(sorted(holders)) or None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _exe_path(pid: int) -> str | None:
    path = _readlink(f"/proc/{pid}/exe")
    if path is None or path.endswith(" (deleted)"):
        return None  # replaced on disk: what runs is not what the path names
    return path


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
                if len(_sha256_by_file) >= _SHA256_CACHE_SIZE:
                    del _sha256_by_file[next(iter(_sha256_by_file))]
                _sha256_by_file[key] = hashlib.file_digest(binary, "sha256").hexdigest()
            return _sha256_by_file[key]
    except OSError:
        return None
