"""``device_map="auto"`` (accelerate places the model) on CPU with a tiny model: same NLL as the plain path, and
the model's own loss agrees; an unknown device map is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layershap.core.errors import LayershapError
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.loading import load_model

ALL_MASKS = ((np.arange(16)[:, None] >> np.arange(4)) & 1).astype(bool)


def test_device_map_auto_equals_plain_path(tiny_model_dir, one_thread):
    plain = load_model(str(tiny_model_dir), device="cpu")
    mapped = load_model(str(tiny_model_dir), device_map="auto")  # no GPU here: accelerate keeps it on the CPU
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"} and mapped.device.type == "cpu"
    assert mapped.model_hash == plain.model_hash
    windows = np.random.default_rng(0).integers(3, 300, size=(3, 12))
    a = MaskedEvaluator(plain.model, windows, batch_size=2).nll(ALL_MASKS)
    b = MaskedEvaluator(mapped.model, windows, batch_size=2).nll(ALL_MASKS)
    print(f"device_map auto vs plain: {len(ALL_MASKS)} masks, max |dnll| = {np.abs(a - b).max():.3g}")
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    ids = torch.as_tensor(windows)
    with torch.no_grad():
        loss = float(mapped.model(input_ids=ids, labels=ids, use_cache=False).loss)
    assert abs(b[ALL_MASKS.all(axis=1)][0] - loss) < 1e-5  # the full model: the model's own loss


def test_unknown_device_map_is_a_clear_error(tiny_model_dir):
    with pytest.raises(LayershapError, match="unknown device map 'everywhere'; use one of auto"):
        load_model(str(tiny_model_dir), device_map="everywhere")
