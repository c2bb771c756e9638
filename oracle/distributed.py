"""Distributed oracle on Ray: worker actors each hold the model and measure groups of masks in parallel.

:class:`RayOracle` is a drop-in evaluator for :func:`~layershap.oracle.measure.measure_masks` (and everything
built on it: ``StoreOracle``, active sampling): the driver (this process) cuts the masks into kept-layer trie
groups exactly as the single-process path does, sends each group to an idle worker, and commits each finished
group with ``store.append``, so the driver is the only writer and resume works as before (finished rows kept,
none measured twice). Every worker evaluates on the same token windows, sent from the driver (common random
numbers). A worker that dies (killed, crashed, out of memory) has its groups re-queued on the others and is
replaced; a group that kills :data:`MAX_TRIES` workers is reported instead of retried forever.

Each worker takes one GPU when the cluster has GPUs (``gpus_per_worker`` of them with a ``device_map``, which
shards one model over them), else ``cpus_per_worker`` CPU cores.

Example:
    >>> store = DatasetStore.create_or_open(out, dataset_identity(loaded, text_id, windows, 128), windows)
    >>> measure_masks_distributed("./my-llama", store, masks, workers=8)          # local cluster or $RAY_ADDRESS
    >>> with RayOracle("./my-llama", store.windows, store.identity, workers=8) as pool:
    ...     measure_masks(pool, store, masks)                                     # same thing, pool kept open
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Self

import numpy as np

from .errors import LayershapError, StoreMismatchError
from .layers import check_masks
from .loading import require_package
from .measure import MASKS_PER_CALL, measure_masks, trie_groups

RAY_PIP = "pip install 'layershap[ray]'"
# Groups sent to a worker before its first one returns: hides the driver's round trip and store write.
PREFETCH = 2
# A group whose worker died this many times is reported (it probably kills workers: out of memory?).
MAX_TRIES = 3


def require_ray():
    """Import ray, or raise :class:`~layershap.oracle.errors.MissingPackageError` naming the pip install.

    Example:
        >>> ray = require_ray()
    """
    return require_package("ray", RAY_PIP, "Measuring with --workers (a pool of Ray workers)")


def connect(ray_address: str | None = None):
    """Join the Ray cluster at ``ray_address`` (None: ``$RAY_ADDRESS`` or a new local one); returns ``ray``.

    Does nothing when this process is already connected.

    Example:
        >>> connect("ray://head-node:10001")
    """
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=ray_address, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"at {ray_address!r}" if ray_address else "(local)"
            raise LayershapError(
                f"could not start or join the Ray cluster {where}: {err}; start one with `ray start --head` "
                "and pass its address with --ray-address, or leave --ray-address out for a local cluster"
            ) from err
    return ray


class MaskWorker:
    """The Ray actor: loads the model once (:meth:`load`), then measures groups of masks (:meth:`nll`)."""

    def __init__(self) -> None:
        self.evaluator = None

    def load(self, model_spec: str, windows: np.ndarray, identity: dict, device: str, device_map: str | None,
             batch_size: int, cache_mb: float | None, threads: int | None) -> dict:
        """Load ``model_spec`` in the store's dtype and check it is the store's model; returns where it runs."""
        import torch

        from .evaluate import MaskedEvaluator
        from .layers import find_layers
        from .loading import load_model

        if threads is not None:
            torch.set_num_threads(threads)
        loaded = load_model(model_spec, device=device, dtype=getattr(torch, identity["dtype"]),
                            device_map=device_map)
        n_layers = find_layers(loaded.model).n_layers
        if (loaded.model_hash, n_layers) != (identity["model_hash"], identity["n_layers"]):
            raise StoreMismatchError(
                f"the worker loaded {model_spec!r} with hash {loaded.model_hash[:12]} and {n_layers} layers, "
                f"but the store was measured on hash {identity['model_hash'][:12]} with {identity['n_layers']} "
                "layers; give every worker the same checkpoint as the driver"
            )
        self.evaluator = MaskedEvaluator(loaded.model, windows, batch_size=batch_size, device=loaded.device,
                                         cache_mb=cache_mb)
        return {"pid": os.getpid(), "device": str(loaded.device)}

    def nll(self, masks: np.ndarray) -> tuple[np.ndarray, float]:
        """Mean NLL of each mask of a group and the wall-clock seconds the group took."""
        began = time.perf_counter()
        values = self.evaluator.nll(masks)
        return values, time.perf_counter() - began


class RayOracle:
    """A pool of :class:`MaskWorker` actors on the connected Ray cluster; an evaluator for ``measure_masks``.

    ``windows``/``identity``: the store's (``store.windows``, ``store.identity``); workers load the model in
    the identity's dtype and refuse a checkpoint with another hash. Workers start loading at once; use the pool
    as a context manager (or call :meth:`close`) to stop them.

    Example:
        >>> with RayOracle("./my-llama", store.windows, store.identity, workers=4) as pool:
        ...     measure_masks(pool, store, masks)
    """

    def __init__(self, model_spec: str, windows: np.ndarray, identity: dict, *, workers: int,
                 device: str = "auto", device_map: str | None = None, gpus_per_worker: int | None = None,
                 cpus_per_worker: int = 1, batch_size: int = 4, cache_mb: float | None = None) -> None:
        ray = require_ray()
        if not ray.is_initialized():
            connect(None)
        if workers < 1 or cpus_per_worker < 1:
            raise LayershapError(f"--workers and CPUs per worker must be >= 1, got {workers} and {cpus_per_worker}")
        if device not in ("auto", "cpu", "cuda"):
            raise LayershapError(f"unknown device {device!r}; use auto, cpu or cuda")
        self._ray = ray
        self.model_spec = model_spec
        self.n_layers = int(identity["n_layers"])
        self.workers = workers
        cluster = ray.cluster_resources()
        gpus = int(cluster.get("GPU", 0)) if device != "cpu" else 0
        if device == "cuda" and gpus == 0:
            raise LayershapError("--device cuda was asked for but the Ray cluster has no GPU; use --device cpu or auto")
        if gpus == 0:
            self.gpus_per_worker, self.cpus_per_worker = 0, cpus_per_worker
        else:
            default = max(1, gpus // workers) if device_map is not None else 1
            self.gpus_per_worker, self.cpus_per_worker = gpus_per_worker or default, 1
        need, have, kind = ((workers * self.gpus_per_worker, gpus, "GPU") if self.gpus_per_worker
                            else (workers * cpus_per_worker, int(cluster.get("CPU", 0)), "CPU"))
        if need > have:
            raise LayershapError(
                f"{workers} workers need {need} {kind}s but the Ray cluster has {have}; ask for fewer --workers "
                "or add nodes to the cluster"
            )
        self._load_args = (ray.put(np.asarray(windows, dtype=np.int64)), dict(identity),
                           "cuda" if self.gpus_per_worker else "cpu", device_map, batch_size, cache_mb,
                           None if self.gpus_per_worker else cpus_per_worker)
        self._actor_class = ray.remote(MaskWorker).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0, max_task_retries=0)
        self.actors: list = [None] * workers
        self._busy = [0] * workers  # groups sent to each worker and not returned yet
        self._pending: dict = {}  # object ref -> (slot, group index or None for the load)
        self.replaced = 0  # workers that died and were replaced
        self.requeued = 0  # groups measured again because their worker died
        self.where: dict[int, dict] = {}  # slot -> {"pid", "device"} once loaded
        for slot in range(workers):
            self._start(slot)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, slot: int) -> None:
        actor = self._actor_class.remote()
        self.actors[slot] = actor
        self._busy[slot] = PREFETCH  # nothing is sent before the model is loaded
        self._pending[actor.load.remote(self.model_spec, *self._load_args)] = (slot, None)

    def busy_actors(self) -> list:
        """Handles of the workers holding unfinished groups right now."""
        return [self.actors[slot] for slot, job in self._pending.values() if job is not None]

    def close(self) -> None:
        """Stop every worker (the store keeps every committed row)."""
        for actor in self.actors:
            if actor is not None:
                self._ray.kill(actor, no_restart=True)
        self.actors = [None] * self.workers
        self._pending.clear()

    def _failure(self, err: Exception, job: int | None) -> LayershapError | Exception:
        """The error to raise for an exception raised inside a worker method."""
        cause = getattr(err, "cause", None) or err
        if job is not None:  # a measurement error (e.g. non-finite NLL): the same error as in one process
            return cause
        return LayershapError(
            f"a Ray worker could not load the model {self.model_spec!r}: {type(cause).__name__}: "
            f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}; every worker must be able to "
            "read the same model spec (a path visible on each node, or a hub id)"
        )

    def run_groups(self, groups: list[np.ndarray],
                   on_group: Callable[[np.ndarray, np.ndarray, np.ndarray], None]) -> None:
        """Measure ``groups`` on the workers; ``on_group(masks, nll, seconds)`` runs here for each finished one.

        Called by :func:`~layershap.oracle.measure.measure_in_groups`; the groups finish in any order.
        """
        from ray.exceptions import RayActorError, RayTaskError

        queue = deque(range(len(groups)))
        tries = [0] * len(groups)
        left = len(groups)
        try:
            for slot in range(self.workers):
                self._feed(slot, queue, groups)
            while left:
                if not self._pending:
                    raise LayershapError("every Ray worker is gone; see the Ray logs (`ray logs`) for why")
                (ref,), _ = self._ray.wait(list(self._pending), num_returns=1)
                slot, job = self._pending.pop(ref)
                try:
                    result = self._ray.get(ref)
                except RayActorError:  # the worker process died: re-queue all its groups, replace it
                    lost = [job]
                    for other in [r for r, (s, _) in self._pending.items() if s == slot]:
                        lost.append(self._pending.pop(other)[1])
                    for j in sorted((j for j in lost if j is not None), reverse=True):
                        tries[j] += 1
                        if tries[j] >= MAX_TRIES:
                            raise LayershapError(
                                f"{MAX_TRIES} Ray workers died measuring the same group of {len(groups[j])} "
                                "masks (out of memory?); use a smaller --batch-size or --masks-per-call"
                            ) from None
                        queue.appendleft(j)
                        self.requeued += 1
                    self._replace(slot)
                    continue
                except RayTaskError as err:
                    raise self._failure(err, job) from None
                if job is None:
                    self.where[slot] = result
                    self._busy[slot] = 0
                else:
                    values, seconds = result
                    self._busy[slot] -= 1
                    on_group(groups[job], values, np.full(len(values), seconds / len(values)))
                    left -= 1
                self._feed(slot, queue, groups)
        finally:  # groups still out after an error are forgotten; their workers finish them unheard
            self._pending = {ref: (s, j) for ref, (s, j) in self._pending.items() if j is None}

    def _feed(self, slot: int, queue: deque, groups: list[np.ndarray]) -> None:
        while queue and self._busy[slot] < PREFETCH:
            job = queue.popleft()
            self._pending[self.actors[slot].nll.remote(groups[job])] = (slot, job)
            self._busy[slot] += 1

    def _replace(self, slot: int) -> None:
        """Start a new worker in ``slot`` after its worker died; its other unfinished groups come back too."""
        if self.replaced >= MAX_TRIES * self.workers:
            raise LayershapError(
                f"{self.replaced} Ray workers died; giving up (see the Ray logs, `ray logs`, for why they died)"
            )
        self._ray.kill(self.actors[slot], no_restart=True)
        self.replaced += 1
        self.where.pop(slot, None)
        self._start(slot)

    def nll(self, masks: np.ndarray) -> np.ndarray:
        """Mean NLL of each mask, ``float64[k]``, measured on the workers (nothing is stored).

        Example:
            >>> pool.nll(np.ones((1, pool.n_layers), bool))
        """
        arr = check_masks(masks, self.n_layers)
        found: dict[bytes, float] = {}

        def keep(group: np.ndarray, values: np.ndarray, _seconds: np.ndarray) -> None:
            found.update({row.tobytes(): float(v) for row, v in zip(group, values)})

        self.run_groups(trie_groups(arr, MASKS_PER_CALL), keep)
        return np.array([found[row.tobytes()] for row in arr], dtype=np.float64)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """Value function: ``-nll``."""
        return -self.nll(masks)


def measure_masks_distributed(model_spec: str, store, masks: np.ndarray, *, workers: int,
                              ray_address: str | None = None, device: str = "auto", device_map: str | None = None,
                              batch_size: int = 4, cache_mb: float | None = None,
                              masks_per_call: int = MASKS_PER_CALL, progress: bool = True) -> int:
    """:func:`~layershap.oracle.measure.measure_masks` on ``workers`` Ray workers; returns the rows added.

    ``store``: an open, writable dataset store (its windows and identity go to the workers); ``ray_address``:
    the cluster to join (None: ``$RAY_ADDRESS`` or a new local cluster).

    Example:
        >>> measure_masks_distributed("./my-llama", store, masks, workers=8, ray_address="ray://head:10001")
    """
    connect(ray_address)
    with RayOracle(model_spec, store.windows, store.identity, workers=workers, device=device,
                   device_map=device_map, batch_size=batch_size, cache_mb=cache_mb) as pool:
        return measure_masks(pool, store, masks, progress=progress, masks_per_call=masks_per_call)
