"""Operations: liveness (no auth), readiness, Prometheus metrics."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import RunnerDep, SettingsDep, StoreDep
from service.schemas import Health, Readiness

health_router = APIRouter(tags=["ops"])
router = APIRouter(tags=["ops"])


@health_router.get("/healthz", response_model=Health, summary="The process is alive (no API key needed)")
def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}},
            summary="The store answers, the job runner runs and the jobs directory takes files")
def readyz(settings: SettingsDep, store: StoreDep, runner: RunnerDep, response: Response) -> Readiness:
    readiness = Readiness(ready=False, store=store.ping(), runner=runner.ready, jobs_dir=_writable(settings.jobs_dir))
    readiness.ready = readiness.store and readiness.runner and readiness.jobs_dir
    if not readiness.ready:
        response.status_code = 503
    return readiness


@router.get("/metrics", response_class=Response, summary="Prometheus metrics", responses={
    200: {"content": {CONTENT_TYPE_LATEST: {"example": 'distill_jobs{status="running"} 1.0\n'}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)


def _writable(directory: Path) -> bool:
    """By writing a file: a read-only mount, lost permissions or a path that became a file show; a full disk may
    not (an empty file takes no blocks)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False
