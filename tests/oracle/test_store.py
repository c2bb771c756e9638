"""DatasetStore: round trip, reopen + append, identity mismatch leaves the store byte-identical, torn appends."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from layershap.core.errors import LayershapError, MaskError, StoreMismatchError
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import windows_sha256

N_LAYERS = 5


def make_identity(**overrides) -> dict:
    ident = {
        "model_id": "tiny/llama", "model_hash": "a" * 64, "n_layers": N_LAYERS,
        "layer_types": ["full_attention"] * N_LAYERS, "text_id": "builtin",
        "windows_sha256": windows_sha256(make_windows()),
        "n_windows": 3, "seq_len": 8, "dtype": "float32",
    }
    ident.update(overrides)
    return ident


def make_windows(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 300, size=(3, 9), dtype=np.int64)


def random_masks(k: int, seed: int = 1) -> np.ndarray:
    """k distinct random masks of N_LAYERS layers."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(2**N_LAYERS, size=k, replace=False)
    return ((rows[:, None] >> np.arange(N_LAYERS)) & 1).astype(bool)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip_and_attributes(tmp_path):
    path = tmp_path / "d.zarr"
    windows = make_windows()
    masks = random_masks(7)
    nll = np.linspace(2.0, 9.0, 7)
    secs = np.arange(7) + 0.5
    store = DatasetStore.create_or_open(path, make_identity(), windows)
    assert len(store) == 0 and store.masks.shape == (0, N_LAYERS)
    store.append(masks[:3], nll[:3], secs[:3])
    store.append(masks[3:], nll[3:], secs[3:])

    back = DatasetStore.open(path)
    assert len(back) == 7
    np.testing.assert_array_equal(back.masks, masks)
    assert back.masks.dtype == bool
    np.testing.assert_array_equal(back.nll, nll)
    np.testing.assert_array_equal(back.seconds, secs)
    np.testing.assert_array_equal(back.windows, windows)
    attrs = back.attrs
    for key, value in make_identity().items():
        assert attrs[key] == value
    assert attrs["schema_version"] == 1 and attrs["n_rows"] == 7
    assert isinstance(attrs["package_version"], str) and attrs["package_version"]
    # the group metadata on disk holds the same committed row count (plain zarr v3 JSON)
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["attributes"]["n_rows"] == 7
    # read-only handle refuses to append
    with pytest.raises(ValueError, match="read-only"):
        back.append(random_masks(1, seed=9), [1.0], [1.0])


def test_reopen_and_append(tmp_path):
    path = tmp_path / "d.zarr"
    masks = random_masks(10)
    first = DatasetStore.create_or_open(path, make_identity(), make_windows())
    first.append(masks[:4], np.arange(4.0), np.ones(4))
    del first
    again = DatasetStore.create_or_open(path, make_identity(model_id="renamed/path"), make_windows())
    assert len(again) == 4
    again.append(masks[4:], np.arange(4.0, 10.0), np.ones(6))
    final = DatasetStore.open(path)
    np.testing.assert_array_equal(final.masks, masks)
    np.testing.assert_array_equal(final.nll, np.arange(10.0))
    assert final.attrs["model_id"] == "tiny/llama"  # created once; a reopen never rewrites identity


def test_missing_and_duplicates(tmp_path):
    store = DatasetStore.create_or_open(tmp_path / "d.zarr", make_identity(), make_windows())
    masks = random_masks(6)
    store.append(masks[[0, 2]], [1.0, 2.0], [0.1, 0.1])
    np.testing.assert_array_equal(store.missing(masks), [False, True, False, True, True, True])
    with pytest.raises(ValueError, match="already stored"):
        store.append(masks[[1, 2]], [1.0, 2.0], [0.1, 0.1])
    with pytest.raises(ValueError, match="repeated"):
        store.append(masks[[3, 3]], [1.0, 1.0], [0.1, 0.1])
    with pytest.raises(MaskError, match="does not match"):
        store.missing(np.ones((1, N_LAYERS + 1), bool))
    with pytest.raises(ValueError, match="non-finite"):
        store.append(masks[[4]], [np.inf], [0.1])
    assert len(DatasetStore.open(tmp_path / "d.zarr")) == 2  # none of the refused appends wrote a row


