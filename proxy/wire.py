"""aiohttp's HTTP/1.1 machinery that is not its public API, in one place: the request and
response parsers, the protocol base class with flow control, the parsed message types, the web
server's connection protocol, and what a parser error may say.

The app connections (``inbound.connection``), the upstream pool (``outbound.upstream``) and the
telemetry/control listeners (``lifecycle.admin_http``) are built on these for speed and strict
parsing. They are internal to aiohttp (pinned ``>=3.11,<4`` in pyproject.toml): when aiohttp
moves them, this module is the one to adapt.
"""

from __future__ import annotations

import re

from aiohttp import base_protocol
from aiohttp.http import (
    HttpProcessingError,
    HttpRequestParser,
    HttpResponseParser,
    HttpVersion11,
    RawRequestMessage,
    RawResponseMessage,
)
from aiohttp.streams import EmptyStreamReader
from aiohttp.web_protocol import RequestHandler

__all__ = [
    "BaseProtocol",
    "EmptyStreamReader",
    "HttpProcessingError",
    "HttpRequestParser",
    "HttpResponseParser",
    "HttpVersion11",
    "RawRequestMessage",
    "RawResponseMessage",
    "RequestHandler",
    "described",
]


class BaseProtocol(base_protocol.BaseProtocol):
    """aiohttp's protocol base with flow control, resumed only when it was paused: a
    StreamReader calls ``resume_reading`` after every chunk it hands out, paused or not, and
    the base's resume feeds the parser an empty read and resumes the transport every time."""

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            super().resume_reading(resume_parser)


_QUOTED = re.compile(r"""(?:\bb)?['"]""")  # where aiohttp starts quoting what it parsed


def described(error: HttpProcessingError) -> str:
    """The parser's words for what is wrong, without the bytes it quotes after them (a request
    line, a status line, a header): either side may carry a credential there."""
    words = _QUOTED.split(str(error.message), 1)[0].split("\n", 1)[0]
    return " ".join(words.split()).rstrip(" :") or type(error).__name__
