"""Route matching: Host and path prefix → route and the path to forward. No I/O.

The path is matched as the app sent it (raw, still percent-encoded) and forwarded byte for byte,
so what matching saw is exactly what the upstream receives.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from multidict import MultiMapping
from yarl import URL

from ..config.model import RouteConfig
from ..errors import InvalidPath
from ..outbound.hygiene import METHOD_OVERRIDE_HEADERS, URL_OVERRIDE_HEADERS

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_REFUSED_ENCODINGS = frozenset({"2F", "5C", "00"})  # '/', '\', NUL
_HEX = frozenset("0123456789ABCDEFabcdef")


def normalize_path(raw_path: str) -> tuple[str, str]:
    """Canonical form of a raw (percent-encoded) path, RFC 3986 §6.2.2: unreserved characters
    decoded, other escapes upper-cased. Returns (with dot segments, without dot segments).

    Refused (``InvalidPath``): encoded '/', '\\' or NUL, a literal backslash or NUL, an empty
    segment ('//'), a malformed escape; and what upstreams read differently from us: a second
    layer of encoding ('%252e', decoded twice by some), escapes that are not UTF-8 ('%c0%ae',
    an overlong '.'), a dot segment with parameters ('..;', which Tomcat/Spring read as '..'),
    and a non-ASCII character that NFKC folds to ASCII punctuation ('．', '／', '＼', '﹪').
    """
    if "\\" in raw_path or "\0" in raw_path:
        raise InvalidPath("backslash or NUL in path")
    if "%" in raw_path or ";" in raw_path or not raw_path.isascii():
        _refuse_misread(raw_path)
    if "%" in raw_path:
        pieces = raw_path.split("%")
        out = [pieces[0]]
        for piece in pieces[1:]:
            code = piece[:2]
            if len(code) < 2 or not set(code) <= _HEX:
                raise InvalidPath("malformed percent-encoding")
            code = code.upper()
            if code in _REFUSED_ENCODINGS:
                raise InvalidPath(f"encoded %{code} in path")
            char = chr(int(code, 16))
            out.append((char if char in _UNRESERVED else "%" + code) + piece[2:])
        raw_path = "".join(out)
    if "//" in raw_path:
        raise InvalidPath("empty path segment")
    return raw_path, _remove_dot_segments(raw_path)


_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_DOTS = frozenset({".", ".."})
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _refuse_misread(raw_path: str) -> None:
    """Refuse a path that an upstream could decode to something the policy did not see."""
    try:
        once = unquote_to_bytes(raw_path.encode("utf-8", "surrogateescape")).decode("utf-8")
    except UnicodeError:
        raise InvalidPath("percent-escapes or bytes that are not UTF-8") from None
    if _ESCAPE.search(once):  # a '%XX' that only appears after one decoding: '%25' + hex
        raise InvalidPath("double percent-encoding")
    if not once.isascii():
        # An upstream that folds compatibility forms (NFKC, Windows best-fit) reads '．．／' as
        # '../', '＼' as '\\', '﹪' as '%': ASCII punctuation in disguise is never path text.
        for char in once:
            if char > "\x7f" and not _ASCII_PUNCTUATION.isdisjoint(
                unicodedata.normalize("NFKC", char)
            ):
                raise InvalidPath("a character that normalizes to ASCII punctuation")
    for segment in once.split("/"):
        name, params, _ = segment.partition(";")
        if name in _DOTS and name != segment:  # '..;' too
            raise InvalidPath("a dot segment with parameters")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path; '..' above the root stays at the root."""
    if "." not in path:
        return path
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(segment)
    return "/" + "/".join(out)


def _origin(url: URL) -> str:
    """scheme://host[:port] with the default port left out, as DPoP's ``htu`` wants it."""
    host = f"[{url.host}]" if url.host and ":" in url.host else url.host
    default = {"http": 80, "https": 443}.get(url.scheme)
    port = "" if url.explicit_port in (None, default) else f":{url.explicit_port}"
    return f"{url.scheme}://{host}{port}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where one route sends requests: ``url_for`` and ``htu_for`` take the forwarded raw path."""

    base: str  # origin + upstream path without its trailing slash

    @classmethod
    def of(cls, upstream: str) -> Target:
        url = URL(upstream)
        return cls(_origin(url) + url.raw_path.rstrip("/"))

    def url_for(self, raw_path_qs: str) -> URL:
        return URL(self.base + raw_path_qs, encoded=True)

    def htu_for(self, raw_path: str) -> str:
        return self.base + raw_path


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    host: str | None
    prefix: str  # without trailing slash; "" matches everything
    strip: bool


def request_host(host_header: str | None) -> str | None:
    """The Host header's name part, lower-cased, without port or IPv6 brackets."""
    if not host_header:
        return None
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else None
    return host.rsplit(":", 1)[0] if ":" in host else host


class RouteTable:
    """Longest path prefix wins; among equal prefixes a route naming the Host wins."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        entries = [
            _Entry(
                index=i,
                host=route.host.lower() if route.host else None,
                prefix=(route.path_prefix or "/").rstrip("/"),
                strip=route.strip_prefix and route.path_prefix is not None,
            )
            for i, route in enumerate(routes)
        ]
        self._entries = sorted(entries, key=lambda e: (-len(e.prefix), e.host is None))

    def match(
        self, host: str | None, raw_path: str, *, host_routes_only: bool = False
    ) -> tuple[int, str] | None:
        """Return (route index, forwarded raw path) or None; ``raw_path`` excludes the query.
        ``host_routes_only``: forward-proxy requests may only reach routes that name a host."""
        for entry in self._entries:
            if entry.host is not None and entry.host != host:
                continue
            if host_routes_only and entry.host is None:
                continue
            prefix = entry.prefix
            if raw_path == prefix or raw_path.startswith(prefix + "/") or not prefix:
                if entry.strip:
                    return entry.index, raw_path[len(prefix) :] or "/"
                return entry.index, raw_path
        return None


def overridden(headers: MultiMapping[str], method: str, path: str) -> list[tuple[str, str]]:
    """Every (method, path) other than (``method``, ``path``) that an upstream honouring
    method/URL override headers may serve instead: what the policy must allow too. A URL
    override's path is normalized as the request's (``InvalidPath`` when refused there)."""
    methods = {method}
    paths = {path}
    for name in METHOD_OVERRIDE_HEADERS:
        for value in headers.getall(name, ()):
            methods.update(m.strip().upper() for m in value.split(","))
    for name in URL_OVERRIDE_HEADERS:
        for value in headers.getall(name, ()):
            raw = URL(value.strip()).raw_path if "://" in value else value.strip()
            raw = raw.partition("?")[0]
            if not raw.startswith("/"):
                raise InvalidPath(f"{name} is not an absolute path")
            paths.add(normalize_path(raw)[1])
    return [(m, p) for m in sorted(methods) for p in sorted(paths) if (m, p) != (method, path)]
