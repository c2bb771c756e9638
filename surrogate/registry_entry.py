"""What a registry entry says about a surrogate: its family (model_type), the description shown by
``registry list/show`` and ``GET /v1/surrogates``, and the rule for safe entry names.

Example:
    >>> family_of({"model_id": "gemma-3-270m"})
    'gemma3_text'
    >>> describe(load_surrogate("artifacts/gemma-3-270m/surrogate").metadata)["rows"]  # doctest: +SKIP
    184
"""

from __future__ import annotations

import re

from layershap.core.errors import LayershapError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# model_type of models whose surrogate metadata predate a recorded model_type (the embedded default)
KNOWN_FAMILIES = {"gemma-3-270m": "gemma3_text"}


def check_name(name: str, what: str = "entry id") -> str:
    """``name`` if it is a safe single path component (letters, digits, ``. _ -``; no slashes, no leading dot)."""
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise LayershapError(f"invalid {what} {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit")
    return name


def family_of(meta: dict, family: str | None = None) -> str:
    """Model family: ``model_type`` from the metadata (top level or ``dataset``), else ``family``, else the
    known family of the embedded default's model id; otherwise ask for ``--family``.
    """
    found = meta.get("model_type") or (meta.get("dataset") or {}).get("model_type")
    if family is not None and found is not None and family != found:
        raise LayershapError(f"--family {family} contradicts the surrogate's model_type {found!r}; drop --family")
    chosen = found or family or KNOWN_FAMILIES.get(str(meta.get("model_id")))
    if chosen is None:
        raise LayershapError(f"the surrogate's metadata record no model_type for {meta.get('model_id')!r}; give the "
                             "model family (the config's model_type, e.g. --family llama)")
    return check_name(chosen, "family")


def describe(meta: dict) -> dict:
    """What a registry listing shows of a surrogate's metadata: model, layers, text and windows, rows, metrics."""
    data = meta.get("dataset") or {}
    return {
        "model_id": meta.get("model_id"), "model_hash": meta.get("model_hash"), "n_layers": meta.get("n_layers"),
        "layer_types": data.get("layer_types"), "dataset_hash": meta.get("dataset_hash"),
        "text": {k: data.get(k) for k in ("text_id", "n_windows", "seq_len", "windows_sha256", "dtype")},
        "rows": (meta.get("split") or {}).get("rows"), "members": len(meta.get("member_files") or []),
        "removed_counts": meta.get("removed_counts"), "metrics": meta.get("metrics"),
        "created": meta.get("created"), "package_version": meta.get("package_version"),
    }
