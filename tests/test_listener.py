"""inbound/listener.py and inbound/connection.py: the app connection's wire, with a recording
handler and admission hook.

Connections are socketpairs accepted by the listener as a server would accept them; the peer's
kernel credentials are this test process's own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.access.callers import Caller
from proxy.errors import CallerNotAllowed, ProblemError
from proxy.inbound import connection
from proxy.inbound.listener import AppListener, Limits
from proxy.inbound.request import AppRequest
from proxy.tasks import spawn
from tests import inprocess
from tests.inprocess import UID, closed, read_response


class Recorder:
    """The handler: answers 200 with the request-target; ``hold`` makes that target's request
    wait for ``release``, so what happens meanwhile can be observed."""

    def __init__(self, hold: str | None = None) -> None:
        self.targets: list[str] = []
        self.hold = hold
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: AppRequest) -> None:
        self.targets.append(request.target)
        if request.target == self.hold:
            self.holding.set()
            await self.release.wait()
        body = await request.body.read()
        request.send(200, "OK", {"Content-Type": "text/plain"}, request.target.encode() + body)


class EarlyAnswer:
    """The handler: answers at once without reading the request's body, as credproxy does when
    the upstream fails while the body streams."""

    async def __call__(self, request: AppRequest) -> None:
        request.send(502, "Bad Gateway", {"Content-Type": "text/plain"}, b"early")


class Admissions:
    """The admission hook: records each (caller, limit refusal) and refuses when ``refuse``."""

    def __init__(self, refuse: ProblemError | None = None) -> None:
        self.calls: list[tuple[Caller, ProblemError | None]] = []
        self.refuse = refuse

    def __call__(self, caller: Caller, over_limit: ProblemError | None) -> ProblemError | None:
        self.calls.append((caller, over_limit))
        return over_limit or self.refuse


class Apps:
    """Opens app connections; at teardown closes them and drains every listener used."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.listeners: set[AppListener] = set()

    async def connect(self, listener: AppListener):
        self.listeners.add(listener)
        return await inprocess.connect(listener, self.writers)


@pytest.fixture
async def apps() -> AsyncIterator[Apps]:
    apps = Apps()
    yield apps
    for writer in apps.writers:
        writer.close()
    for listener in apps.listeners:
        await listener.drain(0.0)


async def _until(predicate) -> None:
    async with asyncio.timeout(10):  # a hang guard, not an assertion
        while not predicate():
            await asyncio.sleep(0.01)


def _listener(
    handler: Recorder | EarlyAnswer,
    admit: Admissions | None = None,
    *,
    keepalive_s: float = 30.0,
    max_head_bytes: int = 32768,
    max_connections: int = 64,
) -> AppListener:
    return AppListener(
        handler,
        admit or Admissions(),
        keepalive_s,
        Limits(max_head_bytes, max_connections, max_connections),
    )


async def test_pipelined_requests_are_served_one_at_a_time_and_answered_in_order(apps):
    """Two requests in one write: the second waits for the first's answer, and the answers
    come back in request order."""
    handler = Recorder(hold="/first")
    listener = _listener(handler)
    reader, writer = await apps.connect(listener)
    writer.write(
        b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc"
    )
    await handler.holding.wait()
    assert handler.targets == ["/first"]  # parsed, but not handed over while /first is served
    handler.release.set()
    first, second = await read_response(reader), await read_response(reader)
    assert (first.body, second.body) == (b"/first", b"/secondabc")


