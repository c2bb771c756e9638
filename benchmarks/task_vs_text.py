"""A task's plans against the text's plans: do they agree, and what does each cost on the other?

On the embedded default (Gemma-3-270M, 18 layers), for K = 1..4 removed layers:
- **text plans**: the main job's verified plans (``plans.json`` in ``--text-plans``, default the committed
  ``artifacts/gemma-3-270m``), chosen on the builtin text (Python's reference documentation);
- **task plans**: ``layershap plan --utility task:benchmarks/tasks/pydoc_mc_plan.yaml`` (into ``--task-plans``;
  made there when missing), chosen on the mean NLL of the correct answers of pydoc_mc's even-id questions.

Both are judged on what neither saw: held-out text perplexity (GPL-3, Vim manual, CPython's email essay;
4 x 256 tokens each) and, on pydoc_mc's odd-id questions (``pydoc_mc_check``, 71 questions), zero-shot accuracy
through lm-eval (acc and acc_norm with standard errors) and the mean NLL of the correct answer.

Example:
    $ python benchmarks/task_vs_text.py          # ~25 min on 2 CPU cores when the task plans are made too
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from common import HELDOUT, heldout_nll, heldout_text

from layershap.core.masks import masks_from_removed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.task_utility import answer_windows
from layershap.oracle.tasks import load_choice_task
from layershap.oracle.text import eval_windows
from layershap.oracle.zeroshot import ZeroShot, accuracy

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "benchmarks" / "tasks"


def plans_of(folder: Path) -> dict[int, list[int]]:
    doc = json.loads((folder / "plans.json").read_text())
    return {int(p["k"]): [int(i) for i in p["removed"]] for p in doc["plans"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--text-plans", type=Path, default=ROOT / "artifacts" / "gemma-3-270m")
    p.add_argument("--task-plans", type=Path, default=ROOT / "benchmarks" / "data" / "task_vs_text" / "pydoc")
    p.add_argument("--plan-task", default="pydoc_mc_plan", help="task the task plans are made for")
    p.add_argument("--check-task", default="pydoc_mc_check", help="task both are judged on")
    p.add_argument("--remove", default="1,2,3,4")
    p.add_argument("--heldout", default="gpl3,vim,email")
    args = p.parse_args()
    ks = [int(k) for k in args.remove.split(",")]
    if not (args.task_plans / "plans.json").is_file():
        subprocess.run([sys.executable, "-m", "layershap", "plan", "--model", args.model, "--utility",
                        f"task:{TASKS / (args.plan_task + '.yaml')}", "--remove", args.remove,
                        "--out", str(args.task_plans), "--no-progress"], check=True)
    text_plans, task_plans = plans_of(args.text_plans), plans_of(args.task_plans)
    loaded = load_model(args.model, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    n = model.config.num_hidden_layers
    names = args.heldout.split(",")
    texts = {h: eval_windows(tok, heldout_text(h).text, 256, 4) for h in names}
    check = load_choice_task(args.check_task, tok, task_dir=TASKS)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers = answer_windows(check.items, pad)
    answer_ev = MaskedEvaluator(model, answers.ids, batch_size=4, utility="task", weights=answers.weights)
    zero_shot = ZeroShot([args.check_task], task_dir=str(TASKS))

    def judge(removed: list[int]) -> str:
        mask = masks_from_removed([removed], n)[0]
        ppl = heldout_nll(model, texts, mask)
        acc = accuracy(zero_shot.evaluate(model, tok, mask=mask))[args.check_task]
        nll = float(answer_ev.loss(mask[None, :])[0])
        return (f"{' / '.join(f'{math.exp(ppl[h]):.1f}' for h in names):<22} "
                f"{100 * acc['acc']:>5.1f} ± {100 * acc['acc_stderr']:<4.1f} "
                f"{100 * acc['acc_norm']:>5.1f} ± {100 * acc['acc_norm_stderr']:<4.1f} {nll:>7.3f}")

    print(f"{loaded.model_id}: {n} layers; text plans from {args.text_plans} (builtin text), task plans from "
          f"{args.task_plans} ({args.plan_task}); judged on held-out {', '.join(f'{h} ({HELDOUT[h][1]})' for h in names)}"
          f" (4 x 256 tokens each) and {args.check_task} ({len(check.items)} questions neither plan saw)")
    print(f"{'K':>2} {'plan':<6} {'removed':<16} {'held-out ppl ' + '/'.join(names):<22} {'acc %':>12} "
          f"{'acc_norm %':>12} {'ans NLL':>7}")
    print(f"{0:>2} {'dense':<6} {'{}':<16} {judge([])}", flush=True)
    agree = 0
    for k in ks:
        same = text_plans[k] == task_plans[k]
        agree += same
        for label, plan in (("text", text_plans[k]), ("task", task_plans[k])):
            if label == "task" and same:
                print(f"{k:>2} {'task':<6} {'(the same set)':<16}")
                continue
            removed = "{" + ", ".join(map(str, plan)) + "}"
            print(f"{k:>2} {label:<6} {removed:<16} {judge(plan)}", flush=True)
    print(f"the text and task plans agree at {agree} of {len(ks)} K; overlap of the sets: "
          + ", ".join(f"K={k}: {len(set(text_plans[k]) & set(task_plans[k]))}/{k}" for k in ks))
    print("chance accuracy is 25 %; ans NLL: mean NLL of the correct answer (nats per question), lower is better")


if __name__ == "__main__":
    main()
