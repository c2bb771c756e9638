"""The Ray actor of the distributed oracle: one loaded model, its token windows, and groups of masks to measure.

Plain Python: :class:`~layershap.oracle.distributed.RayOracle` wraps :class:`MaskWorker` with ``ray.remote`` and
drives it; nothing here imports Ray.

Example:
    >>> worker = MaskWorker()                       # in-process, as a Ray actor runs it
    >>> worker.load("./my-llama", None, "cpu", None, threads=1)  # doctest: +SKIP
    >>> windows, identity = worker.cut_windows(text, "builtin", n_windows=4, seq_len=128, seed=0)  # doctest: +SKIP
    >>> worker.use_windows(windows, identity, batch_size=4, cache_mb=None)  # doctest: +SKIP
    >>> measured, seconds = worker.measure(masks)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time

import numpy as np

from layershap.core.errors import LayershapError, StoreMismatchError


class WorkerLoadError(LayershapError):
    """A Ray worker could not load the model; the message says why."""


class MaskWorker:
    """The Ray actor: loads the model once (:meth:`load`), takes the token windows (:meth:`use_windows`), then
    measures groups of masks (:meth:`measure`). A failed load is raised again by every later call."""

    def __init__(self) -> None:
        self.loaded = None
        self.load_error: WorkerLoadError | None = None
        self.evaluator = None

    def load(self, model_spec: str, dtype: str | None, device: str, device_map: str | None,
             threads: int | None) -> dict:
        """Load ``model_spec`` (``dtype``: a torch dtype name, None for the device's default); where it runs."""
        import torch

        from .loading import load_model

        if threads is not None:
            torch.set_num_threads(threads)
        try:
            self.loaded = load_model(model_spec, device=device, dtype=None if dtype is None else getattr(torch, dtype),
                                     device_map=device_map)
        except Exception as err:  # kept: every later call on this worker raises it again
            text = str(err).strip()
            self.load_error = WorkerLoadError(
                f"a Ray worker could not load the model {model_spec!r}: {type(err).__name__}: "
                f"{text.splitlines()[-1] if text else ''}; every worker must be able to read the same model spec "
                "(a path visible on each node, or a hub id)"
            )
            raise self.load_error from err
        return {"pid": os.getpid(), "device": str(self.loaded.device)}

    def _model(self):
        if self.load_error is not None:
            raise self.load_error
        return self.loaded

    def cut_windows(self, text: str, text_id: str, n_windows: int, seq_len: int, seed: int) -> tuple[np.ndarray, dict]:
        """Token windows of ``text`` (this worker's tokenizer) and the store identity they give with its model."""
        from .measure import dataset_identity
        from .text import make_windows

        loaded = self._model()
        windows = make_windows(loaded.tokenizer, text, n_windows, seq_len, seed)
        return windows, dataset_identity(loaded, text_id, windows, seq_len)

    def use_windows(self, windows: np.ndarray, identity: dict, batch_size: int, cache_mb: float | None) -> None:
        """Check the loaded model is the one ``identity`` names, and evaluate on ``windows`` from now on."""
        from .evaluate import MaskedEvaluator
        from .layers import find_layers

        loaded = self._model()
        dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
        mine = (loaded.model_hash, find_layers(loaded.model).n_layers, dtype)
        wanted = (identity["model_hash"], identity["n_layers"], identity["dtype"])
        if mine != wanted:
            raise StoreMismatchError(
                f"a Ray worker loaded a model with (hash, layers, dtype) = ({mine[0][:12]}, {mine[1]}, {mine[2]}) but "
                f"the store was measured with ({wanted[0][:12]}, {wanted[1]}, {wanted[2]}); every worker must read "
                "the same checkpoint in the store's dtype"
            )
        self.evaluator = MaskedEvaluator(loaded.model, windows, batch_size=batch_size, device=loaded.device,
                                         cache_mb=cache_mb, utility=identity.get("utility", "nll"))

    def measure(self, masks: np.ndarray):
        """The :class:`~layershap.oracle.evaluate.Measurement` of a group and the wall-clock seconds it took."""
        began = time.perf_counter()
        measured = self.evaluator.measure(masks)
        return measured, time.perf_counter() - began
