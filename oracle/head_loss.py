"""Token losses straight from final hidden states, without building the (tokens x vocabulary) logits tensor.

- :func:`tiled_head_pass`: per-token NLL and log-sum-exp through the output head in (token x vocabulary) tiles
  (online log-sum-exp over vocabulary chunks, target-logit gather; each logit computed exactly once), optionally
  the indices of each token's ``top_k`` largest logits;
- :class:`KLReference` and :func:`token_kl`: the divergence KL(dense || masked) of the next-token distributions,
  with the dense model's distribution kept as its ``top_k`` log-probabilities plus the mass of the rest (the tail
  as one outcome). Coarse-graining the tail can only lower a KL divergence, so this is a lower bound of the full
  KL that tends to it as ``top_k`` grows; at ``top_k = 512`` of a 262k vocabulary it keeps what decides which
  layers matter (``benchmarks/oracle_speed.py --utility kl`` and ``tests/oracle/test_kl.py`` measure the gap).

The masked model's logits at the reference indices are computed by one gather-matmul per token
(:func:`logits_at`), for the reference and the masked model alike, so the full model's KL to itself is exactly 0.

Example:
    >>> out = tiled_head_pass(head.weight, None, hidden, targets, None, 512, 4096, top_k=512)  # doctest: +SKIP
    >>> ref = KLReference.from_dense(head.weight, None, hidden, out, None)  # doctest: +SKIP
    >>> token_kl(ref, logits_at(head.weight, None, masked_hidden, ref.idx, None), masked_lse)   # float32[T]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Tokens per gather-matmul of :func:`logits_at`: top_k x hidden weights are gathered per token.
GATHER_TOKENS = 32


@dataclass
class HeadPass:
    """Per-token results of one tiled head pass: ``nll`` and ``lse`` float32[T]; ``top_idx`` int64[T, k] or None."""

    nll: torch.Tensor
    lse: torch.Tensor
    top_idx: torch.Tensor | None = None


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)


def tiled_head_pass(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    token_chunk: int,
    vocab_chunk: int,
    top_k: int = 0,
) -> HeadPass:
    """Per-token -log p(target) and log-sum-exp for a linear head ``logits = hidden @ weight.T + bias``, in tiles.

    Tiles are at most ``token_chunk x vocab_chunk`` logits (token chunks are evened out, since each one streams the
    whole head weight); log-sum-exp runs online over the vocabulary chunks (running max and rescaled sum in
    float32) and the target logit is gathered from the tile that holds it. With ``top_k`` the indices of each
    token's ``top_k`` largest logits are kept too (a running top-k over the chunks).

    Example:
        >>> tiled_head_pass(model.lm_head.weight, None, hidden, targets, None, 512, 4096).nll   # float32[T]  # doctest: +SKIP
    """
    vocab = weight.shape[0]
    n_tokens = hidden.shape[0]
    nll = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    top_idx = torch.empty((n_tokens, top_k), dtype=torch.long, device=hidden.device) if top_k else None
    n_chunks = max(1, -(-n_tokens // token_chunk))
    token_chunk = max(1, -(-n_tokens // n_chunks))
    for t0 in range(0, n_tokens, token_chunk):
        h = hidden[t0 : t0 + token_chunk]
        tgt = targets[t0 : t0 + token_chunk]
        rows = h.shape[0]
        run_max = torch.full((rows,), -torch.inf, dtype=torch.float32, device=h.device)
        run_sum = torch.zeros((rows,), dtype=torch.float32, device=h.device)
        picked = torch.zeros((rows,), dtype=torch.float32, device=h.device)
        best_val = torch.empty((rows, 0), dtype=torch.float32, device=h.device)
        best_idx = torch.empty((rows, 0), dtype=torch.long, device=h.device)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            logits = _softcapped(nn.functional.linear(h, weight[v0:v1], None if bias is None else bias[v0:v1])
                                 .float(), softcap)
            local = tgt - v0
            inside = (local >= 0) & (local < v1 - v0)
            got = logits.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0]
            picked += torch.where(inside, got, torch.zeros_like(got))
            if top_k:
                vals = torch.cat([best_val, logits], dim=1)
                idx = torch.cat([best_idx, torch.arange(v0, v1, device=h.device).expand(rows, -1)], dim=1)
                best_val, pos = vals.topk(min(top_k, vals.shape[1]), dim=1)
                best_idx = idx.gather(1, pos)
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            run_sum.mul_(torch.exp(run_max - new_max))
            run_sum += logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            run_max = new_max
        lse[t0 : t0 + rows] = run_max + torch.log(run_sum)
        nll[t0 : t0 + rows] = lse[t0 : t0 + rows] - picked
        if top_k:
            if best_idx.shape[1] < top_k:
                raise ValueError(f"top_k={top_k} is larger than the vocabulary ({vocab})")
            top_idx[t0 : t0 + rows] = best_idx
    return HeadPass(nll, lse, top_idx)


def tiled_token_nll(weight, bias, hidden, targets, softcap, token_chunk, vocab_chunk) -> torch.Tensor:
    """Per-token -log p(target), ``float32[T]`` (:func:`tiled_head_pass` without the rest).

    Example:
        >>> tiled_token_nll(model.lm_head.weight, None, hidden, targets, None, 512, 4096)   # float32[T]  # doctest: +SKIP
    """
    return tiled_head_pass(weight, bias, hidden, targets, softcap, token_chunk, vocab_chunk).nll


def logits_at(weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor, idx: torch.Tensor,
              softcap: float | None) -> torch.Tensor:
    """Each token's logits at its own vocabulary indices: ``float32[T, k]`` for ``idx`` int64[T, k].

    Example:
        >>> logits_at(head.weight, None, hidden, ref.idx, None).shape    # (T, top_k)  # doctest: +SKIP
    """
    out = torch.empty(idx.shape, dtype=torch.float32, device=hidden.device)
    for t0 in range(0, hidden.shape[0], GATHER_TOKENS):
        rows = idx[t0 : t0 + GATHER_TOKENS]
        picked = torch.einsum("tkh,th->tk", weight[rows], hidden[t0 : t0 + GATHER_TOKENS]).float()
        if bias is not None:
            picked += bias[rows].float()
        out[t0 : t0 + rows.shape[0]] = _softcapped(picked, softcap)
    return out


def _log_rest(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp))) per row: the log-probability of everything outside the kept indices."""
    return torch.log1p(-torch.exp(torch.logsumexp(logp, dim=1)).clamp(max=1.0)).clamp(min=-80.0)


@dataclass
class KLReference:
    """The dense model's next-token distributions on some tokens: top-k indices ``idx`` int64[T, k], their
    log-probabilities ``logp`` float32[T, k], and the log-probability of all other tokens ``log_tail`` float32[T]."""

    idx: torch.Tensor
    logp: torch.Tensor
    log_tail: torch.Tensor

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor, dense: HeadPass,
                   softcap: float | None) -> KLReference:
        """From the dense model's final hidden states and their :func:`tiled_head_pass` (run with ``top_k``)."""
        if dense.top_idx is None:
            raise ValueError("the dense head pass was run without top_k")
        logp = logits_at(weight, bias, hidden, dense.top_idx, softcap) - dense.lse[:, None]
        return cls(dense.top_idx, logp, _log_rest(logp))

    def rows(self, start: int, stop: int) -> KLReference:
        """The reference of tokens ``start:stop``."""
        return KLReference(self.idx[start:stop], self.logp[start:stop], self.log_tail[start:stop])


def token_kl(ref: KLReference, logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """KL(dense || masked) per token, ``float32[T]``, from the masked model's logits at ``ref.idx`` and its
    log-sum-exp (the tail is one outcome on both sides).

    Example:
        >>> token_kl(ref, logits_at(w, None, hidden, ref.idx, None), head_pass.lse)  # doctest: +SKIP
    """
    logq = logits - lse[:, None]
    p = torch.exp(ref.logp)
    kept = (p * (ref.logp - logq)).sum(dim=1)
    p_tail = torch.exp(ref.log_tail)
    tail = torch.where(p_tail > 0, p_tail * (ref.log_tail - _log_rest(logq)), torch.zeros_like(p_tail))
    return kept + tail
