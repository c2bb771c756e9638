"""Defaults shared by the commands and the library calls behind them (one place to change them).

The calibration size and the main job's budgets were chosen with ``benchmarks/calibration_size.py`` (development
texts that the pruning-quality benchmark never reports) within the main job's 10-minute CPU budget on the
embedded default.

Example:
    >>> from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS
    >>> CALIBRATION_WINDOWS * CALIBRATION_SEQ_LEN   # calibration tokens per oracle pass
    512
"""

from __future__ import annotations

CALIBRATION_WINDOWS = 4  # token windows every mask is measured on
CALIBRATION_SEQ_LEN = 128  # tokens per window (BOS added when the model has one)
MAIN_JOB_MASKS = 96  # stratified masks of the main job (full model and every leave-one-out included)
PLAN_BUDGET = 88  # new calibration passes of the plan search
