"""Helpers of the service tests: a tiny surrogate trained on a synthetic game, and a real `layershap serve`
process on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import atexit
import functools
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from layershap.sampling.stratified import stratified_masks
from layershap.surrogate.data import MaskDataModule
from layershap.surrogate.train import train_ensemble

N_TINY = 8
ARTIFACT_SURROGATE = Path(__file__).resolve().parents[1] / "artifacts" / "gemma-3-270m" / "surrogate"


def tiny_game(masks: np.ndarray) -> np.ndarray:
    """nll = 2 + sum_i w_i (1 - m_i) + 0.3 (1 - m_0)(1 - m_1): additive plus one pairwise term, fixed weights."""
    w = np.linspace(0.1, 0.8, N_TINY)
    r = (~masks).astype(np.float64)
    return 2.0 + r @ w + 0.3 * r[:, 0] * r[:, 1]


def train_tiny(out: Path, model_type: str | None = "llama") -> Path:
    """A 2-member, 8-layer surrogate of :func:`tiny_game` in ``out`` (seconds on a CPU)."""
    masks = stratified_masks(N_TINY, 120, seed=0, removed=range(1, N_TINY + 1))
    provenance = {"model_id": "tiny-synthetic", "model_hash": "h-tiny", "dataset_hash": None}
    if model_type is not None:
        provenance["model_type"] = model_type
    dm = MaskDataModule(masks, tiny_game(masks), seed=0)
    train_ensemble(dm, out, provenance=provenance, members=2, seed=0, hidden=16, max_epochs=30, patience=10,
                   lr=5e-3, progress=False)
    return out


@functools.cache
def _tiny_master() -> Path:
    root = Path(tempfile.mkdtemp(prefix="layershap-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    return train_tiny(root / "surrogate")


def tiny_surrogate(dest: Path) -> Path:
    """A copy in ``dest`` of the tiny surrogate, trained once per test session."""
    shutil.copytree(_tiny_master(), dest)
    return dest


class Server:
    """`layershap serve` in a subprocess: ``url`` once it listens; ``stop()`` ends it (and only it)."""

    def __init__(self, registry: Path, startup_timeout: float = 90.0, preamble: str = "", **options: object) -> None:
        """``preamble``: Python statements run in the server process before it starts (e.g. a fault to inject)."""
        opts = ", ".join(f"{k}=Path({str(v)!r})" if isinstance(v, Path) else f"{k}={v!r}"
                         for k, v in options.items())
        code = (f"{preamble}\nimport sys; from pathlib import Path; from layershap.cli.serve import serve; "
                f"sys.exit(serve(registry=Path({str(registry)!r}), port=0{', ' + opts if opts else ''}))")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.output: list[str] = []
        self.url = self._wait_for_url(startup_timeout)
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                self.output.append(line)
                if "listening on " in line:
                    return line.split("listening on ")[1].split()[0]
            if self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError("server did not start:\n" + "".join(self.output))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
