"""Defaults shared by the commands and the library calls behind them (one place to change them).

The calibration size was chosen with ``benchmarks/calibration_size.py`` on development texts that the
pruning-quality benchmark never reports: on Gemma-3-270M, the K = 2 set that is best on 2 x 256 builtin tokens is
within 1.055x / 1.000x of the best on the two development texts, where 4 x 128 tokens (the same cost) picked a set
1.109x / 1.294x off, and 8 x 128 tokens (twice the cost) 1.149x / 1.139x: the length of a window matters more than
the number of windows. The main job's budgets keep it within 10 minutes on a 2-core CPU.

Example:
    >>> from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS
    >>> CALIBRATION_WINDOWS * CALIBRATION_SEQ_LEN   # calibration tokens per oracle pass
    512
"""

from __future__ import annotations

CALIBRATION_WINDOWS = 2  # token windows every mask is measured on
CALIBRATION_SEQ_LEN = 256  # tokens per window (BOS added when the model has one)
MAIN_JOB_MASKS = 96  # stratified masks of the main job (full model and every leave-one-out included)
PLAN_BUDGET = 88  # new calibration passes of the plan search
SPARSIFY_WINDOWS = 4  # windows of the calibration activations of `layershap sparsify` (Wanda, OWL)
SPARSIFY_SEQ_LEN = 128  # tokens per such window
TASK_SEED = 1234  # seed of lm-eval's generators for zero-shot tasks (lm-eval's own default)
