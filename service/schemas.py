"""Request/response models of the jobs, datasets and operations routes, and the one error type they raise."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.store import Dataset, Event, Job, JobStatus


class ServiceError(Exception):
    """A request the service refuses; app.py turns it into `{"detail": message}` with this status and headers."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.headers = status_code, message, headers


class ErrorBody(BaseModel):
    detail: str = Field(examples=["train.epoch: unknown key; allowed keys: batch_size, cache_teacher_logits, ..."])


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {code: {"model": ErrorBody} for code in codes}


# ----------------------------------------------------------------------------------------------------------
# Jobs

JOB_CONFIG_EXAMPLE: dict[str, Any] = {
    "teacher": {"name": "minilm-l6"},
    "data": {"dataset": "reviews", "limit": 2000},
    "student": {"init": "model", "model": "minilm-l6", "num_layers": 3},
    "train": {"epochs": 2, "batch_size": 32},
    "compress": {"quantize": "dynamic"},
}


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    stage: str | None = Field(description="The stage running now (or the last one that ran).")
    progress: float = Field(ge=0, le=1, description="Fraction of the current stage's steps done: training steps "
                                                    "in teacher-finetune and distill, examples in teacher-head's "
                                                    "feature pass and teacher-logits / teacher-embeddings, models "
                                                    "measured in evaluate-deployment; 0 in stages without steps; 1 "
                                                    "once the job succeeded.")
    metrics: dict[str, Any] = Field(description="Latest validation metrics per stage; `test` once it succeeded.")
    error: str | None
    config: dict[str, Any] = Field(description="The job config as submitted, defaults filled in.")
    runs: int = Field(description="Processes started for the job; more than 1 after a resume.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f9a1c2b7d4e", "status": "running", "stage": "distill", "progress": 0.42,
        "metrics": {"teacher-head": {"epoch": 4, "validation_accuracy": 0.66},
                    "teacher-finetune": {"epoch": 1, "validation_accuracy": 0.81, "validation_loss": 0.43}},
        "error": None, "config": JOB_CONFIG_EXAMPLE, "runs": 1, "created_at": "2026-01-05T10:00:00Z",
        "started_at": "2026-01-05T10:00:01Z", "finished_at": None, "updated_at": "2026-01-05T10:03:12Z"}]})

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        return cls(id=job.id, status=job.status, stage=job.stage, progress=job.progress, metrics=job.metrics,
                   error=job.error, config=job.config, runs=job.runs, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at, updated_at=job.updated_at)


class JobList(BaseModel):
    items: list[JobPublic]
    total: int = Field(description="Jobs matching the filter, all pages together.")
    limit: int
    offset: int


class EventPublic(BaseModel):
    seq: int = Field(description="Position in the job's history, from 1; pass the last one seen as `after`.")
    kind: str = Field(description="stage, progress, metrics, checkpoint, resumed, log, done (from the pipeline) "
                                  "or status (queued/running/succeeded/failed/cancelled, from the service).")
    data: dict[str, Any]
    time: datetime

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "seq": 17, "kind": "progress", "time": "2026-01-05T10:03:12Z",
        "data": {"stage": "distill", "step": 120, "total_steps": 800, "epoch": 1, "loss": 0.61, "lr": 9.1e-5}}]})

    @classmethod
    def of(cls, event: Event) -> EventPublic:
        return cls(seq=event.seq, kind=event.kind, data=event.data, time=event.time)


class EventPage(BaseModel):
    job_id: str
    status: JobStatus = Field(description="The job's status when the page was read.")
    events: list[EventPublic]
    next_after: int = Field(description="The cursor for the next page: the last seq returned (or `after`).")


class ArtifactList(BaseModel):
    job_id: str
    files: list[str] = Field(examples=[["report.json", "report.md", "student-onnx/model_int8.onnx"]],
                             description="Paths relative to the job directory, for /artifacts/{name}.")


# ----------------------------------------------------------------------------------------------------------
# Datasets

class DatasetPublic(BaseModel):
    id: str
    kind: Literal["builtin", "upload"]
    reference: str = Field(description="What a job config puts in data.dataset to use it.")
    name: str
    description: str | None = None
    pulled: bool = Field(description="Present on the server (an upload always is; a built-in once pulled).")
    rows: int | None = Field(None, description="Rows (uploads); labels is empty for texts alone.")
    labels: list[str]
    label_counts: dict[str, int] | None = None
    text_column: str = "text"
    label_column: str = "label"
    size_bytes: int | None = None
    created_at: datetime | None = None

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "8c1d2e3f4a5b", "kind": "upload", "reference": "upload:8c1d2e3f4a5b", "name": "tickets.csv",
        "pulled": True, "rows": 1200, "labels": ["billing", "bug", "other"],
        "label_counts": {"billing": 400, "bug": 500, "other": 300}, "text_column": "text", "label_column": "label",
        "size_bytes": 183422, "created_at": "2026-01-05T09:58:00Z"}]})

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetPublic:
        return cls(id=dataset.id, kind="upload", reference=f"upload:{dataset.id}", name=dataset.name, pulled=True,
                   rows=dataset.rows, labels=dataset.labels, label_counts=dataset.label_counts,
                   text_column=dataset.text_column, label_column=dataset.label_column, size_bytes=dataset.size_bytes,
                   created_at=dataset.created_at)


class DatasetList(BaseModel):
    items: list[DatasetPublic]


# ----------------------------------------------------------------------------------------------------------
# Operations

class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    store: bool = Field(description="The SQLite store answers.")
    runner: bool = Field(description="The job dispatcher is running.")
    jobs_dir: bool = Field(description="A file can be written in the jobs directory (where new jobs go).")
