"""Client-side TLS for upstreams: verified by default, a custom CA bundle per route, and a client
certificate (mTLS, RFC 8705 style): from files re-read when they change, without restart, or
issued into memory (OpenBao PKI) and loaded without ever touching a disk."""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path

from ..errors import IdentityError
from ..secret import Secret

_STAT_INTERVAL_S = 1.0


def ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    """Verified TLS; with ``ca_file`` the given bundle replaces the system trust store."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else None


class ClientTLS:
    """The SSL setting for one route; ``current()`` reloads the client certificate on change."""

    def __init__(
        self,
        ca_file: Path | None,
        cert_file: Path | None,
        key_file: Path | None,
        *,
        where: str,
        alpn: tuple[str, ...] = (),
    ) -> None:
        self._ca_file = ca_file
        self._alpn = alpn  # offered in the handshake: ("h2",) for HTTP/2 upstreams
        self._cert_file = cert_file
        self._key_file = key_file
        self._where = where
        self._checked_at = 0.0
        self._stamp: tuple[int, ...] = ()
        self._context: ssl.SSLContext | bool = self._build()
        self._presented: tuple[str, ssl.SSLContext] | None = None

    def current(self) -> ssl.SSLContext | bool:
        if self._cert_file is not None and time.monotonic() - self._checked_at > _STAT_INTERVAL_S:
            self._checked_at = time.monotonic()
            if self._file_stamp() != self._stamp:
                try:
                    self._context = self._build()
                except IdentityError:
                    pass  # mid-rotation (cert and key not yet both replaced): keep the last good
        return self._context

    def presenting(self, chain: str, key: Secret) -> ssl.SSLContext:
        """The route's TLS setting with an in-memory client certificate (``chain``: PEM, the
        leaf first; ``key``: its PEM private key); built once per certificate."""
        presented = self._presented
        if presented is not None and presented[0] == chain:
            return presented[1]
        context = ssl_context(str(self._ca_file) if self._ca_file else None)
        context = context or ssl.create_default_context()
        if self._alpn:
            context.set_alpn_protocols(list(self._alpn))
        load_in_memory(context, chain, key)
        self._presented = (chain, context)
        return context

    def _file_stamp(self) -> tuple[int, ...]:
        try:
            return tuple(os.stat(f).st_mtime_ns for f in (self._cert_file, self._key_file) if f)
        except OSError:
            return self._stamp

    def _build(self) -> ssl.SSLContext | bool:
        context = ssl_context(str(self._ca_file) if self._ca_file else None)
        if self._alpn:
            context = context or ssl.create_default_context()
            context.set_alpn_protocols(list(self._alpn))
        if self._cert_file is None:
            return context or True
        context = context or ssl.create_default_context()
        self._stamp = self._file_stamp()
        try:
            context.load_cert_chain(self._cert_file, self._key_file)
        except (OSError, ssl.SSLError) as exc:
            raise IdentityError(
                f"{self._where}.client_cert_file: cannot load {self._cert_file} with its key: {exc}"
            ) from None
        return context


def load_in_memory(context: ssl.SSLContext, chain: str, key: Secret) -> None:
    """Load a client certificate and its key held in memory. OpenSSL reads only paths, so they
    go to an anonymous memory file (memfd: no name in any filesystem, gone when closed) read
    through /proc/self/fd, which only this process's uid can open."""
    fd = os.memfd_create("credproxy-client-certificate", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as memory:
            memory.write(key.reveal().encode() + b"\n" + chain.encode())
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
