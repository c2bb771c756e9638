"""Calibration and evaluation text, and the fixed token windows every mask of a dataset is measured on.

Text sources: ``builtin`` (Python's own reference documentation, ``pydoc_data.topics``, present in every
CPython), a local ``.txt`` (UTF-8) or ``.jsonl`` file (one JSON object with a ``"text"`` field per line), and
``wikitext2`` / ``c4`` (optionally ``:split``) through the ``datasets`` package when it is installed and the
Hugging Face hub is reachable.

Example:
    >>> text = load_text("builtin")
    >>> windows = make_windows(tokenizer, text.text, n_windows=4, seq_len=128, seed=0)  # int64[4, 129], BOS  # doctest: +SKIP
    >>> windows_sha256(windows)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layershap.core.errors import LayershapError, MissingPackageError

DATASETS_PIP = "pip install 'layershap[datasets]'  (or: pip install datasets)"
# First documents of the C4 shard joined into the text (a whole shard is ~800 MB).
C4_DOCUMENTS = 5000
HUB_TEXTS = {
    # name: (default split, description)
    "wikitext2": ("test", "WikiText-2 raw (wikitext, wikitext-2-raw-v1)"),
    "c4": ("validation", "C4 English (allenai/c4), first shard of the split"),
}
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


@dataclass
class CalibrationText:
    """A text and the id recorded with any dataset built on it."""

    text_id: str
    text: str


def builtin_text() -> CalibrationText:
    """Python's ``pydoc_data.topics``: the topic texts joined with blank lines in sorted key order.

    Example:
        >>> builtin_text().text_id
        'builtin:pydoc_data.topics'
    """
    from pydoc_data.topics import topics

    return CalibrationText("builtin:pydoc_data.topics", "\n\n".join(topics[key] for key in sorted(topics)))


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LayershapError(
            f"{path} is not UTF-8 text (invalid byte at offset {err.start}); convert it to UTF-8"
        ) from err


def _file_id(path: Path, text: str) -> str:
    return f"file:{path.name}@sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _jsonl_text(path: Path, content: str) -> str:
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            message = f"{path} line {number} is not valid JSON ({err.msg}); fix or drop it"
            raise LayershapError(message) from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LayershapError(
                f'{path} line {number} has no string "text" field; lines must look like {{"text": "..."}}'
            )
        texts.append(record["text"])
    return "\n\n".join(texts)


def hub_text(name: str, split: str | None = None) -> CalibrationText:
    """``wikitext2`` or ``c4`` through the ``datasets`` package (needs it installed and the hub reachable)."""
    default_split, description = HUB_TEXTS[name]
    split = split or default_split
    if name == "c4" and split not in C4_FILES:
        raise LayershapError(f"c4 split {split!r} is not offered; use one of {sorted(C4_FILES)}")
    try:
        import datasets
    except ImportError as err:
        raise MissingPackageError(
            f"text {name!r} ({description}) is read with the 'datasets' package, which is not installed. "
            f"Fix: {DATASETS_PIP}; or pass a local .txt/.jsonl file, or 'builtin'"
        ) from err
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            text = "\n\n".join(rows)
        else:
            data = datasets.load_dataset("allenai/c4", data_files={split: C4_FILES[split]}, split=split)
            text = "\n\n".join(data.select(range(min(C4_DOCUMENTS, len(data))))["text"])
    except Exception as err:  # datasets' network/hub/cache errors have many types; re-raised with advice
        raise LayershapError(
            f"could not get text {name!r} split {split!r} from the Hugging Face hub "
            f"({type(err).__name__}: {err}); "
            "the hub may be unreachable. Pass a local .txt/.jsonl file, or 'builtin'"
        ) from err
    suffix = f"[:{C4_DOCUMENTS} docs]" if name == "c4" else ""
    return CalibrationText(f"{name}:{split}{suffix}", text)


def load_text(spec: str) -> CalibrationText:
    """Load text: ``builtin`` | ``path.txt`` | ``path.jsonl`` | ``wikitext2[:split]`` | ``c4[:split]``.

    File texts get the id ``file:NAME@sha256:<first 16 hex of the text's sha256>`` so that the same content
    gives the same id wherever it lives.

    Example:
        >>> load_text("builtin").text_id
        'builtin:pydoc_data.topics'
        >>> load_text("wikitext2:test")      # needs `datasets` and the hub  # doctest: +SKIP
    """
    if spec == "builtin":
        return builtin_text()
    name, _, split = spec.partition(":")
    if name in HUB_TEXTS and not Path(spec).exists():
        return hub_text(name, split or None)
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise LayershapError(
            f"unknown text {spec!r}; use 'builtin', a .txt or .jsonl file, 'wikitext2[:split]' "
            "or 'c4[:split]'"
        )
    if not path.is_file():
        raise LayershapError(f"text file {spec!r} does not exist; check the path")
    content = _read_utf8(path)
    text = _jsonl_text(path, content) if suffix == ".jsonl" else content
    if not text.strip():
        raise LayershapError(f"text file {spec!r} holds no text")
    return CalibrationText(_file_id(path, text), text)


def tokenize_stream(tokenizer, text: str) -> np.ndarray:
    """The whole text as one int64 token stream, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def _with_bos(tokenizer, windows: np.ndarray) -> np.ndarray:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return np.ascontiguousarray(windows, dtype=np.int64)
    column = np.full((windows.shape[0], 1), bos, dtype=np.int64)
    return np.ascontiguousarray(np.concatenate([column, windows], axis=1))