@pytest.mark.parametrize(
    "override",
    [
        {"model_hash": "c" * 64},
        {"text_id": "other.txt"},
        {"windows_sha256": windows_sha256(make_windows(seed=1))},
        {"n_layers": N_LAYERS + 1, "layer_types": ["full_attention"] * (N_LAYERS + 1)},
        {"dtype": "bfloat16"},
    ],
    ids=["model_hash", "text", "windows", "n_layers", "dtype"],
)
def test_identity_mismatch_leaves_store_untouched(tmp_path, override):
    path = tmp_path / "d.zarr"
    store = DatasetStore.create_or_open(path, make_identity(), make_windows())
    store.append(random_masks(3), [1.0, 2.0, 3.0], [0.5, 0.5, 0.5])
    before = snapshot(path)
    key = next(iter(override))
    windows = make_windows(seed=1 if key == "windows_sha256" else 0)
    with pytest.raises(StoreMismatchError) as info:
        DatasetStore.create_or_open(path, make_identity(**override), windows)
    msg = str(info.value)
    assert key in msg and "--out" in msg
    assert repr(make_identity()[key])[:40] in msg and repr(override[key])[:40] in msg  # names both values
    assert snapshot(path) == before


def test_identity_must_describe_the_windows(tmp_path):
    with pytest.raises(ValueError, match="windows_sha256"):
        DatasetStore.create_or_open(tmp_path / "d.zarr", make_identity(), make_windows(seed=5))
    with pytest.raises(ValueError, match="identity lacks keys"):
        DatasetStore.create_or_open(tmp_path / "d.zarr", {"model_id": "x"}, make_windows())
    assert not (tmp_path / "d.zarr").exists()


def test_not_a_store(tmp_path):
    with pytest.raises(LayershapError, match="does not exist"):
        DatasetStore.open(tmp_path / "nothing.zarr")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(LayershapError, match="not a layershap dataset store"):
        DatasetStore.open(plain)
    with pytest.raises(LayershapError, match="not a layershap dataset store"):
        DatasetStore.create_or_open(plain, make_identity(), make_windows())
    assert (plain / "notes.txt").read_text() == "hello" and len(list(plain.iterdir())) == 1
    import zarr

    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w-").update_attributes({"x": 1})
    with pytest.raises(LayershapError, match="not a layershap dataset store"):
        DatasetStore.open(tmp_path / "foreign.zarr")


