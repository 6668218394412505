"""The CLI's side of the control plane: one HTTP request to the control socket (or loopback
port) named by the config, its JSON answer, and errors that say what to check."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlencode

from ..config.model import Config, parse_address

_TIMEOUT_S = 30.0  # a revoke waits for a replacement token (up to 10 s per credential)


class ControlError(Exception):
    """The control plane did not answer, or refused; the message says which and why."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(
    config: Config,
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    body: Any = None,
    timeout_s: float = _TIMEOUT_S,
) -> Any:
    """The decoded JSON answer of a 2xx; ``ControlError`` otherwise."""
    listen = config.control.listen
    if not listen:
        raise ControlError("control.listen is null in the config: the control plane is off")
    address = parse_address(listen)
    connection = (
        _UnixConnection(address.path, timeout_s)
        if address.path
        else http.client.HTTPConnection(address.host, address.port, timeout=timeout_s)
    )
    target = path + ("?" + urlencode(query) if query else "")
    payload = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    try:
        connection.request(method, target, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
    except OSError as exc:
        raise ControlError(
            f"the control plane at {address} is not answering ({exc.strerror or exc}); is "
            "credproxy running with this config, and may this user open the socket?"
        ) from None
    finally:
        connection.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"{address} answered {response.status} without JSON") from None
    if response.status >= 300:
        detail = answer.get("detail", "") if isinstance(answer, dict) else ""
        code = answer.get("code", response.status) if isinstance(answer, dict) else ""
        raise ControlError(f"{address} refused: {code}: {detail}")
    return answer
