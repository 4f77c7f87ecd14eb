"""create_app(settings): the FastAPI app; its lifespan wires the store, the job runner and the model catalog."""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from service.datasets import remove_unfinished_uploads
from service.deps import require_api_key
from service.models import ModelCatalog
from service.routes import compare, datasets, jobs, models, ops, ui
from service.runner import DELETING, Runner
from service.schemas import ServiceError
from service.settings import Settings, get_settings
from service.store import Store
from service.telemetry import RequestTelemetry, build_registry, configure_logging

log = logging.getLogger("distill.service")
SHUTDOWN_GRACE_SECONDS = 5  # open requests' time to finish when the server stops (event streams never do)

DESCRIPTION = """Distil a Transformer teacher into a small student, export it to ONNX, compress it, and serve it.

Submit a job (`POST /v1/jobs`, the same config as `distill run`), follow its events, download its artifacts.
Upload your own labelled CSV/JSONL with `POST /v1/datasets` and use it as `data.dataset: "upload:<id>"`.
When the server has an API key, send `Authorization: Bearer <key>` (every `/v1` route, `/readyz`, `/metrics`;
`/healthz`, the page `/ui` and these docs are open).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(settings.jobs_dir / DELETING, ignore_errors=True)  # what a delete cut short left
        settings.datasets_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.database)
        remove_unfinished_uploads(settings, store)
        catalog = ModelCatalog(settings)
        runner = Runner(settings, store, catalog)
        await anyio.to_thread.run_sync(runner.start)  # recovery may wait for an orphaned job process to exit
        app.state.settings, app.state.store, app.state.runner = settings, store, runner
        app.state.models = catalog
        log.info("ready", extra={"home": str(settings.home), "max_concurrent_jobs": settings.max_concurrent_jobs})
        try:
            yield
        finally:
            await app.state.models.close()
            await anyio.to_thread.run_sync(runner.stop)
            store.close()

    app = FastAPIOffline(title="distill", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings  # before start-up too, so dependencies never miss it
    app.state.store = None
    app.state.stopping = lambda: False  # serve() asks its uvicorn server
    app.state.metrics_registry, histogram = build_registry(lambda: app.state.store)
    app.add_middleware(RequestTelemetry, histogram=histogram)
    add_error_handlers(app)

    protected = [Depends(require_api_key)]
    app.include_router(ops.health_router)
    app.include_router(ui.router)
    for router in (ops.router, jobs.router, datasets.router, models.router, compare.router):
        app.include_router(router, dependencies=protected)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """How errors become answers: a ServiceError its status and message, a malformed request FastAPI's 422."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OSError, _storage_error)


async def _service_error(request: Request, exc: Any) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=exc.headers)


async def _storage_error(request: Request, exc: Any) -> JSONResponse:
    """A full disk is the operator's to fix and the client's to retry: 507 saying so (it was a plain-text 500);
    any other OSError stays a 500, as JSON like every answer, without the server's paths."""
    assert isinstance(exc, OSError)
    if exc.errno == errno.ENOSPC:
        return JSONResponse({"detail": "the server's disk is full, so the request was not completed and nothing of "
                                       "it kept; retry once space is freed under DISTILL_HOME"}, status_code=507)
    log.exception("request failed", exc_info=exc)
    return JSONResponse({"detail": f"internal error: {exc.strerror or type(exc).__name__}"}, status_code=500)


async def _validation_error(request: Request, exc: Any) -> JSONResponse:
    """A malformed request's 422 as one message, like every other refusal: each error's place (`texts[1]`,
    `repeats`, `offset`) and what is wrong. The input is not echoed back: a NaN or ±Infinity (Python's JSON reader
    takes them) cannot be written as JSON, and a body nested a few hundred levels deep overflowed the recursion
    limit on the way out; both were 500s."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": "; ".join(map(_validation_message, exc.errors()))}, status_code=422)


def _validation_message(error: dict[str, Any]) -> str:
    """`texts[1]: Input should be a valid string` from one of pydantic's errors (loc: ("body", "texts", 1))."""
    source, *path = error["loc"]
    if error["type"] == "json_invalid":  # path: the character where the JSON reader stopped
        return f"body: not valid JSON at character {path[0]}: {error['ctx']['error']}"
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
    return f"{where or source}: {error['msg']}"


def serve(settings: Settings | None = None) -> None:
    """Run the API with uvicorn on settings.host:settings.port, logging JSON lines."""
    import uvicorn

    settings = settings or get_settings()
    configure_logging(settings.log_level)
    # log_config=None: keep our JSON handler; access_log=False: RequestTelemetry writes one line per request.
    # uvloop and httptools (uvicorn[standard]) named, not "auto": without them start-up fails instead of every
    # request silently costing more. The graceful shutdown waits up to SHUTDOWN_GRACE_SECONDS for open requests;
    # a job's event stream, open until the job ends, ends as soon as the server is told to stop (the client
    # reconnects with Last-Event-ID), rather than being cancelled with a traceback when the grace runs out.
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                           access_log=False, loop="uvloop", http="httptools",
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS))
    app.state.stopping = lambda: server.should_exit
    server.run()
