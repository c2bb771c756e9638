"""--masks SPEC parsing: loo, stratified, file:PATH (.npy and text), and the errors for bad files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layershap.core.errors import LayershapError, MaskError
from layershap.sampling.specs import check_mask_spec, parse_mask_spec


def test_loo_closed_form():
    masks = parse_mask_spec("loo", 4, None, 0)
    expected = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(masks, expected)


def test_stratified_specs():
    n = 8
    default = parse_mask_spec("stratified", n, 40, seed=3)
    assert default.shape == (40, n) and len({r.tobytes() for r in default}) == 40
    assert (~default).sum(1).max() <= math.ceil(n / 2)  # default strata: 1 .. ceil(n/2) removed
    np.testing.assert_array_equal(default, parse_mask_spec("stratified", n, 40, seed=3))  # seeded
    everything = parse_mask_spec("stratified-all", n, 2**n, seed=0)  # all sizes: every mask exactly once
    assert len({r.tobytes() for r in everything}) == 2**n
    capped = parse_mask_spec("stratified", 5, None, seed=0)  # default 128 capped at 1 + C(5,1..3) = 26
    assert capped.shape == (1 + 5 + 10 + 10, 5)
    assert parse_mask_spec("stratified", 12, None, seed=0).shape == (128, 12)


def test_text_file_forms(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("# header comment\n110111\n\n1 0 1 1 1 1   # spaced\n0,0,0,0,0,1\n")
    masks = parse_mask_spec(f"file:{path}", 6, None, 0)
    expected = np.array([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(masks, expected)


def test_npy_file_forms(tmp_path):
    ints = np.array([[1, 0, 1], [0, 1, 1]], np.int8)
    np.save(tmp_path / "i.npy", ints)
    np.save(tmp_path / "b.npy", ints.astype(bool))
    for name in ("i.npy", "b.npy"):
        np.testing.assert_array_equal(parse_mask_spec(f"file:{tmp_path / name}", 3, None, 0), ints.astype(bool))
    np.save(tmp_path / "bad.npy", np.array([[1, 0, 1], [0, 2, 1]]))
    with pytest.raises(MaskError, match="row 1 contains values other than 0/1"):
        parse_mask_spec(f"file:{tmp_path / 'bad.npy'}", 3, None, 0)
    with pytest.raises(MaskError, match="length 3 but the model has 4"):
        parse_mask_spec(f"file:{tmp_path / 'i.npy'}", 4, None, 0)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("1111\n111\n", r"line 2: mask has 3 values but the model has 4"),
        ("1111\n11x1\n", r"line 2: '11x1' contains something other than 0 and 1"),
        ("# only a comment\n\n", "contains no masks"),
        ("1 1 2 1\n", r"line 1: '1 1 2 1' contains something other than 0 and 1"),
    ],
)
def test_bad_text_files(tmp_path, content, pattern):
    path = tmp_path / "m.txt"
    path.write_text(content)
    with pytest.raises(MaskError, match=pattern):
        parse_mask_spec(f"file:{path}", 4, None, 0)


def test_unknown_spec_and_missing_file(tmp_path):
    with pytest.raises(LayershapError, match="valid forms: loo, stratified, stratified-all, file:PATH"):
        parse_mask_spec("random", 4, None, 0)
    with pytest.raises(LayershapError, match="does not exist"):
        parse_mask_spec(f"file:{tmp_path / 'nope.txt'}", 4, None, 0)
    with pytest.raises(LayershapError, match="does not exist"):
        check_mask_spec(f"file:{tmp_path / 'nope.txt'}")
    with pytest.raises(LayershapError, match="valid forms"):
        check_mask_spec("file")
    for good in ("loo", " stratified", "stratified-all"):
        check_mask_spec(good)
