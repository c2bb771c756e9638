"""A trained surrogate ensemble on disk and in memory: ``metadata.json`` + one ``member_<i>.pt`` state dict
per member. Loading needs only torch (no Lightning). A folder is saved whole: written into a hidden sibling and
renamed into place, so a kill never leaves new members beside old metadata.

Example:
    >>> sur = load_surrogate("runs/default/surrogate")  # doctest: +SKIP
    >>> sur.predict_nll(masks), sur.predict_std(masks)     # float64[k]: ensemble mean and spread (nats)  # doctest: +SKIP
    >>> sur(masks)                                         # value function: -nll, higher = better  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from layershap.core.errors import LayershapError, MaskError
from layershap.core.masks import check_masks
from layershap.oracle.measurement import log_offset

from .network import MaskNet, encode_masks

FORMAT = "layershap-surrogate"
FORMAT_VERSION = 2  # 2: target log(nll) standardized (target_mean, target_std); 1 was plain nll
TARGET = "log_nll"  # the nll surrogate's target; a kl surrogate's is TARGETS["kl"]
# utility -> what members learn: log(loss + log_offset(utility)); a task's loss is its gold answers' NLL
TARGETS = {"nll": TARGET, "kl": "log_kl", "task": "log_answer_nll"}
METADATA_FILE = "metadata.json"
# Activation bytes per forward pass: chunks whose hidden activations stay in the CPU caches run the network
# 2-3x faster than 64k-mask chunks that stream through memory (n=20 exact Shapley: 1.5 s -> 0.55 s).
PREDICT_CHUNK_BYTES = 2 << 20


def predict_chunk(hidden: int) -> int:
    """Masks per forward pass for a ``hidden``-wide network: a power of two with ~2 MiB float32 activations.

    Example:
        >>> predict_chunk(128), predict_chunk(256)
        (4096, 2048)
    """
    return max(256, 1 << max(0, (PREDICT_CHUNK_BYTES // (4 * max(1, hidden))).bit_length() - 1))


class Surrogate:
    """An ensemble of :class:`MaskNet` members that predicts a model's loss (nll, the KL to the dense model, or a
    task's answer NLL: the ``utility`` of the rows it learned from) for any layer mask.

    ``metadata`` holds model_id, model_hash, n_layers, dataset_hash, target (``"log_nll"`` or ``"log_kl"``),
    target_mean, target_std (each member outputs ``(log(loss + offset) - target_mean) / target_std``, offset
    :func:`~layershap.oracle.measurement.log_offset`), removed_counts (sorted removed-layer counts of the
    training rows), architecture, training and metrics.
    """

    def __init__(self, nets: list[MaskNet], metadata: dict, chunk_size: int | None = None) -> None:
        if not nets:
            raise ValueError("a surrogate needs at least one member network")
        self.nets = [net.eval() for net in nets]
        self.metadata = metadata
        self.n_layers = int(metadata["n_layers"])
        if any(net.n_layers != self.n_layers for net in nets):
            raise ValueError("member networks disagree with metadata n_layers")
        utility = {v: k for k, v in TARGETS.items()}.get(metadata.get("target"))
        if utility is None:
            raise ValueError(f"surrogate metadata must say a target of {sorted(TARGETS.values())}, got "
                             f"{metadata.get('target')!r}")
        self.utility, self.offset = utility, log_offset(utility)
        self.target_mean = float(metadata["target_mean"])
        self.target_std = float(metadata["target_std"])
        self.chunk_size = chunk_size or predict_chunk(max(net.hidden for net in nets))

    @property
    def members(self) -> int:
        return len(self.nets)

    def member(self, j: int) -> Surrogate:
        """Member ``j`` alone, as a one-network surrogate with the same metadata (shares the weights)."""
        return Surrogate([self.nets[j]], self.metadata, self.chunk_size)

    @property
    def removed_counts(self) -> list[int]:
        return list(self.metadata["removed_counts"])

    def __repr__(self) -> str:
        return (
            f"Surrogate(model_id={self.metadata.get('model_id')!r}, n_layers={self.n_layers}, "
            f"members={self.members}, removed_counts={self.removed_counts})"
        )

    # ---------------------------------------------------------------- queries
    def _check(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        arr = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        width = arr.shape[-1] if arr.ndim >= 1 else None
        if width != self.n_layers:
            raise MaskError(
                f"this surrogate was trained for a model with {self.n_layers} decoder layers "
                f"({self.metadata.get('model_id')}); got masks of length {width}. Give one True/False per layer"
            )
        return check_masks(arr, self.n_layers)

    def predict(self, masks: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean loss (nll, or kl for a kl surrogate) and member spread (sample std; 0 for one member),
        both ``float64[k]`` in nats.

        Each member predicts ``exp(output * target_std + target_mean) - offset``; mean and spread are taken over
        the members' predictions. Works in chunks of ``chunk_size`` masks under ``torch.inference_mode``.

        Example:
            >>> mean, std = sur.predict(np.ones((1, sur.n_layers), bool))  # doctest: +SKIP
        """
        arr = self._check(masks)
        k = len(arr)
        mean = np.empty(k, dtype=np.float64)
        std = np.zeros(k, dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, k, self.chunk_size):
                x = encode_masks(arr[start : start + self.chunk_size])
                outs = torch.stack([net(x) for net in self.nets]).double()  # [members, chunk], standardized
                nll = torch.exp(outs * self.target_std + self.target_mean) - self.offset
                mean[start : start + len(x)] = nll.mean(dim=0).numpy()
                if len(self.nets) > 1:
                    std[start : start + len(x)] = nll.std(dim=0).numpy()
        return mean, std

    def predict_nll(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted loss (nats; the mean token nll for an nll surrogate), ensemble mean: ``float64[k]``."""
        return self.predict(masks)[0]

    def predict_std(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Spread of the members' predictions (nats): ``float64[k]``, 0 for a single member."""
        return self.predict(masks)[1]

    def __call__(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Value function for Shapley estimators: ``-predict_nll(masks)`` (higher = better)."""
        return -self.predict_nll(masks)

    # ---------------------------------------------------------------- saving
    def save(self, out_dir: str | Path, extra: Callable[[Path], None] | None = None) -> Path:
        """Write the surrogate folder ``out_dir`` whole or not at all: ``member_<i>.pt``, ``metadata.json`` and
        whatever ``extra(folder)`` writes go into a hidden sibling folder, are fsynced, and that folder then
        replaces ``out_dir``; the previous surrogate stays in place until the new one is complete.

        A kill leaves either the previous folder or the new one at ``out_dir``, never a mix. (Between the two
        renames of the swap ``out_dir`` is briefly absent: :func:`load_surrogate` then names the previous folder.)
        ``out_dir`` must be absent, empty, or a surrogate folder (see :func:`check_save_target`).

        Example:
            >>> sur.save("runs/default/surrogate", extra=lambda d: np.savez(d / "validation.npz", x=x))  # doctest: +SKIP
        """
        out = check_save_target(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = out.parent / f".{out.name}{_SAVING}{tag}"
        old = out.parent / f".{out.name}{_OLD}{tag}"
        names = [f"member_{i}.pt" for i in range(len(self.nets))]
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, **self.metadata,
            "architecture": self.nets[0].architecture(), "member_files": names,
        }
        tmp.mkdir()
        try:
            for name, net in zip(names, self.nets):
                torch.save(net.state_dict(), tmp / name)
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
            if extra is not None:
                extra(tmp)
            for file in tmp.iterdir():
                with open(file, "rb+") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if out.exists():
                os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                if old.exists() and not out.exists():
                    os.rename(old, out)  # the previous surrogate back in place
                raise
            _fsync_dir(out.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        shutil.rmtree(old, ignore_errors=True)
        _remove_stale_saves(out)
        self.metadata = meta
        return out


_SAVING, _OLD = ".saving-", ".old-"
# Files a surrogate folder may hold (members, metadata, and what `layershap train` writes beside them).
SURROGATE_FILES = ("member_*.pt", METADATA_FILE, "validation.npz", "fit.png", "history.csv", ".*.tmp")


def check_save_target(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path if a surrogate may be saved there (absent, an empty folder, or a folder holding only
    surrogate files, :data:`SURROGATE_FILES`), else a :class:`LayershapError`: saving replaces the whole folder.

    Example:
        >>> check_save_target("runs/default/surrogate")
        PosixPath('runs/default/surrogate')
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayershapError(f"{out} is a file; give a folder for the surrogate")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.is_dir() or not any(p.match(g) for g in SURROGATE_FILES)]
        if foreign:
            raise LayershapError(
                f"{out} holds {sorted(foreign)[:3]}, which are not surrogate files; saving a surrogate replaces the "
                "whole folder, so give a new or empty folder (e.g. RUN/surrogate)"
            )
    return out


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # folders cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_saves(out: Path) -> None:
    """Delete the temporary siblings of saves of ``out`` killed mid-way (their process is gone)."""
    for kind in (_SAVING, _OLD):
        for leftover in out.parent.glob(f".{out.name}{kind}*"):
            pid = leftover.name[len(f".{out.name}{kind}"):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def load_surrogate(path: str | Path) -> Surrogate:
    """Rebuild a :class:`Surrogate` from a directory written by ``layershap train``.

    Example:
        >>> sur = load_surrogate("artifacts/gemma-3-270m/surrogate")  # doctest: +SKIP
    """
    root = Path(path)
    meta_path = root / METADATA_FILE
    previous = sorted(root.parent.glob(f".{root.name}{_OLD}*"))
    if not root.exists() and previous:
        raise LayershapError(
            f"no surrogate at {root}: a save was killed while it replaced the folder; the previous surrogate is in "
            f"{previous[-1]}: rename it to {root}, or train again"
        )
    if not meta_path.is_file():
        raise LayershapError(
            f"{root} is not a trained surrogate (no {METADATA_FILE}); give the --out folder of `layershap train`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise LayershapError(f"{meta_path} is not valid JSON ({exc}); retrain with `layershap train`") from exc
    if meta.get("format") != FORMAT:
        raise LayershapError(f"{meta_path} is not a layershap surrogate (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LayershapError(
            f"{root} has surrogate format version {meta.get('format_version')}, this layershap reads "
            f"{FORMAT_VERSION}; retrain with `layershap train`"
        )
    arch = meta["architecture"]
    nets = []
    for name in meta["member_files"]:
        file = root / name
        if not file.is_file():
            raise LayershapError(f"surrogate member {file} is missing; retrain with `layershap train`")
        net = MaskNet(int(arch["n_layers"]), hidden=int(arch["hidden"]), depth=int(arch["depth"]),
                      anchor=arch.get("anchor"))
        net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        nets.append(net)
    return Surrogate(nets, meta)
