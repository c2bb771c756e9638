"""Heal-aware plans (``layershap plan --heal METHOD``, ``layershap run --heal METHOD``): the plan stage run again
with every candidate measured after its training-free recovery (:mod:`layershap.pruning.heal_aware`: patches
fitted in closed form on 16 x 256 tokens of the text that neither the calibration windows nor the decision
blocks hold, :func:`heal_fit_windows`), so the plan is the best *healed* set. Its stores and ``plans.json`` go to ``<out>/heal-<method>/``; the unhealed plans
of ``<out>/plans.json`` are recorded beside it (``unhealed``).

Example:
    >>> doc = run_healed_plans(session, text="builtin", method="linear", out=Path("runs/g"), ks=[2, 4])  # doctest: +SKIP
    >>> print(format_healed(doc))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from layershap.core.defaults import HEAL_SEQ_LEN, HEAL_WINDOWS
from layershap.core.jsonio import write_json
from layershap.core.masks import check_removal_count
from layershap.oracle.session import OracleSession
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import load_text, make_windows
from layershap.oracle.windows import decision_windows
from layershap.pruning.budget import PlanBudget
from layershap.pruning.heal_aware import HealedEvaluator, SpanFitter

from .plans import PLANS_FILE, decision_shape, default_ks, format_plans, read_plans, run_plans, session_budget


def heal_folder(out: Path, method: str) -> Path:
    """``<out>/heal-<method>`` (``lowrank:64`` -> ``heal-lowrank64``).

    Example:
        >>> heal_folder(Path("runs/g"), "lowrank:64").as_posix()
        'runs/g/heal-lowrank64'
    """
    return Path(out) / f"heal-{method.replace(':', '')}"


def heal_fit_windows(session: OracleSession, *, text: str, seed: int, n_blocks: int) -> np.ndarray:
    """Windows the patches of a heal-aware search are fitted on: as many tokens as ``layershap heal`` uses
    (16 x 256), overlapping neither the calibration windows nor the ``n_blocks`` decision blocks, so every
    candidate is measured on text its patches never saw (fitted in-sample, sets with more spans and so more
    patch parameters would look better than they are). They are the windows of the decision blocks after the
    first ``n_blocks`` (:func:`~layershap.oracle.windows.decision_windows` draws block ``b`` the same however many
    are asked for). A task session fits on ``make_windows`` of ``text`` (its questions are not text windows).

    Example:
        >>> heal_fit_windows(session, text="builtin", seed=0, n_blocks=3).shape      # (16, 257) on CPU  # doctest: +SKIP
    """
    tok, body = session.loaded.tokenizer, load_text(text).text
    if session.task is not None:
        return make_windows(tok, body, HEAL_WINDOWS, HEAL_SEQ_LEN, seed)
    block_windows, block_seq_len = decision_shape(session)
    need = max(1, -(-HEAL_WINDOWS * HEAL_SEQ_LEN // block_seq_len))  # windows for 16 x 256 tokens
    extra = -(-need // block_windows)
    attrs = session.store.attrs
    blocks = decision_windows(tok, body, int(attrs["n_windows"]), int(attrs["seq_len"]), seed, block_windows,
                              block_seq_len, n_blocks + extra)
    return np.concatenate(blocks[n_blocks:])[:need]


def healed_session(session: OracleSession, *, text: str, method: str, out: Path, seed: int = 0,
                   n_blocks: int = 3, batch_size: int = 4) -> OracleSession:
    """The session measuring after ``method``'s recovery: its own store at ``<folder>/dataset.zarr`` (identity:
    the session's plus the healing), evaluators wrapped in :class:`~layershap.pruning.heal_aware.HealedEvaluator`,
    patches fitted on :func:`heal_fit_windows`."""
    loaded = session.loaded
    windows = heal_fit_windows(session, text=text, seed=seed, n_blocks=n_blocks)
    fitter = SpanFitter(loaded.model, windows, method, batch_size=batch_size)

    def wrap(evaluator):
        return HealedEvaluator(evaluator, fitter)

    identity = {**session.store.identity, "heal": fitter.identity()}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    store = DatasetStore.create_or_open(folder / "dataset.zarr", identity, session.store.windows)
    return dataclasses.replace(session, store=store, evaluator=wrap(session.evaluator), heal=fitter.identity(),
                               wrap=wrap)


def run_healed_plans(session: OracleSession, *, text: str, method: str, out: Path, ks: list[int] | None = None,
                     budget: PlanBudget | None = None, total_tokens: int | None = None, seed: int = 0,
                     batch_size: int = 4, cache_mb: int | None = None, progress: bool = True) -> dict:
    """:func:`~layershap.pipeline.plans.run_plans` on :func:`healed_session` into :func:`heal_folder`; the
    document gains ``heal`` (method, fit windows and tokens) and ``unhealed`` (``<out>/plans.json``'s sets)."""
    folder = heal_folder(out, method)
    ks = sorted({check_removal_count(int(k), session.store.n_layers) for k in (ks or default_ks(session.store.n_layers))})
    budget = budget or session_budget(session, ks, total_tokens)
    healed = healed_session(session, text=text, method=method, out=folder, seed=seed, n_blocks=budget.max_blocks,
                            batch_size=batch_size)
    try:
        doc = run_plans(healed, text=text, out=folder, ks=ks, budget=budget, total_tokens=total_tokens, seed=seed,
                        batch_size=batch_size, cache_mb=cache_mb, progress=progress)
    finally:
        healed.store.close()
    unhealed_path = Path(out) / PLANS_FILE
    if unhealed_path.is_file():
        doc["unhealed"] = {str(p["k"]): p["removed"] for p in read_plans(unhealed_path)["plans"]}
    fit = healed.evaluator.fitter.windows
    doc["heal"] = {"method": method, "identity": healed.heal, "fit_windows": int(fit.shape[0]),
                   "fit_seq_len": int(fit.shape[1] - 1), "text": text,
                   "fit": "windows disjoint from the calibration windows and the decision blocks"}
    write_json(folder / PLANS_FILE, doc)
    return doc


def format_healed(doc: dict, names: list[str] | None = None) -> str:
    """The healed plan table, and per K the healed plan against the unhealed one.

    Example:
        >>> print(format_healed(read_plans("runs/g/heal-linear")))  # doctest: +SKIP
    """
    lines = [f"healed with {doc['heal']['method']} (fitted on {doc['heal']['fit_windows']} x "
             f"{doc['heal']['fit_seq_len']} tokens of {doc['heal']['text']}): " + format_plans(doc, names=names)]
    unhealed = doc.get("unhealed") or {}
    for p in doc["plans"]:
        other = unhealed.get(str(p["k"]))
        if other is not None:
            same = "the same set" if sorted(other) == sorted(p["removed"]) else f"unhealed plan {other}"
            lines.append(f"  K = {p['k']}: healed plan {p['removed']}, {same}")
    return "\n".join(lines)
