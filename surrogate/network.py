"""The surrogate's network as a plain ``torch.nn.Module`` (no Lightning needed to load or query it).

A mask enters as floats in {-1, +1} (removed = -1, kept = +1); the output is the standardized nll
``(nll - mean) / std``. The network is an MLP plus a linear skip path, so the additive part of the game
(one weight per layer) is learned directly and the hidden layers model the interactions. With an ``anchor``
(the measured full model's standardized nll) the network learns the damage of a mask relative to the full
model: ``out(x) = f(x) - f(all kept) + anchor``, so the full model is reproduced exactly, whatever the
catastrophic masks pull the fit towards.

Example:
    >>> net = MaskNet(n_layers=18, hidden=64, depth=2)
    >>> net(encode_masks(np.ones((4, 18), bool))).shape
    torch.Size([4])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

DEFAULT_HIDDEN = 64  # hidden units per layer of every surrogate unless the user asks otherwise


def encode_masks(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``bool[k, n]`` masks -> ``float32[k, n]`` inputs in {-1, +1} (True = kept = +1).

    Example:
        >>> encode_masks(np.array([[True, False]])).tolist()
        [[1.0, -1.0]]
    """
    t = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(masks))
    return t.to(torch.float32).mul_(2.0).sub_(1.0)


class MaskNet(nn.Module):
    """MLP ``n -> hidden (x depth, SiLU) -> 1`` plus a linear ``n -> 1`` skip path; returns shape ``[k]``.
    ``anchor``: the output for the all-kept mask (exact), or ``None`` for a free fit.

    Example:
        >>> MaskNet(6, hidden=16, depth=2)(torch.zeros(3, 6)).shape
        torch.Size([3])
        >>> float(MaskNet(6, anchor=-1.5)(torch.ones(1, 6)))
        -1.5
    """

    def __init__(self, n_layers: int, hidden: int = DEFAULT_HIDDEN, depth: int = 2,
                 anchor: float | None = None) -> None:
        super().__init__()
        if n_layers < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"MaskNet needs n_layers, hidden, depth >= 1; got {n_layers}, {hidden}, {depth}")
        blocks: list[nn.Module] = []
        width = n_layers
        for _ in range(depth):
            blocks += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*blocks)
        self.skip = nn.Linear(n_layers, 1)
        self.n_layers, self.hidden, self.depth = n_layers, hidden, depth
        self.anchor = None if anchor is None else float(anchor)
        if self.anchor is not None:
            if not np.isfinite(self.anchor):
                raise ValueError(f"MaskNet anchor must be finite, got {anchor}")
            self.register_buffer("full", torch.ones(1, n_layers), persistent=False)

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        return (self.mlp(x) + self.skip(x)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.anchor is None:
            return self._raw(x)
        return self._raw(x) - self._raw(self.full) + self.anchor

    def architecture(self) -> dict:
        """Hyper-parameters that rebuild this network (stored in metadata.json)."""
        return {
            "type": "mlp+linear-skip", "n_layers": self.n_layers, "hidden": self.hidden, "depth": self.depth,
            "activation": "silu", "input": "mask as +1 kept / -1 removed", "output": "standardized nll",
            "anchor": self.anchor,
        }
