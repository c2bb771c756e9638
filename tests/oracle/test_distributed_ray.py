"""The distributed oracle on a local 2-CPU Ray cluster with a tiny 6-layer model: the store it fills equals the
single-process store row for row; a worker killed mid-run, and a driver killed with SIGKILL then rerun, lose and
duplicate nothing; a worker that cannot load the model gives one clear error; without Ray, the pip fix is named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import ray
import torch
from conftest import save_tiny_model_dir

from layershap.core.errors import LayershapError, MissingPackageError
from layershap.oracle.distributed import RayOracle, measure_masks_distributed
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.measure import dataset_identity, measure_masks
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import make_windows

N_LAYERS = 6
TEXT = "\n".join(list(topics.values())[:40])
ALL_MASKS = ((np.arange(2**N_LAYERS)[:, None] >> np.arange(N_LAYERS)) & 1).astype(bool)  # all 64 masks


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs (one per worker), shut down after the module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model's directory, its store identity and windows, and the single-process reference store."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny_model_dir(root / "model", "llama", N_LAYERS, 0)
    loaded = load_model(str(model_dir), device="cpu")
    windows = make_windows(loaded.tokenizer, TEXT, 2, 16, 0)
    identity = dataset_identity(loaded, "topics", windows, 16)
    reference = DatasetStore.create_or_open(root / "reference.zarr", identity, windows)
    measure_masks(MaskedEvaluator(loaded.model, windows, device="cpu"), reference, ALL_MASKS, progress=False)
    torch.set_num_threads(threads)
    return {"root": root, "model_dir": model_dir, "identity": identity, "windows": windows, "ref": reference}


def new_store(setup, name: str) -> DatasetStore:
    return DatasetStore.create_or_open(setup["root"] / name, setup["identity"], setup["windows"])


def max_diff_to_reference(store: DatasetStore, reference: DatasetStore) -> float:
    """Asserts ``store`` holds exactly the reference's masks, each once; returns the largest |nll difference|."""
    keys = [row.tobytes() for row in store.masks]
    assert len(keys) == len(set(keys)) == len(reference)
    ref = {row.tobytes(): v for row, v in zip(reference.masks, reference.nll)}
    assert set(keys) == set(ref)
    return max(abs(v - ref[k]) for k, v in zip(keys, store.nll))


def test_reference_matches_hf_loss(setup):
    """The reference itself agrees with the model's own loss with layers deleted (independent computation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32).eval()
    ids = torch.as_tensor(setup["windows"])
    ref = {row.tobytes(): v for row, v in zip(setup["ref"].masks, setup["ref"].nll)}
    layers = model.model.layers
    for keep in (np.ones(N_LAYERS, bool), np.array([1, 0, 1, 1, 0, 1], bool)):
        model.model.layers = torch.nn.ModuleList([layer for layer, k in zip(layers, keep) if k])
        model.config.num_hidden_layers = int(keep.sum())
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        assert abs(ref[keep.tobytes()] - loss) < 1e-5


def test_distributed_store_equals_single_process(cluster, setup):
    store = new_store(setup, "dist.zarr")
    added = measure_masks_distributed(str(setup["model_dir"]), store, np.vstack([ALL_MASKS, ALL_MASKS[:5]]),
                                      workers=2, masks_per_call=4, progress=False)
    assert added == 64
    diff = max_diff_to_reference(DatasetStore.open(store.path), setup["ref"])
    print(f"distributed vs single process: {len(store)} rows, max |dnll| = {diff:.3g}")
    assert diff < 1e-6
    assert measure_masks_distributed(str(setup["model_dir"]), store, ALL_MASKS, workers=2, progress=False) == 0


class KillOnFirstAppend:
    """A store whose first append kills a worker that still holds unfinished groups."""

    def __init__(self, store: DatasetStore, pool: RayOracle) -> None:
        self.store, self.pool, self.killed = store, pool, 0

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def append(self, masks, nll, seconds, **per_window) -> None:
        self.store.append(masks, nll, seconds, **per_window)
        if not self.killed:
            busy = self.pool.busy_actors()
            assert busy, "no worker held a group when the first rows landed"
            ray.kill(busy[0], no_restart=True)
            self.killed = 1


def test_worker_killed_mid_run_loses_and_duplicates_nothing(cluster, setup):
    with RayOracle(str(setup["model_dir"]), workers=2) as pool:
        windows, identity = pool.windows_for(TEXT, "topics", 2, 16, 0)  # cut on a worker, as the driver would
        np.testing.assert_array_equal(windows, setup["windows"])
        assert identity == setup["identity"]
        store = new_store(setup, "killed-worker.zarr")
        wrapped = KillOnFirstAppend(store, pool)
        assert measure_masks(pool, wrapped, ALL_MASKS, progress=False, masks_per_call=2) == 64
        assert wrapped.killed == 1 and pool.replaced == 1 and pool.requeued >= 1
        diff = max_diff_to_reference(DatasetStore.open(store.path), setup["ref"])
        print(f"worker killed: {len(store)} rows, {pool.requeued} groups re-queued, max |dnll| = {diff:.3g}")
        assert diff < 1e-6
        some = ALL_MASKS[[63, 5, 40, 5]]  # the pool is also a plain evaluator (compare, baselines): nothing stored
        ref = {row.tobytes(): v for row, v in zip(setup["ref"].masks, setup["ref"].nll)}
        np.testing.assert_allclose(pool.loss(some), [ref[row.tobytes()] for row in some], rtol=0, atol=1e-6)
        assert len(DatasetStore.open(store.path)) == 64


DRIVER = textwrap.dedent("""
    import sys, time
    from layershap.oracle.distributed import measure_masks_distributed
    from layershap.oracle.store import DatasetStore
    import numpy as np

    path, model_dir, address = sys.argv[1:4]
    seen = DatasetStore.open(path)
    store = DatasetStore.create_or_open(path, seen.identity, seen.windows)
    commit = store.append
    def slow_append(*args, **kwargs):  # each group's rows land, then the driver dawdles: the kill comes mid-run
        commit(*args, **kwargs)
        time.sleep(0.25)
    store.append = slow_append
    masks = ((np.arange(64)[:, None] >> np.arange(6)) & 1).astype(bool)
    measure_masks_distributed(model_dir, store, masks, workers=2, ray_address=address, masks_per_call=2,
                              progress=False)
