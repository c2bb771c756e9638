"""`layershap serve` as a real uvicorn process on 127.0.0.1 (ephemeral port) driven by httpx: every endpoint
against the library's own functions, identical bytes for identical queries, the committed Gemma entry, a corrupt
entry beside a good one, and concurrent requests equal to serial ones."""

from __future__ import annotations

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_support import ARTIFACT_SURROGATE, N_TINY, Server, tiny_game, tiny_surrogate

from layershap.oracle.store import DatasetStore
from layershap.pruning.search import best_removal_sets
from layershap.pruning.sparsity import bounded_sparsities, export_document
from layershap.shapley.estimate import ensemble_scores
from layershap.shapley.exact import exact_interactions
from layershap.shapley.scores_io import ScoresRecord
from layershap.shapley.semivalues import Index
from layershap.surrogate.checkpoint import load_surrogate
from layershap.surrogate.registry import Registry

TINY = "tiny-synthetic"
GEMMA = "gemma-3-270m"
LIMITS = {"max_exact_layers": 10, "max_budget": 20_000, "max_masks": 4096, "max_body_mb": 1.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    tiny = tiny_surrogate(base / "tiny")
    reg = Registry(base / "registry")
    reg.add(tiny)
    reg.add(tiny, name="broken")
    member = base / "registry" / "llama" / "broken" / "surrogate" / "member_1.pt"
    member.write_bytes(member.read_bytes()[:64])  # a half-copied member file
    before = _tree(base / "registry")
    server = Server(base / "registry", **LIMITS)
    client = httpx.Client(base_url=server.url, timeout=120)
    yield {"server": server, "client": client, "tiny": load_surrogate(tiny), "gemma": load_surrogate(ARTIFACT_SURROGATE)}
    client.close()
    server.stop()
    assert _tree(base / "registry") == before  # the server never wrote into the registry


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _post(setup, path: str, body: dict) -> dict:
    resp = setup["client"].post(path, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_health_docs_and_listing(setup):
    c = setup["client"]
    health = c.get("/v1/health").json()
    assert health["status"] == "ok" and health["entries"] == 2 and health["corrupt"] == 1
    assert health["limits"]["max_exact_layers"] == 10
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/surrogates/{entry_id}/predict", "/v1/surrogates/{entry_id}/scores"} <= set(paths)
    listed = {e["id"]: e for e in c.get("/v1/surrogates").json()["surrogates"]}
    assert listed[GEMMA]["status"] == "ok" and listed[GEMMA]["builtin"] and listed[GEMMA]["family"] == "gemma3_text"
    assert listed[TINY]["status"] == "ok" and listed[TINY]["family"] == "llama"
    assert listed["broken"]["status"] == "corrupt" and "member_1.pt" in listed["broken"]["reason"]
    assert [e["id"] for e in c.get("/v1/surrogates", params={"family": "llama"}).json()["surrogates"]] == [
        "broken", TINY]
    desc = c.get(f"/v1/surrogates/{TINY}").json()
    # the default covers only removed counts the held-out metrics validate: up to the first count they do not
    # (the empty model, count n, is never held out, so Shapley is never the default)
    from layershap.surrogate.metrics import not_validated

    for entry, sur in ((TINY, setup["tiny"]), (GEMMA, setup["gemma"])):
        excluded = not_validated(sur.metadata)
        assert excluded and sur.n_layers in excluded or min(excluded) < sur.n_layers
        expected = f"semivalue[1:{min(excluded) - 1}]"
        got = c.get(f"/v1/surrogates/{entry}").json()
        assert got.get("default_index") == expected, got
    assert desc["n_layers"] == N_TINY
    resp = c.post("/v1/surrogates/broken/predict", json={"masks": [[True] * N_TINY]})
    assert resp.status_code == 409 and "corrupt" in resp.json()["error"]


@pytest.mark.parametrize("entry", [TINY, GEMMA])
def test_predict_matches_the_surrogate(setup, entry):
    sur = setup["tiny"] if entry == TINY else setup["gemma"]
    masks = np.random.default_rng(1).random((50, sur.n_layers)) < 0.7
    doc = _post(setup, f"/v1/surrogates/{entry}/predict", {"masks": masks.astype(int).tolist()})
    mean, std = sur.predict(masks)
    np.testing.assert_allclose(doc["nll"], mean, rtol=1e-12)
    np.testing.assert_allclose(doc["nll_std"], std, rtol=1e-12)
    np.testing.assert_allclose(doc["perplexity"], np.exp(mean), rtol=1e-12)
    if entry == TINY:  # and the surrogate learned the game it was trained on
        assert np.abs(np.array(doc["nll"]) - tiny_game(masks)).max() < 0.5


def test_scores_match_the_library_and_repeat_byte_for_byte(setup):
    sur, c = setup["tiny"], setup["client"]
    expected = ensemble_scores(sur, Index("shapley"), "exact", progress=False)
    body = {"index": {"kind": "shapley"}, "method": "exact"}
    first = c.post(f"/v1/surrogates/{TINY}/scores", json=body)
    doc = first.json()
    np.testing.assert_allclose(doc["scores"], expected.values, rtol=1e-9)
    np.testing.assert_allclose(doc["stderr"], expected.stderr, rtol=1e-9)
    assert doc["ranking"] == expected.ranking().tolist() and doc["index"] == "shapley"
    assert doc["efficiency"]["ok"] is True
    # the same query again, and the default spelled out (auto = the validated semivalue[1:3] here, exact for
    # n <= 10): the same bytes
    assert c.post(f"/v1/surrogates/{TINY}/scores", json=body).content == first.content
    spelled = {"index": {"kind": "semivalue", "sizes": "1:3"}, "method": "exact"}
    assert c.post(f"/v1/surrogates/{TINY}/scores", json={}).content == c.post(
        f"/v1/surrogates/{TINY}/scores", json=spelled).content
    banzhaf = _post(setup, f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "banzhaf"}})
    np.testing.assert_allclose(banzhaf["scores"], ensemble_scores(sur, Index("banzhaf"), "exact",
                                                                  progress=False).values, rtol=1e-9)
    semi = _post(setup, f"/v1/surrogates/{TINY}/scores",
                 {"index": {"kind": "semivalue", "sizes": "1:3"}, "method": "mc", "budget": 4000, "seed": 3})
    lib = ensemble_scores(sur, Index("semivalue", 1, 3), "mc-stratified", budget=4000, seed=3, progress=False)
    assert semi["method"] == "mc-stratified" and semi["index"] == "semivalue[1:3]"
    np.testing.assert_allclose(semi["scores"], lib.values, rtol=1e-9)
    np.testing.assert_allclose(semi["stderr"], lib.stderr, rtol=1e-9)


