"""Committed outputs of the main job, installed as ``layershap.artifacts`` so that the Gemma-3-270M surrogate in
``gemma-3-270m/surrogate/`` is the service registry's built-in entry (read in place, never copied).

Example:
    >>> from importlib.resources import files
    >>> files("layershap.artifacts") / "gemma-3-270m" / "surrogate" / "metadata.json"
"""
