"""What several benchmarks share: the held-out texts of the embedded default and the main job's plan stage.

Example:
    >>> from common import HELDOUT, heldout_text
    >>> sorted(HELDOUT)
    ['email', 'gpl3', 'vim']
"""

from __future__ import annotations

import email
import glob
import hashlib
from pathlib import Path

import numpy as np

from layershap.core.defaults import CALIBRATION_SEQ_LEN, CALIBRATION_WINDOWS, main_job_masks
from layershap.core.load_options import LoadOptions
from layershap.oracle.evaluate import MaskedEvaluator
from layershap.oracle.measure import measure_masks
from layershap.oracle.session import open_session
from layershap.oracle.store import DatasetStore
from layershap.oracle.text import CalibrationText
from layershap.pipeline.plans import default_ks, run_plans
from layershap.sampling.specs import parse_mask_spec

HELDOUT = {
    "gpl3": ("/usr/share/common-licenses/GPL-3", "legal: the GPL-3 licence"),
    "vim": ("/usr/share/vim/vim*/doc/usr_0[1-9].txt", "editor manual: Vim user manual, chapters 1-9"),
    "email": (str(Path(email.__file__).parent / "architecture.rst"),
              "design essay: the architecture of CPython's email package (blind check, added last)"),
}


def heldout_text(name: str) -> CalibrationText:
    """A held-out text by name (files every Debian machine with CPython's base system and vim ships)."""
    pattern, _ = HELDOUT[name]
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"held-out text {name!r}: no file matches {pattern}; install the package that ships it")
    text = "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
    return CalibrationText(f"heldout:{name}@sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}", text)


def heldout_nll(model, windows: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean token NLL per held-out text of ``model`` as it stands (its layers where ``mask`` is False skipped)."""
    out = {}
    for name, ids in windows.items():
        evaluator = MaskedEvaluator(model, ids, batch_size=2, prefix_sharing=False, cache_mb=0)
        keep = np.ones(evaluator.n_layers, bool) if mask is None else mask
        out[name] = float(evaluator.nll(keep[None, :])[0])
    return out


def layershap_run(model: str, text: str, folder: Path, seed: int, utility: str = "nll",
                  ks: list[int] | None = None) -> tuple[dict, int]:
    """The main job's oracle and plan stages (``layershap run`` without the surrogate) into ``folder``; returns
    the plans document and the tokens a fresh run measures (every row of its stores)."""
    folder.mkdir(parents=True, exist_ok=True)
    session = open_session(model=model, text=text, masks="loo", out=folder / "dataset.zarr",
                           windows=CALIBRATION_WINDOWS, seq_len=CALIBRATION_SEQ_LEN, seed=seed,
                           loading=LoadOptions(device="cpu"), utility=utility)
    with session:
        n = session.store.n_layers
        measure_masks(session.evaluator, session.store,
                      parse_mask_spec("stratified", n, main_job_masks(n), seed), progress=False)
        doc = run_plans(session, text=text, out=folder, ks=ks or default_ks(n), seed=seed, progress=False)
        pass_tokens = session.evaluator.n_tokens
    tokens = len(DatasetStore.open(folder / "dataset.zarr")) * pass_tokens
    tokens += sum(len(DatasetStore.open(p)) for p in folder.glob("decision-*.zarr")) * doc["decision"][
        "tokens_per_block"]
    return doc, tokens
