"""The LightningModule that trains a :class:`~layershap.surrogate.network.MaskNet` on (mask, standardized nll).

Loss: mean squared error weighted ``1 / (1 + removed layers)`` per mask, so the near-full masks where pruning
decisions are made count more than the catastrophic ones (Gemma-3-270M, main job's 184 rows on 4 x 128 tokens,
3 seeds: out-of-fold Spearman on 1..5 removed 0.968 vs 0.961 unweighted, both anchored at the full model);
optimiser: Adam. Logs ``train_loss`` and ``val_loss`` (the weighted loss) once per epoch.

Example:
    >>> module = MaskMLP(n_layers=18, hidden=64)
    >>> trainer.fit(module, datamodule=MaskDataModule.from_store("data.zarr"))   # doctest: +SKIP
"""

from __future__ import annotations

import lightning as L
import torch

from .network import DEFAULT_HIDDEN, MaskNet


def mask_weights(x: torch.Tensor) -> torch.Tensor:
    """Loss weight of each encoded mask (rows of {-1, +1}): ``1 / (1 + number of removed layers)``.

    Example:
        >>> [round(w, 3) for w in mask_weights(torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]])).tolist()]
        [1.0, 0.5, 0.333]
    """
    return 1.0 / (1.0 + (x < 0).sum(dim=-1).to(x.dtype))


class MaskMLP(L.LightningModule):
    """Mask -> standardized nll regressor; ``self.net`` is the plain network that gets saved."""

    def __init__(
        self, n_layers: int, hidden: int = DEFAULT_HIDDEN, depth: int = 2, lr: float = 1e-3, weight_decay: float = 0.0,
        anchor: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MaskNet(n_layers, hidden=hidden, depth=depth, anchor=anchor)
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        weight = mask_weights(x)
        return (weight * (self(x) - y).square()).sum() / weight.sum()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[1]))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=len(batch[1]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
