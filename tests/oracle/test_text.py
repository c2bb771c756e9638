"""Calibration text sources and token windows."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from collections import Counter

import numpy as np
import pytest

from layershap.core.errors import LayershapError, MissingPackageError
from layershap.oracle.text import eval_windows, load_text, make_windows, windows_sha256
from layershap.oracle.windows import decision_windows, validation_windows


class CountingTokenizer:
    """Text "0 1 2 ..." -> ids [0, 1, 2, ...]: a window's tokens reveal exactly where it was cut."""

    def __init__(self, bos_token_id: int | None = 10**6) -> None:
        self.bos_token_id = bos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        ids = [int(word) for word in text.split()]
        special = add_special_tokens and self.bos_token_id is not None
        return {"input_ids": ([self.bos_token_id] if special else []) + ids}


def counting_text(n: int) -> str:
    return " ".join(str(i) for i in range(n))


def test_builtin_text_is_pydoc_topics_in_key_order():
    from pydoc_data.topics import topics

    text = load_text("builtin")
    assert text.text_id == "builtin:pydoc_data.topics"
    assert len(text.text) > 300_000
    keys = sorted(topics)
    assert text.text.startswith(topics[keys[0]]) and text.text.endswith(topics[keys[-1]])
    assert text.text.count(topics[keys[1]]) >= 1 and len(text.text) == sum(map(len, topics.values())) + 2 * (
        len(topics) - 1
    )


def test_txt_file_and_content_based_id(tmp_path):
    content = "Ünïcode prose.\nSecond line — with a dash.\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "cal.txt", tmp_path / "b" / "cal.txt"
    first.write_text(content, encoding="utf-8")
    second.write_text(content, encoding="utf-8")
    loaded = load_text(str(first))
    assert loaded.text == content
    assert loaded.text_id == f"file:cal.txt@sha256:{hashlib.sha256(content.encode()).hexdigest()[:16]}"
    assert load_text(str(second)).text_id == loaded.text_id
    second.write_text(content + "x", encoding="utf-8")
    assert load_text(str(second)).text_id != loaded.text_id


