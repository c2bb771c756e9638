"""One writer per dataset store, across real processes: a second writer is refused at open and changes nothing;
a killed writer's lock is taken over; a lock naming another host is not; readers never wait."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_store import make_identity, make_windows, random_masks, snapshot

from layershap.cli.main import main
from layershap.core.errors import StoreLockedError
from layershap.oracle import session as session_module
from layershap.oracle.store import DatasetStore
from layershap.oracle.writer_lock import LOCK_FILE

# A writer process: opens the store for writing and appends one row (mask ``row`` of random_masks(32, seed=3));
# "hold" then waits for stdin to close. A refusal prints the error and exits 3.
WRITER = """
import json, sys
import numpy as np
from layershap.core.errors import StoreLockedError
from layershap.oracle.store import DatasetStore
path, identity, windows, row, mode = sys.argv[1], json.loads(sys.argv[2]), np.load(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rng = np.random.default_rng(3)
rows = rng.choice(2 ** identity["n_layers"], size=32, replace=False)
masks = ((rows[:, None] >> np.arange(identity["n_layers"])) & 1).astype(bool)
try:
    store = DatasetStore.create_or_open(path, identity, windows)
except StoreLockedError as err:
    print(err, file=sys.stderr)
    sys.exit(3)
store.append(masks[row : row + 1], [float(row) + 0.5], [0.1])
print("ready", flush=True)
if mode == "hold":
    sys.stdin.read()
store.close()
"""


def masks_of_writer(row: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    rows = rng.choice(2 ** make_identity()["n_layers"], size=32, replace=False)
    return ((rows[:, None] >> np.arange(make_identity()["n_layers"])) & 1).astype(bool)[row]


def writer(tmp_path: Path, path: Path, row: int, mode: str) -> subprocess.Popen:
    np.save(tmp_path / "windows.npy", make_windows())
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), json.dumps(make_identity()),
                             str(tmp_path / "windows.npy"), str(row), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def started(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()


def test_a_second_writer_process_is_refused_and_changes_nothing(tmp_path):
    path = tmp_path / "d.zarr"
    holder = writer(tmp_path, path, 0, "hold")
    try:
        started(holder)
        before = snapshot(path)
        holder_line = json.loads((path / LOCK_FILE).read_text())
        assert holder_line["pid"] == holder.pid and holder_line["host"] == socket.gethostname()
        second = writer(tmp_path, path, 1, "once")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 3, (out, err)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err and "another --out" in err
        assert len(err.strip().splitlines()) == 1
        assert snapshot(path) == before  # not one byte of the store changed, lock file included
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):  # this process is refused too
            DatasetStore.create_or_open(path, make_identity(), make_windows())
        reader = DatasetStore.open(path)  # readers never need the lock
        np.testing.assert_array_equal(reader.masks, masks_of_writer(0)[None])
    finally:
        holder.communicate(timeout=120)  # stdin closed: the holder closes its store and exits
    assert holder.returncode == 0
    assert (path / LOCK_FILE).read_text() == ""  # released on close
    third = writer(tmp_path, path, 1, "once")
    assert third.communicate(timeout=120) and third.returncode == 0
    np.testing.assert_array_equal(DatasetStore.open(path).nll, [0.5, 1.5])


def test_a_killed_writers_lock_is_taken_over(tmp_path, capfd):
    path = tmp_path / "d.zarr"
    holder = writer(tmp_path, path, 0, "hold")
    started(holder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    holder.stdout.close(), holder.stdin.close(), holder.stderr.close()
    assert json.loads((path / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead holder's line is left
    store = DatasetStore.create_or_open(path, make_identity(), make_windows())
    err = capfd.readouterr().err
    assert "took over the write lock" in err and f"pid {holder.pid}" in err
    assert json.loads((path / LOCK_FILE).read_text())["pid"] == os.getpid()
    store.append(masks_of_writer(5)[None], [9.0], [0.1])
    np.testing.assert_array_equal(DatasetStore.open(path).nll, [0.5, 9.0])  # the killed writer's row is kept
    store.close()
    assert (path / LOCK_FILE).read_text() == ""


def test_a_lock_of_another_host_is_refused_until_deleted(tmp_path):
    path = tmp_path / "d.zarr"
    DatasetStore.create_or_open(path, make_identity(), make_windows()).close()
    line = {"pid": 4242, "host": "elsewhere", "command": "layershap oracle ...", "started": "2025-01-02 03:04:05"}
    (path / LOCK_FILE).write_text(json.dumps(line) + "\n")
    with pytest.raises(StoreLockedError, match=r"pid 4242 on host elsewhere.*delete .*writer\.lock"):
        DatasetStore.create_or_open(path, make_identity(), make_windows())
    (path / LOCK_FILE).unlink()
    DatasetStore.create_or_open(path, make_identity(), make_windows()).close()


def test_a_later_writer_in_this_process_takes_the_lock_and_the_earlier_cannot_append(tmp_path):
    path = tmp_path / "d.zarr"
    masks = random_masks(3)
    first = DatasetStore.create_or_open(path, make_identity(), make_windows())
    first.append(masks[:1], [1.0], [0.1])
    second = DatasetStore.create_or_open(path, make_identity(), make_windows())
    assert len(second) == 1
    with pytest.raises(StoreLockedError, match="handed its write lock"):
        first.append(masks[1:2], [2.0], [0.1])
    second.append(masks[1:3], [3.0, 4.0], [0.1, 0.1])
    first.close()  # closing the earlier writer leaves the lock with the later one
    assert json.loads((path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.close()
    np.testing.assert_array_equal(DatasetStore.open(path).nll, [1.0, 3.0, 4.0])


def test_an_append_refuses_rows_committed_behind_its_back(tmp_path):
    """Where a file system ignores the lock, a writer that sees other committed rows writes nothing."""
    import zarr

    path = tmp_path / "d.zarr"
    masks = random_masks(3)
    store = DatasetStore.create_or_open(path, make_identity(), make_windows())
    store.append(masks[:1], [1.0], [0.1])
    group = zarr.open_group(str(path), mode="r+")  # another writer: data of row 1, then its commit
    group["masks"].resize((2, masks.shape[1]))
    group["masks"][1:2] = masks[1:2]
    group["nll"].resize((2,))
    group["nll"][1:2] = [7.0]
    group["seconds"].resize((2,))
    group["seconds"][1:2] = [0.1]
    group.update_attributes({"n_rows": 2})
    before = snapshot(path)
    with pytest.raises(StoreLockedError, match="2 committed rows on disk but this writer read 1"):
        store.append(masks[2:3], [3.0], [0.1])
    assert snapshot(path) == before
    store.close()


def test_layershap_oracle_is_refused_before_loading_the_model_while_another_process_writes(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.zarr"
    quick = ["--windows", "2", "--seq-len", "16", "--device", "cpu", "--no-progress"]
    assert main(["oracle", "--model", str(tiny_model_dir), "--masks", "loo", "--out", str(out), *quick]) == 0
    stored = DatasetStore.open(out)
    np.save(tmp_path / "windows.npy", stored.windows)
    hold = ("import sys, json, numpy as np\nfrom layershap.oracle.store import DatasetStore\n"
            "s = DatasetStore.create_or_open(sys.argv[1], json.loads(sys.argv[2]), np.load(sys.argv[3]))\n"
            "print('ready', flush=True)\nsys.stdin.read()\ns.close()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out), json.dumps(stored.identity),
                               str(tmp_path / "windows.npy")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        started(holder)
        before = snapshot(out)

        def no_load(*args, **kwargs):
            raise AssertionError("the model must not be loaded for a store another process is writing")

        monkeypatch.setattr(session_module, "load_model", no_load)
        capsys.readouterr()
        code = main(["oracle", "--model", str(tiny_model_dir), "--masks", "stratified", "--n-masks", "8",
                     "--out", str(out), *quick])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("layershap oracle: error: the dataset store") and f"pid {holder.pid}" in err
        assert len(err.splitlines()) == 1
        assert snapshot(out) == before
    finally:
        holder.communicate(timeout=120)
    assert holder.returncode == 0
