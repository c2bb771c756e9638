"""Defaults shared by the commands and the library calls behind them (one place to change them).

The calibration size was chosen with ``benchmarks/calibration_size.py`` on development texts that the
pruning-quality benchmark never reports: on Gemma-3-270M, the K = 2 set that is best on 2 x 256 builtin tokens is
within 1.055x / 1.000x of the best on the two development texts, where 4 x 128 tokens (the same cost) picked a set
1.109x / 1.294x off, and 8 x 128 tokens (twice the cost) 1.149x / 1.139x: the length of a window matters more than
the number of windows. The main job's budgets (:func:`main_job_masks` here, the plan search's in
``layershap.pruning.budget``) keep it within 10 minutes on a 2-core CPU for the embedded default.

Example:
    >>> from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS
    >>> CALIBRATION_WINDOWS * CALIBRATION_SEQ_LEN   # calibration tokens per oracle pass
    512
"""

from __future__ import annotations

CALIBRATION_WINDOWS = 2  # token windows every mask is measured on
CALIBRATION_SEQ_LEN = 256  # tokens per window (BOS added when the model has one)
SPARSIFY_WINDOWS = 4  # windows of the calibration activations of `layershap sparsify` (Wanda, OWL)
SPARSIFY_SEQ_LEN = 128  # tokens per such window
TASK_SEED = 1234  # seed of lm-eval's generators for zero-shot tasks (lm-eval's own default)


def main_job_masks(n_layers: int) -> int:
    """Stratified masks of the main job (full model and every leave-one-out included): three per layer, at least
    48. They teach the surrogate the whole pruning range; the plan search's rows come on top and teach it too.

    Example:
        >>> main_job_masks(18), main_job_masks(32)
        (54, 96)
    """
    return max(48, 3 * n_layers)


# Calibration of a healing fit (``layershap heal``, ``prune --heal``, heal-aware plans): 16 x 256 tokens; 32 close
# no more of the gap at K = 4 (benchmarks/healing.py). The ridge equals layershap.pruning.heal.DEFAULT_RIDGE.
HEAL_WINDOWS, HEAL_SEQ_LEN, HEAL_RIDGE = 16, 256, 1e-4
