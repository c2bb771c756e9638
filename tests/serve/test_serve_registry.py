"""Surrogate registry: location, atomic add, list/show/remove commands, the built-in entry, family resolution,
id validation, and corrupt entries reported beside good ones."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from serve_support import ARTIFACT_SURROGATE, N_TINY, tiny_surrogate

from layershap.cli.registry import registry_add, registry_list, registry_remove, registry_show
from layershap.core.errors import LayershapError
from layershap.surrogate import digests
from layershap.surrogate import registry as registry_mod
from layershap.surrogate.checkpoint import load_surrogate
from layershap.surrogate.registry import (
    BUILTIN_ID,
    CorruptEntryError,
    Registry,
    UnknownEntryError,
    register_trained,
    registry_root,
)


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return tiny_surrogate(tmp_path / "tiny")


def test_registry_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERSHAP_REGISTRY", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry_root(tmp_path / "flag") == tmp_path / "flag"
    assert registry_root(None) == tmp_path / "env"
    monkeypatch.delenv("LAYERSHAP_REGISTRY")
    assert registry_root(None) == tmp_path / "xdg" / "layershap" / "registry"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry_root(None) == Path.home() / ".cache" / "layershap" / "registry"


def test_builtin_entry_is_there_without_add_and_is_read_only(tmp_path, capsys):
    reg = Registry(tmp_path / "empty")
    entries = reg.entries()
    assert [(e.id, e.family, e.status, e.builtin) for e in entries] == [(BUILTIN_ID, "gemma3_text", "ok", True)]
    meta = json.loads((ARTIFACT_SURROGATE / "metadata.json").read_text())
    info = entries[0].info
    assert info["model_hash"] == meta["model_hash"] and info["n_layers"] == 18 and info["members"] == 8
    assert info["layer_types"] == meta["dataset"]["layer_types"] and info["rows"] == meta["split"]["rows"]
    assert info["text"]["text_id"] == meta["dataset"]["text_id"] and info["metrics"] == meta["metrics"]
    assert entries[0].surrogate_dir.resolve() == ARTIFACT_SURROGATE.resolve()  # read in place, not copied
    _, sur = reg.load(BUILTIN_ID)
    ones = np.ones((1, 18), bool)
    assert sur.predict_nll(ones)[0] == load_surrogate(ARTIFACT_SURROGATE).predict_nll(ones)[0]
    with pytest.raises(LayershapError, match="built-in"):
        registry_remove(BUILTIN_ID, registry=tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # reading never creates the registry


def test_add_list_show_remove(tmp_path, tiny, capsys):
    root = tmp_path / "reg"
    assert registry_add(tiny, registry=root) == 0  # name = model id, family = metadata model_type
    entry_dir = root / "llama" / "tiny-synthetic"
    assert (entry_dir / "entry.json").is_file()
    assert sorted(p.name for p in (entry_dir / "surrogate").iterdir()) == sorted(p.name for p in tiny.iterdir())
    assert [p.name for p in root.iterdir()] == ["llama"]  # no temporary folder left behind
    masks = np.random.default_rng(0).random((5, N_TINY)) < 0.5
    _, sur = Registry(root).load("tiny-synthetic")
    assert np.array_equal(sur.predict(masks)[0], load_surrogate(tiny).predict(masks)[0])

    assert registry_list(registry=root) == 0
    out = capsys.readouterr().out
    assert "tiny-synthetic" in out and "llama" in out and BUILTIN_ID in out
    assert registry_list(family="llama", registry=root) == 0
    out = capsys.readouterr().out
    assert "tiny-synthetic" in out and BUILTIN_ID not in out
    assert registry_show("tiny-synthetic", registry=root) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "ok" and shown["n_layers"] == N_TINY and shown["model_hash"] == "h-tiny"
    assert shown["members"] == 2 and shown["added"] is not None and shown["rows"] == 120

    with pytest.raises(LayershapError, match="already has an entry"):
        registry_add(tiny, registry=root)
    assert registry_add(tiny, name="second", registry=root) == 0
    assert {e.id for e in Registry(root).entries()} == {BUILTIN_ID, "tiny-synthetic", "second"}
    assert registry_remove("tiny-synthetic", registry=root) == 0
    assert {e.id for e in Registry(root).entries()} == {BUILTIN_ID, "second"}
    assert not entry_dir.exists() and [p.name for p in (root / "llama").iterdir()] == ["second"]
    with pytest.raises(UnknownEntryError):
        Registry(root).get("tiny-synthetic")


def test_family_from_metadata_flag_or_error(tmp_path, tiny):
    meta_path = tiny / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_type"]
    meta_path.write_text(json.dumps(meta))
    root = tmp_path / "reg"
    with pytest.raises(LayershapError, match="--family"):
        registry_add(tiny, registry=root)
    assert registry_add(tiny, family="qwen2", registry=root) == 0
    assert Registry(root).get("tiny-synthetic").family == "qwen2"
    meta["model_type"] = "llama"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LayershapError, match="contradicts"):
        registry_add(tiny, name="x", family="qwen2", registry=root)


@pytest.mark.parametrize("bad", ["../evil", "a/b", ".hidden", "", "x" * 101, "a b", "..", "/abs"])
def test_path_tricks_in_ids_are_refused(tmp_path, tiny, bad):
    root = tmp_path / "reg"
    with pytest.raises(LayershapError, match="invalid"):
        registry_add(tiny, name=bad, registry=root)
    with pytest.raises(LayershapError, match="invalid"):
        Registry(root).get(bad)
    assert not root.exists() or not any(root.iterdir())


def test_add_of_a_broken_folder_is_refused(tmp_path):
    with pytest.raises(LayershapError, match="not a trained surrogate"):
        registry_add(tmp_path, registry=tmp_path / "reg")


def test_interrupted_add_leaves_nothing(tmp_path, tiny, monkeypatch):
    root = tmp_path / "reg"
    calls = []
    real_copy = shutil.copyfile

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(registry_mod.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError):
        registry_add(tiny, registry=root)
    assert len(calls) == 3
    assert [p.name for p in root.iterdir()] == []  # neither the entry nor its temporary folder
    assert [e.id for e in Registry(root).entries()] == [BUILTIN_ID]


def test_corrupt_entries_are_reported_beside_good_ones(tmp_path, tiny):
    root = tmp_path / "reg"
    reg = Registry(root)
    for name in ("good", "truncated", "no-entry", "altered", "missing"):
        reg.add(tiny, name=name)
    member = root / "llama" / "truncated" / "surrogate" / "member_0.pt"
    member.write_bytes(member.read_bytes()[:100])
    (root / "llama" / "no-entry" / "entry.json").unlink()
    entry_json = root / "llama" / "altered" / "entry.json"
    entry_json.write_text(entry_json.read_text()[:50])
    (root / "llama" / "missing" / "surrogate" / "member_1.pt").unlink()
    (root / ".tmp-add-0123").mkdir()
    (root / "llama" / "manual-copy").mkdir()

    status = {e.id: (e.status, e.reason) for e in reg.entries()}
    assert status[BUILTIN_ID] == ("ok", None) and status["good"] == ("ok", None)
    assert "sha256" in status["truncated"][1] and "entry.json" in status["no-entry"][1]
    assert "member_1.pt is missing" in status["missing"][1] and "interrupted" in status[".tmp-add-0123"][1]
    assert all(status[k][0] == "corrupt" for k in ("truncated", "no-entry", "altered", "missing", "manual-copy"))
    with pytest.raises(CorruptEntryError, match="truncated"):
        reg.load("truncated")
    _entry, sur = reg.load("good")
    assert sur.n_layers == N_TINY
    reg.remove("truncated")  # a corrupt entry can be removed
    assert "truncated" not in {e.id for e in reg.entries()}


def test_register_trained_names_by_data_and_replaces_an_earlier_run(tmp_path, tiny, monkeypatch):
    meta_path = tiny / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.update(model_id="org/My Model", dataset_hash="abcdef0123456789")
    del meta["model_type"]
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setenv("LAYERSHAP_REGISTRY", str(tmp_path / "reg"))
    first = register_trained(tiny, "llama")
    assert (first.id, first.family, first.status) == ("org--My-Model-abcdef012345", "llama", "ok")
    again = register_trained(tiny, "llama")  # a rerun on the same data replaces the entry, never refuses
    assert again.id == first.id and again.info["added"] >= first.info["added"]
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["llama"]  # no leftovers
    assert [e.id for e in Registry(tmp_path / "reg").entries()] == [BUILTIN_ID, first.id]
    with pytest.raises(LayershapError, match="already has an entry"):
        Registry(tmp_path / "reg").add(tiny, name=first.id, family="llama")  # plain add still refuses


def _count_hashing(monkeypatch) -> list[Path]:
    hashed: list[Path] = []
    real = digests.sha256

    def counting(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(digests, "sha256", counting)
    return hashed


def _flip_a_byte_keeping_size_and_mtime(path: Path) -> None:
    """Alter one byte in place, then give the file its old mtime back (only ctime then tells it changed)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_listing_reads_no_unchanged_file_twice_and_still_sees_an_altered_one(tmp_path, tiny, monkeypatch):
    root = tmp_path / "reg"
    reg = Registry(root)
    reg.add(tiny)
    reg.add(tiny, name="other")
    files = sorted((root / "llama" / "tiny-synthetic" / "surrogate").iterdir())
    hashed = _count_hashing(monkeypatch)
    # files written less than RACY_NS ago are hashed on every listing (a same-size rewrite within the
    # timestamp granularity would look unchanged): both listings read them
    reg.entries()
    reg.entries()
    fresh = [p for p in hashed if p.parent.name == "surrogate" and "tiny-synthetic" in p.parts]
    assert sorted(fresh) == sorted(files * 2)

    monkeypatch.setattr(digests, "RACY_NS", 50_000_000)
    time.sleep(0.1)  # every file now older than the (shortened) racy window
    first = len(hashed)
    assert [e.status for e in reg.entries()] == ["ok"] * 3
    builtin = 1 + len(json.loads((ARTIFACT_SURROGATE / "metadata.json").read_text())["member_files"])
    assert len(hashed) - first <= 2 * len(files) + builtin  # at most each file once (the built-in may be cached)
    settled = len(hashed)
    for _ in range(5):
        assert [e.status for e in reg.entries()] == ["ok"] * 3
        reg.get("tiny-synthetic")
    assert len(hashed) == settled  # nothing re-read: listing costs a stat per file

    member = root / "llama" / "tiny-synthetic" / "surrogate" / "member_0.pt"
    original = member.read_bytes()
    _flip_a_byte_keeping_size_and_mtime(member)
    status = {e.id: (e.status, e.reason) for e in reg.entries()}
    assert status["tiny-synthetic"][0] == "corrupt" and "member_0.pt does not match" in status["tiny-synthetic"][1]
    assert status["other"] == ("ok", None) and hashed[settled:] == [member]  # only the altered file re-read
    with pytest.raises(CorruptEntryError):
        reg.load("tiny-synthetic")
    member.write_bytes(original)  # put back: the entry is good again
    assert reg.get("tiny-synthetic").status == "ok"
