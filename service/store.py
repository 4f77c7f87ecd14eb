"""Job, event and dataset records in SQLite (WAL); artifacts live on disk under settings.jobs_dir/<job id>/.

One connection behind a lock: every call is one short transaction, made from a worker thread (sync routes run in
FastAPI's threadpool, the runner has its own threads), never on the event loop. Events are the job's history in
order (`seq` per job); the job row folds them into what a poll needs: stage, progress, metrics so far.

Schema:
    jobs(id, status, config, dataset_id, stage, progress, metrics, error, runs, pid,
         created_at, started_at, finished_at, updated_at)
    events(job_id, seq, kind, data, time)           primary key (job_id, seq)
    datasets(id, name, filename, format, text_column, label_column, rows, labels, label_counts, size_bytes,
             created_at)
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[JobStatus, ...] = ("queued", "running")
TERMINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
STATUSES: tuple[JobStatus, ...] = (*ACTIVE, *TERMINAL)
_IS_ACTIVE = "status IN ('queued', 'running')"


class DatasetGone(LookupError):
    """The uploaded dataset a new job reads no longer exists."""


class SourceJobGone(LookupError):
    """A job whose model a new job names (teacher.name / student.model `<job_id>.<variant>`) is no longer there."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    config TEXT NOT NULL,            -- JSON: the config as submitted (validated, defaults filled, no output_dir)
    dataset_id TEXT,                 -- the uploaded dataset it reads, so DELETE can refuse while it is in use
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    metrics TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    runs INTEGER NOT NULL DEFAULT 0, -- processes started for it; a resumed job has 2 or more
    pid INTEGER,                     -- of its running process, to stop an orphan after a server crash
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    time TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS job_sources (  -- jobs whose models a job trains from, so DELETE can refuse while it runs
    job_id TEXT NOT NULL REFERENCES jobs (id),
    source_id TEXT NOT NULL,
    PRIMARY KEY (job_id, source_id)
);
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    filename TEXT NOT NULL,
    format TEXT NOT NULL,
    text_column TEXT NOT NULL,
    label_column TEXT NOT NULL,
    rows INTEGER NOT NULL,
    labels TEXT NOT NULL,
    label_counts TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
