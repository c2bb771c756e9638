"""``layershap registry add | list | show | remove``: manage the folder of trained surrogates the service reads.

Example:
    $ layershap registry add runs/my-llama/surrogate --name my-llama --family llama
    $ layershap registry list --family gemma3_text
    $ layershap registry show gemma-3-270m
    $ layershap registry remove my-llama
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


def _registry(registry: Path | None):
    from layershap.surrogate.registry import Registry, registry_root

    return Registry(registry_root(registry))


def registry_add(surrogate_dir: Path, name: str | None = None, family: str | None = None,
                 registry: Path | None = None) -> int:
    """Add a trained surrogate folder to the registry (copied atomically).

    Args:
        surrogate_dir: the --out folder of `layershap train` (or runs/NAME/surrogate of `layershap run`).
        name: entry id (default: the model id, '/' written as '--').
        family: model family, the config's model_type (needed when the surrogate's metadata lack it).
        registry: registry folder (default: $LAYERSHAP_REGISTRY, else ~/.cache/layershap/registry).
    """
    entry = _registry(registry).add(surrogate_dir, name=name, family=family)
    print(f"added {entry.family}/{entry.id} ({entry.info.get('n_layers')} layers, {entry.info.get('members')} "
          f"members) to {entry.path.parent.parent}")
    return 0


def registry_list(family: str | None = None, registry: Path | None = None) -> int:
    """List the registry's surrogates, corrupt entries with the reason.

    Args:
        family: show only this model family (model_type).
        registry: registry folder (default: $LAYERSHAP_REGISTRY, else ~/.cache/layershap/registry).
    """
    reg = _registry(registry)
    entries = reg.entries(family)
    print(f"registry {reg.root}")
    print(f"{'id':<28} {'family':<16} {'layers':>6} {'rows':>6} {'R2':>6}  status")
    for e in entries:
        r2 = ((e.info.get("metrics") or {}).get("overall") or {}).get("r2")
        status = e.status + (" (built-in)" if e.builtin else "") + (f": {e.reason}" if e.reason else "")
        print(f"{e.id:<28} {e.family:<16} {e.info.get('n_layers') or '-':>6} {e.info.get('rows') or '-':>6} "
              f"{'-' if r2 is None else f'{r2:.3f}':>6}  {status}")
    return 0


def registry_show(entry_id: str, registry: Path | None = None) -> int:
    """Print one entry's description (model, layers, text and windows, rows, metrics) as JSON.

    Args:
        entry_id: the entry id (see `layershap registry list`).
        registry: registry folder (default: $LAYERSHAP_REGISTRY, else ~/.cache/layershap/registry).
    """
    entry = _registry(registry).get(entry_id, require_ok=False)
    print(json.dumps(entry.summary() | {"path": str(entry.path)}, indent=2))
    return 0


def registry_remove(entry_id: str, registry: Path | None = None) -> int:
    """Delete an entry from the registry (the built-in entry cannot be removed).

    Args:
        entry_id: the entry id (see `layershap registry list`).
        registry: registry folder (default: $LAYERSHAP_REGISTRY, else ~/.cache/layershap/registry).
    """
    entry = _registry(registry).remove(entry_id)
    print(f"removed {entry.family}/{entry.id}")
    return 0


def registry(action: Literal["add", "list", "show", "remove"], target: str | None = None, name: str | None = None,
             family: str | None = None, registry: Path | None = None) -> int:
    """Manage the registry of trained surrogates: add SURROGATE_DIR, list, show ID, remove ID.

    Args:
        action: add | list | show | remove.
        target: the surrogate folder (add) or the entry id (show, remove).
        name: entry id for add (default: the model id, '/' written as '--').
        family: model family (the config's model_type) for add when the metadata lack it; a filter for list.
        registry: registry folder (default: $LAYERSHAP_REGISTRY, else ~/.cache/layershap/registry).
    """
    from layershap.core.errors import LayershapError

    if action == "list":
        return registry_list(family, registry)
    if target is None:
        what = "the surrogate folder" if action == "add" else "the entry id"
        raise LayershapError(f"`layershap registry {action}` needs {what}, e.g. `layershap registry {action} "
                             f"{'runs/x/surrogate' if action == 'add' else 'gemma-3-270m'}`")
    if action == "add":
        return registry_add(Path(target), name, family, registry)
    if action == "show":
        return registry_show(target, registry)
    return registry_remove(target, registry)
