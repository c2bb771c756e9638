"""Python client of ``layershap serve``: the same operations as the HTTP API, returning the library's objects
(:class:`Scores`, :class:`Candidate` plans, numpy arrays).

Example:
    >>> from layershap import Client
    >>> with Client("http://127.0.0.1:8000") as c:  # doctest: +SKIP
    ...     scores = c.scores("gemma-3-270m", index="semivalue", sizes="1:9")
    ...     scores.ranking()[:4], scores.stderr
    ...     nll, spread = c.predict("gemma-3-270m", np.ones((1, 18), bool))
    ...     plans = c.removal_sets("gemma-3-270m", k=4)            # best first; -plans[0].predicted = nll
"""

from __future__ import annotations

import socket
from typing import Any, Self

import httpx
import numpy as np

from .queries import Candidate, LayershapError, Scores, candidates_from_document, scores_from_dict


def no_delay_transport() -> httpx.HTTPTransport:
    """An httpx transport with TCP_NODELAY: a request's headers and body go out as separate writes, and without
    it Nagle's algorithm holds the body back until the server's delayed ACK (~40 ms per request)."""
    return httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


class ServiceError(LayershapError):
    """The service answered with an error; ``status`` is the HTTP status, the message is the server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Client:
    """HTTP client of one server; ``token`` is sent as ``Authorization: Bearer <token>`` when given."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self._http = httpx.Client(base_url=url.rstrip("/") + "/v1", headers=headers, timeout=timeout,
                                  transport=no_delay_transport())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> Any:
        try:
            resp = self._http.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise ServiceError(0, f"no answer from {self._http.base_url} ({exc}); is `layershap serve` running?") from exc
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text
            raise ServiceError(resp.status_code, message)
        return resp.json()

    # ------------------------------------------------------------ registry
    def health(self) -> dict:
        """Server status, version, entry counts and limits."""
        return self._call("GET", "/health")

    def surrogates(self, family: str | None = None) -> list[dict]:
        """Every registry entry (``status`` ok or corrupt), optionally of one model family."""
        return self._call("GET", "/surrogates", params={"family": family} if family else None)["surrogates"]

    def describe(self, entry_id: str) -> dict:
        """One entry: model, layers, calibration text and windows, rows, metrics, default index."""
        return self._call("GET", f"/surrogates/{entry_id}")

    # ------------------------------------------------------------ queries
    def predict(self, entry_id: str, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean loss (nll, or kl for a kl surrogate) and member spread, ``float64[k]`` each, as
        :meth:`Surrogate.predict`."""
        arr = np.asarray(masks, dtype=bool)
        doc = self._call("POST", f"/surrogates/{entry_id}/predict", {"masks": arr.reshape(len(arr), -1).tolist()})
        return np.asarray(doc["loss"], dtype=np.float64), np.asarray(doc["loss_std"], dtype=np.float64)

    def scores_document(self, entry_id: str, index: str = "auto", sizes: str | None = None, method: str = "auto",
                        budget: int | None = None, seed: int = 0) -> dict:
        """The scores JSON (as ``layershap shapley`` writes it) for ``index`` auto | shapley | banzhaf | semivalue."""
        return self._call("POST", f"/surrogates/{entry_id}/scores", self._scores_body(index, sizes, method, budget, seed))

    def scores(self, entry_id: str, index: str = "auto", sizes: str | None = None, method: str = "auto",
               budget: int | None = None, seed: int = 0) -> Scores:
        """Layer scores as the library's :class:`Scores` (values, stderr, ranking())."""
        return scores_from_dict(self.scores_document(entry_id, index, sizes, method, budget, seed))

    def interactions(self, entry_id: str) -> np.ndarray:
        """Pairwise Shapley interaction index ``float64[n, n]`` of the ensemble mean."""
        return np.asarray(self._call("GET", f"/surrogates/{entry_id}/interactions")["interactions"], dtype=np.float64)

    def removal_sets(self, entry_id: str, k: int | None = None, depth_fraction: float | None = None, top: int = 5,
                     beam_width: int = 64) -> list[Candidate]:
        """The ``top`` best sets of ``k`` layers (or ``depth_fraction`` of them) to remove, best first."""
        body = {"k": k, "depth_fraction": depth_fraction, "top": top, "beam_width": beam_width}
        return candidates_from_document(self._call("POST", f"/surrogates/{entry_id}/removal-sets", body))

    def sparsities(self, entry_id: str, target: float, lam: float = 0.08, index: str = "auto",
                   sizes: str | None = None, method: str = "auto", budget: int | None = None, seed: int = 0) -> dict:
        """Per-layer sparsities with mean ``target`` (the ``layershap export`` document)."""
        body = {"target": target, "lambda": lam, "scores": self._scores_body(index, sizes, method, budget, seed)}
        return self._call("POST", f"/surrogates/{entry_id}/sparsities", body)

    @staticmethod
    def _scores_body(index: str, sizes: str | None, method: str, budget: int | None, seed: int) -> dict:
        spec: dict[str, Any] = {"kind": index}
        if sizes is not None:
            spec["sizes"] = sizes
        return {"index": spec, "method": method, "budget": budget, "seed": seed}
