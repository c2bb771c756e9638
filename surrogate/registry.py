"""A registry of trained surrogates on disk: ``<root>/<family>/<id>/`` (family = the model's ``model_type``), each
entry holding ``surrogate/`` (a copy of the ``layershap train`` folder) and ``entry.json`` (its description and
the sha256 of every file). The committed Gemma-3-270M surrogate is a read-only built-in entry read in place.

Root: ``--registry DIR``, else ``$LAYERSHAP_REGISTRY``, else ``$XDG_CACHE_HOME/layershap/registry``
(``~/.cache/layershap/registry``). Adding copies into ``<root>/.tmp-add-*``, fsyncs, and renames into place, so an
entry is either complete or absent; an entry whose files are missing, truncated or altered is listed as
``corrupt`` with the reason and never hides the others.

Example:
    >>> reg = Registry(registry_root(None))
    >>> reg.add("runs/x/surrogate", name="my-llama", family="llama")  # doctest: +SKIP
    >>> [(e.id, e.status) for e in reg.entries()]  # doctest: +SKIP
    [('gemma-3-270m', 'ok'), ('my-llama', 'ok')]
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from layershap.core.errors import LayershapError

from .checkpoint import METADATA_FILE, Surrogate, load_surrogate
from .digests import DigestCache, sha256
from .registry_entry import KNOWN_FAMILIES, check_name, describe, family_of

ENTRY_FILE = "entry.json"
ENTRY_FORMAT = "layershap-registry-entry"
SURROGATE_DIR = "surrogate"
BUILTIN_ID = "gemma-3-270m"
TMP_PREFIX = ".tmp-"


class UnknownEntryError(LayershapError):
    """No registry entry has this id."""


class CorruptEntryError(LayershapError):
    """The entry exists but its files are missing, truncated or altered."""


@dataclass
class Entry:
    """One registry entry: ``status`` is ``ok`` or ``corrupt`` (then ``reason`` says why); ``info`` describes it."""

    id: str
    family: str
    path: Path
    builtin: bool = False
    status: str = "ok"
    reason: str | None = None
    info: dict = field(default_factory=dict)
    fingerprint: str | None = None  # sha256 over the entry's file hashes: changes when the entry is replaced

    @property
    def surrogate_dir(self) -> Path:
        return self.path if self.builtin else self.path / SURROGATE_DIR

    def summary(self) -> dict:
        """JSON-ready description (id, family, status, reason, builtin, then ``info``)."""
        return {"id": self.id, "family": self.family, "status": self.status, "reason": self.reason,
                "builtin": self.builtin, **self.info}


def registry_root(registry: str | Path | None = None) -> Path:
    """The registry folder: ``registry``, else ``$LAYERSHAP_REGISTRY``, else the user cache's ``layershap/registry``.

    Example:
        >>> registry_root("/tmp/reg")
        PosixPath('/tmp/reg')
    """
    if registry is not None:
        return Path(registry).expanduser()
    if os.environ.get("LAYERSHAP_REGISTRY"):
        return Path(os.environ["LAYERSHAP_REGISTRY"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "layershap" / "registry"


def builtin_dir() -> Path:
    """The committed Gemma-3-270M surrogate folder, installed as package data of ``layershap.artifacts``."""
    return Path(str(files("layershap.artifacts") / "gemma-3-270m" / "surrogate"))


def _fingerprint(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("layershap")
    except PackageNotFoundError:
        return "unknown"


class Registry:
    """The entries under ``root`` plus the built-in one. Reading never writes; ``add``/``remove`` are atomic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._digests = DigestCache()  # file verification results, kept while the files are unchanged

    # ------------------------------------------------------------ reading
    def entries(self, family: str | None = None) -> list[Entry]:
        """Every entry (built-in first, then by family and id), corrupt ones included with their reason."""
        found = [self._builtin()]
        if self.root.is_dir():
            for fam in sorted(p for p in self.root.iterdir() if p.is_dir()):
                if fam.name.startswith(TMP_PREFIX):
                    found.append(Entry(fam.name, "", fam, status="corrupt",
                                       reason="an interrupted `registry add` (or one in progress); delete the folder"))
                    continue
                if fam.name.startswith("."):
                    continue
                found += [self._read(p) for p in sorted(fam.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        return [e for e in found if family is None or e.family == family]

    def get(self, entry_id: str, require_ok: bool = True) -> Entry:
        """The entry with this id; :class:`UnknownEntryError` if none, :class:`CorruptEntryError` if corrupt."""
        check_name(entry_id)
        if entry_id == BUILTIN_ID:
            entry = self._builtin()
        else:
            paths = sorted(self.root.glob(f"*/{entry_id}")) if self.root.is_dir() else []
            paths = [p for p in paths if p.is_dir() and not p.parent.name.startswith(".")]
            if not paths:
                raise UnknownEntryError(f"no surrogate {entry_id!r} in the registry {self.root}; list the ids with "
                                        "`layershap registry list` (or GET /v1/surrogates)")
            entry = self._read(paths[0])
        if require_ok and entry.status != "ok":
            raise CorruptEntryError(f"registry entry {entry_id!r} is corrupt ({entry.reason}); remove it and add the "
                                    "surrogate again")
        return entry

    def load(self, entry_id: str) -> tuple[Entry, Surrogate]:
        """The entry and its loaded surrogate ensemble."""
        entry = self.get(entry_id)
        try:
            return entry, load_surrogate(entry.surrogate_dir)
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise CorruptEntryError(f"registry entry {entry_id!r} does not load ({exc}); remove it and add the "
                                    "surrogate again") from exc

    def _builtin(self) -> Entry:
        path = builtin_dir()
        try:
            meta = json.loads((path / METADATA_FILE).read_text())
            hashes = {name: self._digests.sha256(path / name) for name in [METADATA_FILE, *meta["member_files"]]}
            return Entry(BUILTIN_ID, family_of(meta), path, builtin=True, info=describe(meta) | {"added": None},
                         fingerprint=_fingerprint(hashes))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return Entry(BUILTIN_ID, KNOWN_FAMILIES[BUILTIN_ID], path, builtin=True, status="corrupt",
                         reason=f"the committed surrogate at {path} is unreadable: {exc}")

    def _read(self, path: Path) -> Entry:
        entry = Entry(path.name, path.parent.name, path)
        try:
            doc = json.loads((path / ENTRY_FILE).read_text())
            if not isinstance(doc, dict) or doc.get("format") != ENTRY_FORMAT:
                raise ValueError(f"{ENTRY_FILE} is not a layershap registry entry")
            if doc.get("id") != path.name or doc.get("family") != path.parent.name:
                raise ValueError(f"{ENTRY_FILE} names {doc.get('family')}/{doc.get('id')}, not its folder")
            hashes = doc["files"]
            for name, digest in hashes.items():
                file = path / SURROGATE_DIR / check_name(name, "file name")
                if not file.is_file():
                    raise ValueError(f"file {SURROGATE_DIR}/{name} is missing (half-copied?)")
                if self._digests.sha256(file) != digest:
                    raise ValueError(f"file {SURROGATE_DIR}/{name} does not match its recorded sha256 (truncated "
                                     "or altered)")
            entry.info = dict(doc["info"])
            entry.fingerprint = _fingerprint(hashes)
        except FileNotFoundError:
            entry.status, entry.reason = "corrupt", f"no {ENTRY_FILE} (an incomplete copy, not made by registry add)"
        except (OSError, ValueError, KeyError, TypeError, AttributeError, LayershapError) as exc:
            entry.status, entry.reason = "corrupt", str(exc)
        return entry

    # ------------------------------------------------------------ writing
    def add(self, surrogate_dir: str | Path, name: str | None = None, family: str | None = None,
            replace: bool = False) -> Entry:
        """Copy a trained surrogate folder into the registry as ``<family>/<name>`` (default name: the model id,
        ``/`` written as ``--``); atomic: a temporary folder is filled, fsynced and renamed into place.
        ``replace=True`` swaps out an existing entry of that name and family (absent for the instant between the
        two renames) instead of refusing.
        """
        src = Path(surrogate_dir)
        try:
            sur = load_surrogate(src)
        except LayershapError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise LayershapError(f"{src} is not a loadable surrogate ({exc}); give the --out folder of "
                                 "`layershap train`") from exc
        meta = sur.metadata
        fam = family_of(meta, family)
        entry_id = check_name(name if name is not None else str(meta.get("model_id") or "").replace("/", "--"),
                              "entry id (give --name)")
        taken = sorted(self.root.glob(f"*/{entry_id}")) if self.root.is_dir() else []
        if replace and taken == [self.root / fam / entry_id]:
            taken = []
        if entry_id == BUILTIN_ID or taken:
            raise LayershapError(f"the registry already has an entry {entry_id!r}; choose another --name or "
                                 f"`layershap registry remove {entry_id}` first")
        names = sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}add-{uuid.uuid4().hex}"
        try:
            (tmp / SURROGATE_DIR).mkdir(parents=True)
            hashes = {}
            for file_name in names:
                dst = tmp / SURROGATE_DIR / file_name
                shutil.copyfile(src / file_name, dst)
                with open(dst, "rb+") as fh:
                    os.fsync(fh.fileno())
                hashes[file_name] = sha256(dst)
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            doc = {"format": ENTRY_FORMAT, "format_version": 1, "id": entry_id, "family": fam,
                   "source": str(src.resolve()), "files": hashes,
                   "info": describe(meta) | {"added": now, "added_by_version": package_version()}}
            with open(tmp / ENTRY_FILE, "w") as fh:
                fh.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp / SURROGATE_DIR)
            _fsync_dir(tmp)
            (self.root / fam).mkdir(exist_ok=True)
            final = self.root / fam / entry_id
            if final.exists() and not replace:
                raise LayershapError(f"the registry already has an entry {entry_id!r}; choose another --name")
            old = self.root / f"{TMP_PREFIX}remove-{uuid.uuid4().hex}"
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(self.root / fam)
            if old.exists():
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return self.get(entry_id)

    def remove(self, entry_id: str) -> Entry:
        """Delete an entry (corrupt ones too): renamed away first, so it disappears at once. Built-in: refused."""
        entry = self.get(entry_id, require_ok=False)
        if entry.builtin:
            raise LayershapError(f"{entry_id!r} is the built-in entry (the committed surrogate); it cannot be removed")
        doomed = self.root / f"{TMP_PREFIX}remove-{uuid.uuid4().hex}"
        os.rename(entry.path, doomed)
        shutil.rmtree(doomed)
        return entry


def register_trained(surrogate_dir: str | Path, family: str, registry: str | Path | None = None) -> Entry:
    """Register a surrogate the main job just trained, as ``<model id>-<dataset hash[:12]>`` (replacing the
    entry of an earlier run on the same data); ``family`` is the loaded model's ``config.model_type``.

    Example:
        >>> register_trained("runs/gemma-3-270m/surrogate", loaded.model.config.model_type)  # doctest: +SKIP
    """
    meta = json.loads((Path(surrogate_dir) / METADATA_FILE).read_text())
    model = re.sub(r"[^A-Za-z0-9._-]", "-", str(meta.get("model_id") or "model").replace("/", "--")).lstrip("._-")
    suffix = str(meta.get("dataset_hash") or "run")[:12]
    return Registry(registry_root(registry)).add(surrogate_dir, name=f"{model[:80] or 'model'}-{suffix}",
                                                 family=family, replace=True)