""")


def committed_rows(path: Path) -> int:
    try:
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["n_rows"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_driver_sigkill_then_rerun_resumes(cluster, setup):
    path = new_store(setup, "killed-driver.zarr").path
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(path), str(setup["model_dir"]), cluster],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while committed_rows(path) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    kept = len(DatasetStore.open(path))
    assert 6 <= kept < 64  # killed mid-run, after some rows landed
    before = DatasetStore.open(path)
    store = DatasetStore.create_or_open(path, setup["identity"], setup["windows"])
    added = measure_masks_distributed(str(setup["model_dir"]), store, ALL_MASKS, workers=2, progress=False)
    assert added == 64 - kept
    after = DatasetStore.open(path)
    np.testing.assert_array_equal(after.masks[:kept], before.masks)  # finished rows kept as they were
    np.testing.assert_array_equal(after.nll[:kept], before.nll)
    diff = max_diff_to_reference(after, setup["ref"])
    print(f"driver SIGKILL: {kept} rows kept, {added} added on rerun, {len(after)} rows, max |dnll| = {diff:.3g}")
    assert diff < 1e-6


def test_worker_that_cannot_load_the_model_gives_one_clear_error(cluster, setup):
    broken = setup["root"] / "broken-model"
    shutil.copytree(setup["model_dir"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    store = new_store(setup, "broken.zarr")
    store.append(ALL_MASKS[:1], np.array([3.0]), np.array([1.0]))
    with pytest.raises(LayershapError) as info:
        measure_masks_distributed(str(broken), store, ALL_MASKS, workers=2, progress=False)
    message = str(info.value)
    print(f"load failure: {message}")
    assert "could not load the model" in message and str(broken) in message and "\n" not in message
    assert len(DatasetStore.open(store.path)) == 1  # the row written before is still there


def test_workers_without_ray_name_the_pip_install(setup, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    store = new_store(setup, "no-ray.zarr")
    with pytest.raises(MissingPackageError, match=r"pip install 'layershap\[ray\]'"):
        measure_masks_distributed(str(setup["model_dir"]), store, ALL_MASKS, workers=2, progress=False)
    assert len(DatasetStore.open(store.path)) == 0


def test_oracle_command_with_workers_equals_the_single_process_command(cluster, setup, tmp_path, capsys):
    """`layershap oracle --workers 2` and the plain command write the same rows (same masks, same nll)."""
    from layershap.cli.main import main

    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    common = ["--model", str(setup["model_dir"]), "--text", str(text), "--masks", "stratified", "--n-masks", "20",
              "--windows", "2", "--seq-len", "16", "--device", "cpu", "--no-progress"]
    assert main(["oracle", *common, "--out", str(tmp_path / "one.zarr")]) == 0
    assert main(["oracle", *common, "--out", str(tmp_path / "pool.zarr"), "--workers", "2"]) == 0
    one, pool = DatasetStore.open(tmp_path / "one.zarr"), DatasetStore.open(tmp_path / "pool.zarr")
    assert max_diff_to_reference(pool, one) < 1e-5
    np.testing.assert_array_equal(pool.windows, one.windows)
    assert main(["oracle", *common, "--out", str(tmp_path / "x.zarr"), "--ray-address", "a:1"]) == 2
    assert "--ray-address needs --workers" in capsys.readouterr().err
