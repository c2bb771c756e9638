"""The HTTP API (FastAPI), versioned under ``/v1``; OpenAPI schema at ``/openapi.json``, docs at ``/docs``.

=======  ==========================================  =====================================================
GET      /v1/health                                  status, version, entry counts, limits
GET      /v1/surrogates[?family=F]                   every registry entry (corrupt ones with their reason)
GET      /v1/surrogates/{id}                         one entry: model, layers, text, rows, metrics, index
POST     /v1/surrogates/{id}/predict                 nll, spread, perplexity for posted masks
POST     /v1/surrogates/{id}/scores                  scores ± s.e. and ranking for an index (cached)
GET      /v1/surrogates/{id}/interactions            pairwise Shapley interactions (exact, cached)
POST     /v1/surrogates/{id}/removal-sets            best sets of k layers to remove (cached)
POST     /v1/surrogates/{id}/sparsities              per-layer sparsities, ``layershap export`` format (cached)
=======  ==========================================  =====================================================

Errors are ``{"error": "what was wrong and how to fix it"}`` with a 4xx status: 400 bad value, 401/403 token,
404 unknown id, 409 corrupt entry, 413 body too large, 415 body not sent as JSON, 421 Host not loopback (on a
loopback-bound server), 422 malformed request; an unexpected failure is a 500 that names a request id, under
which the server logs the traceback.

Example:
    >>> app = create_app(Registry(registry_root(None)), Limits(), token=None)  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from layershap.surrogate.registry import CorruptEntryError, Registry, UnknownEntryError, package_version

from .guard import ERROR_ID, Guard, internal_error_message, log, request_id
from .queries import (
    Index,
    LayershapError,
    Limits,
    MaskError,
    dumps,
    interactions_document,
    predict_document,
    removal_k,
    removal_sets_document,
    resolve_index,
    resolve_scores_method,
    scores_document,
    sparsities_document,
)
from .schemas import IndexSpec, PredictRequest, RemovalSetsRequest, ScoresRequest, SparsitiesRequest
from .service import Service

JSON = "application/json"
INLINE_MASKS = 64


def _json(doc: dict | list, status: int = 200) -> Response:
    return Response(dumps(doc), status_code=status, media_type=JSON)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def index_of(sur, spec: IndexSpec) -> Index:
    """The library :class:`Index` of a request's index object (a new index kind adds a branch here)."""
    return resolve_index(sur, spec.kind, getattr(spec, "sizes", None))


