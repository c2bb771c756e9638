"""Multiple-choice tasks in lm-evaluation-harness's format: registry tasks and local YAML + JSONL files.

A task name is looked up first in ``task_dir`` (every ``*.yaml`` below it, lm-eval's task format), then in
lm-eval's own registry; a path to a ``.yaml`` file works too. In a local task file, relative ``data_files``
are read relative to the YAML's folder (lm-eval itself reads them relative to the working directory, which
still works here when no such file sits beside the YAML). A task whose data cannot be loaded (a registry task
offline) ends in one line naming the fixes. Needs the ``lm-eval`` extra: ``pip install 'layershap[tasks]'``.

:func:`load_choice_task` turns a multiple-choice task into token ids, exactly the requests lm-eval's ``HFLM``
scores (same prompt, same tokenisation): per item, one (context, continuation) pair per answer choice and the
gold index, so the answer log-likelihoods can be computed with any forward pass (e.g. a masked model's).

Example (``tokenizer`` of the embedded Gemma-3-270M):
    >>> task = load_choice_task("pydoc_mc", tokenizer, task_dir="benchmarks/tasks", limit=20)  # doctest: +SKIP
    >>> item = task.items[0]  # doctest: +SKIP
    >>> len(task.items), item.gold, len(item.continuations), item.contexts[0][:4], item.continuations[item.gold]  # doctest: +SKIP
    (20, 0, 4, (2, 14977, 236787, 15311), (219496,))
    >>> tokenizer.decode(item.contexts[0] + item.continuations[item.gold])[-30:]  # doctest: +SKIP
    'browsers."?\\nAnswer: webbrowser'
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from layershap.core.errors import LayershapError

from .loading import require_package

TASKS_PIP = "pip install 'layershap[tasks]'  (lm-eval, the lm-evaluation-harness)"


class TaskError(LayershapError):
    """A task could not be found or loaded; the message names the task and the fix."""


@lru_cache(maxsize=4)
def task_manager(task_dir: str | None, include_defaults: bool):
    """lm-eval's ``TaskManager`` over ``task_dir`` (and its registry when ``include_defaults``), built once."""
    require_package("lm_eval", TASKS_PIP, "zero-shot tasks")
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return TaskManager(include_path=task_dir, include_defaults=include_defaults)


def _check_dir(task_dir: str | Path | None) -> str | None:
    if task_dir is None:
        return None
    path = Path(task_dir).expanduser()
    if not path.is_dir():
        raise TaskError(f"--task-dir {task_dir} is not a directory; give the folder that holds the task YAML files")
    return str(path.resolve())


def _local_data_files(files: Any, base: Path) -> Any:
    """``data_files`` with each relative path that exists beside the YAML made absolute."""
    if isinstance(files, dict):
        return {split: _local_data_files(v, base) for split, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_local_data_files(v, base) for v in files]
    if isinstance(files, str) and not Path(files).is_absolute() and (base / files).exists():
        return str((base / files).resolve())
    return files


def _local_config(yaml_path: Path) -> dict:
    """The task YAML as lm-eval reads it (includes merged, ``!function`` resolved), data paths fixed."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = _local_data_files(kwargs["data_files"], yaml_path.parent)
        cfg["dataset_kwargs"] = kwargs
    return cfg


def _why(err: Exception) -> str:
    """``Type: first line of the message`` (the CLI prints one line)."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _data_fix(name: str, err: Exception) -> str:
    return (f"task {name!r}: its data could not be loaded ({_why(err)}). Fix: download it once "
            f"where the Hugging Face hub is reachable (e.g. `lm_eval --tasks {name} --limit 1`), then run with "
            f"HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) to read it from the datasets cache; or write the task as "
            f"a local YAML + JSONL file and pass its folder with --task-dir")


def load_tasks(names: list[str], task_dir: str | Path | None = None) -> tuple[list, Any]:
    """lm-eval ``Task`` objects (data loaded) for ``names``, and the ``TaskManager`` that knows them.

    Example:
        >>> tasks, manager = load_tasks(["pydoc_mc"], "benchmarks/tasks")  # doctest: +SKIP
    """
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise TaskError("--tasks lists no task; give task names, e.g. --tasks piqa,hellaswag or a local task")
    folder = _check_dir(task_dir)
    local = task_manager(folder, False).task_index if folder else {}
    needs_registry = any(n not in local and not n.endswith((".yaml", ".yml")) for n in names)
    manager = task_manager(folder, needs_registry)
    tasks: list = []
    for name in names:
        tasks.extend(_load_one(manager, name, local))
    return tasks, manager