def test_scores_on_the_committed_gemma_entry(setup):
    sur = setup["gemma"]
    doc = _post(setup, f"/v1/surrogates/{GEMMA}/scores", {"budget": 3000, "seed": 0})
    # 18 layers > max_exact_layers 10: auto falls back to Monte Carlo, index = the counts the metrics validate
    from layershap.surrogate.metrics import not_validated

    top = min(not_validated(sur.metadata)) - 1
    lib = ensemble_scores(sur, Index("semivalue", 1, top), "mc-stratified", budget=3000, seed=0, progress=False)
    assert doc["index"] == f"semivalue[1:{top}]" and doc["method"] == "mc-stratified"
    np.testing.assert_allclose(doc["scores"], lib.values, rtol=1e-9)
    # the most important layers are the cornerstones: those whose removal alone sends the measured perplexity past 1e6
    store = DatasetStore.open(ARTIFACT_SURROGATE.parent / "dataset.zarr")
    alone = {int(np.flatnonzero(~m)[0]): v for m, v in zip(store.masks, store.nll) if (~m).sum() == 1}
    cornerstones = {i for i, v in alone.items() if math.exp(v) > 1e6}
    assert len(cornerstones) >= 1 and set(doc["ranking"][-len(cornerstones):]) == cornerstones


def test_interactions_match_exact_enumeration(setup):
    sur = setup["tiny"]
    doc = setup["client"].get(f"/v1/surrogates/{TINY}/interactions").json()
    expected = exact_interactions(sur, N_TINY, progress=False)
    np.testing.assert_allclose(doc["interactions"], expected, rtol=1e-9, atol=1e-12)
    i, j = doc["strongest"]["layers"]
    assert abs(expected[i, j]) == np.abs(expected).max()
    resp = setup["client"].get(f"/v1/surrogates/{GEMMA}/interactions")
    assert resp.status_code == 400 and "limited to 10 layers" in resp.json()["error"]


def test_removal_sets_match_search_and_brute_force(setup):
    sur = setup["tiny"]
    doc = _post(setup, f"/v1/surrogates/{TINY}/removal-sets", {"k": 3, "top": 4})
    cands, calls, strategy = best_removal_sets(sur, N_TINY, 3, top=4, progress=False)
    assert doc["strategy"] == strategy == "exhaustive" and doc["value_calls"] == calls == math.comb(N_TINY, 3)
    assert [tuple(c["removed"]) for c in doc["candidates"]] == [c.removed for c in cands]
    combos = list(itertools.combinations(range(N_TINY), 3))
    masks = np.ones((len(combos), N_TINY), bool)
    for row, combo in enumerate(combos):
        masks[row, list(combo)] = False
    nll = sur.predict_nll(masks)
    best = np.argsort(nll, kind="stable")[:4]
    assert [tuple(c["removed"]) for c in doc["candidates"]] == [combos[b] for b in best]
    np.testing.assert_allclose([c["predicted_nll"] for c in doc["candidates"]], nll[best], rtol=1e-12)
    np.testing.assert_allclose([c["predicted_perplexity"] for c in doc["candidates"]], np.exp(nll[best]), rtol=1e-12)
    by_fraction = _post(setup, f"/v1/surrogates/{GEMMA}/removal-sets", {"depth_fraction": 0.1, "top": 2})
    assert by_fraction["k"] == 2  # round(0.1 * 18), as `layershap run` counts
    gem, _, _ = best_removal_sets(setup["gemma"], 18, 2, top=2, progress=False)
    assert [tuple(c["removed"]) for c in by_fraction["candidates"]] == [c.removed for c in gem]


