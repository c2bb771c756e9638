"""``layershap compare``: layershap vs peer depth-pruning methods, held-out perplexity per method and K.

Methods: ShortGPT block influence, angular distance (Gromov et al.), leave-one-out (Shortened LLaMA), SLEB,
drop-last-k, random (several seeds), and layershap (lowest scores; surrogate-guided subset search). All choose
on the same calibration windows through the same oracle; all are scored on a different, held-out text.
Writes ``compare.json`` and ``compare.png`` (and, when it builds a surrogate, ``dataset.zarr``,
``surrogate/`` and ``scores.json``) into ``--out``; prints the table.

Example:
    $ layershap compare --model gemma-3-270m --calib-text builtin --eval-text heldout.txt --remove 1,2,3,4
    $ layershap compare --model ./llama --calib-text c4 --eval-text wikitext2 --remove 2,4,8 \\
        --surrogate runs/llama/surrogate --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path

from layershap.oracle.cli_evaluate import windows_arg
from layershap.oracle.cli_oracle import non_negative_int, positive_int

from .cli_prune import layer_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="gemma-3-270m (embedded default), a .gguf file, a local model directory or a hub id")
    parser.add_argument("--calib-text", required=True,
                        help="calibration text the methods choose layers on: builtin, .txt/.jsonl, c4, wikitext2")
    parser.add_argument("--eval-text", required=True, help="held-out evaluation text (must differ from --calib-text)")
    parser.add_argument("--remove", type=layer_list, required=True, metavar="K1,K2,...",
                        help="numbers of layers to remove, e.g. 1,2,3,4")
    parser.add_argument("--windows", type=positive_int, default=None,
                        help="calibration windows (default 4 on CPU, 16 on CUDA)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="calibration tokens per window (default 128 on CPU, 512 on CUDA)")
    parser.add_argument("--eval-windows", type=windows_arg, default=0, metavar="W|all",
                        help="consecutive evaluation windows from the start of the text (default 8 on CPU, 32 on CUDA)")
    parser.add_argument("--eval-seq-len", type=positive_int, default=None,
                        help="evaluation tokens per window (default 128 on CPU, 1024 on CUDA)")
    parser.add_argument("--surrogate", default=None, metavar="DIR",
                        help="trained surrogate of this model (`layershap train`); default: build one here on the "
                             "calibration windows with --budget stratified masks")
    parser.add_argument("--budget", type=positive_int, default=None,
                        help="masks measured for the surrogate built when --surrogate is not given "
                             "(default 64 on CPU, 256 on CUDA; includes the full model and leave-one-out masks)")
    parser.add_argument("--index", choices=("auto", "shapley", "semivalue", "banzhaf"), default="auto",
                        help="layer scores for 'layershap: lowest scores' (default auto: what the surrogate's data "
                             "cover, as in `layershap shapley`)")
    parser.add_argument("--top", type=positive_int, default=3,
                        help="subset-search candidates re-measured by the oracle per K (default 3)")
    parser.add_argument("--beam-width", type=positive_int, default=64,
                        help="beam width when C(n, K) > 1e6 removal sets (default 64)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="random-removal seeds (default 3)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the calibration windows, the masks and the surrogate training (default 0)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CUDA when available, else CPU (default auto)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="windows per forward pass (default 4 on CPU, 8 on CUDA)")
    parser.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, format_table, run_compare

    cfg = CompareConfig(
        model=args.model, calib_text=args.calib_text, eval_text=args.eval_text, ks=args.remove, out=Path(args.out),
        windows=args.windows, seq_len=args.seq_len,
        eval_windows=args.eval_windows or None, eval_seq_len=args.eval_seq_len,
        eval_all_windows=args.eval_windows is None,
        surrogate=args.surrogate, seeds=args.seeds, seed=args.seed, budget=args.budget, top=args.top,
        beam_width=args.beam_width, index=args.index, device=args.device, batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    doc = run_compare(cfg)
    print(format_table(doc))
    print(f"wrote {cfg.out / 'compare.json'}, {cfg.out / 'compare.png'}")
    return 0
