"""Prometheus metrics. Labels are bounded: route, issuer and reason names come from the config.

With ``--workers`` each process writes its values under ``PROMETHEUS_MULTIPROC_DIR`` and the
admin listener (worker 0) exposes their aggregate: counters and histograms summed, gauges as
their ``multiprocess_mode`` says (the soonest expiry, the longest backoff, summed connections).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """One set per process, on its own registry so tests and the demo can run several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # children by label values: bounded, as the values are (routes, statuses, outcomes)
        self._request_counters: dict[tuple[str, int, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._upstream_durations: dict[str, Any] = {}
        self.requests = Counter(
            "credproxy_requests",
            "Requests answered to the app.",
            ["route", "code", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "credproxy_request_duration_seconds",
            "Time from request to response headers.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "credproxy_upstream_duration_seconds",
            "Time the upstream took to send headers.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
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
            "Revocations of cached credentials (revoked, unsupported, failed).",
            ["issuer", "outcome"],
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
        self.credential_backoff = Gauge(
            "credproxy_credential_backoff_seconds",
            "Current retry delay after failed token requests (0: healthy).",
            ["issuer", "credential"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def count_request(self, route: str, status: int, outcome: str, duration_s: float) -> None:
        """Per request: the labelled children are looked up once, then reused (hot path)."""
        key = (route, status, outcome)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self.requests.labels(
                route, str(status), outcome
            )
        counter.inc()
        histogram = self._durations.get(route)
        if histogram is None:
            histogram = self._durations[route] = self.request_duration.labels(route)
        histogram.observe(duration_s)

    def observe_upstream(self, route: str, duration_s: float) -> None:
        histogram = self._upstream_durations.get(route)
        if histogram is None:
            histogram = self._upstream_durations[route] = self.upstream_duration.labels(route)
        histogram.observe(duration_s)

    def exposition(self) -> bytes:
        """The text format for /metrics: this process's registry, or every worker's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