def _load_one(manager, name: str, local: dict) -> list:
    from lm_eval.tasks._index import Kind

    entry = local.get(name)
    yaml_path = Path(name).expanduser() if name.endswith((".yaml", ".yml")) else None
    if yaml_path is not None and not yaml_path.is_file():
        raise TaskError(f"task file {name} does not exist; give a task YAML path or a task name")
    if entry is not None and entry.kind == Kind.TASK and entry.yaml_path is not None:
        yaml_path = Path(entry.yaml_path)
    try:
        spec: Any = _local_config(yaml_path.resolve()) if yaml_path is not None else name
    except Exception as err:  # a malformed YAML: name the file and what lm-eval's loader said
        raise TaskError(f"task file {yaml_path} could not be read ({_why(err)}); fix the YAML") from err
    if yaml_path is None and entry is None and name not in manager.task_index:
        raise TaskError(f"unknown task {name!r}: neither lm-eval's registry nor --task-dir has it; check the "
                        f"spelling, or pass the folder of its YAML file with --task-dir")
    try:
        loaded = manager.load([spec])
    except OSError as err:  # ConnectionError (the hub), FileNotFoundError (data files, the datasets cache)
        local_files = isinstance(spec, dict) and "data_files" in (spec.get("dataset_kwargs") or {})
        if isinstance(err, ConnectionError) or not local_files:
            raise TaskError(_data_fix(name, err)) from err
        raise TaskError(f"local task {name!r} ({yaml_path or entry.yaml_path}): its data files could not be read "
                        f"({_why(err)}); check dataset_kwargs.data_files in the YAML") from err
    return list(loaded["tasks"].values())


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question as token ids: choice ``i`` is ``contexts[i] + continuations[i]``.

    ``contexts`` are equal for the usual tasks (the answers follow the question); tasks with the choices in the
    prompt (WinoGrande-style) have one context per choice and one shared continuation. ``choice_chars`` are
    the characters of each answer text, the divisor of lm-eval's ``acc_norm``.
    """

    doc_id: int
    contexts: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[int, ...], ...]
    gold: int
    choice_chars: tuple[int, ...]


@dataclass(frozen=True)
class ChoiceTask:
    """A multiple-choice task as token ids, ``items`` in the task's document order."""

    name: str
    items: tuple[ChoiceItem, ...]

    def sha256(self) -> str:
        """Hash of every item's token ids and gold index: the identity of what a measurement saw."""
        digest = hashlib.sha256(self.name.encode())
        for it in self.items:
            digest.update(repr((it.contexts, it.continuations, it.gold)).encode())
        return digest.hexdigest()


def _encode(tokenizer, text: str, special: bool | None = None) -> list[int]:
    """lm-eval's ``HFLM.tok_encode``: the tokenizer's own special tokens unless the text starts with BOS."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if special is None and text.startswith(tokenizer.decode(bos)):
        special = False
    return list(tokenizer.encode(text) if special is None else tokenizer.encode(text, add_special_tokens=special))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) request exactly as lm-eval's causal ``HFLM`` makes them.

    Trailing whitespace of the context moves to the continuation; the continuation is what encoding the
    whole string adds after the context's tokens; an empty context becomes BOS (EOS without one).

    Example:
        >>> encode_pair(tokenizer, "Question: 2+2?\\nAnswer:", " 4")  # doctest: +SKIP
    """
    if context == "":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = _encode(tokenizer, continuation, special=False)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def load_choice_task(name: str, tokenizer, task_dir: str | Path | None = None,
                     limit: int | None = None) -> ChoiceTask:
    """A multiple-choice task (lm-eval format) as token ids: the first ``limit`` items (all when None).

    Example:
        >>> task = load_choice_task("pydoc_mc", tokenizer, task_dir="benchmarks/tasks")  # doctest: +SKIP
        >>> len(task.items), task.items[0].gold  # doctest: +SKIP
    """
    tasks, _ = load_tasks([name], task_dir)
    if len(tasks) != 1:
        raise TaskError(f"{name!r} is a group of {len(tasks)} tasks; give one multiple-choice task")
    task = tasks[0]
    if task.OUTPUT_TYPE != "multiple_choice":
        raise TaskError(f"task {name!r} is a {task.OUTPUT_TYPE} task; a multiple-choice task is needed")
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=limit)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    items = []
    for doc_id, insts in sorted(by_doc.items()):
        insts = sorted(insts, key=lambda i: i.idx)
        doc = insts[0].doc
        pairs = [encode_pair(tokenizer, *inst.args) for inst in insts]
        items.append(ChoiceItem(doc_id=doc_id, contexts=tuple(tuple(c) for c, _ in pairs),
                                continuations=tuple(tuple(c) for _, c in pairs), gold=_gold(task, doc, name),
                                choice_chars=tuple(len(c) for c in task.doc_to_choice(doc))))
    return ChoiceTask(name=task.task_name, items=tuple(items))


def _gold(task, doc: dict, name: str) -> int:
    """The gold choice's index, as lm-eval's ``process_results`` reads it (an index or the answer text)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    choices = task.doc_to_choice(doc)
    if isinstance(gold, str) and gold in choices:
        gold = choices.index(gold)
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise TaskError(f"task {name!r}: a document's gold answer {gold!r} is not one of its {len(choices)} choices "
                        "(one gold index or answer text per document is needed)")
    return gold
