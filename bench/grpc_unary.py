"""gRPC unary calls/s: a grpcio client straight to a grpcio server on loopback, and through
credproxy (h2c from the client, h2c upstream, a static header credential: the protocol's cost
without a signature's). Each path: ``--calls`` small unary calls, ``--concurrency`` in flight on
one channel, best of ``--rounds``. Prints a Markdown table.

    PYTHONPATH=. python bench/grpc_unary.py [--calls 5000] [--concurrency 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from tests.counterparts import PREAMBLE, Credproxy

SERVICE = "bench.Echo"


def _identity(data: bytes) -> bytes:
    return data


def _server() -> tuple[grpc.Server, int]:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _calls_per_s(target: str, calls: int, concurrency: int) -> float:
    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary(
            f"/{SERVICE}/Unary", request_serializer=_identity, response_deserializer=_identity
        )
        unary(b"warm-up", timeout=10)
        started = time.perf_counter()
        pending: list[Any] = []
        for _ in range(calls):
            pending.append(unary.future(b"x" * 64, timeout=30))
            if len(pending) >= concurrency:
                pending.pop(0).result()
        for future in pending:
            future.result()
        return calls / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    server, port = _server()
    with tempfile.TemporaryDirectory(prefix="credproxy-grpc-bench-") as tmp:
        key_file = Path(tmp) / "key"
        key_file.write_text("bench-static-key-0123456789\n")
        proc = Credproxy(
            Path(tmp),
            f"""{PREAMBLE}issuers:
  key: {{type: static, secret_file: {key_file}}}
routes:
  - name: grpc
    path_prefix: /{SERVICE}/
    strip_prefix: false
    upstream: http://127.0.0.1:{port}
    upstream_protocol: h2c
    credential: {{issuer: key, inject: header, header: X-Api-Key}}
    allow: [{{callers: [test-suite]}}]
log: {{access: false}}
""",
        ).start()
        try:
            rows = {"grpcio direct": f"127.0.0.1:{port}", "through credproxy": proc.url[7:]}
            best = {name: 0.0 for name in rows}
            for _ in range(args.rounds):
                for name, target in rows.items():
                    rate = _calls_per_s(target, args.calls, args.concurrency)
                    best[name] = max(best[name], rate)
        finally:
            proc.stop()
            server.stop(None)
    print(f"# gRPC unary calls/s ({args.calls} calls, {args.concurrency} in flight, 64 B)\n")
    print("| path | calls/s | × direct |\n|---|---:|---:|")
    for name, rate in best.items():
        print(f"| {name} | {rate:,.0f} | {rate / best['grpcio direct']:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
