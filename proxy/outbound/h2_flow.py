"""HTTP/2 flow control as a body ``StreamReader`` drives it, on either side of credproxy: a
stream's received bytes are acknowledged (``WINDOW_UPDATE``) as they arrive, or held while its
reader is paused, so that a peer sends no faster than the reader takes."""

from __future__ import annotations

from typing import Protocol


class Acknowledging(Protocol):
    def acknowledge(self, stream_id: int, size: int) -> None: ...


class StreamFlow:
    """What a body ``StreamReader`` pauses and resumes (an answer's here, a request's on the
    app side): whether the stream's received bytes are acknowledged (WINDOW_UPDATE) as they
    arrive, or held until the reader takes them."""

    __slots__ = ("_connection", "_stream_id", "_reading_paused", "_unacknowledged", "connected")

    def __init__(self, connection: Acknowledging, stream_id: int) -> None:
        self._connection = connection
        self._stream_id = stream_id
        self._reading_paused = False
        self._unacknowledged = 0
        self.connected = True

    def received(self, size: int) -> None:
        if self._reading_paused:
            self._unacknowledged += size
        elif size:
            self._connection.acknowledge(self._stream_id, size)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._reading_paused:
            self._reading_paused = False
            size, self._unacknowledged = self._unacknowledged, 0
            if size:
                self._connection.acknowledge(self._stream_id, size)
