"""Errors for bad user input: the CLI prints their message (what was wrong, how to fix it) as one line, no traceback.

Example:
    >>> raise MaskError("mask length 3 does not match the model's 18 decoder layers")
    Traceback (most recent call last):
    layershap.core.errors.MaskError: mask length 3 does not match the model's 18 decoder layers
"""


class LayershapError(ValueError):
    """Base class of every error caused by bad input; its message says what was wrong and what to do."""


class UnsupportedModelError(LayershapError):
    """The model's architecture has no known decoder layer list."""


class MaskError(LayershapError):
    """A layer mask has the wrong shape, dtype or content."""


class StoreMismatchError(LayershapError):
    """A dataset store was built for another model, text or layer count."""


class MissingPackageError(LayershapError, ImportError):
    """An optional package is needed; the message names the pip install that fixes it."""


class NonFiniteLossError(LayershapError, FloatingPointError):
    """A mask gave a non-finite NLL (the model diverged); nothing is stored for it."""


class StoreLockedError(LayershapError):
    """A dataset store is being written by another process (its lock file names the holder)."""
