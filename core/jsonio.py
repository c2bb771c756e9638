"""JSON helpers shared by every file layershap writes: plain JSON types, compact layout, atomic writes.

Example:
    >>> jsonable({"x": np.float64(1.5), "m": np.eye(2)})
    {'x': 1.5, 'm': [[1.0, 0.0], [0.0, 1.0]]}
    >>> write_text_atomic("out/scores.json", dumps_compact(doc) + "\\n")     # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(obj: Any) -> Any:
    """Numpy arrays/scalars, paths and tuples as plain JSON types; non-finite floats become None.

    Example:
        >>> jsonable((np.int64(2), float("nan"), Path("a")))
        [2, None, 'a']
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_compact(obj: Any, indent: int = 0) -> str:
    """JSON with 2-space indentation, but lists of numbers/strings on one line (matrices: one row a line).

    Example:
        >>> print(dumps_compact({"a": [1, 2]}))
        {
          "a": [1, 2]
        }
    """
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dumps_compact(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj, allow_nan=False)
        return "[\n" + ",\n".join(inner + dumps_compact(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def package_version() -> str:
    """Installed layershap version, or ``unknown`` when running from an uninstalled tree.

    Example:
        >>> package_version()          # doctest: +SKIP
        '0.1.0'
    """
    try:
        return version("layershap")
    except PackageNotFoundError:
        return "unknown"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling file and a rename: never a half-written file.

    Example:
        >>> write_text_atomic("out/summary.json", "{}\\n")      # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: str | Path, obj: Any, *, compact: bool = False) -> Path:
    """:func:`jsonable` ``obj`` written atomically as indented JSON (``compact``: :func:`dumps_compact` layout).

    Example:
        >>> write_json("out/compare.json", doc)      # doctest: +SKIP
    """
    data = jsonable(obj)
    text = dumps_compact(data) if compact else json.dumps(data, indent=2, allow_nan=False)
    return write_text_atomic(path, text + "\n")