def create_app(registry: Registry, limits: Limits, token: str | None = None, computations: int = 1,
               loopback_hosts: bool = True) -> Guard:
    """The ASGI application: FastAPI routes behind the :class:`Guard` (``loopback_hosts``: answer only requests
    addressed to a loopback name, for a server bound to loopback; ``computations``: expensive computations at
    a time)."""
    service = Service(registry, limits, computations=computations)
    app = FastAPI(title="layershap", version=package_version(),
                  description="Layer importances, pruning plans and sparsity budgets from trained surrogates.")
    app.state.service = service
    _handlers(app)

    @app.get("/v1/health")
    def health() -> Response:
        entries = registry.entries()
        return _json({"status": "ok", "version": package_version(), "registry": str(registry.root),
                      "entries": sum(e.status == "ok" for e in entries),
                      "corrupt": sum(e.status != "ok" for e in entries),
                      "cached_answers": service.cache_size(), "process": os.getpid(), "limits": limits.__dict__})

    @app.get("/v1/surrogates")
    def list_surrogates(family: str | None = None) -> Response:
        return _json({"surrogates": [e.summary() for e in registry.entries(family)]})

    @app.get("/v1/surrogates/{entry_id}")
    def describe_surrogate(entry_id: str) -> Response:
        entry, sur = service.surrogate(entry_id)
        default = resolve_index(sur, "auto")
        return _json(entry.summary() | {"default_index": default.name,
                                        "default_index_description": default.describe(sur.n_layers)})

    def predict_bytes(entry_id: str, req: PredictRequest) -> bytes:
        _, sur = service.surrogate(entry_id)
        if len(req.masks) > limits.max_masks:
            raise LayershapError(f"{len(req.masks):,} masks in one request; this server takes at most "
                                 f"{limits.max_masks:,}: split them over several requests")
        bad = next((i for i, m in enumerate(req.masks) if len(m) != sur.n_layers), None)
        if bad is not None:
            raise MaskError(f"mask {bad} has {len(req.masks[bad])} entries but {entry_id} has {sur.n_layers} "
                            "decoder layers; give one true/false per layer")
        return dumps(predict_document(sur, np.array(req.masks, dtype=bool)))

    @app.post("/v1/surrogates/{entry_id}/predict")
    async def predict(entry_id: str, req: PredictRequest) -> Response:
        # a few masks of a loaded surrogate take well under a millisecond: answered on the event loop, which
        # spares the hop to a worker thread; larger requests (and first loads) run in the thread pool
        if len(req.masks) <= INLINE_MASKS and service.loaded(entry_id):
            return Response(predict_bytes(entry_id, req), media_type=JSON)
        return Response(await run_in_threadpool(predict_bytes, entry_id, req), media_type=JSON)

    def scores_query(entry_id: str, req: ScoresRequest) -> tuple:
        entry, sur = service.surrogate(entry_id)
        index = index_of(sur, req.index)
        method, budget, seed = resolve_scores_method(sur, index, req.method, req.budget, req.seed, limits)
        return entry, sur, index, {"index": index.name, "method": method, "budget": budget, "seed": seed}

    def scores_bytes(entry, sur, index, query) -> bytes:
        return service.cached(entry, "scores", query, lambda: scores_document(
            sur, index, query["method"], query["budget"], query["seed"], f"registry:{entry.id}"))

    @app.post("/v1/surrogates/{entry_id}/scores")
    def scores(entry_id: str, req: ScoresRequest) -> Response:
        return Response(scores_bytes(*scores_query(entry_id, req)), media_type=JSON)

    @app.get("/v1/surrogates/{entry_id}/interactions")
    def interactions(entry_id: str) -> Response:
        entry, sur = service.surrogate(entry_id)
        if sur.n_layers > limits.max_exact_layers:  # refused before it reaches the cache
            interactions_document(sur, limits)
        return Response(service.cached(entry, "interactions", {}, lambda: interactions_document(sur, limits)),
                        media_type=JSON)

    @app.post("/v1/surrogates/{entry_id}/removal-sets")
    def removal_sets(entry_id: str, req: RemovalSetsRequest) -> Response:
        entry, sur = service.surrogate(entry_id)
        k = removal_k(sur.n_layers, req.k, req.depth_fraction)
        if req.top > limits.max_top or req.beam_width > limits.max_beam_width:
            raise LayershapError(f"top must be <= {limits.max_top} and beam_width <= {limits.max_beam_width} on "
                                 "this server")
        query = {"k": k, "top": req.top, "beam_width": req.beam_width}
        return Response(service.cached(entry, "removal-sets", query, lambda: removal_sets_document(
            sur, k, req.top, req.beam_width, limits)), media_type=JSON)

    @app.post("/v1/surrogates/{entry_id}/sparsities")
    def sparsities(entry_id: str, req: SparsitiesRequest) -> Response:
        entry, sur, index, scores_q = scores_query(entry_id, req.scores)
        query = {"target": req.target, "lambda": req.lam, "scores": scores_q}

        def compute() -> dict:
            import json

            doc = json.loads(scores_bytes(entry, sur, index, scores_q))
            return sparsities_document(doc, req.target, req.lam, f"registry:{entry.id}")

        return Response(service.cached(entry, "sparsities", query, compute), media_type=JSON)

    return Guard(app, token, limits.max_body_bytes, loopback_hosts)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return 400, f"the request body is not valid JSON ({detail}); send a JSON object"
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid request: " + "; ".join(parts) + more + "; see /docs for the request schema"


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(exc))

    @app.exception_handler(UnknownEntryError)
    async def unknown(request: Request, exc: UnknownEntryError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(CorruptEntryError)
    async def corrupt(request: Request, exc: CorruptEntryError) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(LayershapError)
    async def bad_value(request: Request, exc: LayershapError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.url.path}; see /docs for the API"
        elif exc.status_code == 400 and "parsing the body" in detail:  # FastAPI's words for e.g. RecursionError
            detail = "the request body could not be read as JSON (nested too deeply?); send a flat JSON object"
        return _error(exc.status_code, detail)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server log under a request id; the client gets the id, never the exception
        # text (paths, library internals); the Guard sees ERROR_ID and does not answer or log it a second time
        rid = request_id()
        request.scope[ERROR_ID] = rid
        log.error("internal error %s on %s %s", rid, request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": internal_error_message(rid)}, status_code=500, headers={"x-request-id": rid})
