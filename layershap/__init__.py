"""layershap: which decoder layers of an LLM can you remove? Layer Shapley values through a learned surrogate.

Importing ``layershap`` is light; ``layershap.Client`` (the HTTP client of ``layershap serve``) is imported on
first use.

Example:
    >>> from layershap import Client
    >>> Client("http://127.0.0.1:8000").surrogates()
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from layershap.serve.client import Client

        return Client
    raise AttributeError(f"module 'layershap' has no attribute {name!r}")
