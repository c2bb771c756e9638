"""The answer cache of the service: a computation that raises caches nothing, leaves no per-key lock behind, and
the next request for the same query computes it; identical concurrent queries still compute once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from layershap.serve.queries import Limits, dumps
from layershap.serve.service import Service
from layershap.surrogate.registry import Entry, Registry


@pytest.fixture()
def service(tmp_path) -> tuple[Service, Entry]:
    return Service(Registry(tmp_path / "reg"), Limits(), computations=4), Entry("e", "llama", tmp_path, fingerprint="f")


def test_a_raising_computation_leaves_no_lock_and_the_next_request_computes(service):
    svc, entry = service
    for i in range(50):  # 50 distinct failing queries
        with pytest.raises(RuntimeError, match="boom"):
            svc.cached(entry, "scores", {"q": i}, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert svc._key_locks == {} and svc.in_flight() == 0 and svc.cache_size() == 0 and svc.computed == 0
    assert svc.cached(entry, "scores", {"q": 7}, lambda: {"x": 7}) == dumps({"x": 7})  # computed, not stuck
    assert svc.computed == 1 and svc.cached(entry, "scores", {"q": 7}, lambda: {"x": -1}) == dumps({"x": 7})
    assert svc._key_locks == {}


def test_a_waiter_computes_after_the_first_computation_fails(service):
    svc, entry = service
    started, release, calls = threading.Event(), threading.Event(), []

    def failing() -> dict:
        calls.append("fail")
        started.set()
        release.wait(10)
        raise RuntimeError("first one fails")

    def working() -> dict:
        calls.append("ok")
        return {"answer": 42}

    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(svc.cached, entry, "scores", {"q": 1}, failing)
        assert started.wait(10)
        waiters = [pool.submit(svc.cached, entry, "scores", {"q": 1}, working) for _ in range(3)]
        for _ in range(200):  # until the 3 waiters queue on the key's lock
            if svc._key_locks and next(iter(svc._key_locks.values()))[1] == 4:
                break
            time.sleep(0.01)
        assert svc.in_flight() == 1
        release.set()
        with pytest.raises(RuntimeError, match="first one fails"):
            first.result(10)
        answers = [w.result(10) for w in waiters]
    assert answers == [dumps({"answer": 42})] * 3
    assert calls == ["fail", "ok"]  # the waiters computed once between them, after the failure
    assert svc._key_locks == {} and svc.computed == 1
