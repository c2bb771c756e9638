"""How many token positions a model can attend over, and window lengths that fit.

Example:
    >>> fit_seq_len(gpt2_model, gpt2_tokenizer, 2048)   # n_positions = 1024, BOS prepended  # doctest: +SKIP
    1023
"""

from __future__ import annotations

from torch import nn

from .families import text_config


def position_limit(model: nn.Module) -> int | None:
    """The most token positions ``model`` can attend over (its text config's ``max_position_embeddings``; GPT-2's
    ``n_positions``), or None when the config names no limit.

    Example:
        >>> position_limit(AutoModelForCausalLM.from_config(GPT2Config(n_positions=1024)))  # doctest: +SKIP
        1024
    """
    limit = getattr(text_config(model), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def fit_seq_len(model: nn.Module, tokenizer, seq_len: int) -> int:
    """``seq_len`` shortened, where needed, so that a window plus its BOS token fits the model's position limit
    (for default window lengths; a length the user asked for is checked by :class:`MaskedEvaluator` instead).

    Example:
        >>> fit_seq_len(gpt2_model, gpt2_tokenizer, 2048)   # n_positions = 1024, BOS prepended  # doctest: +SKIP
        1023
    """
    limit = position_limit(model)
    if limit is None:
        return seq_len
    bos = 1 if getattr(tokenizer, "bos_token_id", None) is not None else 0
    return max(1, min(seq_len, limit - bos))
