"""The plan stage of ``layershap run`` and ``layershap plan``: verified depth-pruning plans for several K on an open
oracle session — screened on the calibration windows, decided on blocks of fresh windows — written to
``plans.json`` and printed as a table with how sure each choice is.

Example:
    >>> session = open_session(model="gemma-3-270m", text="builtin", masks="loo", out="runs/g/dataset.zarr")  # doctest: +SKIP
    >>> doc = run_plans(session, text="builtin", out=Path("runs/g"), ks=[1, 2, 3])  # doctest: +SKIP
    >>> print(format_plans(doc))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from layershap.core.errors import LayershapError
from layershap.core.jsonio import write_json
from layershap.core.masks import check_removal_count, masks_from_removed
from layershap.oracle.measure import CachedOracle
from layershap.oracle.positions import fit_seq_len
from layershap.oracle.session import OracleSession, open_decision_blocks
from layershap.oracle.store import DatasetStore
from layershap.oracle.sublayers import removed_costs, sublayer_costs
from layershap.pruning.budget import DECISION, PlanBudget, plan_budget
from layershap.pruning.plan import find_plans
from layershap.pruning.race import Z_DROP

PLANS_FILE = "plans.json"
FORMAT = "layershap-plans"
FORMAT_VERSION = 2
DEPTH_REDUCTIONS = (0.10, 0.20, 0.30)


def default_ks(n_layers: int) -> list[int]:
    """The K of each depth reduction (10, 20, 30 % of the layers) and every K from 1 up to min(5, the 30 % K).

    Example:
        >>> default_ks(18), default_ks(32)
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 10])
    """
    depth = {max(1, round(f * n_layers)) for f in DEPTH_REDUCTIONS}
    ks = set(range(1, min(5, max(depth)) + 1)) | depth
    return sorted(k for k in ks if k < n_layers)


def decision_shape(session: OracleSession) -> tuple[int, int]:
    """Windows and tokens per window of one decision block: the device's (:data:`~layershap.pruning.budget.DECISION`),
    the window shortened to the model's position limit (a task utility's: its decision questions in that many
    blocks, at the calibration questions' padded length).

    Example:
        >>> decision_shape(session)          # (4, 256) on CPU  # doctest: +SKIP
    """
    dec = DECISION["cuda" if session.evaluator.device.type == "cuda" else "cpu"]
    if session.task is not None:  # the task utility: the decision questions in the device's number of blocks
        return (max(1, len(session.task.decision) // dec["max_blocks"]),
                int(session.task.calibration.ids.shape[1] - 1))
    return dec["windows"], fit_seq_len(session.loaded.model, session.loaded.tokenizer, dec["seq_len"])


def session_budget(session: OracleSession, ks: list[int], total_tokens: int | None = None) -> PlanBudget:
    """The plan budget for the session's model, windows and device (:func:`~layershap.pruning.budget.plan_budget`).

    Example:
        >>> print(session_budget(session, [1, 2, 3]).describe())  # doctest: +SKIP
    """
    ev = session.evaluator
    windows, seq_len = decision_shape(session)
    return plan_budget(session.store.n_layers, ks, device=ev.device.type, screen_tokens=ev.n_tokens,
                       block_tokens=windows * seq_len, total_tokens=total_tokens)


def previous_spent(out: Path, store: DatasetStore) -> dict[int, int]:
    """Screening passes per K that earlier plan stages on the same calibration store spent (``plans.json``)."""
    path = out / PLANS_FILE
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    if doc.get("calibration", {}).get("windows_sha256") != store.attrs.get("windows_sha256"):
        return {}
    return {int(k): int(v) for k, v in doc.get("spent", {}).items()}


def _column(store: DatasetStore, removed: tuple[int, ...], column: str = "nll") -> float | None:
    """A stored row's value in ``column`` (the nll also for a kl store), or None when not stored."""
    mask = masks_from_removed([removed], store.n_layers)[0]
    hits = np.flatnonzero((store.masks == mask).all(axis=1))
    return None if hits.size == 0 else float(getattr(store, column)[hits[0]])


