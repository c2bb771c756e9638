"""The comparison of :mod:`layershap.pruning.compare` for people: per-method table and perplexity plot.

Example:
    >>> print(format_table(doc)); plot_compare(doc, Path("runs/compare/compare.png"))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pass_text(passes: list[int]) -> str:
    return str(passes[0]) if len(set(passes)) == 1 else "/".join(str(p) for p in passes)


def method_order(results: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def summarize(doc: dict) -> list[dict]:
    """One row per method: mean perplexity per K (random: mean over seeds, with min/max), passes per K."""
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
    return "\n".join(lines)


def _fmt_ppl(x: float) -> str:
    return f"{x:.3f}" if x < 1e4 else f"{x:.3g}"


def plot_compare(doc: dict, path: Path) -> Path:
    """PNG line plot: held-out perplexity (log scale) vs layers removed, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = [0] + list(doc["ks"])
    full = doc["full"]["eval_ppl"]
    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "osD^vP<>X*"
    for i, r in enumerate(summarize(doc)):
        y = [full] + [r["per_k"][k]["ppl"] for k in doc["ks"]]
        ours = r["method"].startswith("layershap")
        line, = ax.plot(ks, y, "-" if ours else "--", marker=markers[i % len(markers)], label=r["method"],
                        lw=2.2 if ours else 1.2, ms=7 if ours else 5, alpha=0.9, zorder=3 if ours else 2)
        if r["per_k"][doc["ks"][0]]["n"] > 1:
            lo = [full] + [r["per_k"][k]["min"] for k in doc["ks"]]
            hi = [full] + [r["per_k"][k]["max"] for k in doc["ks"]]
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_xticks(ks)
    ax.set_xlabel("decoder layers removed")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{doc['model_id']}: {doc['n_layers']} layers, eval {doc['eval']['text_id']}"[:90], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
