"""What a process tree spends, read from /proc: CPU seconds, RSS and PSS, the machine's busy time."""

from __future__ import annotations

import os
import re
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx master + worker, worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads) and of their reaped children."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / CLK_TCK


def system_busy_seconds() -> float:
    """CPU time of the whole machine not idle (user nice system irq softirq), /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def _proc_kb_each(pids: list[int], file: str, field: str) -> list[int]:
    """``field`` (a kB line) of /proc/PID/``file`` for each process, in bytes; processes gone
    meanwhile are left out."""
    found = []
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/{file}").read_text()
        except OSError:
            continue
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        found.append(int(match[1]) * 1024 if match else 0)
    return found


def rss_each(pids: list[int]) -> list[int]:
    return _proc_kb_each(pids, "status", "VmRSS")


def pss_each(pids: list[int]) -> list[int]:
    """Proportional set size: pages shared after a fork counted once, split among sharers."""
    return _proc_kb_each(pids, "smaps_rollup", "Pss")


def rss_bytes(pids: list[int]) -> int:
    return sum(rss_each(pids))
