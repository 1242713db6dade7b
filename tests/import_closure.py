"""The modules of ``maptr/`` a script can execute: its import closure, read from the source (no import).

Every ``import`` statement counts, also those inside functions (the entrypoints import torch-heavy modules
after parsing their arguments, and error paths import lazily), and importing ``a.b.c`` also runs
``a/__init__.py`` and ``a/b/__init__.py``. tests/test_dvc_yaml.py checks that each stage's deps in dvc.yaml
cover this closure, so that no code edit can leave a stale cached result.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "maptr"


def module_file(name: str) -> Path | None:
    """The file of module or package ``name`` inside the repository, or None (not ours, or not a module)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_names(path: Path) -> set[str]:
    """Dotted names ``path`` imports (``from a import b`` gives ``a`` and ``a.b``; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # the package a relative import starts from: a module's folder (a package's own, for its __init__.py)
    package = list(path.relative_to(REPO).parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def closure(script: Path) -> set[Path]:
    """Files of ``maptr/`` (modules and the ``__init__.py`` of every package on the way) ``script`` can run."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        current = todo.pop()
        for name in imported_names(current):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # a.b.c runs a/__init__.py, a/b/__init__.py, a/b/c.py
                found = module_file(".".join(parts[:depth]))
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen
