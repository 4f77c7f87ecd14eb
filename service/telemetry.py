"""Structured JSON logs and Prometheus metrics: request latency per route template, jobs by status, queue depth."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import transformers
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.store import STATUSES, Store

log = logging.getLogger("distill.service.http")

# The attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON object
# (but uvicorn's color_message, the message again with terminal colours).
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(),
                                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr for our loggers and uvicorn's (serve() runs uvicorn with log_config=None)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # transformers writes its load reports through a handler of its own and draws progress bars (raw `\r` lines):
    # its records go through ours instead, and the bars are off.
    transformers.logging.disable_default_handler()
    transformers.logging.enable_propagation()
    transformers.logging.disable_progress_bar()


class RequestTelemetry:
    """ASGI middleware: a latency histogram per (method, route template, status) and one log line per request.

    Latency is measured to the start of the response, so a long server-sent-event stream counts as the time it
    took to answer, not as how long the client listened.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_and_measure(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._record(scope, message["status"], time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_and_measure)
        except Exception:
            self._record(scope, 500, time.perf_counter() - started)
            raise

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        # The template ("/v1/jobs/{job_id}"), never the raw path: one series per route, not per job.
        template = _route_template(scope)
        self.histogram.labels(scope["method"], template, str(status)).observe(seconds)
        log.info("request", extra={"method": scope["method"], "path": scope["path"], "route": template,
                                   "status": status, "duration_ms": round(seconds * 1000, 2)})


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is None:  # FastAPI sets scope["route"] for its API routes only; /docs and /openapi.json are plain
        route = next((r for r in scope["app"].routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", None) or "<unmatched>"


class JobsCollector(Collector):
    """Jobs by status and queue depth, read from the store at scrape time (so they survive restarts)."""

    def __init__(self, store: Callable[[], Store | None]) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        store = self.store()
        if store is None:  # scraped before start-up finished
            return
        counts = store.count_by_status()
        jobs = GaugeMetricFamily("distill_jobs", "Jobs in the store by status.", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts[status])
        yield jobs
        yield GaugeMetricFamily("distill_job_queue_depth", "Jobs waiting for a free slot.", value=counts["queued"])


def build_registry(store: Callable[[], Store | None]) -> tuple[CollectorRegistry, Histogram]:
    """A registry per app (tests build several apps in one process; the global one would refuse duplicates)."""
    registry = CollectorRegistry()
    histogram = Histogram("distill_http_request_duration_seconds", "Time to answer an HTTP request.",
                          ["method", "route", "status"], registry=registry)
    registry.register(JobsCollector(store))
    return registry, histogram
