"""The dataset store: one zarr v3 group of ``(mask, nll)`` rows measured on one model, text and window set.

Layout::

    STORE.zarr/            group attributes: schema_version, package_version, identity (model_id, model_hash,
                           n_layers, layer_types, text_id, windows_sha256, n_windows, seq_len, dtype, game,
                           utility), n_rows
        masks      (N, n) bool, True = layer kept
        nll        (N,)   float64, mean token NLL in nats (log-perplexity); utility ``task``: the mean NLL of a
                          multiple-choice task's gold answers, nats per question (windows: one per question)
        seconds    (N,)   float64, wall-clock seconds the measurement took
        windows    (W, L) int64, the exact token windows every mask was measured on
        window_nll (N, W) float64, the NLL of each window (NaN: rows measured before per-window values were kept)
        kl         (N,)   float64, utility ``kl`` only: mean token KL(dense || masked) of next-token distributions
        window_kl  (N, W) float64, utility ``kl`` only: the KL of each window
        writer.lock       the write lock: names the process writing the store (empty when none is)

The rows' **loss** (:attr:`DatasetStore.loss`) is the column the store's utility names: ``nll`` or ``kl``; it is
what surrogates learn and plans minimise. Per-window values let two masks be compared window by window.

Crash safety: ``n_rows`` (the committed row count) is written only after the row data, and zarr's
``LocalStore`` writes every file through a temporary file + ``os.replace``, so each write is atomic.
Rows beyond ``n_rows`` (an append killed half-way) are ignored and overwritten by the next append. A new
store is built in a hidden sibling folder and renamed into place, so a half-created store never exists.

One writer at a time: :meth:`DatasetStore.create_or_open` takes the store's write lock (:mod:`.writer_lock`)
and holds it until :meth:`DatasetStore.close` (a ``with`` block, garbage collection or process exit); a writer
in another process is refused at open with one line naming the holder (a later writer in the same process
takes the lock over, and the earlier one can no longer append). Readers (:meth:`DatasetStore.open`) never take
the lock.

(Over 300 lines: opening with its checks and the lock, reading, and the crash-safe append keep the invariants of
one object, and read best together.)

Example:
    >>> with DatasetStore.create_or_open("runs/x.zarr", identity, windows) as store:  # doctest: +SKIP
    ...     todo = masks[store.missing(masks)]
    ...     store.append(todo[:1], np.array([2.91]), np.array([7.2]))
    >>> len(store), store.nll  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import weakref
from pathlib import Path
from typing import Any, Self

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, GroupNotFoundError

from layershap.core.errors import LayershapError, MaskError, StoreLockedError, StoreMismatchError
from layershap.core.jsonio import jsonable, package_version
from layershap.core.masks import check_masks

from .identity import legacy_hash_reason
from .measurement import loss_column
from .text import windows_sha256
from .writer_lock import LOCK_FILE, WriterLock

SCHEMA_VERSION = 1
ROWS_ATTR = "n_rows"
IDENTITY_KEYS = (
    "model_id", "model_hash", "n_layers", "layer_types", "text_id", "windows_sha256", "n_windows", "seq_len", "dtype",
    "game", "utility", "heal",
)
# What a mask means (``game``: which players a False removes, e.g. whole blocks) and what a row measures
# (``utility``: mean token NLL, or another; ``heal``: the training-free healing every mask was measured after, e.g.
# ``linear;ridge=0.0001;fit=<hash>x16``, or none). Stores written before these keys existed are blocks / nll; keys at
# their defaults are left out of the content hash, so such stores keep the hash their surrogates recorded.
GAME_DEFAULTS = {"game": "blocks", "utility": "nll", "heal": "none"}
# Identity keys only some games have: ``players`` names the mask entries of a sublayer store ("3.attn", "3.mlp");
# a blocks store has none, so its attributes and content hash are those of a store written before sublayers.
# ``task`` describes the multiple-choice task a ``task`` store measures (name, file, content hash, split).
OPTIONAL_KEYS = ("players", "task")
# Keys that must agree for two runs to share a store. model_id may differ (same weights under another path);
# dtype is checked because float32 and bfloat16 measurements must never be mixed silently.
MATCH_KEYS = ("model_hash", "text_id", "windows_sha256", "n_layers", "dtype", *GAME_DEFAULTS)
ROW_CHUNK = 512
ROW_ARRAYS = ("masks", "nll", "seconds")  # one entry per row, always present


def _check_identity(identity: dict) -> dict:
    identity = {**GAME_DEFAULTS, **identity}
    missing = [k for k in IDENTITY_KEYS if k not in identity]
    if missing:
        raise ValueError(f"store identity lacks keys {missing}; it needs all of {list(IDENTITY_KEYS)}")
    ident = {k: jsonable(v) for k, v in identity.items()}
    if len(ident["layer_types"]) != ident["n_layers"]:
        raise ValueError(f"identity has {len(ident['layer_types'])} layer_types for n_layers={ident['n_layers']}")
    if "players" in ident and len(ident["players"]) != ident["n_layers"]:
        raise ValueError(f"identity names {len(ident['players'])} players for masks of {ident['n_layers']} entries")
    return ident


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class DatasetStore:
    """Rows of measured layer masks for one (model, text, windows) identity; see the module docstring."""

    def __init__(self, path: str | Path, writable: bool) -> None:
        """Open an existing store; use :meth:`open` or :meth:`create_or_open` instead of calling this.

        A writable store holds the store's write lock (:mod:`.writer_lock`) until :meth:`close` (or until it is
        garbage-collected, or the process exits); its rows are read after the lock is taken.
        """
        self.path = Path(path)
        self.writable = writable
        self._lock: WriterLock | None = None
        self._check_is_store(self._open_group("r"))
        if writable:
            self._lock = WriterLock.acquire(self.path)
            weakref.finalize(self, self._lock.release)
        try:
            self._read(self._open_group("r+" if writable else "r"))
        except BaseException:
            self.close()
            raise

    def _open_group(self, mode: str) -> zarr.Group:
        if not self.path.exists():
            raise LayershapError(f"no dataset store at {self.path}: the path does not exist")
        try:
            return zarr.open_group(str(self.path), mode=mode)
        except (GroupNotFoundError, ContainsArrayError, FileNotFoundError, NotADirectoryError) as exc:
            raise LayershapError(
                f"{self.path} is not a layershap dataset store (no zarr group there: {exc}); "
                f"give the path of a store written by `layershap oracle`, or a new path to create one"
            ) from exc

    def _check_is_store(self, group: zarr.Group) -> dict:
        attrs = dict(group.attrs)
        if "schema_version" not in attrs or ROWS_ATTR not in attrs:
            raise LayershapError(
                f"{self.path} is a zarr group but not a layershap dataset store (no schema_version/{ROWS_ATTR} "
                f"attributes); use another --out path"
            )
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise LayershapError(
                f"{self.path} has store schema version {attrs['schema_version']}, this layershap reads version "
                f"{SCHEMA_VERSION}; use the layershap version that wrote it ({attrs.get('package_version')}) "
                f"or another --out path"
            )
        return attrs

    def _read(self, group: zarr.Group) -> None:
        """Read the committed rows (for a writer: under the lock, so no other process appends meanwhile)."""
        self._group = group
        attrs = self._check_is_store(group)
        self._attrs = {**GAME_DEFAULTS, **attrs}
        self.n_layers = int(attrs["n_layers"])
        n_rows = int(attrs[ROWS_ATTR])
        try:
            self._arrays = {name: self._group[name] for name in (*ROW_ARRAYS, "windows")}
        except KeyError as exc:
            raise LayershapError(f"dataset store {self.path} is damaged: array {exc} is missing") from exc
        optional = ("window_nll", "kl", "window_kl") if self.utility == "kl" else ("window_nll",)
        self._arrays.update({name: self._group[name] for name in optional if name in self._group})
        if self.utility == "kl" and not {"kl", "window_kl"} <= set(self._arrays):
            raise LayershapError(f"dataset store {self.path} is damaged: a kl store without its kl arrays")
        for name, array in self._arrays.items():
            if name != "windows" and array.shape[0] < n_rows:
                raise LayershapError(
                    f"dataset store {self.path} is damaged: {name} has {array.shape[0]} rows "
                    f"but {n_rows} are committed"
                )
        if self._arrays["masks"].shape[1] != self.n_layers:
            raise LayershapError(f"dataset store {self.path} is damaged: masks are not {self.n_layers} wide")
        self._rows = {name: np.asarray(array[:n_rows], dtype=bool if name == "masks" else np.float64)
                      for name, array in self._arrays.items() if name != "windows"}
        self._keys = {row.tobytes() for row in self._rows["masks"]}
        self._windows: np.ndarray | None = None

    def close(self) -> None:
        """Give back the write lock (a writer); the rows read so far stay readable. Safe to call twice.

        Example:
            >>> with DatasetStore.create_or_open("x.zarr", identity, windows) as store:  # doctest: +SKIP
            ...     store.append(masks, nll, seconds)
        """
        if self._lock is not None:
            self._lock.release()
        self.writable = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path) -> DatasetStore:
        """Open an existing store read-only; a missing path or a non-store is a clear :class:`LayershapError`.

        Example:
            >>> store = DatasetStore.open("runs/default/dataset.zarr"); len(store)  # doctest: +SKIP
        """
        return cls(path, writable=False)

    @classmethod
    def create_or_open(cls, path: str | Path, identity: dict, windows: np.ndarray) -> DatasetStore:
        """Open the store at ``path`` for appending, creating it when absent.

        An existing store must have been built for the same model hash, text, windows, layer count and
        dtype, else :class:`StoreMismatchError` (naming both values) is raised and nothing is written. The
        returned store holds the write lock (:class:`StoreLockedError` while another writer holds it): close it,
        or use it in a ``with`` block.

        Example:
            >>> store = DatasetStore.create_or_open("x.zarr", identity, windows)   # windows: int64[W, L]  # doctest: +SKIP
        """
        ident = _check_identity(identity)
        windows = np.asarray(windows)
        if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
            raise ValueError(f"windows must be an int array [W, L]; got {windows.dtype} {windows.shape}")
        if windows.shape[0] != ident["n_windows"]:
            raise ValueError(f"identity says n_windows={ident['n_windows']} but windows has {windows.shape[0]} rows")
        if windows_sha256(windows) != ident["windows_sha256"]:
            raise ValueError("identity's windows_sha256 is not the sha256 of the windows passed in")
        path = Path(path)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            cls._create(path, ident, windows.astype(np.int64))
        cls(path, writable=False).check_identity(ident)  # a wrong store is refused before its lock is touched
        store = cls(path, writable=True)
        try:
            store.check_identity(ident)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _create(cls, path: Path, ident: dict, windows: np.ndarray) -> None:
        """Build the store in a hidden sibling folder, then rename it into place (atomic)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:12]}"
        try:
            group = zarr.open_group(str(tmp), mode="w-")
            n = ident["n_layers"]
            group.create_array("masks", shape=(0, n), dtype=bool, chunks=(ROW_CHUNK, max(n, 1)), fill_value=False)
            group.create_array("nll", shape=(0,), dtype=np.float64, chunks=(ROW_CHUNK,), fill_value=np.nan)
            group.create_array("seconds", shape=(0,), dtype=np.float64, chunks=(ROW_CHUNK,), fill_value=np.nan)
            group.create_array("windows", data=windows, chunks=windows.shape)
            columns = ("nll", "kl") if ident["utility"] == "kl" else ("nll",)
            if "kl" in columns:
                group.create_array("kl", shape=(0,), dtype=np.float64, chunks=(ROW_CHUNK,), fill_value=np.nan)
            for column in columns:
                group.create_array(f"window_{column}", shape=(0, windows.shape[0]), dtype=np.float64,
                                   chunks=(ROW_CHUNK, windows.shape[0]), fill_value=np.nan)
            group.update_attributes(
                {"schema_version": SCHEMA_VERSION, "package_version": package_version(), **ident, ROWS_ATTR: 0}
            )
            try:
                os.rename(tmp, path)  # replaces a missing path or an empty folder; fails on a non-empty one
            except OSError:
                if not (path / "zarr.json").exists():
                    raise
                # another writer created the store first: open theirs (and check its identity)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    def check_identity(self, identity: dict) -> None:
        """Raise :class:`StoreMismatchError` (naming both values) where ``identity`` disagrees with the store.

        Compares the keys of ``identity`` among model_hash, text_id, windows_sha256, n_layers, dtype, game,
        utility, n_windows and seq_len; a partial identity allows a cheap check before the model is loaded.

        Example:
            >>> store.check_identity({"text_id": "builtin", "seq_len": 128})  # doctest: +SKIP
        """
        keys = [k for k in (*MATCH_KEYS, "n_windows", "seq_len") if k in identity]
        wanted = {k: jsonable(identity[k]) for k in keys}
        diffs = [(k, self._attrs.get(k), wanted[k]) for k in keys if self._attrs.get(k) != wanted[k]]
        legacy = legacy_hash_reason(self._attrs.get("model_hash"), wanted.get("model_hash"))
        if legacy:
            raise StoreMismatchError(
                f"the dataset store {self.path} (made by layershap {self._attrs.get('package_version')}) cannot be "
                f"extended with this model: {legacy}. Measure into another --out (a new store), or use the "
                "layershap version that made it. Nothing in the store was changed."
            )
        if diffs:
            lines = "; ".join(f"{k}: store has {_short(a)}, this run has {_short(b)}" for k, a, b in diffs)
            raise StoreMismatchError(
                f"the dataset store {self.path} was built for another model/text/windows ({lines}). "
                f"Masks measured under different conditions must not be mixed: use another --out path "
                f"(or the --model/--text/--windows/--seq-len/--seed/--device/--dtype the store was made with). "
                f"Nothing in the store was changed."
            )

    # ------------------------------------------------------------------ reading
    @property
    def attrs(self) -> dict:
        """A copy of the group attributes (identity, schema_version, package_version, n_rows)."""
        return dict(self._attrs)

    @property
    def identity(self) -> dict:
        """The identity attributes the store was created with (``players`` only where the game names them)."""
        return {k: self._attrs[k] for k in (*IDENTITY_KEYS, *OPTIONAL_KEYS) if k in self._attrs}

    @property
    def game(self) -> str:
        """What a False in a mask removes: ``blocks`` (a decoder layer) or ``sublayers`` (an attention or MLP)."""
        return str(self._attrs.get("game", GAME_DEFAULTS["game"]))

    @property
    def players(self) -> list[str]:
        """The name of each mask entry: the layer index (blocks) or ``"<layer>.attn"`` / ``"<layer>.mlp"``."""
        return list(self._attrs.get("players") or [str(i) for i in range(self.n_layers)])

    def _check_masks(self, masks: np.ndarray) -> np.ndarray:
        """:func:`check_masks`, with the store's game named when a mask has another game's width."""
        arr = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
        width = arr.shape[-1] if arr.ndim in (1, 2) else None
        if width is not None and width != self.n_layers and (self.game != "blocks" or width == 2 * self.n_layers):
            entries = ("one per decoder layer" if self.game == "blocks" else
                       f"attention and MLP of each of {self.n_layers // 2} layers")
            raise MaskError(f"{self.path} holds the {self.game} game: masks of {self.n_layers} entries ({entries}), "
                            f"not {width}; use a store of the other game (another --out) for those masks")
        return check_masks(arr, self.n_layers)

    def __len__(self) -> int:
        return len(self._rows["nll"])

    @property
    def utility(self) -> str:
        """What the rows' loss is: ``nll`` (mean token NLL), ``kl`` (mean token KL to the dense model) or ``task``
        (mean NLL of a multiple-choice task's gold answers, per question; the task is ``attrs["task"]``)."""
        return str(self._attrs["utility"])

    @property
    def masks(self) -> np.ndarray:
        """``bool[N, n_layers]`` of the committed rows (a copy)."""
        return self._rows["masks"].copy()

    @property
    def nll(self) -> np.ndarray:
        """``float64[N]`` mean token NLL (nats) of the committed rows (a copy)."""
        return self._rows["nll"].copy()

    @property
    def loss(self) -> np.ndarray:
        """``float64[N]``: the utility's column (``nll`` or ``kl``; a task store's answer NLL is its ``nll``), lower
        = better (a copy)."""
        return self._rows[loss_column(self.utility)].copy()

    def window_loss(self) -> np.ndarray:
        """``float64[N, W]``: the utility's per-window values; NaN rows for rows stored without them (a copy)."""
        name = f"window_{loss_column(self.utility)}"
        if name not in self._rows:
            return np.full((len(self), int(self._attrs["n_windows"])), np.nan)
        return self._rows[name].copy()

    @property
    def seconds(self) -> np.ndarray:
        """``float64[N]`` seconds each committed row took to measure (a copy)."""
        return self._rows["seconds"].copy()

    @property
    def windows(self) -> np.ndarray:
        """``int64[W, L]`` token windows every mask was measured on."""
        if self._windows is None:
            self._windows = np.asarray(self._arrays["windows"][:], dtype=np.int64)
        return self._windows.copy()

    def missing(self, masks: np.ndarray) -> np.ndarray:
        """``bool[k]``: True where a mask is not stored yet (wrong mask length -> MaskError).

        Example:
            >>> todo = masks[store.missing(masks)]  # doctest: +SKIP
        """
        arr = self._check_masks(masks)
        return np.array([row.tobytes() not in self._keys for row in arr], dtype=bool)

    def content_hash(self, rows: int | None = None) -> str:
        """sha256 over the identity attributes and the committed masks, nll (and other loss) values, in row order.

        ``rows``: hash only the first ``rows`` rows — appends never change earlier rows, so a surrogate trained
        on a store that has grown since can still be matched to the rows it saw.
        """
        n = len(self) if rows is None else int(rows)
        if not 0 <= n <= len(self):
            raise LayershapError(f"{self.path} has {len(self)} rows; cannot hash the first {rows}")
        h = hashlib.sha256()
        hashed = {k: v for k, v in self.identity.items() if GAME_DEFAULTS.get(k, object()) != v}
        h.update(json.dumps(hashed, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self._rows["masks"][:n], dtype=np.uint8).tobytes())
        h.update(np.ascontiguousarray(self._rows["nll"][:n], dtype="<f8").tobytes())
        if loss_column(self.utility) != "nll":
            h.update(np.ascontiguousarray(self._rows[loss_column(self.utility)][:n], dtype="<f8").tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ writing
    def _check_unchanged(self) -> None:
        """Refuse to append when the committed rows on disk are not the ones this writer read: another writer
        got in (only possible where the file system ignores the lock), so its rows and ours would be mixed."""
        on_disk = int(json.loads((self.path / "zarr.json").read_text())["attributes"][ROWS_ATTR])
        if on_disk != len(self):
            raise StoreLockedError(
                f"the dataset store {self.path} has {on_disk} committed rows on disk but this writer read "
                f"{len(self)}: another process wrote to it although this one holds its write lock ({LOCK_FILE}; "
                "does this file system support file locks?); nothing was written: run again, one writer at a time"
            )

    def append(self, masks: np.ndarray, nll: np.ndarray, seconds: np.ndarray, *,
               window_nll: np.ndarray | None = None, kl: np.ndarray | None = None,
               window_kl: np.ndarray | None = None) -> None:
        """Add finished rows; crash-safe (SIGKILL loses no committed row and never leaves a duplicate).

        ``window_nll`` / ``window_kl`` (``[k, W]``): per-window values (NaN when not given); ``kl``: required by a
        kl store. Masks already stored (or repeated within ``masks``) raise ``ValueError``: callers filter with
        :meth:`missing` first.

        Example:
            >>> store.append(np.ones((1, store.n_layers), bool), np.array([2.9]), np.array([6.8]))  # doctest: +SKIP
        """
        if not self.writable:
            raise ValueError(f"{self.path} was opened read-only (or closed); use DatasetStore.create_or_open to append")
        arr = self._check_masks(masks)
        k = len(arr)
        columns = {"masks": arr, "nll": nll, "seconds": seconds, "kl": kl}
        columns = {name: value if name == "masks" else np.asarray(value, dtype=np.float64).reshape(-1)
                   for name, value in columns.items() if value is not None}
        if self.utility == "kl" and "kl" not in columns:
            raise ValueError(f"{self.path} is a kl store: append needs the rows' kl values")
        if self.utility != "kl" and "kl" in columns:
            del columns["kl"]  # an nll store keeps the nll column only
        wide = int(self._attrs["n_windows"])
        for name, value in (("window_nll", window_nll), ("window_kl", window_kl)):
            if name == "window_kl" and self.utility != "kl":
                continue
            value = np.full((k, wide), np.nan) if value is None else np.asarray(value, dtype=np.float64)
            if value.shape != (k, wide):
                raise ValueError(f"append got {name} of shape {value.shape}, expected {(k, wide)}")
            columns[name] = value
        if any(len(v) != k for v in columns.values()):
            raise ValueError(f"append got {k} masks but columns of lengths {[len(v) for v in columns.values()]}")
        for name in ("nll", "kl"):
            if name in columns and not np.isfinite(columns[name]).all():
                raise ValueError(f"append got non-finite {name} values; only finished, finite measurements are stored")
        keys = [row.tobytes() for row in arr]
        if len(set(keys)) != k or any(key in self._keys for key in keys):
            raise ValueError("append got masks that are already stored or repeated; filter with missing() first")
        if k == 0:
            return
        if self._lock is None or not self._lock.held:
            raise StoreLockedError(
                f"this writer of {self.path} handed its write lock to a later DatasetStore.create_or_open of the "
                "same store in this process; append through that one"
            )
        self._check_unchanged()
        if "window_nll" not in self._arrays:  # a store written before per-window values: add them, NaN so far
            self._arrays["window_nll"] = self._group.create_array(
                "window_nll", shape=(len(self), wide), dtype=np.float64, chunks=(ROW_CHUNK, wide),
                fill_value=np.nan)
            self._rows["window_nll"] = np.full((len(self), wide), np.nan)
        start, end = len(self), len(self) + k
        for name, data in columns.items():
            zarr_array = self._arrays[name]
            if zarr_array.shape[0] < end:
                zarr_array.resize((end, *zarr_array.shape[1:]))
            zarr_array[start:end] = data
        self._group.update_attributes({ROWS_ATTR: end})  # the commit: an atomic rewrite of the group's zarr.json
        self._attrs[ROWS_ATTR] = end
        for name, data in columns.items():
            self._rows[name] = np.concatenate([self._rows[name], data])
        self._keys.update(keys)
