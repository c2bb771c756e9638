"""The LightningModule that trains a :class:`~layershap.surrogate.network.MaskNet` on (mask, standardized nll).

Loss: mean squared error; optimiser: Adam. Logs ``train_loss`` and ``val_loss`` once per epoch.

Example:
    >>> module = MaskMLP(n_layers=18, hidden=64)
    >>> trainer.fit(module, datamodule=MaskDataModule.from_store("data.zarr"))   # doctest: +SKIP
"""

from __future__ import annotations

import lightning as L
import torch
from torch.nn import functional as F

from .network import DEFAULT_HIDDEN, MaskNet


class MaskMLP(L.LightningModule):
    """Mask -> standardized nll regressor; ``self.net`` is the plain network that gets saved."""

    def __init__(
        self, n_layers: int, hidden: int = DEFAULT_HIDDEN, depth: int = 2, lr: float = 1e-3, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MaskNet(n_layers, hidden=hidden, depth=depth)
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

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