async def test_a_connection_is_kept_alive_between_requests_unless_asked_to_close(apps):
    """HTTP/1.1 stays open across requests; ``Connection: close`` and an HTTP/1.0 request
    without keep-alive end the connection after their answer."""
    handler = Recorder()
    listener = _listener(handler)
    reader, writer = await apps.connect(listener)
    for target in (b"/a", b"/b"):
        writer.write(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % target)
        assert (await read_response(reader)).body == target
    writer.write(b"GET /c HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    answer = await read_response(reader)
    assert answer.headers["connection"] == "close" and await closed(reader)
    reader, writer = await apps.connect(listener)
    writer.write(b"GET /d HTTP/1.0\r\n\r\n")
    assert (await read_response(reader)).status == 200 and await closed(reader)
    assert handler.targets == ["/a", "/b", "/c", "/d"]


def _serving(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """The tasks started since ``before`` but the listener's idle sweep: connections' own."""
    return {t for t in asyncio.all_tasks() - before if t.get_name() != "app-idle-sweep"}


async def test_one_task_serves_a_connection_and_ends_when_the_app_closes_it(apps):
    """The connection's task waits between requests (not busy: a drain closes the connection
    at once) instead of being made anew per request; when the app closes the connection the
    task ends, so none is left behind per connection served."""
    listener = _listener(Recorder())
    before = asyncio.all_tasks()
    reader, writer = await apps.connect(listener)
    seen = []
    for target in (b"/a", b"/b", b"/c"):
        writer.write(b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % target)
        assert (await read_response(reader)).body == target
        await _until(lambda: not next(iter(listener.connections)).busy)
        seen.append(_serving(before))
    assert len(seen[0]) == 1 and seen[0] == seen[1] == seen[2]
    writer.close()
    await _until(lambda: not listener.connections and not _serving(before))
    [task] = seen[0]
    assert task.done() and not task.cancelled()


async def test_drain_closes_an_idle_connection_at_once_and_a_busy_one_after_its_answer(apps):
    """A connection waiting for its next request is not busy: a drain closes it while another
    connection's request is still being served; that one gets its answer, then the close."""
    handler = Recorder(hold="/slow")
    listener = _listener(handler)
    before = asyncio.all_tasks()
    idle_reader, idle_writer = await apps.connect(listener)
    idle_writer.write(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await read_response(idle_reader)).body == b"/a"
    busy_reader, busy_writer = await apps.connect(listener)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await handler.holding.wait()
    draining = spawn(listener.drain(30.0), name="drain")
    assert await closed(idle_reader)
    assert not draining.done()
    handler.release.set()
    assert (await read_response(busy_reader)).body == b"/slow"
    assert await closed(busy_reader)
    await draining
    await _until(lambda: not _serving(before - {draining}))


async def test_connections_left_idle_after_a_request_leave_no_task_once_swept(apps):
    """A flood of keep-alive connections, each served once and then left open and silent: the
    idle sweep closes every one, and the task each had waiting for its next request ends."""
    listener = _listener(Recorder(), keepalive_s=2.0)
    before = asyncio.all_tasks()
    readers = []
    for i in range(40):
        reader, writer = await apps.connect(listener)
        writer.write(b"GET /%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i)
        assert (await read_response(reader)).body == b"/%d" % i
        readers.append(reader)
    assert len(_serving(before)) == 40  # one parked task per open connection
    for reader in readers:
        assert await closed(reader)
    await _until(lambda: not listener.connections and not _serving(before))


async def test_an_idle_connection_is_closed_after_keepalive_s(apps):
    """A connection with no request in progress is closed by the idle sweep."""
    listener = _listener(Recorder(), keepalive_s=0.0)
    reader, writer = await apps.connect(listener)  # accepting it started the sweep
    assert await closed(reader)


async def test_a_malformed_request_is_answered_400_after_the_ones_before_it_then_closed(apps):
    """A malformed request parsed while an earlier one is served waits for that answer, then
    gets a 400 problem that does not quote its bytes, and the connection closes."""
    handler = Recorder(hold="/ok")
    listener = _listener(handler)
    reader, writer = await apps.connect(listener)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await handler.holding.wait()
    writer.write(b"GET /bad\x00secret HTTP/1.1\r\n\r\n")
    await writer.drain()
    handler.release.set()
    ok, refused = await read_response(reader), await read_response(reader)
    assert ok.status == 200 and refused.status == 400
    assert json.loads(refused.body)["code"] == "malformed_request"
    assert b"secret" not in refused.body
    assert await closed(reader) and handler.targets == ["/ok"]


async def test_a_head_over_max_head_bytes_is_refused_431_even_when_sent_in_pieces(apps):
    """The head cap counts a head across reads; over it the app gets 431 and a close, and the
    handler is never called."""
    handler = Recorder()
    listener = _listener(handler, max_head_bytes=1024)
    reader, writer = await apps.connect(listener)
    writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
    await writer.drain()
    for _ in range(3):
        writer.write(b"X-Filler: " + b"f" * 400 + b"\r\n")
        await writer.drain()
    answer = await read_response(reader)
    assert answer.status == 431
    assert json.loads(answer.body)["code"] == "request_head_too_large"
    assert await closed(reader) and handler.targets == []


async def test_admission_is_asked_at_accept_with_the_kernels_caller_before_any_byte(apps):
    """The admission hook runs when the connection is accepted, before the app sends a byte,
    with the caller the kernel reported (our own uid over a socketpair)."""
    admit = Admissions()
    listener = _listener(Recorder(), admit)
    reader, writer = await apps.connect(listener)
    [(caller, over_limit)] = admit.calls
    assert caller.identified and caller.transport == "unix" and caller.uid == UID
    assert over_limit is None


async def test_a_refused_caller_gets_one_problem_and_a_close_and_no_request_is_served(apps):
    """When admission refuses, the connection is answered with that problem, unprompted, and
    closed; it never counts as open and no request on it reaches the handler."""
    handler = Recorder()
    listener = _listener(handler, Admissions(refuse=CallerNotAllowed("no rule")))
    reader, _ = await apps.connect(listener)
    answer = await read_response(reader)
    assert answer.status == 403 and json.loads(answer.body)["code"] == "caller_not_allowed"
    assert answer.headers["connection"] == "close"
    assert await closed(reader) and handler.targets == []
    assert listener.connections == set()


async def test_a_connection_over_max_connections_is_refused_503_with_the_limit_given_to_admit(apps):
    """Past ``max_connections`` the admission hook is told (its refusal stands) and the app gets
    503 too_many_connections; closing one connection makes room for the next."""
    admit = Admissions()
    listener = _listener(Recorder(), admit, max_connections=1)
    _, first_writer = await apps.connect(listener)
    reader, _ = await apps.connect(listener)
    answer = await read_response(reader)
    assert answer.status == 503 and json.loads(answer.body)["code"] == "too_many_connections"
    assert admit.calls[0][1] is None and admit.calls[1][1] is not None
    first_writer.close()
    await _until(lambda: not listener.connections)
    reader, writer = await apps.connect(listener)
    writer.write(b"GET /room HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert (await read_response(reader)).status == 200


_MIB = 2**20


async def _answered_mid_body(apps, listener: AppListener, length: int):
    """An app connection that sent a head for ``length`` body bytes and 64 KiB of them, and
    read the early answer to it."""
    reader, writer = await apps.connect(listener)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % length)
    writer.write(b"y" * 65536)
    answer = await read_response(reader)
    assert (answer.status, answer.body) == (502, b"early")
    return reader, writer


async def test_an_answer_before_the_body_was_read_lets_the_app_finish_sending_it(apps):
    """Answered mid-body, the app may go on sending the rest (as an app that reads only once
    its body is out does) without a reset; the connection ends when the app closes it."""
    listener = _listener(EarlyAnswer())
    reader, writer = await _answered_mid_body(apps, listener, 2 * _MIB)
    for _ in range(31):  # the rest of the 2 MiB
        writer.write(b"y" * 65536)
        await writer.drain()
    assert await closed(reader)  # a FIN, after the answer
    writer.close()
    await _until(lambda: not listener.connections and not listener.lingering)


async def test_an_app_sending_past_the_linger_byte_bound_is_cut_off(apps):
    """After an early answer at most ``_LINGER_MAX_BYTES`` more are read and dropped: an app
    that keeps sending is reset, however long its declared body."""
    listener = _listener(EarlyAnswer())
    _, writer = await _answered_mid_body(apps, listener, 1024 * _MIB)
    with pytest.raises(ConnectionError):
        for _ in range(connection._LINGER_MAX_BYTES // 65536 + 256):  # bound + 16 MiB
            writer.write(b"y" * 65536)
            await writer.drain()
    await _until(lambda: not listener.connections and not listener.lingering)


async def test_an_app_that_never_closes_after_an_early_answer_is_closed_at_linger_s(
    apps, monkeypatch
):
    """The lingering close is bounded in time too: an app that sends nothing more and keeps
    its end open is closed by the sweep once ``_LINGER_S`` has passed."""
    monkeypatch.setattr(connection, "_LINGER_S", 0.0)
    listener = _listener(EarlyAnswer())
    await _answered_mid_body(apps, listener, 2 * _MIB)
    await _until(lambda: not listener.connections and not listener.lingering)
