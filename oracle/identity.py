"""The one model-identity check: was a scores file, surrogate or dataset store made for this model?

Anything layershap writes records ``model_id``, ``model_hash`` (content hash of the weights) and ``n_layers``.
Two records describe the same model when their layer counts agree and their hashes agree (or, where either
hash is missing, their ids agree). ``model_hash`` is a .gguf file's sha256 (64 hex digits) or, for a model
directory or hub id, ``weights-v1:<sha256>`` (:mod:`.fingerprint`); records made by layershap 0.1.0 from a model
directory hold its sampled fingerprint (64 hex digits, over ``config.to_dict()``), which cannot be compared with
the new hash: such records are refused with a message that says so (:func:`legacy_hash_reason`).

Example:
    >>> check_same_model(surrogate.metadata, store.attrs, what="the surrogate", fix="train one on this store")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from layershap.core.errors import StoreMismatchError

# The scheme prefix of the model hash of model directories and hub models (:mod:`.fingerprint`).
WEIGHTS_SCHEME = "weights-v1"


def _short_hash(value: Any) -> str:
    text = str(value)
    scheme, _, digest = text.rpartition(":")
    return f"{scheme}:{digest[:12]}..." if scheme else f"{text[:12]}..."


def legacy_hash_reason(recorded: Any, current: Any) -> str | None:
    """Why ``recorded`` (a model hash some file records) cannot be compared with ``current`` (this model's), or
    None when they can: a plain 64-hex hash beside a ``weights-v1:`` one (a fingerprint of layershap 0.1.0, or a
    .gguf file's sha256, against the content hash of a model directory).

    Example:
        >>> legacy_hash_reason("ab" * 32, "weights-v1:" + "cd" * 32)[:38]
        'it records model_hash abababababab...,'
        >>> legacy_hash_reason("ab" * 32, "ab" * 32) is None
        True
    """
    rec, cur = str(recorded or ""), str(current or "")
    plain = len(rec) == 64 and all(c in "0123456789abcdef" for c in rec)
    if not (plain and cur.startswith(f"{WEIGHTS_SCHEME}:")):
        return None
    return (
        f"it records model_hash {_short_hash(rec)}, the fingerprint of layershap 0.1.0 (over config.to_dict(), "
        f"whose keys change with transformers upgrades) or a .gguf file's sha256, while this model directory is "
        f"now identified by the content hash of its weights ({_short_hash(cur)}), so layershap cannot tell whether "
        "they are the same model"
    )


def check_same_model(recorded: Mapping[str, Any], current: Mapping[str, Any], *, what: str, fix: str) -> None:
    """Raise :class:`StoreMismatchError` when ``recorded`` (what ``what`` was made for) is another model than
    ``current``; both map ``model_id``, ``model_hash`` and ``n_layers`` (missing keys are not compared).

    Example:
        >>> check_same_model({"n_layers": 5}, {"n_layers": 4, "model_id": "m"}, what="scores.json", fix="use its own")
        Traceback (most recent call last):
        layershap.core.errors.StoreMismatchError: scores.json was made for a 5-layer model but 'm' has 4 decoder layers (n_layers ...
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
        legacy = legacy_hash_reason(rec_hash, cur_hash)
        if legacy:
            raise StoreMismatchError(f"{what} cannot be checked against {current_id!r}: {legacy}; {fix}")
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
