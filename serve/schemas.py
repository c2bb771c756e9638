"""Request bodies of the HTTP API (pydantic): unknown fields are refused, so a typo is reported, not ignored.

The index of a scores query is a tagged object, ``{"kind": "shapley"}``, ``{"kind": "banzhaf"}``,
``{"kind": "semivalue", "sizes": "1:9"}`` or ``{"kind": "auto"}`` (what the training data cover); a new index
is one more tagged class in :data:`IndexSpec` and one more branch in ``app.index_of``.

Example:
    >>> ScoresRequest.model_validate({"index": {"kind": "semivalue", "sizes": "1:6"}, "method": "exact"})  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHODS = ("auto", "exact", "mc", "mc-permutation", "mc-stratified")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AutoIndex(_Strict):
    """The index the surrogate's training data support (as ``layershap shapley --index auto``)."""

    kind: Literal["auto"] = "auto"


class ShapleyIndex(_Strict):
    """The Shapley value."""

    kind: Literal["shapley"]


class BanzhafIndex(_Strict):
    """The Banzhaf value."""

    kind: Literal["banzhaf"]


class SemivalueIndex(_Strict):
    """The pruning-range semivalue over ``sizes`` = ``"A:B"`` removed layers (default: the range the data cover)."""

    kind: Literal["semivalue"]
    sizes: str | None = Field(None, max_length=32, examples=["1:9"])


IndexSpec = Annotated[AutoIndex | ShapleyIndex | BanzhafIndex | SemivalueIndex, Field(discriminator="kind")]


class PredictRequest(_Strict):
    """Layer masks to predict: one list of ``n_layers`` booleans (or 0/1) per mask, True = layer kept."""

    masks: list[list[bool]] = Field(min_length=1, examples=[[[True] * 18]])


class ScoresRequest(_Strict):
    """A scores query: index, estimator (``auto`` = exact when the server allows it), Monte Carlo budget, seed."""

    index: IndexSpec = Field(default_factory=AutoIndex)
    method: Literal[METHODS] = "auto"  # type: ignore[valid-type]
    budget: int | None = Field(None, ge=1, description="Monte Carlo value-function evaluations (capped)")
    seed: int = Field(0, ge=0, le=2**63 - 1)


class RemovalSetsRequest(_Strict):
    """Best sets of ``k`` layers to remove (or ``depth_fraction`` of the layers), ``top`` of them, best first."""

    k: int | None = Field(None, ge=1, le=1_000_000)
    depth_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    top: int = Field(5, ge=1)
    beam_width: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> RemovalSetsRequest:
        if (self.k is None) == (self.depth_fraction is None):
            raise ValueError("give exactly one of k (layers to remove) or depth_fraction (e.g. 0.2)")
        return self


class SparsitiesRequest(_Strict):
    """Per-layer sparsities with mean ``target`` within ``target ± lambda``, from the scores of ``scores``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

    target: float = Field(ge=0.0, lt=1.0, examples=[0.7])
    lam: float = Field(0.08, alias="lambda", ge=0.0, le=1.0)
    scores: ScoresRequest = Field(default_factory=ScoresRequest)
