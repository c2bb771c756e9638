"""What the command functions share: the checks of numbers, each failing with a one-line :class:`LayershapError`
that names the flag (spelled as users type it, with dashes). The loading options (``--device``, ``--dtype``,
``--device-map``) are one dataclass, :class:`~layershap.core.load_options.LoadOptions`, shared by every command
that loads a model.

Example:
    >>> positive("windows", 4)
    4
    >>> positive("windows", 0)
    Traceback (most recent call last):
    layershap.core.errors.LayershapError: --windows must be at least 1, got 0
"""

from __future__ import annotations

from layershap.core.errors import LayershapError

MODEL_HELP = "gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def positive(name: str, value: int | None) -> int | None:
    """``value`` if it is None or at least 1, else a LayershapError naming ``--name``."""
    if value is not None and value < 1:
        raise LayershapError(f"{_flag(name)} must be at least 1, got {value}")
    return value


def non_negative(name: str, value: float | None) -> int | float | None:
    """``value`` if it is None or at least 0, else a LayershapError naming ``--name``."""
    if value is not None and value < 0:
        raise LayershapError(f"{_flag(name)} must be 0 or more, got {value}")
    return value


def positive_float(name: str, value: float | None) -> float | None:
    """``value`` if it is None or a finite number above 0."""
    if value is not None and not 0 < value < float("inf"):
        raise LayershapError(f"{_flag(name)} must be a number above 0, got {value}")
    return value


def fraction(name: str, value: float) -> float:
    """``value`` if ``0 < value < 1``."""
    if not 0.0 < value < 1.0:
        raise LayershapError(f"{_flag(name)} must be between 0 and 1 (exclusive), got {value}")
    return value
