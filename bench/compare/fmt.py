"""How the report writes numbers: thousands separators, ratios as ``1.23×``, bytes as MB, and
``—`` for what was not measured."""

from __future__ import annotations

import math


def num(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def mb(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e6:.1f}"


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