def test_txt_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LayershapError, match="not UTF-8.*offset 3"):
        load_text(str(bad))
    with pytest.raises(LayershapError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LayershapError, match="holds no text"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(LayershapError, match="unknown text"):
        load_text("shakespeare")


def test_jsonl_joins_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "first doc", "meta": 1}, {"text": "second\ndoc"}, {"text": "third"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    assert load_text(str(path)).text == "first doc\n\nsecond\ndoc\n\nthird"


def test_jsonl_bad_lines_are_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(LayershapError, match='line 2 has no string "text" field'):
        load_text(str(path))
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(LayershapError, match="line 3 is not valid JSON"):
        load_text(str(path))
    path.write_text('{"text": 5}\n')
    with pytest.raises(LayershapError, match="line 1"):
        load_text(str(path))


@pytest.mark.parametrize("spec", ["wikitext2", "c4", "c4:train", "wikitext2:validation"])
def test_hub_text_without_datasets_names_pip_install(monkeypatch, spec):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(MissingPackageError) as info:
        load_text(spec)
    assert "pip install 'layershap[datasets]'" in str(info.value)
    assert "pip install datasets" in str(info.value)
    assert "local .txt/.jsonl" in str(info.value)


def test_hub_text_unreachable_and_reachable(monkeypatch):
    asked = []

    def offline(*args, **kwargs):
        asked.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(LayershapError, match="unreachable.*local .txt/.jsonl"):
        load_text("wikitext2")
    assert asked[0][0] == ("wikitext", "wikitext-2-raw-v1") and asked[0][1]["split"] == "test"

    def online(*args, split, **kwargs):
        return {"text": [" = Title = \n", " body line \n"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=online))
    text = load_text("wikitext2:train")
    assert text.text_id == "wikitext2:train"
    assert text.text == " = Title = \n\n\n body line \n"
    with pytest.raises(LayershapError, match="c4 split 'test' is not offered"):
        load_text("c4:test")


def test_make_windows_are_sorted_non_overlapping_slices():
    tok = CountingTokenizer()
    windows = make_windows(tok, counting_text(1000), n_windows=7, seq_len=50, seed=3)
    assert windows.shape == (7, 51) and windows.dtype == np.int64
    assert (windows[:, 0] == tok.bos_token_id).all()
    starts = windows[:, 1]
    np.testing.assert_array_equal(windows[:, 1:], starts[:, None] + np.arange(50))  # exact stream slices
    assert (np.diff(starts) >= 50).all() and starts[0] >= 0 and starts[-1] + 50 <= 1000


def test_make_windows_without_bos():
    windows = make_windows(CountingTokenizer(bos_token_id=None), counting_text(100), 3, 20, seed=0)
    assert windows.shape == (3, 20)
    np.testing.assert_array_equal(windows, windows[:, :1] + np.arange(20))


def test_make_windows_seeded():
    tok, text = CountingTokenizer(), counting_text(5000)
    a = make_windows(tok, text, 5, 64, seed=11)
    np.testing.assert_array_equal(a, make_windows(tok, text, 5, 64, seed=11))
    assert not np.array_equal(a, make_windows(tok, text, 5, 64, seed=12))


def test_make_windows_placements_uniform():
    # 5 tokens, 2 windows of 2: the placements (0,2), (0,3), (1,3) should each come up a third of the time.
    tok, text = CountingTokenizer(bos_token_id=None), counting_text(5)
    counts = Counter(tuple(make_windows(tok, text, 2, 2, seed=s)[:, 0]) for s in range(3000))
    assert set(counts) == {(0, 2), (0, 3), (1, 3)}
    for placement in counts:
        assert abs(counts[placement] / 3000 - 1 / 3) < 0.04
    # Exact fill: the only placement.
    np.testing.assert_array_equal(make_windows(tok, counting_text(6), 3, 2, seed=5), [[0, 1], [2, 3], [4, 5]])


def test_make_windows_too_short_text():
    with pytest.raises(LayershapError, match="has 99 tokens.*at most 4 windows of 20"):
        make_windows(CountingTokenizer(), counting_text(99), 5, 20, seed=0)
    with pytest.raises(LayershapError, match="must be >= 1"):
        make_windows(CountingTokenizer(), counting_text(99), 0, 20, seed=0)


def test_make_windows_with_real_tokenizer(tiny_tokenizer):
    text = load_text("builtin").text[:20_000]
    stream = np.asarray(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = make_windows(tiny_tokenizer, text, 4, 32, seed=0)
    assert windows.shape == (4, 33)
    assert (windows[:, 0] == tiny_tokenizer.bos_token_id).all()
    assert tiny_tokenizer.bos_token_id not in windows[:, 1:]
    views = np.lib.stride_tricks.sliding_window_view(stream, 32)
    end = 0
    for row in windows[:, 1:]:  # greedy: each window must occur in the stream after the previous one ends
        hits = np.flatnonzero((views == row).all(axis=1))
        hits = hits[hits >= end]
        assert hits.size, "window is not a slice of the token stream after the previous window"
        end = hits[0] + 32


def test_eval_windows_consecutive():
    tok = CountingTokenizer()
    windows = eval_windows(tok, counting_text(105), seq_len=25)
    assert windows.shape == (4, 26)
    np.testing.assert_array_equal(windows[:, 1:], np.arange(100).reshape(4, 25))
    assert (windows[:, 0] == tok.bos_token_id).all()
    np.testing.assert_array_equal(eval_windows(tok, counting_text(105), 25, n_windows=2), windows[:2])
    with pytest.raises(LayershapError, match="4 full windows of 25 tokens, 5 asked for"):
        eval_windows(tok, counting_text(105), 25, n_windows=5)
    with pytest.raises(LayershapError, match="0 full windows"):
        eval_windows(tok, counting_text(10), 25)


def test_windows_sha256_properties():
    windows = np.arange(24, dtype=np.int64).reshape(4, 6)
    digest = windows_sha256(windows)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert windows_sha256(windows.astype(np.int32)) == digest  # content, not storage dtype
    assert windows_sha256(np.asfortranarray(windows)) == digest  # nor memory layout
    assert windows_sha256(windows.reshape(6, 4)) != digest  # same bytes, other shape
    changed = windows.copy()
    changed[3, 5] += 1
    assert windows_sha256(changed) != digest


def test_validation_windows_avoid_calibration_and_each_other():
    tok = CountingTokenizer()
    text = counting_text(3000)
    for seed in (0, 1, 2):
        calib = make_windows(tok, text, 6, 50, seed=seed)
        val = validation_windows(tok, text, 6, 50, seed=seed)
        assert val.shape == calib.shape and (val[:, 0] == tok.bos_token_id).all()
        # the counting stream's token ids are positions: every window is a consecutive run of positions
        assert (np.diff(val[:, 1:], axis=1) == 1).all()
        cal_tokens = set(calib[:, 1:].ravel().tolist())
        val_tokens = val[:, 1:].ravel().tolist()
        assert not cal_tokens & set(val_tokens)  # no calibration token reused
        assert len(set(val_tokens)) == len(val_tokens)  # validation windows do not overlap each other
        np.testing.assert_array_equal(val, validation_windows(tok, text, 6, 50, seed=seed))  # seeded


def test_validation_windows_need_room():
    with pytest.raises(LayershapError, match="too few"):
        validation_windows(CountingTokenizer(), counting_text(500), 4, 100, seed=0)


def test_decision_blocks_avoid_calibration_and_each_other_and_do_not_depend_on_how_many_are_asked():
    tok = CountingTokenizer()
    text = counting_text(6000)
    calib = make_windows(tok, text, 3, 80, seed=4)
    blocks = decision_windows(tok, text, 3, 80, 4, 5, 120, 3)  # longer windows than the calibration's
    assert [b.shape for b in blocks] == [(5, 121)] * 3
    used = set(calib[:, 1:].ravel().tolist())
    for block in blocks:
        tokens = block[:, 1:].ravel().tolist()
        assert (np.diff(block[:, 1:], axis=1) == 1).all() and len(set(tokens)) == len(tokens)
        assert not used & set(tokens)  # disjoint from calibration and from the blocks before
        used |= set(tokens)
    first_two = decision_windows(tok, text, 3, 80, 4, 5, 120, 2)
    for a, b in zip(first_two, blocks):
        np.testing.assert_array_equal(a, b)
    from layershap.oracle.windows import blocks_that_fit

    room = blocks_that_fit(6000, 3, 80, 5, 120)
    assert len(decision_windows(tok, text, 3, 80, 4, 5, 120, room)) == room
    with pytest.raises(LayershapError, match=f"room for {room}"):
        decision_windows(tok, text, 3, 80, 4, 5, 120, room + 1)
