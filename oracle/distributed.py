"""Distributed oracle on Ray: worker actors each hold the model and measure groups of masks in parallel.

:class:`RayOracle` is a drop-in evaluator for :func:`~layershap.oracle.measure.measure_masks` (and everything
built on it: ``CachedOracle``, active sampling): the driver (this process) cuts the masks into kept-layer trie
groups exactly as the single-process path does, sends each group to an idle worker, and commits each finished
group with ``store.append``, so the driver is the only writer and resume works as before (finished rows kept,
none measured twice). Every worker evaluates on the same token windows, sent from the driver (common random
numbers). A worker that dies (killed, crashed, out of memory) has its groups re-queued on the others and is
replaced; a group that kills :data:`MAX_TRIES` workers is reported instead of retried forever.

Each worker takes one GPU when the cluster has GPUs (``gpus_per_worker`` of them with a ``device_map``, which
shards one model over them), else ``cpus_per_worker`` CPU cores.

The driver never needs the model itself: :meth:`RayOracle.windows_for` cuts the token windows and computes the
store identity on a worker, so a model larger than the driver's memory can still be measured.

Example:
    >>> measure_masks_distributed("./my-llama", store, masks, workers=8)          # local cluster or $RAY_ADDRESS  # doctest: +SKIP
    >>> with RayOracle("./my-llama", workers=8) as pool:                           # a new store, model never on the driver  # doctest: +SKIP
    ...     windows, identity = pool.windows_for(text.text, text.text_id, n_windows=10, seq_len=128, seed=0)
    ...     store = DatasetStore.create_or_open("llama.zarr", identity, windows)
    ...     measure_masks(pool, store, masks)

Over 300 lines because the actor pool, its fault handling (re-queue, replace, give up) and the driver loop are one
mechanism that reads best in one place.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Self

import numpy as np

from layershap.core.errors import LayershapError
from layershap.core.masks import check_masks

from .loading import require_package
from .measure import MASKS_PER_CALL, measure_masks, trie_groups
from .measurement import Measurement
from .ray_worker import MaskWorker

RAY_PIP = "pip install 'layershap[ray]'"
# Groups sent to a worker before its first one returns: hides the driver's round trip and store write.
PREFETCH = 2
# A group whose worker died this many times is reported (it probably kills workers: out of memory?).
MAX_TRIES = 3


def require_ray():
    """Import ray, or raise :class:`~layershap.core.errors.MissingPackageError` naming the pip install.

    Example:
        >>> ray = require_ray()
    """
    return require_package("ray", RAY_PIP, "Measuring with --workers (a pool of Ray workers)")


def connect(ray_address: str | None = None):
    """Join the Ray cluster at ``ray_address`` (None: ``$RAY_ADDRESS`` or a new local one); returns ``ray``.

    Does nothing when this process is already connected.

    Example:
        >>> connect("ray://head-node:10001")  # doctest: +SKIP
    """
    ray = require_ray()
    if not ray.is_initialized():
        try:
            local = ray_address is None and "RAY_ADDRESS" not in os.environ
            ray.init(address=ray_address, **({"include_dashboard": False} if local else {}))
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"at {ray_address!r}" if ray_address else "(local)"
            raise LayershapError(
                f"could not start or join the Ray cluster {where}: {err}; start one with `ray start --head` "
                "and pass its address with --ray-address, or leave --ray-address out for a local cluster"
            ) from err
    return ray


# Kinds of worker calls the driver waits on, besides groups of masks (their index).
LOAD, WINDOWS = "load", "windows"


class RayOracle:
    """A pool of :class:`MaskWorker` actors on the connected Ray cluster; an evaluator for ``measure_masks``.

    Workers start loading ``model_spec`` at once (``dtype``: a store's dtype name, None for the device's
    default). Before measuring, give them their token windows: :meth:`use_windows` with an existing store's
    ``windows``/``identity``, or :meth:`windows_for` to cut new ones from a text on a worker (the driver never
    loads the model). Use the pool as a context manager (or call :meth:`close`) to stop the workers.

    Example:
        >>> with RayOracle("./my-llama", workers=4, dtype=store.identity["dtype"]) as pool:  # doctest: +SKIP
        ...     pool.use_windows(store.windows, store.identity)
        ...     measure_masks(pool, store, masks)
        >>> pool = RayOracle("./llama-70b", workers=2, device_map="auto")    # 4 GPUs each on an 8-GPU node  # doctest: +SKIP
        >>> windows, identity = pool.windows_for(text.text, text.text_id, n_windows=10, seq_len=128, seed=0)  # doctest: +SKIP
        >>> store = DatasetStore.create_or_open("llama70b.zarr", identity, windows)  # doctest: +SKIP
    """

    def __init__(self, model_spec: str, *, workers: int, dtype: str | None = None, device: str = "auto",
                 device_map: str | None = None, gpus_per_worker: int | None = None, cpus_per_worker: int = 1,
                 batch_size: int = 4, cache_mb: float | None = None) -> None:
        ray = require_ray()
        if not ray.is_initialized():
            connect(None)
        if workers < 1 or cpus_per_worker < 1:
            raise LayershapError(f"--workers and CPUs per worker must be >= 1, got {workers} and {cpus_per_worker}")
        if device not in ("auto", "cpu", "cuda"):
            raise LayershapError(f"unknown device {device!r}; use auto, cpu or cuda")
        self._ray = ray
        self.model_spec = model_spec
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
        self._load_args = (model_spec, dtype, "cuda" if self.gpus_per_worker else "cpu", device_map,
                           None if self.gpus_per_worker else cpus_per_worker)
        self._eval_args = (batch_size, cache_mb)
        self._windows: tuple | None = None  # (windows object ref, identity) once given
        self.n_layers: int | None = None
        self.utility = "nll"  # set, with n_windows, by use_windows
        self.n_windows = 0
        self._actor_class = ray.remote(MaskWorker).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0, max_task_retries=0)
        self.actors: list = [None] * workers
        self._busy = [0] * workers  # groups sent to each worker and not returned yet (PREFETCH until ready)
        self._pending: dict = {}  # object ref -> (slot, LOAD, WINDOWS or a group index)
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
        self._busy[slot] = PREFETCH  # nothing is sent before the model is loaded and has its windows
        self._pending[actor.load.remote(*self._load_args)] = (slot, LOAD)
        if self._windows is not None:
            self._pending[actor.use_windows.remote(*self._windows, *self._eval_args)] = (slot, WINDOWS)

    def use_windows(self, windows: np.ndarray, identity: dict) -> None:
        """Measure on ``windows`` from now on; workers check their model against ``identity`` (a store's).

        Example:
            >>> pool.use_windows(store.windows, store.identity)  # doctest: +SKIP
        """
        if self._windows is not None:
            raise ValueError("the workers already have their windows; start a new RayOracle for other windows")
        self._windows = (self._ray.put(np.asarray(windows, dtype=np.int64)), dict(identity))
        self.n_layers = int(identity["n_layers"])
        self.utility = str(identity.get("utility", "nll"))
        self.n_windows = int(np.asarray(windows).shape[0])
        for slot, actor in enumerate(self.actors):
            self._pending[actor.use_windows.remote(*self._windows, *self._eval_args)] = (slot, WINDOWS)

    def windows_for(self, text: str, text_id: str, n_windows: int, seq_len: int,
                    seed: int) -> tuple[np.ndarray, dict]:
        """Cut token windows from ``text`` on a worker, as ``make_windows`` does, and use them; returns
        ``(windows, identity)`` for ``DatasetStore.create_or_open``.

        Example:
            >>> windows, identity = pool.windows_for(text.text, text.text_id, 4, 128, seed=0)  # doctest: +SKIP
        """
        from ray.exceptions import RayActorError, RayTaskError

        while True:
            slot = 0
            try:
                windows, identity = self._ray.get(self.actors[slot].cut_windows.remote(
                    text, text_id, n_windows, seq_len, seed))
                break
            except RayActorError:
                self._lost(slot)
            except RayTaskError as err:
                raise (getattr(err, "cause", None) or err) from None
        self.use_windows(windows, identity)
        return windows, identity

    def busy_actors(self) -> list:
        """Handles of the workers holding unfinished groups right now."""
        return [self.actors[slot] for slot, job in self._pending.values() if isinstance(job, int)]

    def close(self) -> None:
        """Stop every worker (the store keeps every committed row)."""
        for actor in self.actors:
            if actor is not None:
                self._ray.kill(actor, no_restart=True)
        self.actors = [None] * self.workers
        self._pending.clear()

    def _lost(self, slot: int) -> list[int]:
        """The worker in ``slot`` died: forget its calls, start a new one there; returns its unfinished groups."""
        refs = [ref for ref, (s, _) in self._pending.items() if s == slot]
        lost = [self._pending.pop(ref)[1] for ref in refs]
        self._replace(slot)
        return [job for job in lost if isinstance(job, int)]

    def run_groups(self, groups: list[np.ndarray],
                   on_group: Callable[[np.ndarray, Measurement, np.ndarray], None]) -> None:
        """Measure ``groups`` on the workers; ``on_group(masks, measurement, seconds)`` runs here for each
        finished one.

        Called by :func:`~layershap.oracle.measure.measure_in_groups`; the groups finish in any order.
        """
        from ray.exceptions import RayActorError, RayTaskError

        if self._windows is None:
            raise ValueError("give the workers their windows first: use_windows(...) or windows_for(...)")
        queue = deque(range(len(groups)))
        tries = [0] * len(groups)
        left = len(groups)
        try:
            for slot in range(self.workers):
                self._feed(slot, queue, groups)
            while left:
                (ref,), _ = self._ray.wait(list(self._pending), num_returns=1)
                slot, job = self._pending[ref]
                try:
                    result = self._ray.get(ref)
                except RayActorError:  # the worker process died: re-queue all its groups, replace it
                    for j in sorted(self._lost(slot), reverse=True):
                        tries[j] += 1
                        if tries[j] >= MAX_TRIES:
                            raise LayershapError(
                                f"{MAX_TRIES} Ray workers died measuring the same group of {len(groups[j])} "
                                "masks (out of memory?); use a smaller --batch-size or --masks-per-call"
                            ) from None
                        queue.appendleft(j)
                        self.requeued += 1
                    continue
                except RayTaskError as err:  # raised inside the worker: a failed load, a wrong model, bad values
                    raise (getattr(err, "cause", None) or err) from None
                del self._pending[ref]
                if job == LOAD:
                    self.where[slot] = result
                elif job == WINDOWS:
                    self._busy[slot] = 0
                else:
                    measured, seconds = result
                    self._busy[slot] -= 1
                    on_group(groups[job], measured, np.full(len(groups[job]), seconds / len(groups[job])))
                    left -= 1
                self._feed(slot, queue, groups)
        finally:  # groups still out after an error are forgotten; their workers finish them unheard
            self._pending = {ref: (s, j) for ref, (s, j) in self._pending.items() if not isinstance(j, int)}

    def _feed(self, slot: int, queue: deque, groups: list[np.ndarray]) -> None:
        while queue and self._busy[slot] < PREFETCH:
            job = queue.popleft()
            self._pending[self.actors[slot].measure.remote(groups[job])] = (slot, job)
            self._busy[slot] += 1

    def _replace(self, slot: int) -> None:
        """Start a new worker in ``slot`` after its worker died."""
        if self.replaced >= MAX_TRIES * self.workers:
            raise LayershapError(
                f"{self.replaced} Ray workers died; giving up (see the Ray logs, `ray logs`, for why they died)"
            )
        self._ray.kill(self.actors[slot], no_restart=True)
        self.replaced += 1
        self.where.pop(slot, None)
        self._start(slot)

    def loss(self, masks: np.ndarray) -> np.ndarray:
        """The utility's mean loss of each mask, ``float64[k]``, measured on the workers (nothing is stored).

        Example:
            >>> pool.loss(np.ones((1, pool.n_layers), bool))  # doctest: +SKIP
        """
        if self.n_layers is None:
            raise ValueError("give the workers their windows first: use_windows(...) or windows_for(...)")
        arr = check_masks(masks, self.n_layers)
        found: dict[bytes, float] = {}

        def keep(group: np.ndarray, measured: Measurement, _seconds: np.ndarray) -> None:
            found.update({row.tobytes(): float(v) for row, v in zip(group, measured.loss(self.utility))})

        self.run_groups(trie_groups(arr, MASKS_PER_CALL), keep)
        return np.array([found[row.tobytes()] for row in arr], dtype=np.float64)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """Value function: ``-loss``."""
        return -self.loss(masks)


def measure_masks_distributed(model_spec: str, store, masks: np.ndarray, *, workers: int,
                              ray_address: str | None = None, device: str = "auto", device_map: str | None = None,
                              batch_size: int = 4, cache_mb: float | None = None,
                              masks_per_call: int = MASKS_PER_CALL, progress: bool = True) -> int:
    """:func:`~layershap.oracle.measure.measure_masks` on ``workers`` Ray workers; returns the rows added.

    ``store``: an open, writable dataset store (its windows and identity go to the workers, which load the
    model in the store's dtype); ``ray_address``: the cluster to join (None: ``$RAY_ADDRESS`` or a new local
    cluster).

    Example:
        >>> measure_masks_distributed("./my-llama", store, masks, workers=8, ray_address="ray://head:10001")  # doctest: +SKIP
    """
    if not store.missing(check_masks(masks, store.n_layers)).any():
        return 0  # everything is stored already: no workers to start
    connect(ray_address)
    with RayOracle(model_spec, workers=workers, dtype=store.identity["dtype"], device=device,
                   device_map=device_map, batch_size=batch_size, cache_mb=cache_mb) as pool:
        pool.use_windows(store.windows, store.identity)
        return measure_masks(pool, store, masks, progress=progress, masks_per_call=masks_per_call)
