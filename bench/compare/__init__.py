"""credproxy against nginx, Envoy and mitmproxy, side by side, in one run on this machine.

    bench/run [--duration S] [--rounds N] [--only NAME,...] [--no-pin] [--keep]
                                                       (installs what is missing)
    .venv/bin/python -m bench.compare [same options]          (when everything is there)
    .venv/bin/python -m bench.compare --render bench/results/compare.json  (report again, no run)

An upstream nginx on loopback serves a small body (/small) and 1 MiB (/big); it answers 401 unless
the request carries the credential the path under test should have added (the static key in
``X-Api-Key``, or ``Authorization: Bearer``, or ``Authorization: DPoP`` with a ``DPoP`` proof),
so a proxy that forgets to inject shows up as errors, not as speed. ``wrk`` measures each path:
requests/s and latency at 50 connections, latency at 1 connection, the 1 MiB body at 50
connections. The proxy's CPU time (utime+stime of its process tree, /proc/PID/stat) over a run,
divided by the requests of that run, gives CPU µs per request; RSS is the sum of VmRSS over the
process tree, idle (after start and a readiness probe) and the peak sampled under load.

With two or more CPUs the proxy under test is pinned to the last one and everything else (wrk,
the upstream, the IdP, the bench) to the others, so "requests/s" is what one proxy core serves
and "per core" (10⁶ / CPU µs per request) is comparable across proxies; ``--no-pin`` turns this
off. Every proxy runs one worker (nginx ``worker_processes 1``, Envoy ``--concurrency 1``).
credproxy's bearer and DPoP paths and Envoy's OAuth2 injector get tokens from bench/bench_idp.py
(the demo IdP; ``--token-ttl`` 10 s by default, so refreshes happen under load), which counts
token requests. bench/aiohttp_proxy.py, a bare aiohttp proxy, is the floor for credproxy's stack.
Every path is measured ``--rounds`` times (2 by default), the paths taking turns, and each load
point is reported from its best round: on a shared VM a neighbour slows a single run by 15-25 %.
Each credproxy path is also run once under callgrind (valgrind), which counts the instructions
of 1,000 requests sent one at a time: a per-request figure that does not move with the VM.
Every process started is stopped by PID, in a ``finally``; everything listens on 127.0.0.1.
Results: bench/results/compare.json, and compare.md rendered from it (also printed).

Paths (``--only`` keys; direct always runs): direct, nginx, envoy, envoy-oauth2, mitmproxy,
aiohttp, cp-static, cp-static-1000, cp-bearer, cp-dpop, cp-jwt, and cp-bearer-2w once ``credproxy run --workers``
exists.

Modules, in the order a run uses them::

    cli          options; one run, or --render of a saved JSON
    workspace    the shared pieces of a run (Bench: keys, ports, CPU layout)
    processes    starting and stopping processes by PID; readiness probes
    counterparts the upstream nginx (upstream.nginx.conf) and the bench IdP
    subjects/    the paths under test as one table; a module (and config template) per subject
    measuring    a path's round, rounds taking turns, best of rounds
    wrk          driving wrk and parsing its output;  sampling: /proc CPU, RSS, PSS
    callgrind    instructions per request;  upload: the 1 GiB streamed upload
    results      rows and settings as data, and their JSON
    report       compare.md from the JSON;  targets: issue 7's targets as a table
"""
