"""Prometheus metrics. Labels are bounded: route, issuer and reason names come from the config.

With ``--workers`` each process writes its values under ``PROMETHEUS_MULTIPROC_DIR`` and the
admin listener (worker 0) exposes their aggregate: counters and histograms summed, gauges as
their ``multiprocess_mode`` says (the soonest expiry, the longest backoff, summed connections).

The three metrics every request updates are ``RequestCounts``: plain numbers, turned into
metric families when scraped. With workers, each saves them next to prometheus_client's files
every 5 s and on exit, and worker 0 adds its own live ones: the other workers' requests show up
within 5 s, and a worker killed outright takes its last seconds of counts with it.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from .log import server_log

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SESSION_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
_BUCKET_NAMES = [repr(float(bound)) for bound in _LATENCY_BUCKETS] + ["+Inf"]  # as `le` values


class Durations:
    """One route's latency histogram as plain numbers: a count per bucket (the last is above
    every bound) and the sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self, buckets: list[int] | None = None, total: float = 0.0) -> None:
        self.buckets = buckets or [0] * len(_BUCKET_NAMES)
        self.sum = total

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # le: bound >= seconds
        self.sum += seconds

    def add(self, other: Durations) -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.sum += other.sum


class RequestCounts:
    """``credproxy_requests_total`` and the request and upstream duration histograms. A request
    adds to dicts and lists here, with no lock (one event loop per process): prometheus_client's
    locked values cost about 6 µs per request, 8 with ``--workers`` (each write also goes to a
    memory-mapped file)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int, str], int] = {}  # (route, status, outcome) → count
        self.durations: dict[str, Durations] = {}
        self.upstream: dict[str, Durations] = {}

    def add(self, other: RequestCounts) -> None:
        for key, count in other.requests.items():
            self.requests[key] = self.requests.get(key, 0) + count
        for mine, theirs in ((self.durations, other.durations), (self.upstream, other.upstream)):
            for route, durations in theirs.items():
                mine.setdefault(route, Durations()).add(durations)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": [[*key, count] for key, count in self.requests.items()],
            "durations": {route: [d.buckets, d.sum] for route, d in self.durations.items()},
            "upstream": {route: [d.buckets, d.sum] for route, d in self.upstream.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestCounts:
        counts = cls()
        counts.requests = {(r, int(s), o): int(n) for r, s, o, n in data["requests"]}
        counts.durations = {r: Durations(b, t) for r, (b, t) in data["durations"].items()}
        counts.upstream = {r: Durations(b, t) for r, (b, t) in data["upstream"].items()}
        return counts


class _RequestCollector:
    """Metric families from ``RequestCounts``, for a registry (prometheus_client's collector
    protocol)."""

    def __init__(self, counts: Callable[[], RequestCounts]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts()
        requests = CounterMetricFamily(
            "credproxy_requests",
            "Requests answered to the app.",
            labels=("route", "code", "outcome"),
        )
        for (route, status, outcome), count in sorted(counts.requests.items()):
            requests.add_metric((route, str(status), outcome), count)
        yield requests
        yield _histogram(
            "credproxy_request_duration_seconds",
            "Time from request to response headers.",
            counts.durations,
        )
        yield _histogram(
            "credproxy_upstream_duration_seconds",
            "Time the upstream took to send headers.",
            counts.upstream,
        )


def _histogram(name: str, documentation: str, by_route: dict[str, Durations]) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=("route",))
    for route, durations in sorted(by_route.items()):
        cumulative = zip(_BUCKET_NAMES, accumulate(durations.buckets), strict=True)
        family.add_metric((route,), list(cumulative), durations.sum)
    return family


class Metrics:
    """One set per process, on its own registry so tests and the demo can run several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.counts = RequestCounts()
        self._directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # set with --workers
        r.register(_RequestCollector(lambda: self.counts))
        self.denied = Counter(
            "credproxy_denied", "Requests refused by credproxy itself.", ["reason"], registry=r
        )
        self.credential_issued = Counter(
            "credproxy_credential_issued",
            "Token requests to issuers, by outcome.",
            ["issuer", "outcome"],
            registry=r,
        )
        self.credential_refresh_duration = Histogram(
            "credproxy_credential_refresh_duration_seconds",
            "Duration of token requests.",
            ["issuer"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.credential_expiry = Gauge(
            "credproxy_credential_expiry_seconds",
            "Unix time at which the cached credential expires (0: none cached).",
            ["issuer", "credential"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.credential_revoked = Counter(
            "credproxy_credential_revoked",
            "Revocations of cached credentials (revoked, unsupported, failed, deferred).",
            ["issuer", "outcome"],
            registry=r,
        )
        self.revocations_pending = Gauge(
            "credproxy_credential_revocations_pending",
            "Revoked credentials still awaiting revocation at the issuer (deferred or failed; "
            "retried after the next refresh).",
            ["issuer", "credential"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.break_glass_active = Gauge(
            "credproxy_break_glass_active",
            "Break-glass grants active: time-boxed exceptions to a route's policy.",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.break_glass_uses = Counter(
            "credproxy_break_glass_uses",
            "Requests let through by a break-glass grant that the route's rules refused.",
            ["route"],
            registry=r,
        )
        self.http2_streams = Counter(
            "credproxy_http2_streams",
            "HTTP/2 app streams answered (each also counts in credproxy_requests_total), by "
            "route and the gRPC status sent ('-': not gRPC).",
            ["route", "grpc_status"],
            registry=r,
        )
        self.credential_retries = Counter(
            "credproxy_credential_retries",
            "Requests replayed once after a 401 (invalid_token or use_dpop_nonce).",
            ["route", "reason"],
            registry=r,
        )
        self.app_connections = Gauge(
            "credproxy_app_connections",
            "Open app connections whose caller has been identified.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.tasks = Gauge(
            "credproxy_event_loop_tasks",
            "Tasks alive on the event loop (flat under steady load: no task leak).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.audit_dropped = Counter(
            "credproxy_audit_dropped",
            "Audit events dropped because the writer queue was full (slow disk).",
            registry=r,
        )
        self.config_reloads = Counter(
            "credproxy_config_reloads",
            "Config reloads on SIGHUP, by outcome (applied, rejected).",
            ["outcome"],
            registry=r,
        )
        self.websocket_bytes = Counter(
            "credproxy_websocket_bytes",
            "Bytes spliced through WebSocket sessions (up: app to upstream, down: upstream to "
            "app), counted as they flow.",
            ["route", "direction"],
            registry=r,
        )
        self.websockets_active = Gauge(
            "credproxy_websockets_active",
            "WebSocket sessions spliced now.",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.websocket_sessions = Counter(
            "credproxy_websocket_sessions",
            "WebSocket sessions ended, by how (app_closed, upstream_closed, idle_timeout, "
            "total_timeout, cancelled).",
            ["route", "ended"],
            registry=r,
        )
        self.websocket_duration = Histogram(
            "credproxy_websocket_duration_seconds",
            "How long WebSocket sessions lasted, from the 101 to the close.",
            ["route"],
            buckets=_SESSION_BUCKETS,
            registry=r,
        )
        self.credential_backoff = Gauge(
            "credproxy_credential_backoff_seconds",
            "Current retry delay after failed token requests (0: healthy).",
            ["issuer", "credential"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.svid_expiry = Gauge(
            "credproxy_svid_expiry_seconds",
            "Unix time at which the current X.509-SVID from the SPIFFE Workload API expires "
            "(0: none yet).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.svid_rotations = Counter(
            "credproxy_svid_rotations",
            "X.509-SVIDs received from the SPIFFE Workload API after the first.",
            registry=r,
        )
        self.workload_api_errors = Counter(
            "credproxy_workload_api_errors",
            "Failed SPIFFE Workload API calls and broken watch streams, by call and gRPC code.",
            ["call", "code"],
            registry=r,
        )

    def count_request(self, route: str, status: int, outcome: str, duration_s: float) -> None:
        requests, key = self.counts.requests, (route, status, outcome)
        requests[key] = requests.get(key, 0) + 1
        durations = self.counts.durations.get(route)
        if durations is None:
            durations = self.counts.durations[route] = Durations()
        durations.observe(duration_s)

    def observe_upstream(self, route: str, duration_s: float) -> None:
        durations = self.counts.upstream.get(route)
        if durations is None:
            durations = self.counts.upstream[route] = Durations()
        durations.observe(duration_s)

    def save(self) -> None:
        """With workers: this process's request counts where worker 0's /metrics reads them."""
        if self._directory is None:
            return
        path = Path(self._directory, f"requests_{os.getpid()}.json")
        partial = path.with_suffix(".partial")
        try:
            partial.write_text(json.dumps(self.counts.to_json()))
            partial.replace(path)  # whole or not at all for a reader
        except OSError as exc:  # e.g. a full disk: /metrics lags, requests go on
            server_log.warning("could not save request counts to %s: %s", path, exc)

    def _all_counts(self) -> RequestCounts:
        """This process's live counts plus every other worker's last saved ones (workers that
        were replaced included: their counts stay in the totals)."""
        assert self._directory is not None
        total = RequestCounts()
        total.add(self.counts)
        mine = f"requests_{os.getpid()}.json"
        for path in Path(self._directory).glob("requests_*.json"):
            if path.name != mine:
                total.add(RequestCounts.from_json(json.loads(path.read_text())))
        return total

    def exposition(self) -> bytes:
        """The text format for /metrics: this process's registry, or every worker's."""
        if self._directory is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(_RequestCollector(self._all_counts))
            return generate_latest(registry)
        return generate_latest(self.registry)
