"""Masked evaluation: mean token NLL (log-perplexity) of a causal LM with chosen layers skipped.

Fast path, same numbers as a plain Hugging Face forward with ``labels=`` per mask:

- **prefix sharing** (:mod:`.prefix`): masks that keep the same first layers share the hidden states after them;
  a batch of masks is walked depth-first over its kept-layer trie and shared prefix states are cached within
  ``cache_mb``;
- **no full logits**: the loss is computed in (token x vocabulary) tiles straight from the final hidden states
  (output head, optional logit soft-capping, online log-sum-exp over vocabulary chunks, target-logit gather), so
  the (tokens x vocabulary) logits tensor is never built; each head weight chunk is read once per token chunk;
- **no host synchronisation per mask**: sums stay on the device; one ``.cpu()`` per :meth:`MaskedEvaluator.measure`;
- **per-window values** (:class:`Measurement`), so a comparison of two masks can be paired window by window;
- the **KL utility** (``utility="kl"``): divergence to the dense model's next-token distributions, from the same
  head pass (:mod:`.head_loss`).

Example:
    >>> ev = MaskedEvaluator(model, windows)          # windows: int64[W, L], BOS already prepended  # doctest: +SKIP
    >>> ev.nll(np.ones((1, ev.n_layers), bool))       # float64[1], nats per predicted token  # doctest: +SKIP
    >>> ev.measure(masks).nll.shape                   # (k, W): per-window means  # doctest: +SKIP
    >>> MaskedEvaluator(model, windows, utility="kl").loss(masks)   # mean KL to the dense model, nats/token  # doctest: +SKIP
    >>> ev(masks)                                     # value function: -loss, higher = better  # doctest: +SKIP
    >>> MaskedEvaluator(model, windows, players="sublayers").n_layers   # 2 x decoder layers: attention, MLP  # doctest: +SKIP

(Over 300 lines: the plain and prefix-sharing paths, the tiled head and the KL reference share one evaluator's
state — windows, batches, tiles, players — and read best together.)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from layershap.core.errors import LayershapError, NonFiniteLossError
from layershap.core.masks import check_masks

from .families import text_config
from .head_loss import HeadPass, KLReference, logits_at, tiled_head_pass, token_kl
from .layers import find_layers, skip_layers
from .measurement import DEFAULT_TOP_K, KINDS, UTILITIES, Measurement
from .positions import position_limit
from .prefix import PrefixRunner, plan_prefix_runs
from .sublayers import check_players, skip_sublayers, unit_masks, unit_modules

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


def token_nll_generic(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                      chunk_tokens: int) -> torch.Tensor:
    """Per-token -log p(target), ``float32[T]``, for any head module (called on token chunks; full logits each).

    Example:
        >>> token_nll_generic(model.lm_head, hidden, targets, None, 128)   # float32[T]  # doctest: +SKIP
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[start : start + chunk_tokens]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        tgt = targets[start : start + chunk_tokens]
        out[start : start + logits.shape[0]] = torch.logsumexp(logits, dim=1) - logits.gather(1, tgt[:, None])[:, 0]
    return out


