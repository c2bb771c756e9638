"""The package layout's rules, read from the source: dependencies between folders point one way, no library
module imports the CLI, and the base folders stay free of learning code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {  # folder -> the layershap folders its modules may import
    "core": set(),
    "sampling": {"core"},
    "oracle": {"core", "sampling"},
    "shapley": {"core"},
    "surrogate": {"core", "oracle"},
    "pruning": {"core", "sampling", "oracle", "shapley", "surrogate"},
    "pipeline": {"core", "sampling", "oracle", "shapley", "surrogate", "pruning"},
    "serve": {"core", "sampling", "oracle", "shapley", "surrogate", "pruning", "pipeline"},
    "cli": {"core", "sampling", "oracle", "shapley", "surrogate", "pruning", "pipeline", "serve"},
}


def _imported_folders(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "layershap" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_folders_import_only_what_the_layout_allows():
    bad = []
    for folder, allowed in ALLOWED.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            extra = _imported_folders(path) - allowed - {folder}
            if extra:
                bad.append(f"{folder}/{path.name} imports {sorted(extra)}")
    assert bad == []


def test_library_modules_stay_small_or_say_why():
    long = []
    for folder in ALLOWED:
        for path in (ROOT / folder).glob("*.py"):
            text = path.read_text()
            if text.count("\n") > 310 and "300 lines" not in text.split('"""')[1]:
                long.append(path.name)
    assert long == []
