"""/v1/compare: several models of one task on the same inputs, side by side (see service.models.Comparisons).

Short comparisons (texts in the body, at most service.models.INLINE_TIMED_CALLS timed calls over all models) are
answered in the request with 200; longer ones (a dataset, many repeats) run in the background: 202 with
`Location: /v1/compare/{id}`, polled with GET until `status` is succeeded or failed.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.deps import SettingsDep
from service.models import KEPT_COMPARISONS, CompareError, Comparison, ComparisonsBusy, Status, UnknownModelError
from service.routes.models import CatalogDep, check_texts
from service.routing import TextJsonRoute
from service.runner import RETRY_AFTER_SECONDS
from service.schemas import error_responses

router = APIRouter(prefix="/v1/compare", tags=["compare"], route_class=TextJsonRoute)


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"models": ["3f9a1c2b7d4e.teacher", "3f9a1c2b7d4e.student"], "texts": ["a fine film", "a dull film"],
         "labels": ["positive", "negative"], "repeats": 20},
        {"models": ["3f9a1c2b7d4e.student-fp32", "3f9a1c2b7d4e.student"], "dataset": "job:3f9a1c2b7d4e",
         "limit": 500}]})

    models: list[str] = Field(min_length=1, description="Model ids; agreement and speed-ups are against the first.")
    texts: list[str] | None = Field(None, description="The inputs; or give dataset.")
    labels: list[str] | None = Field(None, description="Label names, one per text: adds accuracy (classifiers "
                                                         "only; encoders and causal LMs are scored by agreement "
                                                         "with the first).")
    dataset: str | None = Field(None, description="'reviews' (built-in, pulled) or 'job:<job_id>': the data that "
                                                  "job was trained on, split the same way. Runs in the background.")
    split: Literal["test", "validation"] = "test"
    limit: int | None = Field(None, ge=1, description="Only the first N rows of the dataset split.")
    repeats: int = Field(20, ge=1, le=1000, description="Timed batch-1 calls per model (latency percentiles).")

    @model_validator(mode="after")
    def _one_input(self) -> CompareRequest:
        if (self.texts is None) == (self.dataset is None):
            raise ValueError("give either texts or dataset (one of them, not both)")
        if self.labels is not None and (self.texts is None or len(self.labels) != len(self.texts)):
            raise ValueError(f"labels: give one label name per text ({len(self.labels)} labels for "
                             f"{len(self.texts or [])} texts)")
        if self.texts is not None and self.limit is not None:
            raise ValueError("limit applies to a dataset; with texts, send fewer texts")
        return self


class ComparisonPublic(BaseModel):
    id: str
    status: Status
    models: list[str]
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    result: dict[str, Any] | None = Field(description="distill.evaluate's report (rows keyed by model id) plus "
                                                      "`inputs`, `speedups` against the first model and `markdown`.")

    @classmethod
    def of(cls, c: Comparison) -> ComparisonPublic:
        return cls(id=c.id, status=c.status, models=c.models, created_at=c.created_at, finished_at=c.finished_at,
                   error=c.error, result=c.result)


@router.post("", response_model=ComparisonPublic, responses={
    **error_responses(404, 413, 422, 429, 500),
    202: {"model": ComparisonPublic, "description": "Run in the background (a dataset, or many timed calls); "
                                                    "GET the Location until it has ended."}},
             summary="Compare models on the same inputs")
async def compare(body: CompareRequest, catalog: CatalogDep, settings: SettingsDep,
                  response: Response) -> ComparisonPublic:
    if body.texts is not None:
        check_texts(body.texts, settings)
    try:
        comparison = catalog.comparisons.start(body.models, texts=body.texts, labels=body.labels,
                                               dataset=body.dataset, split=body.split, limit=body.limit,
                                               repeats=body.repeats)
    except UnknownModelError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None
    except CompareError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None
    except ComparisonsBusy as e:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(e),
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    if comparison.background:
        response.status_code = status.HTTP_202_ACCEPTED
        response.headers["Location"] = f"{router.prefix}/{comparison.id}"
        return ComparisonPublic.of(comparison)
    assert comparison.task is not None
    await asyncio.shield(comparison.task)  # a client that goes away does not cancel it; GET still finds it
    if comparison.status == "failed":
        raise HTTPException(comparison.error_status or status.HTTP_500_INTERNAL_SERVER_ERROR, comparison.error)
    return ComparisonPublic.of(comparison)


@router.get("/{comparison_id}", response_model=ComparisonPublic, responses=error_responses(404),
            summary="A comparison's status, and its result when done")
async def get_comparison(comparison_id: str, catalog: CatalogDep) -> ComparisonPublic:
    comparison = catalog.comparisons.get(comparison_id)
    if comparison is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no comparison {comparison_id!r}; comparisons are kept in memory until the server "
                            f"restarts (the last {KEPT_COMPARISONS}); POST /v1/compare starts one")
    return ComparisonPublic.of(comparison)
