"""Heal a depth-pruned model by distillation: LoRA adapters on the kept layers next to each removed span,
trained to match the dense model's next-token distributions, then merged into the weights.

The student is the pruned model; the teacher is the dense one, run on the same calibration windows. The loss is
the mean token KL divergence KL(teacher || student) of the next-token distributions. LoRA (peft, rank
``lora_rank``) sits on every linear projection of the kept layers that border a removed span (the layer before
it and the layer after it); training runs a bounded number of steps with Lightning (AdamW, a progress bar), and
the adapters are merged, so the result is a standard model of the pruned architecture on every family.

Example:
    >>> student = distill(dense, windows, removed=[6, 7, 8, 9], steps=100)   # a pruned, merged copy  # doctest: +SKIP
    >>> student.save_pretrained("distilled/")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layershap.core.errors import LayershapError, MissingPackageError
from layershap.core.jsonio import write_json
from layershap.oracle.layers import find_layers
from layershap.oracle.prune import PRUNE_INFO_FILE, check_out_dir, prune_model

from .heal import removed_spans

DISTILL_PIP = "pip install 'layershap[heal]'  (or: pip install peft)"


def bordering_layers(removed: Sequence[int], n_layers: int) -> list[int]:
    """Indices, in the pruned model, of the kept layers just before and just after each removed span.

    Example:
        >>> bordering_layers([6, 7, 8, 9], 18)       # original layers 5 and 10
        [5, 6]
    """
    keep = np.ones(n_layers, bool)
    keep[list(removed)] = False
    new = np.cumsum(keep) - 1
    found = set()
    for start, stop in removed_spans(removed, n_layers):
        found |= {int(new[i]) for i in (start - 1, stop) if 0 <= i < n_layers}
    return sorted(found)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def distillation_kl(teacher: nn.Module, student: nn.Module, windows: torch.Tensor, batch_size: int = 2) -> float:
    """Mean token KL(teacher || student) over ``windows`` (no gradients)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, windows.shape[0], batch_size):
            ids = windows[b:b + batch_size]
            kl = _kl(teacher(input_ids=ids, use_cache=False).logits, student(input_ids=ids, use_cache=False).logits)
            total, count = total + float(kl) * ids.shape[0], count + ids.shape[0]
    return total / count


def distill(dense: nn.Module, windows: np.ndarray | torch.Tensor, removed: Sequence[int], steps: int = 100,
            lr: float = 1e-4, lora_rank: int = 8, batch_size: int = 2, seed: int = 0,
            progress: bool = True) -> tuple[nn.Module, dict]:
    """A pruned copy of ``dense`` (``removed`` deleted) distilled for ``steps`` steps and merged; also a record
    (steps, KL before and after on the calibration windows, seconds). ``dense`` itself is left unchanged.

    Example:
        >>> student, record = distill(model, windows, [7, 8], steps=50)  # doctest: +SKIP
        >>> record["kl_after"] < record["kl_before"]  # doctest: +SKIP
    """
    try:
        import lightning as L
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise MissingPackageError(f"distill needs peft: {DISTILL_PIP}") from err
    if steps < 1 or lora_rank < 1:
        raise LayershapError(f"distill needs --steps >= 1 and --lora-rank >= 1, got {steps} and {lora_rank}")
    n_layers = find_layers(dense).n_layers
    removed = sorted(int(i) for i in removed)
    if not removed:
        raise LayershapError("no layer is removed: name the layers to remove (e.g. --layers 7,8)")
    start = time.perf_counter()
    ids = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    torch.manual_seed(seed)
    student = prune_model(copy.deepcopy(dense), np.isin(np.arange(n_layers), removed, invert=True))
    handle = find_layers(student)
    prefix = handle.path
    borders = bordering_layers(removed, n_layers)
    targets = sorted({name.rsplit(".", 1)[-1] for i in borders for name, m in handle.layers[i].named_modules()
                      if isinstance(m, nn.Linear)})
    pattern = rf"{re.escape(prefix)}\.({'|'.join(map(str, borders))})\..*({'|'.join(map(re.escape, targets))})"
    kl_before = distillation_kl(dense, student, ids, batch_size)
    for p in student.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(student, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                    target_modules=pattern))

    class _Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.student = peft_model

        def training_step(self, batch, batch_idx):
            (x,) = batch
            with torch.no_grad():
                teacher_logits = dense(input_ids=x, use_cache=False).logits
            loss = _kl(teacher_logits, self.student(input_ids=x, use_cache=False).logits)
            self.log("kl", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=lr)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                        deterministic=True)
    module = _Module()
    peft_model.train()
    trainer.fit(module, train_dataloaders=loader)
    merged = peft_model.merge_and_unload().eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    record = {"method": "distill", "steps": steps, "lr": lr, "lora_rank": lora_rank, "adapted_layers": borders,
              "kl_before": kl_before, "kl_after": distillation_kl(dense, merged, ids, batch_size),
              "calibration_tokens": int(ids.numel()), "seconds": round(time.perf_counter() - start, 3)}
    return merged, record


def save_distilled_model(student: nn.Module, tokenizer: Any | None, record: dict, removed: Sequence[int],
                         n_layers: int, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Save a :func:`distill` student (a standard model of the pruned architecture) with its tokenizer and
    ``layershap_prune.json`` (the pruning record plus ``"healing"``).

    Example:
        >>> save_distilled_model(student, tokenizer, record, [7, 8], 18, "distilled/")  # doctest: +SKIP
    """
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    kept = [i for i in range(n_layers) if i not in set(removed)]
    write_json(out / PRUNE_INFO_FILE, {"original_n_layers": n_layers, "removed_layers": sorted(removed),
                                       "kept_layers": kept, "n_layers": len(kept), "trust_remote_code": False,
                                       "healing": {**record, "saved_form": "merged"}, **(info or {})})
    return out
