"""The calibration pass of a healing fit: sums of the dense model's activations around each removed span.

For each span ``(start, stop)`` hooks read, per calibration token, the output ``M`` of the carrier's ``branch``
(layer ``start - 1``), the carrier's output ``L_p`` and the span's last output ``L_e``, and accumulate in float64
``G = M^T M``, ``C = M^T D``, ``sum D`` and ``sum ||D||^2`` with ``D = L_e - L_p``: all a closed-form fit needs
(:mod:`.heal`), whatever the number of tokens. The forward pass stops after the last span's last layer.

Example:
    >>> stats, n_tokens = collect_statistics(model, windows, [(6, 10)], branch="post_feedforward_layernorm")  # doctest: +SKIP
    >>> stats[0]["G"].shape  # doctest: +SKIP
    torch.Size([640, 640])
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layershap.oracle.layers import find_layers


class _Stop(Exception):
    """Raised by the last hook: nothing after the last span is needed."""


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def collect_statistics(model: nn.Module, windows: np.ndarray | torch.Tensor, spans: list[tuple[int, int]],
                       branch: str, batch_size: int = 4, progress: bool = True) -> tuple[list[dict], int]:
    """Per span, float64 sums over calibration tokens of the dense model: ``G = M^T M``, ``C = M^T D``,
    ``sum D`` and ``sum ||D||^2``; also the token count. One forward per batch, stopped after the last span."""
    handle = find_layers(model)
    ids = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    device = next(model.parameters()).device
    skip_first = ids.shape[1] > 1 and bool((ids[:, 0] == ids[0, 0]).all())
    stats = [None] * len(spans)
    current: dict[int, dict] = {}
    hooks = []

    def tokens(x: torch.Tensor) -> torch.Tensor:
        x = x[:, 1:] if skip_first else x
        return x.reshape(-1, x.shape[-1]).to(torch.float64)

    def add(k: int, m: torch.Tensor, d: torch.Tensor) -> None:
        if stats[k] is None:
            size = m.shape[1]
            stats[k] = {"G": torch.zeros(size, size, dtype=torch.float64), "C": torch.zeros(size, size,
                        dtype=torch.float64), "sum_d": torch.zeros(size, dtype=torch.float64), "sum_dd": 0.0}
        s = stats[k]
        m, d = m.cpu(), d.cpu()
        s["G"] += m.T @ m
        s["C"] += m.T @ d
        s["sum_d"] += d.sum(0)
        s["sum_dd"] += float((d * d).sum())

    last_span = len(spans) - 1
    for k, (start, stop) in enumerate(spans):
        carrier = handle.layers[start - 1]

        def on_branch(module, args, out, k=k):
            current.setdefault(k, {})["M"] = tokens(_first(out).detach())

        def on_carrier(module, args, out, k=k):
            current[k]["L"] = tokens(_first(out).detach())

        def on_end(module, args, out, k=k):
            c = current.pop(k)
            add(k, c["M"], tokens(_first(out).detach()) - c["L"])
            if k == last_span:
                raise _Stop

        hooks += [getattr(carrier, branch).register_forward_hook(on_branch),
                  carrier.register_forward_hook(on_carrier),
                  handle.layers[stop - 1].register_forward_hook(on_end)]
    try:
        batches = range(0, ids.shape[0], batch_size)
        with torch.inference_mode():
            for b in tqdm(batches, desc="healing: calibration", disable=not progress, leave=False):
                with contextlib.suppress(_Stop):
                    handle.parent(input_ids=ids[b:b + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    n_tokens = ids.shape[0] * (ids.shape[1] - int(skip_first))
    return stats, n_tokens