"""


def now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    config: dict[str, Any]
    dataset_id: str | None
    stage: str | None
    progress: float
    metrics: dict[str, Any]
    error: str | None
    runs: int
    pid: int | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    data: dict[str, Any]
    time: str


@dataclass(frozen=True)
class Dataset:
    id: str
    name: str
    filename: str
    format: str
    text_column: str
    label_column: str
    rows: int
    labels: list[str]
    label_counts: dict[str, int]
    size_bytes: int
    created_at: str


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> bool:
        try:
            with self._lock:
                return self._db.execute("SELECT 1").fetchone()[0] == 1
        except sqlite3.Error:
            return False

    # ------------------------------------------------------------------------------------------------------
    # Jobs

    def create_job(self, job_id: str, config: dict[str, Any], dataset_id: str | None, capacity: int,
                   source_jobs: Collection[str] = ()) -> Job | None:
        """Insert a queued job unless `capacity` jobs are already queued or running (then None); DatasetGone when
        its uploaded dataset was deleted since the caller looked, SourceJobGone when one of the `source_jobs` whose
        models it trains from is no longer a succeeded job (checked here, where a delete cannot interleave)."""
        stamp = now()
        with self._lock, self._db:
            if dataset_id is not None and self._db.execute("SELECT 1 FROM datasets WHERE id = ?",
                                                           (dataset_id,)).fetchone() is None:
                raise DatasetGone(dataset_id)
            for source in source_jobs:
                if self._db.execute("SELECT 1 FROM jobs WHERE id = ? AND status = 'succeeded'",
                                    (source,)).fetchone() is None:
                    raise SourceJobGone(source)
            active = self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE {_IS_ACTIVE}").fetchone()[0]
            if active >= capacity:
                return None
            self._db.execute("INSERT INTO jobs (id, status, config, dataset_id, created_at, updated_at) "
                             "VALUES (?, 'queued', ?, ?, ?, ?)", (job_id, json.dumps(config), dataset_id, stamp,
                                                                  stamp))
            self._db.executemany("INSERT INTO job_sources (job_id, source_id) VALUES (?, ?)",
                                 [(job_id, source) for source in source_jobs])
            self._append(job_id, "status", {"status": "queued"}, stamp)
            return self._job(job_id)

    def get_job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._job(job_id)

    def list_jobs(self, status: JobStatus | None, limit: int, offset: int) -> tuple[list[Job], int]:
        """Newest first, and the total matching `status`."""
        where, params = ("WHERE status = ?", (status,)) if status else ("", ())
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", params).fetchone()[0]
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                                    (*params, limit, offset)).fetchall()
        return [_job(r) for r in rows], total

    def count_by_status(self) -> dict[JobStatus, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        counts: dict[JobStatus, int] = dict.fromkeys(STATUSES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def job_ids(self, status: JobStatus) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY created_at",
                                                   (status,))]

    def claim_next(self) -> Job | None:
        """The oldest queued job, now `running` (one more run, no pid yet)."""
        stamp = now()
        with self._lock, self._db:
            row = self._db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id "
                                   "LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET status = 'running', runs = runs + 1, pid = NULL, progress = 0, "
                             "started_at = COALESCE(started_at, ?), updated_at = ? WHERE id = ?",
                             (stamp, stamp, row[0]))
            self._append(row[0], "status", {"status": "running"}, stamp)
            return self._job(row[0])

    def set_pid(self, job_id: str, pid: int) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (pid, job_id))

    def requeue(self, job_id: str, reason: str, *, started: bool = True) -> None:
        """A `running` job whose process is gone (server restart) waits to be resumed; `started` False: its process
        could not be started, so this run does not count."""
        stamp = now()
        with self._lock, self._db:
            self._db.execute("UPDATE jobs SET status = 'queued', pid = NULL, runs = runs - ?, updated_at = ? "
                             "WHERE id = ? AND status = 'running'", (0 if started else 1, stamp, job_id))
            self._append(job_id, "log", {"message": reason}, stamp)
            self._append(job_id, "status", {"status": "queued"}, stamp)

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False when it is not queued."""
        stamp = now()
        with self._lock, self._db:
            changed = self._db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ? "
                                       "WHERE id = ? AND status = 'queued'", (stamp, stamp, job_id)).rowcount
            if changed:
                self._append(job_id, "status", {"status": "cancelled"}, stamp)
            return bool(changed)

    def finish(self, job_id: str, status: JobStatus, error: str | None = None,
               test: dict[str, Any] | None = None) -> None:
        """End a running job (a succeeded one with its `test` metrics); the last event of every finished job is its
        status event."""
        assert status in TERMINAL
        stamp = now()
        with self._lock, self._db:
            if test is not None:
                job = self._job(job_id)
                assert job is not None
                self._update(job_id, stamp, metrics=json.dumps({**job.metrics, "test": test}))
            progress = ", progress = 1" if status == "succeeded" else ""
            self._db.execute(f"UPDATE jobs SET status = ?, error = ?, pid = NULL, finished_at = ?, updated_at = ?"
                             f"{progress} WHERE id = ?", (status, error, stamp, stamp, job_id))
            self._append(job_id, "status", {"status": status, **({"error": error} if error else {})}, stamp)

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        """Append a pipeline event and fold it into the job's stage, progress and metrics."""
        stamp = now()
        with self._lock, self._db:
            self._append(job_id, kind, data, stamp)
            stage = data.get("stage")
            if kind == "stage":
                self._update(job_id, stamp, stage=stage, progress=0.0)
            elif kind in ("progress", "resumed"):
                self._update(job_id, stamp, stage=stage, progress=data["step"] / max(data["total_steps"], 1))
            elif kind == "metrics":  # the latest per stage
                job = self._job(job_id)
                assert job is not None
                values = {k: v for k, v in data.items() if k != "stage"}
                self._update(job_id, stamp, metrics=json.dumps({**job.metrics, stage: values}))

    def delete_job(self, job_id: str, take_files: Callable[[], Path | None]) -> tuple[bool, list[str], Path | None]:
        """Delete an ended job's record and events unless queued or running jobs train from its models: (whether
        this call deleted it, those jobs, what `take_files` returned). `take_files` (its directory out of jobs/) runs
        inside the transaction, so no job that trains from its models is queued between the check and the files
        going."""
        with self._lock, self._db:
            if self._db.execute(f"SELECT 1 FROM jobs WHERE id = ? AND NOT {_IS_ACTIVE}", (job_id,)).fetchone() is None:
                return False, [], None
            users = [row[0] for row in self._db.execute(
                f"SELECT id FROM jobs JOIN job_sources ON job_sources.job_id = jobs.id "
                f"WHERE job_sources.source_id = ? AND {_IS_ACTIVE} ORDER BY created_at", (job_id,))]
            if users:
                return False, users, None
            moved = take_files()
            for table, column in (("events", "job_id"), ("job_sources", "job_id"), ("jobs", "id")):
                self._db.execute(f"DELETE FROM {table} WHERE {column} = ?", (job_id,))
            return True, [], moved

    def events(self, job_id: str, after: int, limit: int) -> list[Event]:
        with self._lock:
            rows = self._db.execute("SELECT seq, kind, data, time FROM events WHERE job_id = ? AND seq > ? "
                                    "ORDER BY seq LIMIT ?", (job_id, after, limit)).fetchall()
        return [Event(r["seq"], r["kind"], json.loads(r["data"]), r["time"]) for r in rows]

    def _append(self, job_id: str, kind: str, data: dict[str, Any], stamp: str) -> None:
        self._db.execute("INSERT INTO events (job_id, seq, kind, data, time) "
                         "SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM events WHERE job_id = ?",
                         (job_id, kind, json.dumps(data), stamp, job_id))

    def _update(self, job_id: str, stamp: str, **columns: Any) -> None:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self._db.execute(f"UPDATE jobs SET {assignments}, updated_at = ? WHERE id = ?",
                         (*columns.values(), stamp, job_id))

    def _job(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    # ------------------------------------------------------------------------------------------------------
    # Datasets

    def add_dataset(self, dataset: Dataset) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (dataset.id, dataset.name, dataset.filename, dataset.format, dataset.text_column,
                              dataset.label_column, dataset.rows, json.dumps(dataset.labels),
                              json.dumps(dataset.label_counts), dataset.size_bytes, dataset.created_at))

    def get_dataset(self, dataset_id: str) -> Dataset | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
        return _dataset(row) if row else None

    def list_datasets(self) -> list[Dataset]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM datasets ORDER BY created_at DESC, id").fetchall()
        return [_dataset(r) for r in rows]

    def delete_dataset(self, dataset_id: str) -> tuple[bool, list[str]]:
        """Delete the record unless queued or running jobs read it: (whether this call deleted it, those jobs)."""
        with self._lock, self._db:
            users = [r[0] for r in self._db.execute(f"SELECT id FROM jobs WHERE dataset_id = ? AND {_IS_ACTIVE}",
                                                    (dataset_id,))]
            if users:
                return False, users
            return self._db.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,)).rowcount == 1, []


def _job(row: sqlite3.Row) -> Job:
    return Job(**{**dict(row), "config": json.loads(row["config"]), "metrics": json.loads(row["metrics"])})


def _dataset(row: sqlite3.Row) -> Dataset:
    return Dataset(**{**dict(row), "labels": json.loads(row["labels"]),
                      "label_counts": json.loads(row["label_counts"])})