def test_sparsities_are_the_export_document(setup):
    body = {"target": 0.6, "lambda": 0.1, "scores": {"index": {"kind": "shapley"}}}
    doc = _post(setup, f"/v1/surrogates/{TINY}/sparsities", body)
    scores_doc = _post(setup, f"/v1/surrogates/{TINY}/scores", {"index": {"kind": "shapley"}})
    expected = export_document(ScoresRecord.from_dict(scores_doc), 0.6, 0.1, f"registry:{TINY}")
    assert doc == json.loads(json.dumps(expected))
    ratios = np.array(doc["sparsities"])
    np.testing.assert_allclose(ratios, bounded_sparsities(np.array(scores_doc["scores"]), 0.6, 0.1), rtol=1e-12)
    assert ratios.mean() == pytest.approx(0.6, abs=1e-12) and ratios.min() >= 0.5 - 1e-12
    order = np.argsort(scores_doc["scores"])
    assert (np.diff(ratios[order]) <= 1e-12).all()  # more important layer, lower sparsity


def test_concurrent_requests_equal_serial_ones(setup):
    c = setup["client"]
    rng = np.random.default_rng(5)
    requests = [("POST", f"/v1/surrogates/{TINY}/predict",
                 {"masks": (rng.random((int(rng.integers(1, 40)), N_TINY)) < 0.6).astype(int).tolist()})
                for _ in range(40)]
    requests += [("POST", f"/v1/surrogates/{GEMMA}/predict", {"masks": [[1] * 18, [1] * 5 + [0] + [1] * 12]})] * 8
    scores_body = {"index": {"kind": "semivalue", "sizes": "1:4"}, "method": "mc", "budget": 2000}
    requests += [("POST", f"/v1/surrogates/{TINY}/scores", dict(scores_body, seed=s)) for s in (21, 22)] * 4
    requests += [("POST", f"/v1/surrogates/{TINY}/removal-sets", {"k": 2, "top": 3})] * 4

    def call(req):
        with httpx.Client(base_url=setup["server"].url, timeout=120) as own:
            return own.request(req[0], req[1], json=req[2]).content

    with ThreadPoolExecutor(max_workers=16) as pool:  # first: identical scores queries race each other
        parallel = list(pool.map(call, requests))
    serial = [c.request(m, p, json=b).content for m, p, b in requests]
    assert parallel == serial
    assert all(b.startswith(b"{") and b'"error"' not in b for b in serial)
    for seed, body in ((21, parallel[48]), (22, parallel[49])):  # after 40 + 8 predicts
        lib = ensemble_scores(setup["tiny"], Index("semivalue", 1, 4), "mc-stratified", budget=2000, seed=seed,
                              progress=False)
        np.testing.assert_allclose(json.loads(body)["scores"], lib.values, rtol=1e-9)


def test_client_returns_the_library_objects(setup):
    from layershap import Client
    from layershap.pruning.search import Candidate
    from layershap.shapley.game import Scores

    sur = setup["tiny"]
    with Client(setup["server"].url) as client:
        assert {e["id"] for e in client.surrogates()} == {GEMMA, TINY, "broken"}
        assert [e["id"] for e in client.surrogates(family="gemma3_text")] == [GEMMA]
        assert client.describe(TINY)["model_hash"] == "h-tiny"
        scores = client.scores(TINY, index="semivalue", sizes="2:5")
        expected = ensemble_scores(sur, Index("semivalue", 2, 5), "exact", progress=False)
        assert isinstance(scores, Scores) and scores.index == "semivalue[2:5]" and scores.method == "exact"
        np.testing.assert_allclose(scores.values, expected.values, rtol=1e-9)
        np.testing.assert_allclose(scores.stderr, expected.stderr, rtol=1e-9)
        assert scores.ranking().tolist() == expected.ranking().tolist()
        plans = client.removal_sets(TINY, k=2, top=3)
        cands, _, _ = best_removal_sets(sur, N_TINY, 2, top=3, progress=False)
        assert all(isinstance(p, Candidate) for p in plans)
        assert [p.removed for p in plans] == [c.removed for c in cands]
        np.testing.assert_allclose([p.predicted for p in plans], [c.predicted for c in cands], rtol=1e-12)
        np.testing.assert_allclose(client.interactions(TINY), exact_interactions(sur, N_TINY, progress=False),
                                   rtol=1e-9, atol=1e-12)
        export = client.sparsities(TINY, target=0.5, lam=0.05, index="banzhaf")
        banzhaf = ensemble_scores(sur, Index("banzhaf"), "exact", progress=False).values
        np.testing.assert_allclose(export["sparsities"], bounded_sparsities(banzhaf, 0.5, 0.05), rtol=1e-9)
        nll, std = client.predict(GEMMA, np.ones((2, 18), bool))
        np.testing.assert_allclose(nll, setup["gemma"].predict_nll(np.ones((2, 18), bool)), rtol=1e-12)
        assert (std > 0).all()  # 8 members disagree a little
