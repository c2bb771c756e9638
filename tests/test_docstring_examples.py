"""Every docstring example that can run here runs, and shows what it says: each module's doctests (examples
that need a model, a store, a file or a cluster the test machine lacks are marked ``+SKIP`` in place and read
as illustrations)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("core", "oracle", "sampling", "surrogate", "shapley", "pruning", "pipeline", "serve", "cli")


def modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        package = importlib.import_module(f"layershap.{pkg}")
        names += [f"layershap.{pkg}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return names


def test_every_module_has_been_found():
    found = modules()
    assert len(found) > 80 and "layershap.pruning.plan" in found and "layershap.oracle.store" in found


@pytest.mark.parametrize("name", modules())
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} fail"
