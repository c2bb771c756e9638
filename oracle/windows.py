"""Windows disjoint from the calibration windows: validation windows and blocks of decision windows, drawn from the
same text so that no token measured for a choice was used to screen the candidates.

Example:
    >>> blocks = decision_windows(tokenizer, load_text("builtin").text, 2, 256, 0, 4, 256, 3)  # doctest: +SKIP
    >>> [b.shape for b in blocks]  # doctest: +SKIP
    [(4, 257), (4, 257), (4, 257)]
"""

from __future__ import annotations

import numpy as np

from layershap.core.errors import LayershapError

from .text import _check_sizes, _with_bos, tokenize_stream, window_starts


def validation_windows(tokenizer, text: str, n_windows: int, seq_len: int, seed: int) -> np.ndarray:
    """``n_windows`` windows of ``seq_len`` tokens that overlap neither each other nor the calibration windows
    :func:`make_windows` draws with the same arguments, BOS prepended: windows for choosing among candidates
    measured on the calibration windows without reusing a single calibration token (the first block of
    :func:`decision_windows` with calibration-sized blocks).

    Example:
        >>> validation_windows(tokenizer, load_text("builtin").text, 4, 128, seed=0).shape  # doctest: +SKIP
        (4, 129)
    """
    return decision_windows(tokenizer, text, n_windows, seq_len, seed, n_windows, seq_len, 1)[0]


def decision_windows(tokenizer, text: str, n_windows: int, seq_len: int, seed: int, block_windows: int,
                     block_seq_len: int, n_blocks: int) -> list[np.ndarray]:
    """``n_blocks`` blocks of ``block_windows`` windows of ``block_seq_len`` tokens, overlapping neither each other
    nor the calibration windows (:func:`make_windows` with the first four sizes and ``seed``), BOS prepended.

    Windows are drawn one at a time, uniformly among the placements still free (``np.random.default_rng([seed,
    1])``), so block ``b`` is the same however many blocks are asked for. A text too short for them is a clear
    error (:func:`blocks_that_fit` says how many fit).

    Example:
        >>> [b.shape for b in decision_windows(tokenizer, load_text("builtin").text, 2, 256, 0, 4, 256, 3)]  # doctest: +SKIP
        [(4, 257), (4, 257), (4, 257)]
    """
    _check_sizes(n_windows, seq_len)
    _check_sizes(block_windows, block_seq_len)
    stream = tokenize_stream(tokenizer, text)
    fit = blocks_that_fit(stream.size, n_windows, seq_len, block_windows, block_seq_len)
    if fit < n_blocks:
        raise LayershapError(
            f"the text has {stream.size} tokens, too few for {n_windows} calibration windows of {seq_len} tokens "
            f"and {n_blocks} blocks of {block_windows} windows of {block_seq_len} tokens (room for {fit}); use fewer "
            f"or shorter windows or a longer text"
        )
    starts = _draw_disjoint(stream.size, window_starts(stream.size, n_windows, seq_len, seed), seq_len,
                            block_windows * n_blocks, block_seq_len, np.random.default_rng([seed, 1]))
    blocks = [np.sort(starts[b * block_windows : (b + 1) * block_windows]) for b in range(n_blocks)]
    return [_with_bos(tokenizer, stream[b[:, None] + np.arange(block_seq_len)[None, :]]) for b in blocks]


def blocks_that_fit(n_tokens: int, n_windows: int, seq_len: int, block_windows: int, block_seq_len: int) -> int:
    """How many decision blocks surely fit beside the calibration windows (a conservative count: every window
    placed anywhere leaves room for the rest).

    Example:
        >>> blocks_that_fit(10_000, 2, 256, 4, 256)
        4
    """
    # each calibration window can block up to seq_len + block_seq_len - 1 placements of a block window, and each
    # block window up to 2 * block_seq_len - 1
    free = n_tokens - block_seq_len + 1 - n_windows * (seq_len + block_seq_len - 1)
    per_block = block_windows * (2 * block_seq_len - 1)
    return max(0, free // per_block)


def _draw_disjoint(n_tokens: int, taken: np.ndarray, taken_len: int, count: int, length: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``count`` start positions of windows of ``length`` tokens, drawn one at a time uniformly among the
    placements that overlap neither the ``taken`` windows (of ``taken_len``) nor the ones drawn before."""
    free = np.ones(n_tokens - length + 1, dtype=bool)
    for s in taken:  # a window at p overlaps one at s (length taken_len) iff s - length < p < s + taken_len
        free[max(0, s - length + 1) : s + taken_len] = False
    out: list[int] = []
    for _ in range(count):
        options = np.flatnonzero(free)
        if options.size == 0:
            raise LayershapError(f"no room left for {count} windows of {length} tokens; use fewer or shorter windows "
                                 "or a longer text")
        p = int(options[rng.integers(options.size)])
        out.append(p)
        free[max(0, p - length + 1) : p + length] = False
    return np.array(out, dtype=np.int64)
