"""A bare aiohttp reverse proxy adding a static header: the floor for a Python proxy on aiohttp.

    .venv/bin/python bench/aiohttp_proxy.py --port P --upstream http://127.0.0.1:U --key-file F

The same stack credproxy runs on (uvloop, aiohttp's low-level ``web.Server``, one pooled
``ClientSession``, responses streamed back) with nothing else: no caller lookup, routing, policy,
metrics, audit or scrubbing. The gap between this row and credproxy's is credproxy's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host")
)


async def _serve(port: int, upstream: str, header: str, key: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers[header] = key
        body = request.content if request.body_exists else None
        async with session.request(
            request.method, upstream + request.rel_url.raw_path_qs, headers=headers, data=body
        ) as answer:
            response = web.StreamResponse(
                status=answer.status,
                headers={k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP},
            )
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.ServerRunner(web.Server(handler, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()  # until SIGTERM
    finally:
        await runner.cleanup()
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--header", default="X-Api-Key")
    parser.add_argument("--key-file", type=Path, required=True)
    args = parser.parse_args()
    key = args.key_file.read_text().strip()
    uvloop.run(_serve(args.port, args.upstream, args.header, key))


if __name__ == "__main__":
    main()
