"""Benchmarks: ``compare`` (credproxy beside nginx, Envoy and mitmproxy; ``bench/run``), ``soak``,
``caller_lookup``, and the counterparts they start (``bench_idp``, ``aiohttp_proxy``)."""
