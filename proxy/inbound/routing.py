"""Route matching: Host and path prefix → route and the path to forward. No I/O.

Invariant 11, forward what the app sent: the bytes after the route prefix go upstream exactly as
the app sent them (still percent-encoded), or the request is refused. How a route reads a path
is its ``path`` mode (``RouteConfig.path_mode``):

- ``normalized``: routing and policy see the RFC 3986 normal form (``normalize_path``), and a
  path that normalizing would change (dot segments, escaped unreserved characters, ``//``) is
  refused, never rewritten: forwarding another path than the app's can reach another resource
  (``dir/../a`` is the S3 key ``a``, overwriting it). Escapes differing only in the case of
  their hex digits are equivalent to every decoder and pass as sent.
- ``opaque``: nothing is normalized, for APIs whose path is an opaque key (S3, GCS, blob
  stores: ``a//b`` and ``../x`` are keys like any other). The prefix is matched on the raw
  path, the policy's globs match the raw path, and those raw bytes are forwarded. Encoding
  cannot bypass the policy, because the policy only ever compares the very bytes the upstream
  receives: a glob's literal text matches only itself, so an encoded variant (``%61dmin``,
  ``%2F``, ``..%2F``) of an allowed or a denied name fails a match instead of passing one, and
  rules only allow (default deny). What the upstream then makes of the bytes is the upstream's
  reading, which for an opaque-key API is the key itself, hence ``opaque`` is for such APIs
  only: on an upstream that resolves ``..``, ``/**``-style globs would reach past their
  prefix. Still refused: NUL, CR and LF, raw or as ``%00``, which no key API accepts and which
  cut or split requests in some servers.
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
from ..errors import InvalidPath, PathEscapesRoute, PathNotCanonical, RequestRefused
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
    """Where one route sends requests: ``path_qs_for`` and ``htu_for`` take the forwarded raw
    path (and query)."""

    origin: str  # scheme://host[:port], the default port left out
    path: str  # the upstream's path without its trailing slash

    @classmethod
    def of(cls, upstream: str) -> Target:
        url = URL(upstream)
        return cls(_origin(url), url.raw_path.rstrip("/"))

    @property
    def base(self) -> str:
        return self.origin + self.path

    def path_qs_for(self, raw_path_qs: str) -> str:
        """The request-target sent upstream: the upstream's path, then the forwarded one."""
        return self.path + raw_path_qs

    def htu_for(self, raw_path: str) -> str:
        return self.origin + self.path + raw_path


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    host: str | None
    prefix: str  # without trailing slash; "" matches everything
    strip: bool
    opaque: bool = False


def request_host(host_header: str | None) -> str | None:
    """The Host header's name part, lower-cased, without port or IPv6 brackets."""
    if not host_header:
        return None
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else None
    return host.rsplit(":", 1)[0] if ":" in host else host


class RouteTable:
    """Longest path prefix wins; among equal prefixes a route naming the Host wins. A lookup
    costs one dict probe per path segment up to the longest prefix, whatever the number of
    routes."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        entries = [
            _Entry(
                index=i,
                host=route.host.lower() if route.host else None,
                prefix=(route.path_prefix or "/").rstrip("/"),
                strip=route.strip_prefix and route.path_prefix is not None,
                opaque=route.path_mode == "opaque",
            )
            for i, route in enumerate(routes)
        ]
        self._names = [route.name for route in routes]
        # (host or None, prefix) → the first route declaring it (check-config refuses repeats)
        self._by_key: dict[tuple[str | None, str], _Entry] = {}
        for entry in entries:
            self._by_key.setdefault((entry.host, entry.prefix), entry)
        self._longest = max((len(e.prefix) for e in entries), default=0)

    def route(
        self, host: str | None, raw_path: str, *, host_routes_only: bool = False
    ) -> tuple[int, str] | None:
        """(route index, path to forward and to check the policy against) for a raw path as
        the app sent it, without the query; None when no route matches. The path returned is
        always the app's bytes after the prefix. Refused: what ``normalize_path`` refuses and,
        on a ``normalized`` route, a path normalizing would change (``PathNotCanonical``, or
        ``PathEscapesRoute`` when its normal form belongs to another route or none); on an
        ``opaque`` route only NUL, CR, LF and ``%00`` (the module docstring says why).
        ``host_routes_only``: forward-proxy requests may only reach routes that name a host."""
        entry = self._find(host, raw_path, host_routes_only)
        try:
            if "\0" in raw_path or "\r" in raw_path or "\n" in raw_path:
                raise InvalidPath("NUL, CR or LF in path")
            if entry is not None and entry.opaque:
                if "%00" in raw_path:
                    raise InvalidPath("encoded NUL in path")
                return entry.index, _after(entry, raw_path)
            dotted, path = normalize_path(raw_path)
            if path != raw_path and path != _ESCAPE.sub(_upper, raw_path):
                normal = self._find(host, path, host_routes_only)
                if entry is not None and normal is not entry:
                    raise PathEscapesRoute(f"{raw_path[:200]!r} leaves its route as {path[:200]!r}")
                changed = "dot segments" if dotted != path else "escaped unreserved characters"
                raise PathNotCanonical(f"{raw_path[:200]!r} forwarded as {path[:200]!r}: {changed}")
        except RequestRefused as exc:
            if entry is not None:  # refused on that route: answered in its format
                exc.route = self._names[entry.index]
            raise
        return None if entry is None else (entry.index, _after(entry, raw_path))

    def match(
        self, host: str | None, path: str, *, host_routes_only: bool = False
    ) -> tuple[int, str] | None:
        """(route index, ``path`` after the prefix) by prefix alone, whatever the path mode."""
        entry = self._find(host, path, host_routes_only)
        return None if entry is None else (entry.index, _after(entry, path))

    def _find(self, host: str | None, path: str, host_routes_only: bool) -> _Entry | None:
        """Try the path's prefixes that end at a segment boundary, longest first (none longer
        than the longest route prefix), each with the Host, then without."""
        by_key = self._by_key
        end = len(path)
        if end > self._longest:
            end = path.rfind("/", 0, self._longest + 1)
        while end > 0:
            candidate = path[:end]
            entry = by_key.get((host, candidate)) if host is not None else None
            if entry is None and not host_routes_only:
                entry = by_key.get((None, candidate))
            if entry is not None:
                return entry
            end = path.rfind("/", 0, end)
        entry = by_key.get((host, "")) if host is not None else None  # path_prefix "/"
        if entry is None and not host_routes_only:
            entry = by_key.get((None, ""))
        return entry


def _after(entry: _Entry, path: str) -> str:
    """The path to forward: without the route's prefix where the route strips it."""
    return (path[len(entry.prefix) :] or "/") if entry.strip else path


def _upper(escape: re.Match[str]) -> str:
    return escape[0].upper()


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
