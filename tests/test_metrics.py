"""The per-request metrics kept as plain numbers: Prometheus histogram semantics (``le`` is an
inclusive upper bound, buckets cumulative), and the sum over workers on worker 0."""

from __future__ import annotations

import json
import os
import re

from proxy.metrics import Metrics, RequestCounts


def _samples(text: str, name: str) -> dict[str, float]:
    return {
        labels: float(value)
        for labels, value in re.findall(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.MULTILINE)
    }


def test_durations_follow_prometheus_histogram_semantics(monkeypatch):
    """A value equal to a bound counts in that bucket; buckets are cumulative; +Inf, _count and
    _sum cover every observation; each route and status gets its own series."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    for seconds in (0.0005, 0.0006, 2.5, 11.0):
        metrics.count_request("payments", 200, "proxied", seconds)
    metrics.count_request("payments", 502, "upstream_unavailable", 0.001)
    metrics.observe_upstream("payments", 0.0004)
    text = metrics.exposition().decode()
    buckets = _samples(text, "credproxy_request_duration_seconds_bucket")
    assert buckets['le="0.0005",route="payments"'] == 1
    assert buckets['le="0.001",route="payments"'] == 3
    assert buckets['le="2.5",route="payments"'] == 4
    assert buckets['le="10.0",route="payments"'] == 4
    assert buckets['le="+Inf",route="payments"'] == 5
    assert _samples(text, "credproxy_request_duration_seconds_count") == {'route="payments"': 5}
    [total] = _samples(text, "credproxy_request_duration_seconds_sum").values()
    assert abs(total - 13.5021) < 1e-9
    assert _samples(text, "credproxy_requests_total") == {
        'code="200",outcome="proxied",route="payments"': 4,
        'code="502",outcome="upstream_unavailable",route="payments"': 1,
    }
    upstream = _samples(text, "credproxy_upstream_duration_seconds_bucket")
    assert upstream['le="0.0005",route="payments"'] == 1
    assert "# TYPE credproxy_request_duration_seconds histogram" in text
    assert "# TYPE credproxy_requests_total counter" in text


def test_worker_zero_adds_the_other_workers_saved_counts_once(tmp_path, monkeypatch):
    """With workers, /metrics is this process's live counts plus each other worker's last saved
    ones (a replaced worker's included); its own saved file is not counted twice."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    other = RequestCounts()
    other.requests[("payments", 200, "proxied")] = 7
    (tmp_path / "requests_999999.json").write_text(json.dumps(other.to_json()))
    metrics = Metrics()
    metrics.count_request("payments", 200, "proxied", 0.002)
    metrics.save()
    assert (tmp_path / f"requests_{os.getpid()}.json").exists()
    metrics.count_request("payments", 200, "proxied", 0.002)  # live, not saved yet
    text = metrics.exposition().decode()
    assert _samples(text, "credproxy_requests_total") == {
        'code="200",outcome="proxied",route="payments"': 9
    }
    assert _samples(text, "credproxy_request_duration_seconds_count") == {'route="payments"': 2}
