"""/v1/jobs: submit, list, follow (JSON pages or server-sent events), cancel, and fetch reports and artifacts."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Depends, Header, Query, Response, status
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from distill import atomic
from distill.config import JobConfig
from service.deps import RunnerDep, SettingsDep, StoppingDep, StoreDep
from service.routes.models import CatalogDep
from service.routing import TextJsonRoute
from service.runner import REPORT_FILE, STDERR_FILE, PublicPaths, job_dir, move_out
from service.schemas import (
    JOB_CONFIG_EXAMPLE,
    ArtifactList,
    EventPage,
    EventPublic,
    JobList,
    JobPublic,
    ServiceError,
    error_responses,
)
from service.store import TERMINAL, Job, JobStatus, Store

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=TextJsonRoute)

EVENT_PAGE = 500
SQLITE_MAX_INT = 2**63 - 1  # a larger offset or cursor cannot be bound to a query
SSE_POLL_SECONDS = 0.25
SSE_KEEPALIVE_SECONDS = 15.0  # a comment line now and then keeps proxies from closing a quiet stream


class _DocumentedAsJobConfig:
    """The body is validated by parse_config (so its 422 names keys the way `distill run` does), but documented
    in OpenAPI as the JobConfig schema."""

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(JobConfig.__pydantic_core_schema__))
        schema["properties"].pop("output_dir")  # the server chooses it
        return schema


JobBody = Annotated[dict[str, Any], _DocumentedAsJobConfig(), Body(
    description="The job config, the same schema as `distill run` takes, without output_dir. data.dataset is a "
                "built-in name (`reviews`) or `upload:<id>` of a file uploaded with POST /v1/datasets; "
                "teacher.name and student.model may name a succeeded job's PyTorch model by its id "
                "(`<job_id>.student-torch`, `<job_id>.teacher`), e.g. stage 2 of two-stage distillation.",
    openapi_examples={"reviews": {"summary": "MiniLM → 3-layer student on the built-in reviews",
                                  "value": JOB_CONFIG_EXAMPLE}})]


def load_job(job_id: str, store: StoreDep) -> Job:
    job = store.get_job(job_id)
    if job is None:
        raise ServiceError(404, f"no job {job_id!r}; GET /v1/jobs lists the jobs")
    return job


JobDep = Annotated[Job, Depends(load_job)]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic,
             responses=error_responses(422, 429), summary="Queue a distillation job")
def create_job(body: JobBody, runner: RunnerDep, response: Response) -> JobPublic:
    job = runner.submit(body)
    response.headers["Location"] = f"{router.prefix}/{job.id}"
    return JobPublic.of(job)


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(store: StoreDep, status: JobStatus | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              offset: Annotated[int, Query(ge=0, le=SQLITE_MAX_INT)] = 0) -> JobList:
    jobs, total = store.list_jobs(status, limit, offset)
    return JobList(items=[JobPublic.of(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(404), summary="A job's state")
def get_job(job: JobDep) -> JobPublic:
    return JobPublic.of(job)


@router.get("/{job_id}/events", response_model=EventPage, responses={
    **error_responses(404),
    200: {"description": "A page of events as JSON, or with `Accept: text/event-stream` a server-sent event stream "
                         "(`id` = seq, `event` = kind, `data` = the event as JSON) that ends when the job has ended, "
                         "or when the server stops (reconnect with `Last-Event-ID`).",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    summary="A job's events in order, after a cursor")
def get_events(job: JobDep, store: StoreDep, stopping: StoppingDep,
               after: Annotated[int, Query(ge=0, le=SQLITE_MAX_INT)] = 0,
               limit: Annotated[int, Query(ge=1, le=EVENT_PAGE)] = EVENT_PAGE,
               accept: Annotated[str, Header()] = "",
               last_event_id: Annotated[int | None, Header(ge=0, le=SQLITE_MAX_INT)] = None,
               ) -> EventPage | StreamingResponse:
    if "text/event-stream" in accept:
        # Last-Event-ID is what a reconnecting EventSource sends instead of ?after=.
        return StreamingResponse(_event_stream(store, job.id, max(after, last_event_id or 0), stopping),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events = store.events(job.id, after, limit)
    return EventPage(job_id=job.id, status=job.status, events=[EventPublic.of(e) for e in events],
                     next_after=events[-1].seq if events else after)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=error_responses(404, 409),
             summary="Cancel a queued or running job")
def cancel_job(job: JobDep, runner: RunnerDep, store: StoreDep) -> JobPublic:
    if job.status in TERMINAL:
        raise ServiceError(409, f"job {job.id} has already ended ({job.status}); only queued or running jobs "
                                f"can be cancelled")
    runner.cancel(job.id)
    return JobPublic.of(load_job(job.id, store))


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 409),
               summary="Delete an ended job: its record, events, files and models")
async def delete_job(job: JobDep, settings: SettingsDep, store: StoreDep, catalog: CatalogDep) -> None:
    if job.status not in TERMINAL:
        raise ServiceError(409, f"job {job.id} is {job.status}; cancel it first (POST /v1/jobs/{job.id}/cancel), "
                                f"then delete it")
    if served := catalog.served_from(job.id):
        raise ServiceError(409, f"job {job.id}'s files are the model {', '.join(served)} serves (its teacher); delete "
                                f"{'that job' if len(served) == 1 else 'those jobs'} first")
    deleted, users, moved = store.delete_job(job.id, lambda: move_out(settings, job.id))
    if users:
        raise ServiceError(409, f"job {job.id}'s models are what the queued or running jobs {', '.join(users)} "
                                f"train from; delete it once they have ended (or cancel them)")
    catalog.forget_job(job.id)
    if moved is not None:
        await anyio.to_thread.run_sync(shutil.rmtree, moved, True)  # ignore_errors: the record is gone already
    if not deleted:  # a delete at the same time took it
        raise ServiceError(404, f"no job {job.id!r}")


@router.get("/{job_id}/report", response_model=dict[str, Any], responses=error_responses(404),
            summary="The job's report.json (once it succeeded)")
def get_report(job: JobDep, settings: SettingsDep) -> dict[str, Any]:
    path = job_dir(settings, job.id) / REPORT_FILE
    if not path.is_file():
        why = f"it failed: {job.error}" if job.status == "failed" else "report.json is written when it succeeds"
        raise ServiceError(404, f"job {job.id} has no report: it is {job.status}; {why}")
    return PublicPaths(settings)(json.loads(path.read_text(encoding="utf-8")))


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=error_responses(404),
            summary="The files a job has written so far")
def list_artifacts(job: JobDep, settings: SettingsDep) -> ArtifactList:
    return ArtifactList(job_id=job.id, files=_files(job_dir(settings, job.id)))


@router.get("/{job_id}/artifacts/{name:path}", response_class=FileResponse, responses={
    **error_responses(400, 404), 200: {"description": "The file's bytes.",
                                       "content": {"application/octet-stream": {}}}},
    summary="Download one file, e.g. student-onnx/model_int8.onnx or report.md")
def get_artifact(job: JobDep, settings: SettingsDep, name: str) -> Response:
    directory = job_dir(settings, job.id)
    path = _artifact(directory, name)
    # Compared resolved: "./stderr.log" or "stderr.log/" name the growing log too.
    return log_as_written_now(path) if path == (directory / STDERR_FILE).resolve() else FileResponse(path)


def log_as_written_now(path: Path) -> StreamingResponse:
    """The bytes of a log a running job appends to, up to its size now. Starlette's FileResponse declares the size
    it finds and then reads to the end of the file, so a log that grew meanwhile overran its Content-Length and the
    server aborted the download. (The job's other files are replaced whole, never grown in place.)"""
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as log:
            left = size
            while left > 0 and (chunk := log.read(min(FileResponse.chunk_size, left))):
                left -= len(chunk)
                yield chunk

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8", headers={"Content-Length": str(size)})


def _artifact(directory: Path, name: str) -> Path:
    if "\0" in name:  # no file has one; the OS would refuse the path
        raise ServiceError(400, f"artifact name {name!r} holds a NUL byte; use a path from GET .../artifacts")
    root = directory.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ServiceError(400, f"artifact name {name!r} leaves the job directory; use a path from "
                                f"GET .../artifacts")
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError:  # a name longer than the filesystem allows: no such file
        is_dir = is_file = False
    if is_dir:
        inside = [(path.relative_to(root) / f).as_posix() for f in _files(path)]
        raise ServiceError(400, f"{name!r} is a directory; download its files one by one: "
                                f"{', '.join(inside) or 'it is empty'}")
    if not is_file:
        raise ServiceError(404, f"no artifact {name!r}; files of this job: {', '.join(_files(root)) or 'none yet'}")
    return path


def _files(directory: Path) -> list[str]:
    """The job's files, relative and sorted, without what is being written or replaced (distill.atomic's staged and
    replaced copies, compress's hidden work directories). A running job deletes directories (a replaced `best/`, the
    joined teacher-output pieces): os.walk skips one gone before it is read, where Path.rglob raises."""
    def kept(name: str) -> bool:
        return not name.startswith(".") and not name.endswith((atomic.STAGED, atomic.REPLACED))

    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if kept(d)]
        files += [(Path(root) / n).relative_to(directory).as_posix() for n in names if kept(n)]
    return sorted(files)


async def _event_stream(store: Store, job_id: str, after: int, stopping: Callable[[], bool]) -> AsyncIterator[str]:
    quiet = 0.0
    while True:
        # The job first: if it had ended by then, every one of its events is already stored.
        job = await anyio.to_thread.run_sync(store.get_job, job_id)
        events = await anyio.to_thread.run_sync(store.events, job_id, after, EVENT_PAGE)
        for event in events:
            yield f"id: {event.seq}\nevent: {event.kind}\ndata: {EventPublic.of(event).model_dump_json()}\n\n"
            after = event.seq
        if len(events) == EVENT_PAGE:
            continue
        if job is None or job.status in TERMINAL or stopping():
            return
        quiet = 0.0 if events else quiet + SSE_POLL_SECONDS
        if quiet >= SSE_KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await anyio.sleep(SSE_POLL_SECONDS)
