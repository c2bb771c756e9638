"""The task utility (``--utility task:FILE``): a mask's loss is the mean negative log-likelihood of the correct
answers of a local multiple-choice task (lm-eval's YAML + JSONL format), in nats per question.

Each question becomes one token window, its gold choice's request exactly as lm-eval scores it (the context,
then the answer; :func:`~layershap.oracle.tasks.load_choice_task`), right-padded to the longest question; a
weight of 1 marks the positions that predict an answer token, so a window's value is
``-log p(answer | question)`` (causal attention keeps the padding out of every weighted position). The
questions are shuffled with the seed and split once: the first third calibrate (the dataset store's rows),
the rest are cut into disjoint decision blocks for the plan search.

Example:
    >>> parse_utility("kl"), parse_utility("task:benchmarks/tasks/pydoc_mc.yaml")
    (('kl', None), ('task', 'benchmarks/tasks/pydoc_mc.yaml'))
    >>> items = [ChoiceItem(0, ((2, 5, 6),), ((7, 8),), 0, (2,)), ChoiceItem(1, ((2, 9),), ((4,),), 0, (1,))]
    >>> w = answer_windows(items, pad_id=0)
    >>> w.ids.tolist(), w.weights.tolist()
    ([[2, 5, 6, 7, 8], [2, 9, 4, 0, 0]], [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layershap.core.errors import LayershapError

from .measurement import UTILITIES
from .tasks import ChoiceItem, ChoiceTask, load_choice_task

TASK_PREFIX = "task:"
CALIBRATION_SHARE = 1 / 3  # of the questions: the calibration set; the rest decide
MIN_ITEMS = 12  # questions a task needs: calibration and at least one decision block of a few each


def parse_utility(utility: str) -> tuple[str, str | None]:
    """``nll`` / ``kl`` -> ``(name, None)``; ``task:FILE`` -> ``("task", FILE)``; anything else is refused.

    Example:
        >>> parse_utility("nll")
        ('nll', None)
    """
    if utility in UTILITIES:
        return utility, None
    if utility.startswith(TASK_PREFIX) and utility[len(TASK_PREFIX):].strip():
        return "task", utility[len(TASK_PREFIX):].strip()
    raise LayershapError(f"unknown utility {utility!r}; use nll, kl, or task:FILE (FILE: a multiple-choice "
                         "task's lm-eval YAML, e.g. task:benchmarks/tasks/pydoc_mc.yaml)")


@dataclass(frozen=True)
class TaskWindows:
    """Padded answer windows ``ids`` int64[W, L] and ``weights`` float32[W, L - 1] (1 where position t predicts
    an answer token, 0 elsewhere)."""

    ids: np.ndarray
    weights: np.ndarray


def answer_windows(items: list[ChoiceItem] | tuple[ChoiceItem, ...], pad_id: int) -> TaskWindows:
    """One window per question: its gold context + gold answer, right-padded with ``pad_id`` (see the module
    example)."""
    seqs = [(it.contexts[it.gold], it.continuations[it.gold]) for it in items]
    if not seqs:
        raise LayershapError("a task window set needs at least one question")
    width = max(len(c) + len(a) for c, a in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    weights = np.zeros((len(seqs), width - 1), dtype=np.float32)
    for i, (ctx, ans) in enumerate(seqs):
        if not ctx or not ans:
            raise LayershapError(f"question {items[i].doc_id} has an empty context or answer; a task question "
                                 "needs both (check the task's doc_to_text / doc_to_choice)")
        ids[i, : len(ctx) + len(ans)] = (*ctx, *ans)
        weights[i, len(ctx) - 1 : len(ctx) + len(ans) - 1] = 1.0  # position t predicts token t + 1
    return TaskWindows(ids, weights)


@dataclass(frozen=True)
class TaskSplit:
    """A task's questions split once with ``seed``: ``calibration`` windows and the ``decision`` questions."""

    task: ChoiceTask
    file: str
    seed: int
    calibration: TaskWindows
    decision: tuple[ChoiceItem, ...]
    pad_id: int

    @property
    def text_id(self) -> str:
        """What the stores record where a text's id would be: ``task:<name>``."""
        return f"{TASK_PREFIX}{self.task.name}"

    def identity(self) -> dict:
        """The task's part of a store's identity: name, file, content hash, seed and question counts."""
        return {"name": self.task.name, "file": self.file, "sha256": self.task.sha256(), "seed": self.seed,
                "calibration_items": int(self.calibration.ids.shape[0]), "decision_items": len(self.decision)}

    def decision_blocks(self, n_blocks: int) -> list[TaskWindows]:
        """``n_blocks`` disjoint blocks of the decision questions, equally many each (a remainder is left out)."""
        per = len(self.decision) // max(1, n_blocks)
        if per < 1:
            raise LayershapError(f"task {self.task.name!r} has {len(self.decision)} decision questions, fewer "
                                 f"than the {n_blocks} decision blocks; use a task with more questions")
        return [answer_windows(self.decision[b * per : (b + 1) * per], self.pad_id) for b in range(n_blocks)]


def split_task(task: ChoiceTask, file: str, seed: int, pad_id: int) -> TaskSplit:
    """Shuffle the questions with ``seed`` and split them: :data:`CALIBRATION_SHARE` calibrate, the rest decide.

    Example:
        >>> split = split_task(load_choice_task("pydoc_mc.yaml", tokenizer), "pydoc_mc.yaml", 0, 0)  # doctest: +SKIP
        >>> split.calibration.ids.shape[0], len(split.decision)  # doctest: +SKIP
        (48, 95)
    """
    n = len(task.items)
    if n < MIN_ITEMS:
        raise LayershapError(f"task {task.name!r} has {n} questions; the task utility needs at least {MIN_ITEMS} "
                             "(a third calibrate, the rest decide the plans)")
    order = np.random.default_rng(seed).permutation(n)
    n_cal = int(np.ceil(n * CALIBRATION_SHARE))
    items = [task.items[i] for i in order]
    return TaskSplit(task, file, seed, answer_windows(items[:n_cal], pad_id), tuple(items[n_cal:]), pad_id)


def check_task_file(file: str) -> Path:
    """``file`` as a path when it is a task YAML file, else one line saying what to give (before any model loads)."""
    path = Path(file).expanduser()
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise LayershapError(f"--utility task:{file}: no task YAML there; give the path of a multiple-choice "
                             "task's lm-eval YAML file (its JSONL data beside it)")
    return path


def open_task(file: str, tokenizer, seed: int) -> TaskSplit:
    """Load the multiple-choice task at ``file`` (an lm-eval task YAML) for ``tokenizer`` and split it.

    Example:
        >>> split = open_task("benchmarks/tasks/pydoc_mc.yaml", tokenizer, seed=0)  # doctest: +SKIP
    """
    path = check_task_file(file)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return split_task(load_choice_task(str(path), tokenizer), str(path), seed, int(pad or 0))
