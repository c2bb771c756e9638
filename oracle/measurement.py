"""What one oracle call returns: per-window mean token losses of a group of masks.

Example:
    >>> m = Measurement(np.array([[2.0, 3.0]]))
    >>> m.loss("nll")
    array([2.5])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from layershap.core.errors import LayershapError

UTILITIES = ("nll", "kl")  # what an evaluator measures per window; the task utility is an NLL of answers
KINDS = (*UTILITIES, "task")  # what a store's rows can be: text NLL, KL to the dense model, answer NLL of a task
DEFAULT_TOP_K = 512  # dense next-token log-probabilities kept per token for the KL utility
KL_FLOOR = 1e-3  # nats: added to a KL before its log, so the full model (KL 0) is finite and the scale is kept


def loss_column(utility: str) -> str:
    """The measured column a utility's loss lives in: ``kl`` for ``kl``, ``nll`` for ``nll`` and ``task`` (the
    NLL of the gold answers).

    Example:
        >>> loss_column("task"), loss_column("kl")
        ('nll', 'kl')
    """
    if utility not in KINDS:
        raise LayershapError(f"unknown utility {utility!r}; use one of {', '.join(KINDS)}")
    return "kl" if utility == "kl" else "nll"


def log_offset(utility: str) -> float:
    """What is added to a loss before its log (the surrogate's and the proposal model's scale): 0 for ``nll``
    (always > 0), :data:`KL_FLOOR` for ``kl`` (0 for the full model).

    Example:
        >>> log_offset("nll"), log_offset("kl")
        (0.0, 0.001)
    """
    return KL_FLOOR if utility == "kl" else 0.0


@dataclass(frozen=True)
class Measurement:
    """Per-window mean token losses of ``k`` masks: ``nll`` float64[k, W] and, for the KL utility, ``kl`` (KL of
    the dense model's next-token distribution to the masked model's) float64[k, W]. Windows are equally long, so
    a mask's value is the mean over its windows.

    Example:
        >>> m = evaluator.measure(masks); m.loss("nll"), m.window_loss("kl").shape  # doctest: +SKIP
    """

    nll: np.ndarray
    kl: np.ndarray | None = None

    def window_loss(self, utility: str) -> np.ndarray:
        """``float64[k, W]``: the utility's per-window values."""
        values = self.kl if loss_column(utility) == "kl" else self.nll
        if values is None:
            raise LayershapError(f"this measurement has no {utility!r} values; measure with utility={utility!r}")
        return values

    def loss(self, utility: str) -> np.ndarray:
        """``float64[k]``: the utility's mean over the windows."""
        return self.window_loss(utility).mean(axis=1)

    def take(self, rows: np.ndarray) -> Measurement:
        """The measurement of the masks at ``rows``."""
        return Measurement(self.nll[rows], None if self.kl is None else self.kl[rows])