def run_plans(session: OracleSession, *, text: str, out: Path, ks: list[int] | None = None,
              budget: PlanBudget | None = None, total_tokens: int | None = None, seed: int = 0,
              batch_size: int = 4, cache_mb: int | None = None, progress: bool = True) -> dict:
    """Search, measure and decide plans (:func:`~layershap.pruning.plan.find_plans`) on the session's store; the
    decision blocks go to ``out/decision-<b>.zarr``; writes and returns the ``plans.json`` document.

    ``budget`` (default: sized for the model, the K range and the device, within ``total_tokens`` when given)
    counts new passes; rows already stored are free, and passes an earlier plan stage on the same store spent
    (its ``plans.json``) count as spent, so a rerun measures only what a new K or a larger budget adds.
    """
    n = session.store.n_layers
    ks = sorted({check_removal_count(int(k), n) for k in (ks or default_ks(n))})
    budget = budget or session_budget(session, ks, total_tokens)
    print(budget.describe())
    ev = session.evaluator
    oracle = CachedOracle(ev, session.store, label="plan candidates", progress=progress)
    block_windows, block_seq_len = decision_shape(session)
    attrs = session.store.attrs
    blocks = open_decision_blocks(session, text=text, out=out, windows=int(attrs["n_windows"]),
                                  seq_len=int(attrs["seq_len"]), seed=seed, block_windows=block_windows,
                                  block_seq_len=block_seq_len, n_blocks=budget.max_blocks, batch_size=batch_size,
                                  cache_mb=cache_mb, progress=progress)
    try:
        result = find_plans(oracle, ks, budget, decide=[b.window_loss for b in blocks],
                            spent=previous_spent(out, session.store), utility=ev.utility, seed=seed,
                            progress=progress)
    finally:
        for block in blocks:
            block.store.close()  # the decision stores' write locks; their rows stay readable
    full = float(oracle.loss(np.ones((1, n), dtype=bool))[0])
    costs = sublayer_costs(session.loaded.model) if session.store.game == "sublayers" else None
    full_nll = _column(session.store, ())
    plans = []
    for k, p in sorted(result.plans.items()):
        outcome = result.races.get(k)
        nll = _column(session.store, p.removed)
        decision_nll = [v for v in (_column(b.store, p.removed) for b in blocks) if v is not None]
        margin = None if outcome is None else outcome.margin_se
        plans.append({
            "k": k, "removed": list(p.removed), "loss": p.loss, "perplexity": math.exp(nll),
            "decision_loss": p.decision_loss, "decision_blocks": p.blocks,
            "decision_perplexity": math.exp(float(np.mean(decision_nll))) if decision_nll else None,
            "runner_up": None if outcome is None or outcome.runner_up is None else list(outcome.runner_up),
            "margin_se": None if margin is None or math.isinf(margin) else margin,
            "separated": None if margin is None else bool(margin >= Z_DROP),
            **({} if costs is None else {"removed_cost": removed_costs(costs, list(p.removed))}),
        })
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_id": session.loaded.model_id, "model_hash": session.loaded.model_hash, "n_layers": n,
        "utility": ev.utility,
        **({"game": session.store.game, "players": session.store.players} if session.store.game != "blocks" else {}),
        "calibration": {"text_id": session.store.attrs.get("text_id"),
                        "windows_sha256": session.store.attrs.get("windows_sha256"),
                        "tokens_per_pass": ev.n_tokens},
        "decision": {"blocks": [b.store.attrs.get("windows_sha256") for b in blocks],
                     "tokens_per_block": budget.block_tokens},
        "full_loss": full, "full_nll": full_nll, "full_perplexity": math.exp(full_nll),
        "choice": (f"the best {budget.candidates} screened sets per K (within {3:g} screening standard errors of "
                   f"the best) race on decision blocks; a set more than {Z_DROP:g} standard errors behind the "
                   "leader (Student t, paired by window) drops out"),
        "budget": budget.to_dict(),
        "plans": plans,
        **{key: value for key, value in result.to_dict().items() if key != "plans"},
    }
    write_json(out / PLANS_FILE, doc)
    return doc