def _check_sizes(n_windows: int | None, seq_len: int) -> None:
    if seq_len < 1:
        raise LayershapError(f"seq_len must be >= 1, got {seq_len}")
    if n_windows is not None and n_windows < 1:
        raise LayershapError(f"the number of windows must be >= 1, got {n_windows}")


def make_windows(tokenizer, text: str, n_windows: int, seq_len: int, seed: int) -> np.ndarray:
    """``n_windows`` random non-overlapping windows of ``seq_len`` tokens, sorted by position, BOS prepended.

    Returns ``int64[n_windows, seq_len + 1]`` when the tokenizer has a BOS token, else ``[n_windows,
    seq_len]``.
    Every non-overlapping placement is equally likely (``np.random.default_rng(seed)``).

    Example:
        >>> make_windows(tokenizer, load_text("builtin").text, n_windows=4, seq_len=128, seed=0).shape  # doctest: +SKIP
        (4, 129)
    """
    _check_sizes(n_windows, seq_len)
    stream = tokenize_stream(tokenizer, text)
    needed = n_windows * seq_len
    if stream.size < needed:
        raise LayershapError(
            f"the text has {stream.size} tokens but {n_windows} windows x {seq_len} tokens need {needed}; "
            f"at most {stream.size // seq_len} windows of {seq_len} tokens are available: "
            "use fewer windows, shorter windows, or a longer text"
        )
    starts = window_starts(stream.size, n_windows, seq_len, seed)
    return _with_bos(tokenizer, stream[starts[:, None] + np.arange(seq_len)[None, :]])


def window_starts(n_tokens: int, n_windows: int, seq_len: int, seed: int) -> np.ndarray:
    """Start positions of :func:`make_windows`' windows in a stream of ``n_tokens`` tokens (sorted).

    Example:
        >>> window_starts(1000, 2, 100, seed=0)       # doctest: +SKIP
        array([ 87, 412])
    """
    slack = n_tokens - n_windows * seq_len
    # Choosing n distinct sorted values c_i from range(slack + n) and setting start_i = c_i - i + i * seq_len
    # is a bijection onto all non-overlapping placements, so each placement is equally likely.
    picks = np.sort(np.random.default_rng(seed).choice(slack + n_windows, size=n_windows, replace=False))
    return picks - np.arange(n_windows) + np.arange(n_windows) * seq_len


def eval_windows(tokenizer, text: str, seq_len: int, n_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows from the start of the text (evaluation protocol), BOS prepended.

    ``n_windows=None`` takes every full window; a trailing partial window is dropped.

    Example:
        >>> eval_windows(tokenizer, held_out_text, seq_len=256).shape     # (all full windows, 257)  # doctest: +SKIP
    """
    _check_sizes(n_windows, seq_len)
    stream = tokenize_stream(tokenizer, text)
    available = stream.size // seq_len
    count = available if n_windows is None else n_windows
    if available < 1 or count > available:
        raise LayershapError(
            f"the text has {stream.size} tokens: {available} full windows of {seq_len} tokens, "
            f"{count if n_windows is not None else 'at least 1'} asked for; "
            "use fewer or shorter windows or a longer text"
        )
    return _with_bos(tokenizer, stream[: count * seq_len].reshape(count, seq_len))


def windows_sha256(windows: np.ndarray) -> str:
    """sha256 of the windows as little-endian int64 C-contiguous bytes, preceded by their shape.

    Example:
        >>> windows_sha256(np.zeros((2, 3), np.int64))[:12]
        '47f3e658a333'
    """
    arr = np.ascontiguousarray(windows, dtype="<i8")
    digest = hashlib.sha256(f"shape={tuple(int(d) for d in arr.shape)};int64-le;".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()
