"""Zero-shot accuracy through lm-evaluation-harness, on a model in memory: as loaded, masked, pruned or healed.

The model object itself is wrapped in lm-eval's ``HFLM`` (nothing is copied or saved); with a ``mask`` the
False layers are skipped for the evaluation (:func:`~layershap.oracle.layers.skip_layers`), which gives the
same answers as the model pruned with that mask. The KV cache is off while lm-eval runs (it scores whole
sequences, and a skipped-layer model keeps its layers' original cache indices). Batch size and seeds are
fixed, so a rerun gives the same numbers. The results are the dict lm-eval's ``simple_evaluate`` returns,
made JSON-safe, plus a ``layershap`` entry saying which model and mask were evaluated (lm-eval's environment
report in it, seconds of subprocesses, is computed once a process and reused).

Example:
    >>> zs = ZeroShot(["pydoc_mc"], task_dir="benchmarks/tasks", limit=40)  # doctest: +SKIP
    >>> results = zs.evaluate(loaded.model, loaded.tokenizer, mask=masks_from_removed([8, 9], 18)[0])  # doctest: +SKIP
    >>> accuracy(results)["pydoc_mc"]["acc_norm"], accuracy(results)["pydoc_mc"]["acc_norm_stderr"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from layershap.core.defaults import TASK_SEED
from layershap.core.jsonio import jsonable
from layershap.core.masks import check_masks

from .families import text_config
from .layers import find_layers, skip_layers
from .tasks import load_tasks

# Requests per forward pass by device kind; fixed (never lm-eval's "auto"), so reruns batch alike.
DEFAULT_BATCH_SIZE = {"cpu": 4, "cuda": 16}
METRICS = ("acc", "acc_norm")


_ENV_INFO: dict = {}  # lm-eval's environment report (torch's collect_env: seconds of subprocesses), once a process


@contextlib.contextmanager
def _env_info_once() -> Iterator[None]:
    """``simple_evaluate`` adds the same environment report to every result; compute it once per process."""
    from lm_eval import evaluator

    original = evaluator.add_env_info

    def add_env_info(storage: dict) -> None:
        if not _ENV_INFO:
            probe: dict = {}
            original(probe)
            _ENV_INFO.update(probe)
        storage.update(copy.deepcopy(_ENV_INFO))

    evaluator.add_env_info = add_env_info
    try:
        yield
    finally:
        evaluator.add_env_info = original


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """``use_cache=False`` on the model's configs while lm-eval runs, restored after (also after an error)."""
    configs = {id(c): c for c in (model.config, text_config(model))}.values()
    saved = [(c, getattr(c, "use_cache", None)) for c in configs]
    try:
        for c, _ in saved:
            c.use_cache = False
        yield
    finally:
        for c, value in saved:
            c.use_cache = value