class MaskedEvaluator:
    """Evaluates layer masks of one model on fixed token windows (common random numbers for all masks).

    ``utility``: ``nll`` (mean token NLL of the text) or ``kl`` (mean token KL divergence of the dense model's
    next-token distribution to the masked model's, the dense one kept as its ``top_k`` log-probabilities plus the
    rest: :mod:`.head_loss`); both are measured per window (:meth:`measure`), and the NLL always comes along.

    Keyword options (defaults suit CPU float32 and CUDA bfloat16 alike):
        prefix_sharing: share hidden states of common kept-layer prefixes within one :meth:`measure` call.
        cache_mb: prefix-cache budget in MiB (default 512 on CPU, 2048 on CUDA); 0 disables caching.
        token_chunk / vocab_chunk: loss tile size (tokens x vocabulary entries); ``vocab_chunk=None`` with
            ``token_chunk`` set gives the generic token-chunk path (NLL only).
        players: ``blocks`` (a mask entry per decoder layer) or ``sublayers`` (attention and MLP, :mod:`.sublayers`);
            ``n_layers`` is the mask width (the game's player count), ``n_blocks`` the decoder layer count.

    ``last_stats`` after each :meth:`measure`: layer forwards run and those a plain path would run (per window
    batch), cache slots and peak cache bytes.
    """

    def __init__(
        self,
        model: nn.Module,
        windows: torch.Tensor | np.ndarray,
        batch_size: int = 4,
        device: torch.device | str | None = None,
        *,
        utility: str = "nll",
        top_k: int = DEFAULT_TOP_K,
        prefix_sharing: bool = True,
        cache_mb: float | None = None,
        token_chunk: int | None = None,
        vocab_chunk: int | None = None,
        players: str = "blocks",
        weights: torch.Tensor | np.ndarray | None = None,
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
        limit = position_limit(model)
        if limit is not None and self.windows.shape[1] > limit:
            raise LayershapError(
                f"windows of {self.windows.shape[1]} tokens (BOS included) exceed the {limit} positions this model "
                f"can attend over (max_position_embeddings); use a window length (--seq-len / --eval-seq-len) of at "
                f"most {limit - 1} tokens"
            )
        for name, value in (("token_chunk", token_chunk), ("vocab_chunk", vocab_chunk)):
            if value is not None and value < 1:
                raise LayershapError(f"{name} must be >= 1 (or None for the default), got {value}")
        if cache_mb is not None and cache_mb < 0:
            raise LayershapError(f"cache_mb must be >= 0 (0 disables the prefix cache), got {cache_mb}")
        if utility not in KINDS:
            raise LayershapError(f"unknown utility {utility!r}; use one of {', '.join(KINDS)}")
        if (utility == "task") != (weights is not None):
            raise LayershapError("the task utility measures weighted answer tokens: give weights with "
                                 "utility='task', and no weights with nll or kl")
        self.batch_size = batch_size
        self.players, self.n_blocks = check_players(players), find_layers(model).n_layers
        # Sublayer game: the three units per layer a run can hold (unsupported families refused here).
        self._units = unit_modules(model) if players == "sublayers" else None
        self.n_layers = self.n_blocks * (2 if self._units is not None else 1)
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
        self.utility = utility
        if utility == "kl":
            if not self.linear_head:
                raise LayershapError("the kl utility needs the model's linear output head and the tiled loss path; "
                                     "leave token_chunk/vocab_chunk at their defaults")
            if top_k < 1:
                raise LayershapError(f"top_k must be >= 1 (dense log-probabilities kept per token), got {top_k}")
        self.top_k = min(int(top_k), int(vocab))  # a vocabulary smaller than top_k is kept whole: the exact KL
        self.n_windows = int(self.windows.shape[0])
        self.n_tokens = self.n_windows * (self.windows.shape[1] - 1)
        self._ids = self.windows.to(self.device)  # moved once; batches are views
        layer_param = next(find_layers(model).layers[0].parameters(), None)
        itemsize = (layer_param.dtype if layer_param is not None else torch.float32).itemsize
        if getattr(config, "residual_in_fp32", False):  # Mamba blocks hand float32 residuals to the next block
            itemsize = max(itemsize, torch.float32.itemsize)
        self.slot_bytes = min(batch_size, self.windows.shape[0]) * self.windows.shape[1] * config.hidden_size * itemsize
        self.weights = None  # task utility: float32[W, L - 1], 1 where a position predicts an answer token
        if weights is not None:
            w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
            if tuple(w.shape) != (self.n_windows, self.windows.shape[1] - 1):
                raise LayershapError(f"weights must be float[W, L - 1] = {(self.n_windows, self.windows.shape[1] - 1)}"
                                     f" for windows of shape {tuple(self.windows.shape)}; got {tuple(w.shape)}")
            self.weights = w.to(self.device)
        self._reference: list[KLReference] | None = None  # per window batch, built on the first KL measurement
        self.last_stats: dict[str, int] = {}

    def _batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for b, start in enumerate(range(0, self._ids.shape[0], self.batch_size)):
            yield b, self._ids[start : start + self.batch_size]

    def _flat(self, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final states of the predicting positions ``[B*(L-1), H]`` (in the head's own dtype, as the models'
        forwards cast: Mamba's final norm returns float32 residuals) and their targets, on the head's device."""
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(self.head_device, self.head_dtype)
        return flat, ids[:, 1:].reshape(-1).to(self.head_device)

    def reference(self) -> list[KLReference]:
        """The dense model's top-k next-token distributions per window batch (one full-model pass, kept)."""
        if self._reference is None:
            refs = []
            full = np.ones(self.n_blocks, dtype=bool)
            for _, ids in self._batches():
                with skip_layers(self.model, full):  # as every mask runs (e.g. RWKV's blocks unrescaled)
                    hidden = self.backbone(input_ids=ids, use_cache=False).last_hidden_state
                flat, targets = self._flat(hidden, ids)
                dense = tiled_head_pass(self.head.weight, self.head.bias, flat, targets, self.softcap,
                                        self.token_chunk, self.vocab_chunk, top_k=self.top_k)
                refs.append(KLReference.from_dense(self.head.weight, self.head.bias, flat, dense, self.softcap))
            self._reference = refs
        return self._reference

    def _token_losses(self, flat: torch.Tensor, targets: torch.Tensor,
                      ref: KLReference | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token NLL ``float32[T]`` and, with a reference, per-token KL."""
        if not self.linear_head:
            return token_nll_generic(self.head, flat, targets, self.softcap, self.token_chunk), None
        out: HeadPass = tiled_head_pass(self.head.weight, self.head.bias, flat, targets, self.softcap,
                                        self.token_chunk, self.vocab_chunk)
        if ref is None:
            return out.nll, None
        return out.nll, token_kl(ref, logits_at(self.head.weight, self.head.bias, flat, ref.idx, self.softcap),
                                 out.lse)

    def _add(self, sums: list[torch.Tensor | None], rows: list[int], batch: int, windows: int,
             nll: torch.Tensor, kl: torch.Tensor | None) -> None:
        """Add per-token losses of ``len(rows)`` masks (stacked) to their per-window sums (device-side adds)."""
        start = batch * self.batch_size
        for values, total in ((nll, sums[0]), (kl, sums[1])):
            if values is None:
                continue
            values = values.view(len(rows), windows, -1)
            if self.weights is not None:  # the task utility: answer tokens only, summed per question
                values = values * self.weights[start : start + windows].to(values.device)
            per_window = values.sum(dim=2, dtype=torch.float64).to(self.device)
            for j, row in enumerate(rows):  # a host->device index tensor would synchronise on CUDA
                total[row, start : start + windows] += per_window[j]

    def _sums(self, k: int) -> list[torch.Tensor | None]:
        def zeros() -> torch.Tensor:
            return torch.zeros((k, self.n_windows), dtype=torch.float64, device=self.device)

        return [zeros(), zeros() if self.utility == "kl" else None]

    def _measure_plain(self, arr: np.ndarray) -> list[torch.Tensor | None]:
        refs = self.reference() if self.utility == "kl" else None
        sums = self._sums(len(arr))
        for i, mask in enumerate(arr):
            with (skip_sublayers if self._units is not None else skip_layers)(self.model, mask):
                for b, ids in self._batches():
                    flat, targets = self._flat(self.backbone(input_ids=ids, use_cache=False).last_hidden_state, ids)
                    losses = self._token_losses(flat, targets, refs[b] if refs else None)
                    self._add(sums, [i], b, ids.shape[0], *losses)
        runs = int((unit_masks(arr) if self._units is not None else arr).sum())  # decoder-layer forwards
        self.last_stats = {"layer_runs": runs, "plain_layer_runs": runs,
                           "slots": 0, "peak_cache_bytes": 0}
        return sums

    def _measure_shared(self, arr: np.ndarray) -> list[torch.Tensor | None]:
        refs = self.reference() if self.utility == "kl" else None
        # Sublayer masks share prefixes over their units (a whole layer, its attention only, its MLP only).
        units = unit_masks(arr) if self._units is not None else arr
        plan = plan_prefix_runs(units, max_slots=self.cache_bytes // self.slot_bytes)
        runner = PrefixRunner(self.model, self.cache_bytes, units=self._units)
        sums = self._sums(len(plan.unique))
        for b, ids in self._batches():
            runner.reset()
            ref = refs[b] if refs else None
            per_mask = ids.shape[0] * (ids.shape[1] - 1)
            # Several masks' final states share one head pass: taller tiles, each weight chunk read once.
            group = max(1, self.token_chunk // per_mask) if self.linear_head else 1
            pending: list[torch.Tensor] = []
            rows: list[int] = []
            for step in plan.steps:
                pending.append(runner.run(step, ids))
                rows.append(step.row)
                if len(pending) == group:
                    self._flush(pending, rows, b, ids, ref, sums)
            if pending:
                self._flush(pending, rows, b, ids, ref, sums)
        runner.reset()
        self.last_stats = {"layer_runs": plan.layer_runs, "plain_layer_runs": int(units.sum()),
                           "slots": plan.max_slots, "peak_cache_bytes": runner.peak_bytes}
        index = torch.as_tensor(plan.inverse, device=self.device)
        return [None if total is None else total[index] for total in sums]

    def _flush(self, pending: list[torch.Tensor], rows: list[int], batch: int, ids: torch.Tensor,
               ref: KLReference | None, sums: list[torch.Tensor | None]) -> None:
        """Losses of the buffered final states of ``rows`` in one head pass; empties the buffers."""
        parts = [self._flat(hidden, ids) for hidden in pending]
        flat = torch.cat([f for f, _ in parts])
        targets = torch.cat([t for _, t in parts])
        stacked = None if ref is None else KLReference(*(torch.cat([x] * len(parts)) for x in
                                                         (ref.idx, ref.logp, ref.log_tail)))
        self._add(sums, rows, batch, ids.shape[0], *self._token_losses(flat, targets, stacked))
        pending.clear()
        rows.clear()

    def measure(self, masks: np.ndarray | torch.Tensor) -> Measurement:
        """Per-window mean token losses of each mask (:class:`Measurement`: ``nll`` and, for ``kl``, ``kl``).

        An all-False mask runs embeddings -> final norm -> head; a model that cannot do that raises.
        """
        arr = check_masks(masks, self.n_layers)
        per_window = self.windows.shape[1] - 1 if self.weights is None else 1  # a token mean; a question's sum
        with torch.inference_mode():
            sums = self._measure_shared(arr) if self.prefix_sharing else self._measure_plain(arr)
            values = [None if total is None else (total / per_window).cpu().numpy() for total in sums]
        for name, got in zip(UTILITIES, values):
            if got is not None and not np.isfinite(got).all():
                bad = sorted({int(i) for i in np.flatnonzero(~np.isfinite(got).all(axis=1))})
                raise NonFiniteLossError(
                    f"non-finite {name} for masks at rows {bad}: the model diverged on them (inf/nan activations); "
                    "nothing was stored for them — check the model's weights/dtype or leave those masks out"
                )
        return Measurement(values[0], values[1])

    def nll(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mean NLL in nats per predicted token for each mask: ``float64[k]``."""
        return self.measure(masks).loss("nll")

    def loss(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """The utility's mean loss per mask (NLL, or KL to the dense model), ``float64[k]``; lower is better."""
        return self.measure(masks).loss(self.utility)

    def __call__(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Value function for Shapley estimators: ``-loss`` (higher = better)."""
        return -self.loss(masks)