def test_empty_directory_becomes_a_store(tmp_path):
    path = tmp_path / "empty.zarr"
    path.mkdir()
    store = DatasetStore.create_or_open(path, make_identity(), make_windows())
    assert len(store) == 0 and (path / "zarr.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["empty.zarr"]  # no temporary folder left behind


def test_torn_append_is_ignored_and_overwritten(tmp_path):
    """Rows written and arrays resized but the count never committed (a SIGKILL mid-append) are invisible."""
    import zarr

    path = tmp_path / "d.zarr"
    masks = random_masks(5)
    store = DatasetStore.create_or_open(path, make_identity(), make_windows())
    store.append(masks[:2], [1.0, 2.0], [0.1, 0.2])
    # simulate the killed append: data of two more rows lands, the commit (n_rows) does not
    group = zarr.open_group(str(path), mode="r+")
    group["masks"].resize((4, N_LAYERS))
    group["masks"][2:4] = masks[2:4]
    group["nll"].resize((4,))
    group["nll"][2:4] = [77.0, 88.0]  # seconds left un-resized: the kill came between arrays
    store.close()  # the killed writer's lock is gone with it
    reopened = DatasetStore.create_or_open(path, make_identity(), make_windows())
    assert len(reopened) == 2
    np.testing.assert_array_equal(reopened.masks, masks[:2])
    assert reopened.missing(masks[2:4]).all()  # the torn rows count as not measured
    reopened.append(masks[2:5], [3.0, 4.0, 5.0], [0.3, 0.4, 0.5])
    final = DatasetStore.open(path)
    np.testing.assert_array_equal(final.masks, masks)
    np.testing.assert_array_equal(final.nll, [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(final.seconds, [0.1, 0.2, 0.3, 0.4, 0.5])


def test_content_hash_tracks_rows_and_identity(tmp_path):
    masks = random_masks(4)
    a = DatasetStore.create_or_open(tmp_path / "a.zarr", make_identity(), make_windows())
    a.append(masks, [1.0, 2.0, 3.0, 4.0], np.ones(4))
    # independent recomputation of the documented formula
    h = hashlib.sha256()
    h.update(json.dumps(make_identity(), sort_keys=True).encode())
    h.update(masks.astype(np.uint8).tobytes())
    h.update(np.array([1.0, 2.0, 3.0, 4.0], "<f8").tobytes())
    assert a.content_hash() == h.hexdigest() == DatasetStore.open(tmp_path / "a.zarr").content_hash()
    b = DatasetStore.create_or_open(tmp_path / "b.zarr", make_identity(), make_windows())
    b.append(masks, [1.0, 2.0, 3.0, 4.5], np.full(4, 9.0))  # seconds do not enter the hash, nll does
    assert b.content_hash() != a.content_hash()


def test_content_hash_of_a_prefix_survives_appends(tmp_path):
    """The hash of the first rows is unchanged by later appends and equals the hash the store had then."""
    import pytest

    from layershap.core.errors import LayershapError

    store = DatasetStore.create_or_open(tmp_path / "p.zarr", make_identity(), make_windows())
    masks = random_masks(3)
    store.append(masks[:2], np.array([3.0, 4.0]), np.zeros(2))
    before = store.content_hash()
    store.append(masks[2:], np.array([5.0]), np.zeros(1))
    assert store.content_hash() != before
    assert store.content_hash(rows=2) == before
    with pytest.raises(LayershapError):
        store.content_hash(rows=4)


def test_game_and_utility_are_part_of_the_identity(tmp_path):
    """A store of one game or utility refuses rows of another; nothing is written."""
    import pytest

    from layershap.core.errors import StoreMismatchError

    store = DatasetStore.create_or_open(tmp_path / "g.zarr", make_identity(), make_windows())
    store.append(random_masks(1), [1.0], [0.1])
    assert (store.attrs["game"], store.attrs["utility"]) == ("blocks", "nll")
    for key, value in (("game", "sublayers"), ("utility", "kl")):
        with pytest.raises(StoreMismatchError, match=key):
            DatasetStore.create_or_open(tmp_path / "g.zarr", {**make_identity(), key: value}, make_windows())
    assert len(DatasetStore.open(tmp_path / "g.zarr")) == 1


def test_a_store_written_before_the_game_keys_reads_as_blocks_nll_with_its_old_hash(tmp_path):
    """Stores without ``game``/``utility`` attributes are whole-block NLL stores; their content hash is the
    formula without those keys (what surrogates trained on them recorded)."""
    import zarr

    masks = random_masks(2)
    legacy = {k: v for k, v in make_identity().items() if k not in ("game", "utility")}
    store = DatasetStore.create_or_open(tmp_path / "old.zarr", make_identity(), make_windows())
    store.append(masks, [1.0, 2.0], [0.1, 0.2])
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    attrs = dict(group.attrs)
    for key in ("game", "utility"):
        attrs.pop(key, None)
    group.attrs.clear()
    group.attrs.update(attrs)
    old = DatasetStore.open(tmp_path / "old.zarr")
    assert old.identity["game"] == "blocks" and old.identity["utility"] == "nll"
    h = hashlib.sha256()
    h.update(json.dumps(legacy, sort_keys=True).encode())
    h.update(masks.astype(np.uint8).tobytes())
    h.update(np.array([1.0, 2.0], "<f8").tobytes())
    assert old.content_hash() == h.hexdigest()


def test_per_window_values_and_the_kl_column_round_trip(tmp_path):
    """A kl store keeps nll, kl and both per-window arrays; its loss is the kl column; it refuses rows without kl."""
    import pytest

    masks = random_masks(2)
    store = DatasetStore.create_or_open(tmp_path / "k.zarr", make_identity(utility="kl"), make_windows())
    window_nll = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    window_kl = np.array([[0.1, 0.2, 0.3], [0.0, 0.3, 0.3]])
    store.append(masks, window_nll.mean(1), [0.5, 0.5], window_nll=window_nll, kl=window_kl.mean(1),
                 window_kl=window_kl)
    again = DatasetStore.open(tmp_path / "k.zarr")
    assert again.utility == "kl"
    np.testing.assert_array_equal(again.nll, [2.0, 2.0])
    np.testing.assert_allclose(again.loss, [0.2, 0.2])
    np.testing.assert_array_equal(again.window_loss(), window_kl)
    with pytest.raises(ValueError, match="needs the rows' kl values"):
        store.append(random_masks(1, seed=9), [1.0], [0.1])
    with pytest.raises(ValueError, match="window_kl of shape"):
        store.append(random_masks(1, seed=9), [1.0], [0.1], kl=[0.1], window_kl=np.zeros((1, 2)))
    assert len(DatasetStore.open(tmp_path / "k.zarr")) == 2


def test_a_store_without_per_window_values_gains_them_with_nan_for_old_rows(tmp_path):
    import zarr

    store = DatasetStore.create_or_open(tmp_path / "w.zarr", make_identity(), make_windows())
    store.append(random_masks(1), [1.0], [0.1])
    group = zarr.open_group(str(tmp_path / "w.zarr"), mode="r+")
    del group["window_nll"]  # as stores written before per-window values were kept
    old = DatasetStore.create_or_open(tmp_path / "w.zarr", make_identity(), make_windows())
    assert np.isnan(old.window_loss()).all() and old.window_loss().shape == (1, 3)
    old.append(random_masks(2, seed=5)[1:], [2.0], [0.1], window_nll=np.array([[1.0, 2.0, 3.0]]))
    rows = DatasetStore.open(tmp_path / "w.zarr").window_loss()
    assert np.isnan(rows[0]).all()
    np.testing.assert_array_equal(rows[1], [1.0, 2.0, 3.0])
