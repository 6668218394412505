"""The results of a run as data: one ``Row`` per path, the run's ``Settings``, and their JSON form
(``bench/results/compare.json``), from which the report is rendered."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class Load:
    """One wrk run, and what the proxy spent on it."""

    connections: int
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    socket_errors: int
    non_2xx: int
    cpu_us_per_request: float | None = None
    cpu_utilization: float | None = None
    rss_peak: int | None = None
    other_cores: float | None = None  # CPU used meanwhile by processes this bench did not start


@dataclass
class Upload:
    """One PUT of ``UPLOAD_BYTES`` streamed through the proxy to nginx, and the proxy's RSS."""

    status: int
    seconds: float
    stored_bytes: int  # what nginx wrote to disk
    rss_before: int
    rss_peak: int


@dataclass
class Row:
    """Everything measured for one path (the best of its rounds once merged by ``best_of``)."""

    key: str
    label: str
    note: str = ""
    error: str = ""
    small_c1: Load | None = None
    small_c50: Load | None = None
    big_c50: Load | None = None
    rss_idle: int | None = None
    rss_idle_largest: int | None = None  # the largest single process (a worker) of the tree
    pss_idle_largest: int | None = None  # the same as proportional set size
    idp_token_requests: int | None = None
    upload: Upload | None = None
    lifetime_s: float | None = None
    instructions_per_request: float | None = None  # callgrind, one request at a time
    instructions_by_object: dict[str, float] = field(default_factory=dict)  # where they go
    startup_s: float | None = None  # `credproxy run` from exec to ready, best of 3
    check_config_s: float | None = None  # `credproxy check-config`, best of 3
    rounds: int = 1  # measured this often; see ``best_of``
    round_errors: int = 0  # failed requests or rounds in the rounds not shown
    metrics: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def loads(self) -> list[Load]:
        return [x for x in (self.small_c1, self.small_c50, self.big_c50) if x is not None]

    @property
    def errors(self) -> int:
        return sum(x.socket_errors + x.non_2xx for x in self.loads)

    @property
    def rps(self) -> float | None:
        """Requests/s for the small body at c=50."""
        return self.small_c50.rps if self.small_c50 else None

    @property
    def per_core(self) -> float | None:
        """10⁶ / proxy CPU µs per request: what one fully busy core would serve."""
        load = self.small_c50
        if load is None or not load.cpu_us_per_request:
            return None
        return 1e6 / load.cpu_us_per_request

    @property
    def other_load(self) -> float:
        """The most CPU (cores) that processes the bench did not start used during a wrk run."""
        return max((x.other_cores or 0.0 for x in self.loads), default=0.0)


@dataclass(frozen=True)
class Settings:
    """The options a run was made with, as far as the report states them."""

    duration: int = 5  # seconds per wrk point
    warmup: int = 1  # seconds of warm-up per path
    connections: int = 50
    wrk_threads: int = 1
    token_ttl: int = 10  # IdP token lifetime (s)
    rounds: int = 2
    workers_supported: bool = True  # `credproxy run --workers` exists

    @property
    def refresh_ahead_s(self) -> float:
        """credproxy's default rule for the IdP's token lifetime."""
        return max(1.0, 0.2 * self.token_ttl)

    @property
    def refresh_window_s(self) -> float:
        """One token request per credential is expected per window."""
        return self.token_ttl - self.refresh_ahead_s


@dataclass
class Results:
    """One run: the machine and versions, its settings, its rows."""

    environment: dict[str, str]
    elapsed_s: float
    settings: Settings
    rows: list[Row]

    def to_json(self) -> str:
        raw = {
            "environment": self.environment,
            "elapsed_s": self.elapsed_s,
            "settings": asdict(self.settings),
            "rows": [asdict(row) for row in self.rows],
        }
        return json.dumps(raw, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Results:
        """Also reads files written before ``settings`` was stored: those ran with the default
        options, except for what the rows themselves show (rounds, connections)."""
        raw = json.loads(text)
        rows = [_row(item) for item in raw["rows"]]
        if "settings" in raw:
            settings = Settings(**raw["settings"])
        else:
            c50 = next((row.small_c50 for row in rows if row.small_c50), None)
            settings = Settings(
                rounds=max((row.rounds for row in rows), default=Settings.rounds),
                connections=c50.connections if c50 else Settings.connections,
            )
        return cls(dict(raw["environment"]), float(raw["elapsed_s"]), settings, rows)

    @classmethod
    def load(cls, path: Path) -> Results:
        return cls.from_json(path.read_text())


def _row(raw: dict[str, Any]) -> Row:
    known = {f.name for f in fields(Row)}
    values = {name: value for name, value in raw.items() if name in known}
    for name in ("small_c1", "small_c50", "big_c50"):
        if values.get(name) is not None:
            values[name] = Load(**values[name])
    if values.get("upload") is not None:
        values["upload"] = Upload(**values["upload"])
    return Row(**values)
