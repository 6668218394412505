"""The kernel's answers the caller binding relies on, each trusted only when positive:
NETLINK_SOCK_DIAG lookups of TCP sockets by 4-tuple and of a Unix socket's peer, the
``/proc/net/tcp{,6}`` fallback, the processes holding a socket, and their executable, gid and
cgroup. ``access.callers`` turns them into a ``Caller``.
"""

from __future__ import annotations

import atexit
import enum
import hashlib
import ipaddress
import os
import socket
import struct
from typing import Final

_TCP_ESTABLISHED = 1
SCAN_MAX_FDS = 20_000  # descriptors read per holders scan; beyond, the holders are unknown
_SHA256_CACHE_SIZE = 64
_sha256_by_file: dict[tuple[int, int, int, int], str] = {}


def address_key(host: str, port: int) -> tuple[bytes, int]:
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


class NoNetlink(enum.Enum):
    NO_NETLINK = enum.auto()


NO_NETLINK: Final = NoNetlink.NO_NETLINK
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


def sock_diag(src: tuple[bytes, int], dst: tuple[bytes, int]) -> tuple[int, int] | None | NoNetlink:
    """(uid, inode) of the TCP socket with exactly this 4-tuple when the kernel positively says
    so: ESTABLISHED, a real inode, the same 4-tuple. None: unknown. ``NO_NETLINK``: ask /proc."""
    family = socket.AF_INET if len(src[0]) == 4 else socket.AF_INET6
    id_ = (
        socket.htons(src[1]), socket.htons(dst[1]), src[0].ljust(16, b"\0"), dst[0].ljust(16, b"\0")
    )  # fmt: skip
    request = _INET_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF, *id_, 0, _NO_COOKIE)
    try:
        payload = _diag(request)
    except OSError:
        return NO_NETLINK
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


def unix_peer_inode(own_inode: int) -> int | None:
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


def find_socket(
    table: str, wanted: tuple[tuple[bytes, int], tuple[bytes, int]]
) -> tuple[int, int] | None:
    """As ``sock_diag``, from a /proc table: (uid, inode) of an ESTABLISHED socket with a real
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


def holders_of(inode: int, owner_uid: int | None) -> tuple[int, ...] | None:
    """Every process of the socket's owner uid whose fd table holds ``socket:[inode]``, sorted;
    None when unknown: none found, one of them unreadable, or more than ``SCAN_MAX_FDS``
    descriptors to look at. Only the owner's processes are read: another uid holds the socket
    only if the owner handed it over, and no other uid can make this scan costly."""
    if owner_uid is None:
        return None
    target = f"socket:[{inode}]"
    holders: list[int] = []
    budget = SCAN_MAX_FDS
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
            if readlink(f"{fd_dir}/{fd}") == target:
                holders.append(int(entry))
                break
    return tuple(sorted(holders)) or None


def readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def exe_path(pid: int) -> str | None:
    path = readlink(f"/proc/{pid}/exe")
    if path is None or path.endswith(" (deleted)"):
        return None  # replaced on disk: what runs is not what the path names
    return path


def status_gid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("Gid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_v2(pid: int) -> str | None:
    """The unified (v2) hierarchy path, e.g. ``/kubepods.slice/…``; None on v1-only hosts."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as cgroups:
            for line in cgroups:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def file_sha256(path: str) -> str | None:
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
