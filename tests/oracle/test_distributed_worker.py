"""The Ray worker class run in-process: it measures what MaskedEvaluator measures on the driver, refuses a
store made with another model or dtype, and keeps a failed load's one-line error for every later call."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np
import pytest

from layershap.core.errors import StoreMismatchError
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model
from layershap.oracle.measure import dataset_identity
from layershap.oracle.ray_worker import MaskWorker, WorkerLoadError
from layershap.oracle.text import make_windows

TEXT = "\n".join(list(topics.values())[:40])
MASKS = ((np.arange(16)[:, None] >> np.arange(4)) & 1).astype(bool)


def test_worker_measures_like_the_driver(tiny_model_dir, one_thread):
    worker = MaskWorker()
    assert worker.load(str(tiny_model_dir), None, "cpu", None, 1)["device"] == "cpu"
    windows, identity = worker.cut_windows(TEXT, "topics", 2, 12, 3)
    loaded = load_model(str(tiny_model_dir), device="cpu")
    expected = make_windows(loaded.tokenizer, TEXT, 2, 12, 3)
    np.testing.assert_array_equal(windows, expected)
    assert identity == dataset_identity(loaded, "topics", expected, 12)
    worker.use_windows(windows, identity, batch_size=1, cache_mb=0)
    measured, seconds = worker.measure(MASKS)
    nll = measured.loss("nll")
    np.testing.assert_allclose(nll, MaskedEvaluator(loaded.model, expected).nll(MASKS), rtol=0, atol=1e-6)
    assert seconds > 0

    for key, value in (("model_hash", "f" * 64), ("dtype", "bfloat16"), ("n_layers", 5)):
        with pytest.raises(StoreMismatchError, match="every worker must read the same checkpoint"):
            worker.use_windows(windows, {**identity, key: value}, batch_size=1, cache_mb=0)


def test_failed_load_is_one_line_and_raised_again(tmp_path):
    worker = MaskWorker()
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(WorkerLoadError) as first:
        worker.load(missing, None, "cpu", None, 1)
    message = str(first.value)
    assert message.startswith(f"a Ray worker could not load the model {missing!r}: LayershapError:")
    assert "no such path" in message and "\n" not in message
    with pytest.raises(WorkerLoadError) as again:
        worker.cut_windows(TEXT, "topics", 2, 12, 0)
    assert again.value is first.value
