"""The package layout is the architecture (docs/design.md): imports point down one order of
stages only, so a module never depends on the stage that calls it."""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parent.parent / "proxy"
# bottom to top; the leaves (errors … aws_sdk) may be imported from anywhere above them
ORDER = [
    "errors", "log", "secret", "tasks", "metrics", "wire", "aws_sdk",
    "audit", "config", "spiffe", "outbound", "credentials", "access", "inbound", "governance",
    "lifecycle", "demo", "cli", "__main__",
]  # fmt: skip


def _stage(module: str) -> int:
    head = module.split(".")[1] if "." in module else module
    assert head in ORDER, f"proxy.{head} is in no stage of ORDER: add it where it belongs"
    return ORDER.index(head)


def _imports(path: Path) -> list[tuple[str, str]]:
    """(this module, each proxy module it imports), resolved from relative imports."""
    parts = list(path.relative_to(PROXY.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    module = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found += [(module, name) for name in names]
    return found


def test_no_module_imports_a_stage_above_its_own():
    """Every relative import in proxy/ points to the same stage or one below it."""
    upward = [
        f"{module} imports {target}"
        for path in sorted(PROXY.rglob("*.py"))
        for module, target in _imports(path)
        if "proxy" not in (module, target)
        and target != "proxy.__version__"
        and _stage(target) > _stage(module)
    ]
    assert upward == []


def test_every_package_says_what_its_stage_does():
    """Each package's __init__ opens with a docstring (the module map reads from them)."""
    for init in PROXY.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), init
