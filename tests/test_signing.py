"""The signature batch: requests in progress together are signed back to back, each gets its own
signature, a request alone is signed at once."""

from __future__ import annotations

import asyncio

import pytest

from proxy.credentials.signing import MAX_BATCH, SignatureBatch
from proxy.tasks import spawn


def _recording(events: list[str]):
    def sign(data: bytes) -> bytes:
        events.append(f"signed {data.decode()}")
        return b"sig:" + data

    return sign


async def test_a_request_alone_is_signed_without_waiting_for_the_loop():
    batch = SignatureBatch()
    batch.requests = 1
    events: list[str] = []
    coroutine = batch.sign(_recording(events), b"a")
    with pytest.raises(StopIteration) as done:  # finished on its first step: no suspension
        coroutine.send(None)
    assert done.value.value == b"sig:a" and events == ["signed a"]


async def test_concurrent_requests_are_signed_together_each_with_its_own_signature():
    batch = SignatureBatch()
    batch.requests = 3
    events: list[str] = []
    sign = _recording(events)

    async def request(name: str) -> bytes:
        events.append(f"asked {name}")
        return await batch.sign(sign, name.encode())

    results = await asyncio.gather(request("a"), request("b"), request("c"))
    assert list(results) == [b"sig:a", b"sig:b", b"sig:c"]
    assert events == ["asked a", "asked b", "asked c", "signed a", "signed b", "signed c"]


async def test_a_batch_is_bounded_so_the_first_requests_go_on_before_the_rest_are_signed():
    batch = SignatureBatch()
    count = 2 * MAX_BATCH + 1
    batch.requests = count
    events: list[str] = []
    sign = _recording(events)

    async def request(i: int) -> None:
        await batch.sign(sign, str(i).encode())
        events.append(f"resumed {i}")

    await asyncio.gather(*(request(i) for i in range(count)))
    signed = [e for e in events if e.startswith("signed")]
    assert signed == [f"signed {i}" for i in range(count)]
    # the first batch's requests resumed before the second batch was signed, and so on
    assert events.index("resumed 0") < events.index(f"signed {MAX_BATCH}")
    assert events.index(f"resumed {MAX_BATCH}") < events.index(f"signed {2 * MAX_BATCH}")


async def test_a_failed_signature_fails_only_its_own_request():
    batch = SignatureBatch()
    batch.requests = 2

    def sign(data: bytes) -> bytes:
        if data == b"bad":
            raise ValueError("key unusable")
        return b"sig:" + data

    results = await asyncio.gather(
        batch.sign(sign, b"bad"), batch.sign(sign, b"good"), return_exceptions=True
    )
    assert isinstance(results[0], ValueError) and results[1] == b"sig:good"


async def test_a_request_cancelled_while_waiting_is_not_signed():
    batch = SignatureBatch()
    batch.requests = 2
    events: list[str] = []
    sign = _recording(events)
    gone = spawn(batch.sign(sign, b"gone"), name="gone")
    kept = spawn(batch.sign(sign, b"kept"), name="kept")
    await asyncio.sleep(0)  # both are waiting for the flush
    gone.cancel()
    assert await kept == b"sig:kept"
    assert events == ["signed kept"]
    with pytest.raises(asyncio.CancelledError):
        await gone
