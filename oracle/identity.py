"""The one model-identity check: was a scores file, surrogate or dataset store made for this model?

Anything layershap writes records ``model_id``, ``model_hash`` (content hash of the weights) and ``n_layers``.
Two records describe the same model when their layer counts agree and their hashes agree (or, where either
hash is missing, their ids agree).

Example:
    >>> check_same_model(surrogate.metadata, store.attrs, what="the surrogate", fix="train one on this store")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layershap.core.errors import StoreMismatchError


def _short_hash(value: Any) -> str:
    return f"{str(value)[:12]}..."


def check_same_model(recorded: Mapping[str, Any], current: Mapping[str, Any], *, what: str, fix: str) -> None:
    """Raise :class:`StoreMismatchError` when ``recorded`` (what ``what`` was made for) is another model than
    ``current``; both map ``model_id``, ``model_hash`` and ``n_layers`` (missing keys are not compared).

    Example:
        >>> check_same_model({"n_layers": 5}, {"n_layers": 4, "model_id": "m"}, what="scores.json", fix="use its own")
        Traceback (most recent call last):
        StoreMismatchError: scores.json was made for a 5-layer model but 'm' has 4 decoder layers (n_layers ...
    """
    current_id = current.get("model_id") or "this model"
    have, want = recorded.get("n_layers"), current.get("n_layers")
    if have is not None and want is not None and int(have) != int(want):
        raise StoreMismatchError(
            f"{what} was made for a {have}-layer model but {current_id!r} has {want} decoder layers "
            f"(n_layers {have} != {want}); {fix}"
        )
    rec_hash, cur_hash = recorded.get("model_hash"), current.get("model_hash")
    if rec_hash and cur_hash:
        if rec_hash != cur_hash:
            raise StoreMismatchError(
                f"{what} was made for model {recorded.get('model_id')!r} (model_hash {_short_hash(rec_hash)}) but "
                f"{current_id!r} has model_hash {_short_hash(cur_hash)}: these are different models (or the same "
                f"checkpoint in another dtype); {fix}"
            )
        return
    rec_id, cur_id = recorded.get("model_id"), current.get("model_id")
    if rec_id and cur_id and rec_id != cur_id:
        raise StoreMismatchError(f"{what} was made for model {rec_id!r}, not {cur_id!r} (model_id); {fix}")
