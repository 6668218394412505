"""Where a request's Python goes: bytecodes executed per request, by module and by function.

callgrind (``bench/run``) shows that about 88 % of a request's instructions run in the Python
interpreter, but not for which code. This counts the interpreter's own unit of work instead:
``credproxy run`` in this process, one static-header route to an upstream answering from
memory, 200 warm-up requests, then ``--requests`` more one at a time on one keep-alive
connection with an opcode trace on the event loop's thread only (the client and the upstream run
in threads of their own, untraced). Static-header and bearer requests do the same work per
request; a DPoP proof or self-signed JWT adds its signature, which runs in OpenSSL, not here.

    PYTHONPATH=. .venv/bin/python bench/bytecodes.py [--requests 500] [--output bench/results/bytecodes.md]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop
import yaml

ROOT = Path(__file__).resolve().parents[1]
BODY = b'{"id":"ch_0001","amount":4200,"currency":"eur","status":"succeeded"}\n'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


def _upstream(sock: socket.socket) -> None:
    """A keep-alive HTTP/1.1 upstream that answers every request head with ``ANSWER``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, sock=sock)
        await server.serve_forever()

    asyncio.run(main())


class Count:
    """Opcodes executed per (file, function) while installed as the trace function."""

    def __init__(self) -> None:
        self.opcodes: collections.Counter[tuple[str, str]] = collections.Counter()

    def global_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return self.local_trace

    def local_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            self.opcodes[(code.co_filename, code.co_name)] += 1
        return self.local_trace


def _short(path: str) -> str:
    for marker in ("site-packages/", f"{ROOT}/", "python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _drive(
    port: int, loop: asyncio.AbstractEventLoop, stop: asyncio.Event, count: Count, requests: int
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def send(n: int) -> None:
        for _ in range(n):
            connection.request("GET", "/api/small")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"credproxy answered {response.status}")

    def on_loop(action: Any) -> None:
        done = threading.Event()

        def run() -> None:
            action()
            done.set()

        loop.call_soon_threadsafe(run)
        done.wait()

    send(200)
    on_loop(lambda: sys.settrace(count.global_trace))
    send(requests)
    on_loop(lambda: sys.settrace(None))
    loop.call_soon_threadsafe(stop.set)


def _report(count: Count, requests: int) -> str:
    total = sum(count.opcodes.values())
    modules: collections.Counter[str] = collections.Counter()
    for (path, _), n in count.opcodes.items():
        modules[_short(path)] += n
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    lines = [
        "# Bytecodes per request",
        "",
        f"`bench/bytecodes.py --requests {requests}` (git {git}, Python "
        f"{sys.version.split()[0]}): a static-header request, one at a time on one keep-alive "
        f"connection. **{total / requests:,.0f} bytecodes per request** on the event loop's "
        "thread. Most of a request's instructions run in the Python interpreter (the "
        "instructions table of [compare.md](compare.md) splits them by shared object), so a "
        "module's share of bytecodes is roughly its share of the request's cost.",
        "",
        "| module | bytecodes/request | share |",
        "|---|---:|---:|",
    ]
    for module, n in modules.most_common(15):
        lines.append(f"| `{module}` | {n / requests:,.0f} | {n / total:.0%} |")
    lines += ["", "| function | bytecodes/request |", "|---|---:|"]
    for (path, name), n in count.opcodes.most_common(20):
        lines.append(f"| `{_short(path)}:{name}` | {n / requests:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/bytecodes.md")
    args = parser.parse_args()
    upstream = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_upstream, args=(upstream,), daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="credproxy-bytecodes-"))
    key = work / "api-key"
    key.write_text("k3y-for-the-bytecode-count\n")
    key.chmod(0o600)
    config = {
        "listen": "127.0.0.1:0",
        "callers": {"bench": {"uid": os.getuid()}},
        "issuers": {"static": {"type": "static", "secret_file": str(key)}},
        "routes": [
            {
                "name": "api",
                "path_prefix": "/api/",
                "upstream": f"http://127.0.0.1:{upstream.getsockname()[1]}",
                "credential": {"issuer": "static", "inject": "header", "header": "X-Api-Key"},
                "allow": [{"callers": ["bench"]}],
            }
        ],
        "audit": {"file": str(work / "audit.jsonl")},
        "log": {"level": "warning", "access": False},
        "control": {"listen": None},
    }
    path = work / "credproxy.yaml"
    path.write_text(yaml.safe_dump(config))
    count = Count()

    async def serve() -> None:
        from proxy.config import loader
        from proxy.lifecycle.server import Server

        async with Server(loader.load(path)) as server:
            stop = asyncio.Event()
            port = server.app_addresses[0].port
            driver = threading.Thread(
                target=_drive,
                args=(port, asyncio.get_running_loop(), stop, count, args.requests),
                daemon=True,
            )
            driver.start()
            await stop.wait()

    uvloop.run(serve())
    report = _report(count, args.requests)
    args.output.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