def read_plans(path: str | Path) -> dict:
    """A ``plans.json`` document (from ``layershap run`` or ``layershap plan``), checked.

    Example:
        >>> {p["k"]: p["removed"] for p in read_plans("runs/gemma-3-270m/plans.json")["plans"]}  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        path = path / PLANS_FILE
    if not path.is_file():
        raise LayershapError(f"no plans file at {path}; make one with `layershap run` or `layershap plan`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LayershapError(f"{path} is not valid JSON ({exc}); make it again with `layershap plan`") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("plans"), list):
        raise LayershapError(f"{path} is not a layershap plans file (no \"format\": \"{FORMAT}\")")
    if doc.get("format_version", 1) != FORMAT_VERSION:
        raise LayershapError(f"{path} was written by an older layershap (plans format {doc.get('format_version', 1)}"
                             f", this one reads {FORMAT_VERSION}); run `layershap plan` on the same folder again "
                             "(its stored rows are reused)")
    return doc


def plan_for(doc: dict, k: int) -> list[int]:
    """The verified removal set for ``k`` in a plans document, or a clear error naming what to run."""
    for plan in doc["plans"]:
        if int(plan["k"]) == k:
            return [int(i) for i in plan["removed"]]
    have = ", ".join(str(p["k"]) for p in doc["plans"])
    raise LayershapError(f"the plans file has no plan for K = {k} (it has K = {have}); run `layershap plan "
                         f"--remove {k}` on the same store first, or prune by score with --by-score")


def format_plans(doc: dict, lowest: dict[int, list[int]] | None = None, names: list[str] | None = None) -> str:
    """The plan table: K, layers to remove, calibration and decision perplexity, how sure, runner-up (and the
    lowest-score sets); ``names``: player names the sets are shown by (the sublayer game's "3.attn").

    Example:
        >>> print(format_plans(read_plans("runs/gemma-3-270m")))  # doctest: +SKIP
    """
    utility = doc.get("utility", "nll")
    task = utility == "task"  # a task's answer NLL (nats per question) is shown as it is: no perplexity
    full = (f"answer NLL {doc['full_nll']:.4g} nats per question" if task
            else f"perplexity {doc['full_perplexity']:.4g}")
    title = (f"verified plans ({utility}; screened on calibration "
             f"{'questions' if task else 'windows'}, decided on fresh ones): full model {full}")
    calib = "calib NLL" if task else "calib ppl"
    lines = [title, f"  {'K':>3}  {'remove':<24} {calib:>10} {'decision':>9} {'margin':>8}  runner-up"
             + ("  lowest scores" if lowest else "")]
    for p in doc["plans"]:
        value, dec_value = ((math.log(p["perplexity"]), p["decision_loss"]) if task
                            else (p["perplexity"], p["decision_perplexity"]))
        dec = "-" if dec_value is None else f"{dec_value:.4g}"
        margin = ("-" if p["separated"] is None else ">99 se" if p["margin_se"] is None
                  else f"{p['margin_se']:.1f} se")
        def shown(players: list[int]) -> str:
            return str(players if names is None else [names[i] for i in players]).replace("'", "")

        runner = "-" if p["runner_up"] is None else shown(p["runner_up"])
        extra = f"  {shown(lowest[p['k']])}" if lowest and p["k"] in lowest else ""
        lines.append(f"  {p['k']:>3}  {shown(p['removed']):<24} {value:>10.4g} {dec:>9} {margin:>8}  "
                     f"{runner}{extra}")
    lines.append(f"  {doc['passes']} screening passes ({doc['calibration']['tokens_per_pass']} tokens each), "
                 f"{doc['decision_passes']} decision passes ({doc['decision']['tokens_per_block']} tokens each); "
                 f"search stopped: {doc['stopped']}")
    lines.append(f"  margin: the plan's lead over the runner-up on the decision blocks in standard errors; below "
                 f"{Z_DROP:g}, the two are not separated by the tokens measured (either is as good)")
    return "\n".join(lines)