class ZeroShot:
    """lm-eval tasks loaded once, evaluated on any number of models or masks.

    Example:
        >>> zs = ZeroShot(["piqa", "pydoc_mc"], task_dir="benchmarks/tasks", limit=100, batch_size=8)  # doctest: +SKIP
        >>> dense, pruned = zs.evaluate(model, tok), zs.evaluate(model, tok, mask=mask)  # doctest: +SKIP
    """

    def __init__(self, tasks: list[str], task_dir: str | Path | None = None, limit: int | None = None,
                 batch_size: int | None = None, seed: int = TASK_SEED, log_samples: bool = False) -> None:
        self.names = list(tasks)
        self.task_dir = None if task_dir is None else str(task_dir)
        self.tasks, self.manager = load_tasks(self.names, task_dir)
        self.limit, self.batch_size, self.seed, self.log_samples = limit, batch_size, seed, log_samples

    def evaluate(self, model: nn.Module, tokenizer, mask: np.ndarray | None = None,
                 info: dict[str, Any] | None = None) -> dict:
        """lm-eval's results for ``model`` (with the layers where ``mask`` is False skipped), JSON-safe.

        The batch size is the one given, else :data:`DEFAULT_BATCH_SIZE` of the model's device kind.
        """
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        n = find_layers(model).n_layers
        keep = np.ones(n, bool) if mask is None else check_masks(mask, n)[0]
        device = next(model.parameters()).device
        batch_size = self.batch_size or DEFAULT_BATCH_SIZE["cuda" if device.type == "cuda" else "cpu"]
        hf_log = logging.getLogger("lm_eval.models.huggingface")
        level = hf_log.level
        with skip_layers(model, keep), _no_kv_cache(model), _env_info_once():
            hf_log.setLevel(logging.ERROR)  # "pretrained is not a str": passing the model object is the point
            try:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            finally:
                hf_log.setLevel(level)
            results = simple_evaluate(
                model=lm, tasks=self.tasks, task_manager=self.manager, batch_size=batch_size,
                limit=self.limit, log_samples=self.log_samples, random_seed=self.seed,
                numpy_random_seed=self.seed, torch_random_seed=self.seed, fewshot_random_seed=self.seed,
            )
        doc = _json_safe(results)
        doc["layershap"] = {
            "tasks": self.names, "task_dir": self.task_dir, "limit": self.limit, "batch_size": batch_size,
            "seed": self.seed, "n_layers": n, "removed_layers": np.flatnonzero(~keep).tolist(), **(info or {}),
        }
        return doc


def _json_safe(results: dict) -> dict:
    from lm_eval.utils import handle_non_serializable

    return jsonable(json.loads(json.dumps(results, default=handle_non_serializable)))


def _metric(row: dict, name: str) -> float | None:
    """``row[name + ',<filter>']`` (the ``none`` filter first) as a float, None when absent or N/A."""
    keys = [f"{name},none"] + sorted(k for k in row if k.startswith(name + ","))
    for key in keys:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def top_level(results: dict) -> list[str]:
    """The tasks and groups of ``results`` that are not part of a group (a group's row holds its aggregate)."""
    members = {t for subs in (results.get("group_subtasks") or {}).values() for t in subs}
    return [t for t in results["results"] if t not in members]


def accuracy(results: dict, top_only: bool = False) -> dict[str, dict[str, float | int | None]]:
    """Per task (and group): ``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr`` and ``n`` documents.

    ``top_only``: only :func:`top_level` entries (no subtask of a group).

    Example (the embedded Gemma-3-270M, ``ZeroShot(["pydoc_mc"], task_dir="benchmarks/tasks", limit=40)``):
        >>> accuracy(results)["pydoc_mc"]  # doctest: +SKIP
        {'acc': 0.475, 'acc_stderr': 0.07996393417804533, 'acc_norm': 0.375, 'acc_norm_stderr': 0.07752170911825529, 'n': 40}
    """
    out = {}
    names = top_level(results) if top_only else list(results["results"])
    for task in names:
        row = results["results"][task]
        entry: dict[str, float | int | None] = {}
        for m in METRICS:
            entry[m] = _metric(row, m)
            entry[m + "_stderr"] = _metric(row, m + "_stderr")
        entry["n"] = (results.get("n-samples", {}).get(task) or {}).get("effective")
        out[task] = entry
    return out


def format_accuracy(results: dict) -> str:
    """The accuracy table printed by ``layershap evaluate --tasks``: one line per task, value ± standard error.

    Example:
        >>> print(format_accuracy(results))  # doctest: +SKIP
    """
    rows = accuracy(results)
    width = max(len("task"), *(len(t) for t in rows)) + 2
    lines = [f"{'task':<{width}}{'n':>6}{'acc':>18}{'acc_norm':>18}"]
    for task, r in rows.items():
        cells = "".join(f"{_pm(r[m], r[m + '_stderr']):>18}" for m in METRICS)
        lines.append(f"{task:<{width}}{r['n'] if r['n'] is not None else '-':>6}{cells}")
    return "\n".join(lines)


def _pm(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
