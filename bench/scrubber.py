"""Echo scrubber throughput: bytes/s through ``Scrubber.feed`` in 64 KiB chunks of prose with
URLs, a JSON API answer and random binary, for a static key and a bearer JWT (no echo in them:
the cost every answer pays). Prints a Markdown table.

    PYTHONPATH=. python bench/scrubber.py [--mib 32]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import time

from proxy.outbound.hygiene import Scrubber

CHUNK_BYTES = 64 * 1024
KEY = "Zm9vYmFy/cXV4+YmF6=="
JWT = "eyJhbGciOiJFUzI1NiIsInR5cCI6ImF0K2p3dCJ9." + "eyJzdWIiOiJvcmRlcnMi" * 12 + ".c2ln" * 20
WORDS = (
    "the of and to in is was for on are with as by at from this that which or an be have it "
    "credential proxy sidecar upstream request response token refresh policy caller route"
).split()


def _text(rng: random.Random, size: int) -> bytes:
    out: list[str] = []
    length = 0
    while length < size:
        words = rng.choices(WORDS, k=rng.randint(6, 18))
        if rng.random() < 0.2:
            words.append(f"https://example.com/a/b?q={rng.randint(0, 999)}&r=%2F{rng.random():.4f}")
        out.append(" ".join(words).capitalize() + ". ")
        length += len(out[-1])
    return "".join(out).encode()[:size]


def _json(rng: random.Random, size: int) -> bytes:
    records = []
    length = 0
    while length < size:
        record = {
            "id": f"{rng.getrandbits(128):032x}",
            "name": " ".join(rng.choices(WORDS, k=3)) + " caf\u00e9",
            "url": f"https://api.example.com/v1/items/{rng.randint(0, 10**6)}?expand=owner",
            "etag": base64.b64encode(rng.randbytes(24)).decode(),
            "count": rng.randint(0, 10**9),
            "tags": rng.choices(WORDS, k=4),
        }
        records.append(record)
        length += 260
    return json.dumps({"items": records}).encode()[:size]


def _binary(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _bytes_per_s(secret: str, data: bytes, rounds: int) -> float:
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    best = float("inf")
    for _ in range(rounds):
        scrubber = Scrubber(secret)
        started = time.perf_counter()
        for chunk in chunks:
            scrubber.feed(chunk)
        scrubber.flush()
        best = min(best, time.perf_counter() - started)
    return len(data) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="bytes of each corpus (MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="best of this many passes")
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    rng = random.Random(16)
    corpora = {"text": _text(rng, size), "json": _json(rng, size), "binary": _binary(rng, size)}
    print(f"| corpus | static key ({len(KEY)} B) | bearer JWT ({len(JWT)} B) |")
    print("|---|---|---|")
    for name, data in corpora.items():
        rates = [_bytes_per_s(secret, data, args.rounds) / 1e6 for secret in (KEY, JWT)]
        print(f"| {name} | {rates[0]:,.0f} MB/s | {rates[1]:,.0f} MB/s |")


if __name__ == "__main__":
    main()
