"""Lightning callbacks of surrogate training: the best-validation-epoch weights and loss history, and one
progress bar per network.

Example:
    >>> best = BestWeights(); trainer = L.Trainer(callbacks=[best, EpochBar(500, "member 1/8")])
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm


class BestWeights(Callback):
    """Keeps the weights of the epoch with the lowest ``val_loss`` in memory, and the loss history."""

    def __init__(self) -> None:
        self.best_loss = float("inf")
        self.best_epoch = -1
        self.state: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, float, float]] = []
        self._val = float("nan")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val = float(trainer.callback_metrics["val_loss"])
        if self._val < self.best_loss:
            self.best_loss, self.best_epoch = self._val, trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train_loss = float(trainer.callback_metrics.get("train_loss", float("nan")))
        self.history.append((trainer.current_epoch, train_loss, self._val))


class EpochBar(Callback):
    """One tqdm bar per member over epochs, showing the validation loss."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bar = tqdm(total=self.total, desc=f"training surrogate {self.label}", unit="epoch", leave=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.bar is not None
        val = trainer.callback_metrics.get("val_loss")
        if val is not None:
            self.bar.set_postfix(val_loss=f"{float(val):.4f}", refresh=False)
        self.bar.update(1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            if trainer.should_stop and self.bar.n < self.total:
                self.bar.set_description(f"training surrogate {self.label} (early stop)")
            self.bar.close()
