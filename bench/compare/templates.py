"""Configuration files written from the templates beside the subject modules: ``{{name}}`` is
replaced by a value; a placeholder without a value, or a value without a placeholder, is an error
(nginx's ``$variables`` and braces pass through untouched)."""

from __future__ import annotations

import re
from pathlib import Path

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def placeholders(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def render_template(path: Path, **values: object) -> str:
    """The template at ``path`` with every ``{{name}}`` replaced by ``str(values[name])``."""
    text = path.read_text()
    wanted = placeholders(text)
    if wanted != set(values):
        raise ValueError(
            f"{path.name}: placeholders without a value {sorted(wanted - set(values))}, "
            f"values without a placeholder {sorted(set(values) - wanted)}"
        )
    return _PLACEHOLDER.sub(lambda match: str(values[match[1]]), text)
