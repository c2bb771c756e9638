"""`layershap serve --workers N`: N forked worker processes answer on one port with the same bytes; a worker that
dies is replaced; stopping the server stops every worker, and workers whose parent is killed shut down."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_support import N_TINY, Server, tiny_surrogate

from layershap.cli.serve import serve
from layershap.core.errors import LayershapError
from layershap.surrogate.checkpoint import load_surrogate
from layershap.surrogate.registry import Registry

TINY = "tiny-synthetic"


def _parent_of(pid: int) -> int | None:
    """The parent pid of a running process; None once it has exited (zombies included)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if state in ("Z", "X") else int(ppid)


def _gone(pids, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_parent_of(p) is None for p in pids):
            return True
        time.sleep(0.05)
    return False


def _clients_per_worker(url: str, workers: int) -> dict[int, httpx.Client]:
    """One keep-alive client per worker process (a connection stays with the worker that accepted it)."""
    found: dict[int, httpx.Client] = {}
    spare: list[httpx.Client] = []
    for _ in range(40):
        batch = [httpx.Client(base_url=url, timeout=60) for _ in range(8)]
        with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent connects: both workers race to accept
            pids = list(pool.map(lambda c: c.get("/v1/health").json()["process"], batch))
        for client, pid in zip(batch, pids):
            if pid in found:
                spare.append(client)
            else:
                found[pid] = client
        if len(found) == workers:
            break
    for client in spare:
        client.close()
    return found


@pytest.fixture(scope="module")
def workers_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("workers")
    tiny = tiny_surrogate(base / "tiny")
    Registry(base / "registry").add(tiny)
    srv = Server(base / "registry", workers=2, max_exact_layers=10)
    yield srv, load_surrogate(tiny)
    srv.stop()


def test_workers_answer_the_same_bytes(workers_server):
    srv, sur = workers_server
    clients = _clients_per_worker(srv.url, 2)
    try:
        assert len(clients) == 2 and all(_parent_of(pid) == srv.proc.pid for pid in clients)
        masks = (np.random.default_rng(3).random((30, N_TINY)) < 0.6).astype(int).tolist()
        queries = [("POST", f"/v1/surrogates/{TINY}/predict", {"masks": masks}),
                   ("POST", f"/v1/surrogates/{TINY}/predict", {"masks": masks[:1]}),
                   ("POST", f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "shapley"}}),
                   ("POST", f"/v1/surrogates/{TINY}/removal-sets", {"k": 2, "top": 3})]
        answers = {pid: [c.request(m, p, json=b).content for m, p, b in queries] for pid, c in clients.items()}
        first, second = answers.values()
        assert first == second  # whichever process computes it
        nll = [float(x) for x in httpx.Response(200, content=first[0]).json()["nll"]]
        np.testing.assert_allclose(nll, sur.predict_nll(np.array(masks, bool)), rtol=1e-12)
    finally:
        for c in clients.values():
            c.close()


def test_a_dead_worker_is_replaced_and_the_server_keeps_answering(workers_server):
    srv, _ = workers_server
    clients = _clients_per_worker(srv.url, 2)
    victim, survivor = sorted(clients)
    for c in clients.values():
        c.close()
    os.kill(victim, signal.SIGKILL)  # e.g. the kernel's OOM killer
    assert _gone([victim])
    deadline, seen = time.monotonic() + 30, set()
    while time.monotonic() < deadline and not (seen - {survivor}):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            resp = c.get("/v1/health")
            assert resp.status_code == 200  # never refused meanwhile
            seen.add(resp.json()["process"])
    replacement = seen - {survivor}
    assert len(replacement) == 1 and victim not in seen
    assert _parent_of(replacement.pop()) == srv.proc.pid
    assert any(f"server worker {victim} exited (-9); starting another" in line for line in srv.output)


def test_stopping_or_killing_the_parent_stops_every_worker(tmp_path):
    reg = tmp_path / "registry"
    for kill in (signal.SIGTERM, signal.SIGKILL):
        srv = Server(reg, workers=2)
        try:
            clients = _clients_per_worker(srv.url, 2)
            pids = set(clients)
            for c in clients.values():
                c.close()
            assert len(pids) == 2
            os.kill(srv.proc.pid, kill)
            assert _gone(pids), f"workers outlived a {kill.name} to their parent"
            srv.proc.wait(timeout=30)
            if kill == signal.SIGTERM:
                assert srv.proc.returncode == 0
        finally:
            srv.stop()


def test_workers_must_be_positive(tmp_path):
    with pytest.raises(LayershapError, match="--workers must be at least 1"):
        serve(registry=tmp_path, port=0, workers=0)
