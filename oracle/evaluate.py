"""Masked evaluation: mean token NLL (log-perplexity) of a causal LM with chosen layers skipped.

Fast path, same numbers as a plain Hugging Face forward with ``labels=`` per mask:

- **prefix sharing** (:mod:`.prefix`): masks that keep the same first layers share the hidden states after them;
  a batch of masks is walked depth-first over its kept-layer trie and shared prefix states are cached within
  ``cache_mb``;
- **no full logits**: the loss is computed in (token x vocabulary) tiles straight from the final hidden states
  (output head, optional logit soft-capping, online log-sum-exp over vocabulary chunks, target-logit gather), so
  the (tokens x vocabulary) logits tensor is never built; each head weight chunk is read once per token chunk;
- **no host synchronisation per mask**: sums stay on the device; one ``.cpu()`` per :meth:`MaskedEvaluator.nll`.

Example:
    >>> ev = MaskedEvaluator(model, windows)          # windows: int64[W, L], BOS already prepended
    >>> ev.nll(np.ones((1, ev.n_layers), bool))       # float64[1], nats per predicted token
    >>> ev(masks)                                     # value function: -nll, higher = better
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from layershap.core.errors import LayershapError, NonFiniteLossError
from layershap.core.masks import check_masks

from .families import text_config
from .layers import find_layers, skip_layers
from .prefix import PrefixRunner, plan_prefix_runs

# Largest logits tile (tokens x vocab elements) materialised at once. Small tiles on CPU stay in cache.
TILE_ELEMENTS = {"cpu": 4 * 1024 * 1024, "cuda": 64 * 1024 * 1024}
# Vocabulary entries per head chunk (measured on a 2-core AVX2 CPU: 2048-4096 keep the head near matmul speed).
VOCAB_CHUNK = {"cpu": 2048, "cuda": 32768}
# Default prefix-cache budget in MiB.
CACHE_MB = {"cpu": 512.0, "cuda": 2048.0}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayershapError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise LayershapError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA (the oracle's dtypes)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def token_nll_sum(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, chunk_tokens: int
) -> torch.Tensor:
    """Sum over tokens of -log p(target), from hidden states ``[T, H]`` and targets ``[T]``, in token chunks.

    Works with any head module (it is called on each chunk).

    Example:
        >>> token_nll_sum(model.lm_head, hidden, targets, None, 128)   # float64 scalar tensor
    """
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[start : start + chunk_tokens]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        tgt = targets[start : start + chunk_tokens]
        picked = logits.gather(1, tgt[:, None])[:, 0]
        total += (torch.logsumexp(logits, dim=1) - picked).sum(dtype=torch.float64)
    return total


def tiled_token_nll(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    token_chunk: int,
    vocab_chunk: int,
) -> torch.Tensor:
    """Per-token -log p(target), ``float32[T]``, for a linear head ``logits = hidden @ weight.T + bias``, in tiles.

    Tiles are at most ``token_chunk x vocab_chunk`` logits (token chunks are evened out, since each one streams
    the whole head weight); log-sum-exp runs online over the vocabulary chunks (running max and rescaled sum in
    float32) and the target logit is gathered from the tile that holds it, so each logit is computed exactly
    once, as in the full-logits path.

    Example:
        >>> tiled_token_nll(model.lm_head.weight, None, hidden, targets, None, 512, 4096)   # float32[T]
    """
    vocab = weight.shape[0]
    n_tokens = hidden.shape[0]
    out = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    n_chunks = max(1, -(-n_tokens // token_chunk))
    token_chunk = max(1, -(-n_tokens // n_chunks))
    for t0 in range(0, n_tokens, token_chunk):
        h = hidden[t0 : t0 + token_chunk]
        tgt = targets[t0 : t0 + token_chunk]
        run_max = torch.full((h.shape[0],), -torch.inf, dtype=torch.float32, device=h.device)
        run_sum = torch.zeros((h.shape[0],), dtype=torch.float32, device=h.device)
        picked = torch.zeros((h.shape[0],), dtype=torch.float32, device=h.device)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            logits = nn.functional.linear(h, weight[v0:v1], None if bias is None else bias[v0:v1]).float()
            if softcap is not None:
                logits.div_(softcap).tanh_().mul_(softcap)
            local = tgt - v0
            inside = (local >= 0) & (local < v1 - v0)
            got = logits.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0]
            picked += torch.where(inside, got, torch.zeros_like(got))
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            run_sum.mul_(torch.exp(run_max - new_max))
            run_sum += logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            run_max = new_max
        out[t0 : t0 + h.shape[0]] = run_max + torch.log(run_sum) - picked
    return out


class MaskedEvaluator:
    """Evaluates layer masks of one model on fixed token windows (common random numbers for all masks).

    Keyword options (defaults suit CPU float32 and CUDA bfloat16 alike):
        prefix_sharing: share hidden states of common kept-layer prefixes within one :meth:`nll` call.
        cache_mb: prefix-cache budget in MiB (default 512 on CPU, 2048 on CUDA); 0 disables caching.
        token_chunk / vocab_chunk: loss tile size (tokens x vocabulary entries); ``vocab_chunk=None`` with
            ``token_chunk`` set gives the generic token-chunk path.

    ``last_stats`` after each :meth:`nll`: layer forwards run and those a plain path would run (per window
    batch), cache slots and peak cache bytes.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor | np.ndarray,
        batch_size: int = 4,
        device: torch.device | str | None = None,
        *,
        prefix_sharing: bool = True,
        cache_mb: float | None = None,
        token_chunk: int | None = None,
        vocab_chunk: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device if device is None else torch.device(device)
        self.windows = torch.as_tensor(np.asarray(windows), dtype=torch.long)
        if self.windows.ndim != 2 or self.windows.shape[1] < 2:
            raise LayershapError(
                f"windows must be int[W, L] with L >= 2; got shape {tuple(self.windows.shape)}"
            )
        if batch_size < 1:
            raise LayershapError(f"batch size must be >= 1, got {batch_size}")
        for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
            if value is not None and value < 1:
                raise LayershapError(f"{name} must be >= 1 (or None for the default), got {value}")
        if cache_mb is not None and cache_mb < 0:
            raise LayershapError(f"cache_mb must be >= 0 (0 disables the prefix cache), got {cache_mb}")
        self.batch_size = batch_size
        self.n_layers = find_layers(model).n_layers
        self.backbone = model.base_model
        self.head = model.get_output_embeddings()
        # A model sharded by a device map may keep its head on another GPU than the embeddings (self.device).
        head_weight = getattr(self.head, "weight", None)
        self.head_device = head_weight.device if head_weight is not None else self.device
        self.head_dtype = head_weight.dtype if head_weight is not None else None
        config = text_config(model)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        self.prefix_sharing = prefix_sharing
        self.cache_bytes = int((CACHE_MB[kind] if cache_mb is None else cache_mb) * 2**20)
        vocab = self.head.out_features if isinstance(self.head, nn.Linear) else config.vocab_size
        self.linear_head = isinstance(self.head, nn.Linear) and not (token_chunk is not None and vocab_chunk is None)
        self.vocab_chunk = min(vocab, vocab_chunk or VOCAB_CHUNK[kind]) if self.linear_head else vocab
        self.token_chunk = token_chunk or max(1, TILE_ELEMENTS[kind] // self.vocab_chunk)
        self.n_tokens = self.windows.shape[0] * (self.windows.shape[1] - 1)
        self._ids = self.windows.to(self.device)  # moved once; batches are views
        layer_param = next(find_layers(model).layers[0].parameters(), None)
        itemsize = (layer_param.dtype if layer_param is not None else torch.float32).itemsize
        if getattr(config, "residual_in_fp32", False):  # Mamba blocks hand float32 residuals to the next block
            itemsize = max(itemsize, torch.float32.itemsize)
        self.slot_bytes = min(batch_size, self.windows.shape[0]) * self.windows.shape[1] * config.hidden_size * itemsize
        self.last_stats: dict[str, int] = {}

    def _batches(self) -> Iterator[torch.Tensor]:
        for start in range(0, self._ids.shape[0], self.batch_size):
            yield self._ids[start : start + self.batch_size]

    def _loss_sum(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # the head's own dtype, as the models' forwards cast (Mamba's final norm returns float32 residuals)
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(self.head_device, self.head_dtype)
        targets = ids[:, 1:].reshape(-1).to(self.head_device)
        if self.linear_head:
            total = tiled_token_nll(self.head.weight, self.head.bias, flat, targets, self.softcap,
                                    self.token_chunk, self.vocab_chunk).sum(dtype=torch.float64)
        else:
            total = token_nll_sum(self.head, flat, targets, self.softcap, self.token_chunk)
        return total.to(self.device)

    def _nll_plain(self, arr: np.ndarray) -> torch.Tensor:
        totals = torch.zeros(len(arr), dtype=torch.float64, device=self.device)
        for i, mask in enumerate(arr):
            with skip_layers(self.model, mask):
                for ids in self._batches():
                    hidden = self.backbone(input_ids=ids, use_cache=False).last_hidden_state
                    totals[i] += self._loss_sum(hidden, ids)
        self.last_stats = {"layer_runs": int(arr.sum()), "plain_layer_runs": int(arr.sum()),
                           "slots": 0, "peak_cache_bytes": 0}
        return totals

    def _nll_shared(self, arr: np.ndarray) -> torch.Tensor:
        plan = plan_prefix_runs(arr, max_slots=self.cache_bytes // self.slot_bytes)
        runner = PrefixRunner(self.model, self.cache_bytes)
        totals = torch.zeros(len(plan.unique), dtype=torch.float64, device=self.device)
        for ids in self._batches():
            runner.reset()
            per_mask = ids.shape[0] * (ids.shape[1] - 1)
            group = max(1, self.token_chunk // per_mask) if self.linear_head else 1
            pending: list[torch.Tensor] = []
            rows: list[int] = []
            for step in plan.steps:
                hidden = runner.run(step, ids)
                if group == 1:
                    totals[step.row] += self._loss_sum(hidden, ids)
                    continue
                # Several masks' final states share one head pass: taller tiles, each weight chunk read once.
                pending.append(hidden[:, :-1].reshape(-1, hidden.shape[-1]))
                rows.append(step.row)
                if len(pending) == group:
                    self._flush_head(pending, rows, ids, totals)
            if pending:
                self._flush_head(pending, rows, ids, totals)
        runner.reset()
        self.last_stats = {"layer_runs": plan.layer_runs, "plain_layer_runs": int(arr.sum()),
                           "slots": plan.max_slots, "peak_cache_bytes": runner.peak_bytes}
        return totals[torch.as_tensor(plan.inverse, device=self.device)]

    def _flush_head(self, pending: list[torch.Tensor], rows: list[int], ids: torch.Tensor,
                    totals: torch.Tensor) -> None:
        """Loss of the buffered final states of ``rows`` in one tiled head pass; empties the buffers."""
        targets = ids[:, 1:].reshape(-1).repeat(len(pending)).to(self.head_device)
        token_nll = tiled_token_nll(self.head.weight, self.head.bias,
                                    torch.cat(pending).to(self.head_device, self.head_dtype),
                                    targets, self.softcap, self.token_chunk, self.vocab_chunk)
        sums = token_nll.view(len(pending), -1).sum(dim=1, dtype=torch.float64).to(self.device)
        for j, row in enumerate(rows):  # device-side adds; a host->device index tensor would synchronise on CUDA
            totals[row] += sums[j]
        pending.clear()
        rows.clear()

    def nll(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mean NLL in nats per predicted token for each mask: ``float64[k]``.

        An all-False mask runs embeddings -> final norm -> head; a model that cannot do that raises.
        """
        arr = check_masks(masks, self.n_layers)
        with torch.inference_mode():
            totals = self._nll_shared(arr) if self.prefix_sharing else self._nll_plain(arr)
            values = (totals / self.n_tokens).cpu().numpy()
        if not np.isfinite(values).all():
            bad = [i for i in range(len(values)) if not np.isfinite(values[i])]
            raise NonFiniteLossError(
                f"non-finite NLL for masks at rows {bad}: the model diverged on them (inf/nan activations); "
                "nothing was stored for them — check the model's weights/dtype or leave those masks out"
            )
        return values

    def __call__(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Value function for Shapley estimators: ``-nll`` (higher = better)."""
        return -self.nll(masks)
