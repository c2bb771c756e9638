"""The comparison of :mod:`layershap.pruning.compare` for people: per-method table and perplexity plot, and
(with ``--tasks``) zero-shot accuracy per method with the share of the dense model's accuracy it retains.

Example:
    >>> print(format_table(doc)); plot_compare(doc, Path("runs/compare/compare.png"))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("acc", "acc_norm")


def _ratio(value: float | None, dense: float | None) -> float | None:
    return None if value is None or not dense else 100.0 * value / dense


def with_retained(acc: dict[str, dict], dense: dict[str, dict]) -> dict[str, dict]:
    """Per task: ``acc`` and ``acc_norm`` (with stderr and n) plus ``<metric>_retained_pct`` = 100 x / dense.

    Example:
        >>> with_retained({"t": {"acc": 0.3, "acc_norm": 0.2}}, {"t": {"acc": 0.4, "acc_norm": 0.4}})["t"]
        {'acc': 0.3, 'acc_norm': 0.2, 'acc_retained_pct': 75.0, 'acc_norm_retained_pct': 50.0}
    """
    out = {}
    for task, row in acc.items():
        out[task] = dict(row) | {f"{m}_retained_pct": _ratio(row.get(m), dense[task].get(m)) for m in METRICS}
    return out


def mean_over_tasks(acc: dict[str, dict], dense: dict[str, dict]) -> dict[str, float | None]:
    """Mean ``acc`` / ``acc_norm`` over the tasks, and its % of the dense model's mean (the field's "retained").

    Example:
        >>> mean_over_tasks({"a": {"acc": 0.3}, "b": {"acc": 0.5}}, {"a": {"acc": 0.5}, "b": {"acc": 0.5}})["acc"]
        0.4
    """
    out: dict[str, float | None] = {}
    for m in METRICS:
        values = [acc[t].get(m) for t in acc]
        base = [dense[t].get(m) for t in acc]
        ok = None not in values and None not in base and bool(values)
        out[m] = float(np.mean(values)) if ok else None
        out[f"{m}_retained_pct"] = _ratio(out[m], float(np.mean(base))) if ok else None
    return out


def _pass_text(passes: list[int]) -> str:
    return str(passes[0]) if len(set(passes)) == 1 else "/".join(str(p) for p in passes)


def method_order(results: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _mean_accuracy(at: list[dict], dense: dict) -> dict:
    """Accuracy of one method at one K (random: the mean over seeds), per task and over tasks, with % retained."""
    per_task = {t: {m: float(np.mean([r["tasks"][t][m] for r in at])) if all(r["tasks"][t][m] is not None
                                                                             for r in at) else None
                    for m in METRICS} for t in dense}
    return {"per_task": with_retained(per_task, dense), "mean": mean_over_tasks(per_task, dense)}


def summarize(doc: dict) -> list[dict]:
    """One row per method: mean perplexity per K (random: mean over seeds, with min/max), passes per K, and with
    tasks the mean accuracy per K (``acc``: per task and over tasks, with % of dense retained)."""
    rows = []
    for method in method_order(doc["results"]):
        rs = [r for r in doc["results"] if r["method"] == method]
        per_k = {}
        for k in doc["ks"]:
            at = [r for r in rs if r["k"] == k]
            ppl = [r["eval_ppl"] for r in at]
            per_k[k] = {"ppl": float(np.exp(np.mean([r["eval_nll"] for r in at]))) if len(at) > 1 else ppl[0],
                        "min": min(ppl), "max": max(ppl), "passes": max(r["oracle_passes"] for r in at),
                        "n": len(at)}
            if doc.get("tasks"):
                per_k[k]["acc"] = _mean_accuracy(at, doc["full"]["tasks"])
        rows.append({"method": method, "per_k": per_k})
    return rows


def format_table(doc: dict) -> str:
    """The comparison as a text table: held-out perplexity per method x K, and oracle passes per K."""
    ks = doc["ks"]
    rows = summarize(doc)
    labels = [r["method"] + (f" ({r['per_k'][ks[0]]['n']} seeds, geo-mean)" if r["per_k"][ks[0]]["n"] > 1 else "")
              for r in rows]
    name_w = max(len("method"), *(len(label) for label in labels)) + 2
    head = f"{'method':<{name_w}}" + "".join(f"{'K=' + str(k):>12}" for k in ks) + "   oracle passes (per K)"
    lines = [
        f"held-out perplexity after removing K of {doc['n_layers']} layers -- {doc['model_id']}",
        (f"calibration: {doc['calib']['text_id']} ({doc['calib']['n_windows']} x {doc['calib']['seq_len']} "
         f"tokens); evaluation: {doc['eval']['text_id']} ({doc['eval']['n_windows']} x {doc['eval']['seq_len']} "
         f"tokens); full model perplexity {doc['full']['eval_ppl']:.3f}"),
        head,
        "-" * len(head),
    ]
    for r, label in zip(rows, labels):
        cells = "".join(f"{_fmt_ppl(r['per_k'][k]['ppl']):>12}" for k in ks)
        lines.append(f"{label:<{name_w}}" + cells + "   " + _pass_text([r["per_k"][k]["passes"] for k in ks]))
    if doc.get("layershap"):
        ls = doc["layershap"]
        lines.append(f"layershap: {ls['index']} scores from {'a surrogate built here' if ls['built'] else ls['path']} "
                     f"on {ls['rows']} measured masks; subset search re-measures the top {doc['config']['top']}")
    lines.append(f"oracle: {doc['oracle_measured']} distinct calibration masks measured in total (shared between "
                 f"methods), {doc['eval_measured']} distinct pruned models evaluated on held-out text; "
                 f"{doc['seconds']:.0f} s")
    if doc.get("tasks"):
        lines += [""] + accuracy_table(doc, rows, [label.replace("geo-mean", "mean") for label in labels], name_w)
    return "\n".join(lines)


def accuracy_table(doc: dict, rows: list[dict], labels: list[str], name_w: int) -> list[str]:
    """Lines of the zero-shot blocks: per task (and over tasks) and metric, accuracy % and % of dense retained."""
    ks, full, names = doc["ks"], doc["full"]["tasks"], doc["tasks"]["names"]
    n_docs = ", ".join(f"{t} {full[t]['n']}" for t in names)
    lines = [(f"zero-shot accuracy (%) after removing K layers, in brackets the % of the dense model's accuracy "
              f"retained; documents: {n_docs}")]
    blocks = [(t, m) for t in names for m in METRICS] + ([(None, m) for m in METRICS] if len(names) > 1 else [])
    stderrs = [r["tasks"][t][m + "_stderr"] for r in doc["results"] for t in names for m in METRICS
               if r["tasks"][t].get(m + "_stderr") is not None]
    for task, m in blocks:
        if task is None:
            dense = mean_over_tasks(full, full)[m]
            title = f"mean {m} over {len(names)} tasks: dense model {_pct(dense)}"
        else:
            dense, se = full[task][m], full[task][m + "_stderr"]
            title = f"{task} {m}: dense model {_pct(dense)}" + (f" ± {100 * se:.1f}" if se is not None else "")
        lines += [title, f"{'method':<{name_w}}" + "".join(f"{'K=' + str(k):>15}" for k in ks)]
        for r, label in zip(rows, labels):
            cells = []
            for k in ks:
                acc = r["per_k"][k]["acc"]
                cell = acc["mean"] if task is None else acc["per_task"][task]
                cells.append(f"{_pct(cell[m])} ({_retained(cell[m + '_retained_pct'])})")
            lines.append(f"{label:<{name_w}}" + "".join(f"{c:>15}" for c in cells))
    if stderrs:
        lines.append(f"standard error of one accuracy: {100 * min(stderrs):.1f} to {100 * max(stderrs):.1f} points "
                     f"(lm-eval's, in compare.json)")
    return lines


def _pct(x: float | None) -> str:
    """An accuracy (a fraction) in percent, one decimal."""
    return "-" if x is None else f"{100 * x:.1f}"


def _retained(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _fmt_ppl(x: float) -> str:
    return f"{x:.3f}" if x < 1e4 else f"{x:.3g}"


def plot_compare(doc: dict, path: Path) -> Path:
    """PNG line plot: held-out perplexity (log scale) vs layers removed, one line per method; with tasks, two more
    panels: the % of the dense model's acc and acc_norm (mean over tasks) each method retains."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = [0] + list(doc["ks"])
    full = doc["full"]["eval_ppl"]
    tasks = bool(doc.get("tasks"))
    fig = Figure(figsize=(16, 4.8) if tasks else (7.5, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if tasks else 1, squeeze=False)[0]
    ax = axes[0]
    markers = "osD^vP<>X*"
    rows = summarize(doc)
    for i, r in enumerate(rows):
        y = [full] + [r["per_k"][k]["ppl"] for k in doc["ks"]]
        line, = ax.plot(ks, y, **_style(r["method"], i, markers))
        if r["per_k"][doc["ks"][0]]["n"] > 1:
            lo = [full] + [r["per_k"][k]["min"] for k in doc["ks"]]
            hi = [full] + [r["per_k"][k]["max"] for k in doc["ks"]]
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{doc['model_id']}: {doc['n_layers']} layers, eval {doc['eval']['text_id']}"[:90], fontsize=9)
    for ax_m, m in zip(axes[1:], METRICS):
        for i, r in enumerate(rows):
            y = [100.0] + [r["per_k"][k]["acc"]["mean"][f"{m}_retained_pct"] for k in doc["ks"]]
            ax_m.plot(ks, [np.nan if v is None else v for v in y], **_style(r["method"], i, markers))
        ax_m.axhline(100.0, color="grey", lw=0.8)
        ax_m.set_ylabel(f"{m}, % of the dense model's")
        names = ", ".join(doc["tasks"]["names"])
        ax_m.set_title(f"zero-shot {m} retained ({'mean over ' if len(doc['tasks']['names']) > 1 else ''}{names})"
                       [:90], fontsize=9)
    for a in axes:
        a.set_xticks(ks)
        a.set_xlabel("decoder layers removed")
        a.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _style(method: str, i: int, markers: str) -> dict:
    ours = method.startswith("layershap")
    return {"linestyle": "-" if ours else "--", "marker": markers[i % len(markers)], "label": method,
            "lw": 2.2 if ours else 1.2, "ms": 7 if ours else 5, "alpha": 0.9, "zorder": 3 if ours else 2}
