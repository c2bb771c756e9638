"""Masked evaluation: mean token NLL (log-perplexity) of a causal LM with chosen layers skipped.

The loss is computed in token chunks straight from the final hidden states (output head, optional
logit soft-capping, log-softmax, gather), so the (tokens x vocabulary) logits tensor is never built.

Example:
    >>> ev = MaskedEvaluator(model, windows)          # windows: int64[W, L], BOS already prepended
    >>> ev.nll(np.ones((1, ev.n_layers), bool))       # float64[1], nats per predicted token
    >>> ev(masks)                                     # value function: -nll, higher = better
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .layers import check_masks, find_layers, skip_layers

# Largest logits chunk (tokens x vocab elements) materialised at once: 32M floats = 128 MB in float32.
LOGIT_CHUNK_ELEMENTS = 32 * 1024 * 1024


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA (DESIGN.md, oracle rules)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def token_nll_sum(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, chunk_tokens: int
) -> torch.Tensor:
    """Sum over tokens of -log p(target), from hidden states ``[T, H]`` and targets ``[T]``, in chunks."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[start : start + chunk_tokens]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        tgt = targets[start : start + chunk_tokens]
        picked = logits.gather(1, tgt[:, None])[:, 0]
        total += (torch.logsumexp(logits, dim=1) - picked).sum(dtype=torch.float64)
    return total


class MaskedEvaluator:
    """Evaluates layer masks of one model on fixed token windows (common random numbers for all masks)."""

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor | np.ndarray,
        batch_size: int = 4,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device if device is None else torch.device(device)
        self.windows = torch.as_tensor(np.asarray(windows), dtype=torch.long)
        if self.windows.ndim != 2 or self.windows.shape[1] < 2:
            raise ValueError(f"windows must be int[W, L] with L >= 2; got shape {tuple(self.windows.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.n_layers = find_layers(model).n_layers
        self.backbone = model.base_model
        self.head = model.get_output_embeddings()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        vocab = self.head.out_features
        self.chunk_tokens = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
        self.n_tokens = self.windows.shape[0] * (self.windows.shape[1] - 1)

    def _nll_one(self, mask: np.ndarray) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with skip_layers(self.model, mask):
            for start in range(0, self.windows.shape[0], self.batch_size):
                ids = self.windows[start : start + self.batch_size].to(self.device, non_blocking=True)
                hidden = self.backbone(input_ids=ids, use_cache=False).last_hidden_state
                flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
                total += token_nll_sum(self.head, flat, ids[:, 1:].reshape(-1), self.softcap, self.chunk_tokens)
        return total / self.n_tokens

    def nll(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mean NLL in nats per predicted token for each mask: ``float64[k]``.

        An all-False mask runs embeddings -> final norm -> head; a model that cannot do that raises.
        """
        arr = check_masks(masks, self.n_layers)
        with torch.inference_mode():
            out = torch.stack([self._nll_one(m) for m in arr])
        values = out.cpu().numpy()
        if not np.isfinite(values).all():
            bad = [i for i in range(len(values)) if not np.isfinite(values[i])]
            raise FloatingPointError(f"non-finite NLL for masks at rows {bad}: the model diverged on them")
        return values

    def __call__(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Value function for Shapley estimators: ``-nll`` (higher = better)."""
        return -self.nll(masks)
