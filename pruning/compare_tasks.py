"""Zero-shot accuracy columns of ``layershap compare --tasks``: every distinct model of a comparison through
lm-evaluation-harness once, the accuracy also as % of the dense model's ("% retained").

Example:
    >>> task_accuracy(doc, zeroshot, loaded, all_masks, progress=True)  # doctest: +SKIP
"""

from __future__ import annotations

import sys

import numpy as np
from tqdm.auto import tqdm

from layershap.core.masks import unique_rows
from layershap.oracle.loading import LoadedModel
from layershap.oracle.zeroshot import ZeroShot, accuracy

from .compare_report import with_retained


def task_accuracy(doc: dict, zeroshot: ZeroShot, loaded: LoadedModel, masks: np.ndarray, progress: bool) -> None:
    """Zero-shot accuracy of every distinct model (``masks[0]`` = dense) into ``doc``, relative to dense too.

    Example:
        >>> task_accuracy(doc, ZeroShot(["pydoc_mc"], "benchmarks/tasks"), loaded, all_masks, progress=False)  # doctest: +SKIP
        >>> doc["results"][0]["tasks"]          # acc, acc_norm, stderrs and % of dense retained per task  # doctest: +SKIP
    """
    distinct = unique_rows(masks)
    print(f"layershap compare: zero-shot {', '.join(zeroshot.names)} on {len(distinct)} distinct models ...",
          file=sys.stderr, flush=True)
    by_mask, run = {}, {}
    for m in tqdm(distinct, desc="zero-shot tasks", disable=not progress):
        results = zeroshot.evaluate(loaded.model, loaded.tokenizer, m)
        by_mask[m.tobytes()], run = accuracy(results, top_only=True), results
    dense = by_mask[masks[0].tobytes()]
    doc["tasks"] = {"names": list(dense), "task_dir": zeroshot.task_dir, "limit": zeroshot.limit,
                    "seed": zeroshot.seed, "batch_size": run["layershap"]["batch_size"],
                    "lm_eval_version": run.get("lm_eval_version"), "models_evaluated": len(distinct)}
    doc["full"]["tasks"] = with_retained(dense, dense)
    for r, mask in zip(doc["results"], masks[1:]):
        r["tasks"] = with_retained(by_mask[mask.tobytes()], dense)
