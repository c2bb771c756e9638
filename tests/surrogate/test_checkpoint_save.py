"""Surrogate folders are saved whole: a save that fails or is killed half-way leaves the previous surrogate
loadable and byte-identical, and no half-written folder is ever loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from layershap.core.errors import LayershapError
from layershap.surrogate import checkpoint
from layershap.surrogate.checkpoint import Surrogate, load_surrogate
from layershap.surrogate.network import MaskNet

N = 6
MASKS = ((np.arange(2**N)[:, None] >> np.arange(N)) & 1).astype(bool)


def make_surrogate(seed: int, members: int) -> Surrogate:
    torch.manual_seed(seed)
    nets = [MaskNet(N, hidden=8, depth=2) for _ in range(members)]
    meta = {"model_id": f"m{seed}", "model_hash": f"h{seed}", "n_layers": N, "target": "log_nll",
            "target_mean": 1.0 + seed, "target_std": 0.5, "removed_counts": [1, 2]}
    return Surrogate(nets, meta)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def saved(tmp_path):
    """``(folder, bytes of its files, predictions)`` of a 3-member surrogate saved at tmp/surrogate."""
    old = make_surrogate(0, 3)
    out = old.save(tmp_path / "surrogate", extra=lambda d: (d / "history.csv").write_text("member,epoch\n"))
    return out, files(out), old.predict(MASKS)


def assert_intact(out: Path, before: dict, predictions) -> None:
    assert files(out) == before
    mean, std = load_surrogate(out).predict(MASKS)
    np.testing.assert_array_equal(mean, predictions[0])
    np.testing.assert_array_equal(std, predictions[1])


def test_a_save_replaces_the_whole_folder(saved):
    out, _, _ = saved
    new = make_surrogate(1, 2)
    new.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["member_0.pt", "member_1.pt", "metadata.json"]
    back = load_surrogate(out)
    assert back.metadata["model_id"] == "m1" and back.members == 2
    np.testing.assert_array_equal(back.predict_nll(MASKS), new.predict_nll(MASKS))
    assert sorted(p.name for p in out.parent.iterdir()) == ["surrogate"]  # no temporary sibling left


def test_a_save_that_fails_half_way_leaves_the_previous_surrogate(saved, monkeypatch):
    out, before, predictions = saved
    calls = []
    real_save = torch.save

    def dies_on_the_second_member(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", dies_on_the_second_member)
    with pytest.raises(OSError, match="disk full"):
        make_surrogate(1, 3).save(out)
    monkeypatch.undo()
    assert_intact(out, before, predictions)
    with pytest.raises(RuntimeError, match="plot failed"):  # the extra files fail after every member is written
        make_surrogate(1, 3).save(out, extra=lambda d: (_ for _ in ()).throw(RuntimeError("plot failed")))
    assert_intact(out, before, predictions)
    assert sorted(p.name for p in out.parent.iterdir()) == ["surrogate"]


def test_a_failed_swap_puts_the_previous_surrogate_back(saved, monkeypatch):
    out, before, predictions = saved
    real_rename = os.rename
    calls = []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("interrupted")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="interrupted"):
        make_surrogate(1, 2).save(out)
    monkeypatch.undo()
    assert_intact(out, before, predictions)


KILLED_SAVE = """
import os, signal, sys, time
import torch
from layershap.surrogate import checkpoint
from layershap.surrogate.checkpoint import Surrogate
from layershap.surrogate.network import MaskNet

out, when = sys.argv[1], sys.argv[2]
torch.manual_seed(1)
meta = {"model_id": "m1", "model_hash": "h1", "n_layers": 6, "target": "log_nll", "target_mean": 2.0,
        "target_std": 0.5, "removed_counts": [1, 2]}
new = Surrogate([MaskNet(6, hidden=8, depth=2) for _ in range(3)], meta)
real_save, real_rename = torch.save, os.rename

def killed_after_one_member(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

def killed_between_renames(src, dst):
    real_rename(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

if when == "members":
    checkpoint.torch.save = killed_after_one_member
else:
    checkpoint.os.rename = killed_between_renames
new.save(out)
"""


def kill_a_save(out: Path, when: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(out), when], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr  # SIGKILL, mid-save


def test_a_process_killed_while_writing_members_leaves_the_previous_surrogate(saved):
    out, before, predictions = saved
    kill_a_save(out, "members")
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "surrogate"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".surrogate.saving-")  # the half-written folder
    assert_intact(out, before, predictions)  # ... is never what loads
    make_surrogate(2, 1).save(out)  # the next save removes the dead process's leftover
    assert sorted(p.name for p in out.parent.iterdir()) == ["surrogate"]


def test_a_process_killed_between_the_renames_names_the_previous_surrogate(saved):
    out, before, predictions = saved
    kill_a_save(out, "renames")
    assert not out.exists()
    (previous,) = out.parent.glob(".surrogate.old-*")
    with pytest.raises(LayershapError, match=f"previous surrogate is in {previous}"):
        load_surrogate(out)
    previous.rename(out)
    assert_intact(out, before, predictions)


def test_a_folder_with_other_files_is_refused_untouched(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "dataset.zarr").mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(LayershapError, match="not surrogate files"):
        make_surrogate(0, 1).save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.zarr", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
