"""Held-out perplexity of a model (e.g. a pruned one) under the evaluation protocol.

Protocol: consecutive non-overlapping windows from the start of the text, BOS prepended to each window,
perplexity = exp(mean NLL over all predicted tokens).

Example:
    >>> result = evaluate_perplexity(load_model("pruned/"), "heldout.txt", seq_len=512, n_windows=None, batch_size=1)  # doctest: +SKIP
    >>> result["perplexity"], result["n_tokens"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time

import numpy as np

from layershap.core.masks import check_masks

from .evaluate import MaskedEvaluator
from .loading import LoadedModel
from .text import eval_windows, load_text, windows_sha256

# Default tokens per window and windows per forward pass, on CPU and on CUDA.
DEFAULT_SEQ_LEN = {"cpu": 512, "cuda": 2048}
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 8}


def evaluate_perplexity(loaded: LoadedModel, text_spec: str, seq_len: int, n_windows: int | None,
                        batch_size: int, mask: np.ndarray | None = None) -> dict:
    """Evaluation-protocol NLL and perplexity of ``loaded`` on text ``text_spec`` (``n_windows`` None = all),
    with the layers where ``mask`` is False skipped (None: every layer).

    Example:
        >>> evaluate_perplexity(load_model("pruned/"), "heldout.txt", 512, None, 1)["perplexity"]  # doctest: +SKIP
    """
    text = load_text(text_spec)
    windows = eval_windows(loaded.tokenizer, text.text, seq_len, n_windows)
    evaluator = MaskedEvaluator(loaded.model, windows, batch_size=batch_size)
    start = time.perf_counter()
    keep = np.ones(evaluator.n_layers, bool) if mask is None else check_masks(mask, evaluator.n_layers)[0]
    nll = float(evaluator.nll(keep[None, :])[0])
    return {
        "model_id": loaded.model_id,
        "model_hash": loaded.model_hash,
        "n_layers": evaluator.n_layers,
        "removed_layers": np.flatnonzero(~keep).tolist(),
        "text_id": text.text_id,
        "seq_len": seq_len,
        "n_windows": int(windows.shape[0]),
        "n_tokens": int(evaluator.n_tokens),
        "windows_sha256": windows_sha256(windows),
        "nll": nll,
        "perplexity": math.exp(nll),
        "seconds": time.perf_counter() - start,
    }
