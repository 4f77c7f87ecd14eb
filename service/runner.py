"""Runs queued jobs outside the event loop: one `python -m distill.pipeline <job-dir>` subprocess per job.

A dispatcher thread starts queued jobs while fewer than `max_concurrent_jobs` run; a watcher thread per job reads
the subprocess's events (JSON lines on its stdout) into the store and records how it ended. A job's directory is
`settings.jobs_dir/<id>/`: the pipeline's output_dir, holding config.json (written at submission) and stderr.log.

Restart: jobs the store still has as `running` lost their process with the previous server. `start()` stops any
orphan left of it, puts each back in the queue, and its next run passes `--resume`, so the engine continues from
its last checkpoint (exactly: data order and RNG are in the checkpoint). A resume that fails ends the job `failed`
with the reason; no job stays `running` without a process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.config import ConfigError, DistributedConfig, FromModel, JobConfig, parse_config
from distill.data import BUILTIN_DATASETS, DataError, check_builtin_keys
from distill.distributed import torchrun_command, uses_cuda, wanted
from distill.student import check_student
from service.schemas import ServiceError
from service.settings import Settings
from service.store import TERMINAL, DatasetGone, Job, SourceJobGone, Store
from teachers.registry import HUB_PREFIX, SOURCES, TeacherNotFound, name_kind, registered_names, resolve_teacher

if TYPE_CHECKING:  # service.models imports this module
    from service.models import ModelCatalog

CONFIG_FILE = "config.json"
STDERR_FILE = "stderr.log"
REPORT_FILE = "report.json"  # distill.pipeline.REPORT, not imported from there: that module loads torch
UPLOAD_PREFIX = "upload:"
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where `distill` and `service` import from
SPAWN_ATTEMPTS, SPAWN_RETRY_SECONDS = 3, 10.0  # a job whose process cannot start is tried again, then failed
RETRY_AFTER_SECONDS = 30  # a guess at when a slot frees up; tiny jobs take a minute, real ones much longer

log = logging.getLogger("distill.service.runner")


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


DELETING = ".deleting"  # under jobs_dir: deleted jobs' directories until removed; a crash leaves them to the next start


def move_out(settings: Settings, job_id: str) -> Path | None:
    """Take a deleted job's directory out of jobs_dir in one rename (its models stop being listed at once) and
    return where it went, for the caller to remove; None when there is none (a delete before this one took it)."""
    trash = settings.jobs_dir / DELETING
    trash.mkdir(exist_ok=True)
    moved = trash / f"{job_id}.{uuid.uuid4().hex}"
    try:
        os.replace(job_dir(settings, job_id), moved)
    except FileNotFoundError:
        return None
    return moved


def upload_path(settings: Settings, dataset_id: str, format: str) -> Path:
    return settings.datasets_dir / dataset_id / f"data.{format}"


class PublicPaths:
    """The server's files as a client sees them in events, errors and reports: an uploaded file is `upload:<id>`,
    a job's directory `jobs/<id>` (its files are GET /v1/jobs/<id>/artifacts/<name>), a registered teacher's its
    name, anything else under the server's home `$DISTILL_HOME/...`, its code and Python `<distill>/...` and
    `<python>/...` (a crashed job's last line of stderr names them); a client learns nothing of the server's file
    system from them."""

    def __init__(self, settings: Settings) -> None:
        self._upload = re.compile(rf"{re.escape(str(settings.datasets_dir))}/([^/\s]+)/data\.(?:csv|jsonl|txt)\b")
        public = {str(settings.jobs_dir): "jobs", str(settings.home): "$DISTILL_HOME", str(PROJECT_ROOT): "<distill>",
                  sys.prefix: "<python>", **{str(path): name for name, source in SOURCES.items()
                                             if (path := source.locate()) is not None}}
        self._public = dict(sorted(public.items(), key=lambda item: -len(item[0])))  # the innermost first
        # Not followed by a name's characters: `/srv/distill` is not in `/srv/distill-old/x`.
        self._roots = re.compile("|".join(rf"{re.escape(path)}(?![\w-])" for path in self._public))

    def __call__(self, value: Any) -> Any:
        """`value` with every server path in its strings (in dicts and lists too) replaced."""
        if isinstance(value, str):
            value = self._upload.sub(lambda m: f"{UPLOAD_PREFIX}{m[1]}", value)
            return self._roots.sub(lambda m: self._public[m[0]], value)
        if isinstance(value, dict):
            return {key: self(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self(item) for item in value]
        return value


@dataclass(frozen=True)
class CheckedJob:
    submitted: JobConfig  # as the client sent it, defaults filled in
    runnable: JobConfig  # what the job runs: an upload's file, models' server paths
    dataset_id: str | None  # the uploaded dataset it reads
    source_jobs: list[str]  # the jobs whose models it trains from


def check_job(body: dict[str, Any], settings: Settings, store: Store, catalog: ModelCatalog) -> CheckedJob:
    """The job, or a 422. Everything a job can be refused for is checked here, before it is queued: the schema, the
    dataset (an uploaded one is `upload:<id>`; the server rewrites it to its file) and the teacher and student
    sources (a model of a succeeded job by its id, `<job_id>.<variant>`: rewritten to its directory)."""
    if "output_dir" in body:
        raise ServiceError(422, "output_dir: chosen by the server (each job writes to its own directory, whose "
                                "files GET /v1/jobs/{id}/artifacts lists); remove the key")
    try:
        config = parse_config(body, withheld={"output_dir"})
        uses_cuda(config.device)  # 'cuda' on a server without a GPU: refused now, not once it runs
    except ConfigError as e:
        raise ServiceError(422, str(e)) from None
    parallel = config.distributed
    if parallel.nproc_per_node > settings.max_job_processes:
        raise ServiceError(422, f"distributed.nproc_per_node: {parallel.nproc_per_node} is more than this server "
                                f"starts for one job; allowed: 1 to {settings.max_job_processes} "
                                f"(DISTILL_MAX_JOB_PROCESSES)")
    if parallel.nnodes > 1 and not settings.multi_node_jobs:
        raise ServiceError(422, f"distributed.nnodes: {parallel.nnodes} machines, but this server runs jobs on "
                                f"itself only (its torchrun would join the rendezvous host a client names); "
                                f"allowed: 1, or start the server with DISTILL_MULTI_NODE_JOBS=true")
    data, dataset_id = config.data, None
    # Paths on the server are not a client's to choose: files come in through POST /v1/datasets.
    if data.dataset == "files":
        raise ServiceError(422, "data.dataset: 'files' reads paths on the server, which the HTTP API does not "
                                "accept; upload the file with POST /v1/datasets and set data.dataset to "
                                "'upload:<id>'")
    if data.transfer not in (None, "builtin"):
        raise ServiceError(422, "data.transfer: a path on the server, which the HTTP API does not accept; use "
                                "'builtin' (a built-in dataset's own transfer texts) or remove it")
    if data.dataset.startswith(UPLOAD_PREFIX):
        if data.transfer == "builtin":
            raise ServiceError(422, "data.transfer: 'builtin' belongs to built-in datasets, not uploads; remove it")
        dataset_id = data.dataset.removeprefix(UPLOAD_PREFIX)
        upload = store.get_dataset(dataset_id)
        if upload is None:
            raise ServiceError(422, f"data.dataset: no uploaded dataset {dataset_id!r}; GET /v1/datasets lists "
                                    f"them, POST /v1/datasets uploads one")
        if not upload.labels and config.task != "causal-lm":
            raise ServiceError(422, f"data.dataset: the upload {dataset_id!r} holds texts without labels (uploaded "
                                    f"with labelled=false), which only causal-lm jobs read; a {config.task} job "
                                    f"needs an upload with a label column")
        for key in ("text_column", "label_column"):
            chosen = getattr(upload, key)
            if key in data.model_fields_set and getattr(data, key) != chosen:
                raise ServiceError(422, f"data.{key}: {getattr(data, key)!r}, but an upload's columns are named when "
                                        f"it is uploaded (POST /v1/datasets); upload {dataset_id!r} has {key} "
                                        f"{chosen!r}; remove the key")
        data = data.model_copy(update={"dataset": "files", "format": "auto",
                                       "train": upload_path(settings, upload.id, upload.format),
                                       "text_column": upload.text_column, "label_column": upload.label_column})
    elif data.dataset not in BUILTIN_DATASETS:
        raise ServiceError(422, f"data.dataset: unknown dataset {data.dataset!r}; allowed: the built-in "
                                f"{', '.join(map(repr, BUILTIN_DATASETS))} or 'upload:<id>' of an uploaded file")
    else:
        try:
            check_builtin_keys(data)
        except DataError as e:
            raise ServiceError(422, str(e)) from None
        if not BUILTIN_DATASETS[data.dataset].cache_path(settings.home).exists():
            raise ServiceError(422, f"data.dataset: the built-in dataset {data.dataset!r} is not downloaded on the "
                                    f"server yet; run `distill datasets pull {data.dataset}` there, or upload a file")
    sources = {"teacher.name": config.teacher.name}
    if isinstance(config.student, FromModel):
        sources["student.model"] = config.student.model
    runs, resolved = {}, {}  # the name each source has in the job that runs, and what it resolves to
    by_id = {}  # a model named by id: its directory (as given and resolved) → the id, which messages show instead
    for key, name in sources.items():
        try:
            job_model = catalog.trainable_dir(name)
        except (LookupError, ValueError) as e:
            raise ServiceError(422, f"{key}: {e.args[0]}") from None
        runs[key] = str(job_model) if job_model is not None else _server_model_name(key, name, settings)
        try:
            resolved[key] = resolve_teacher(runs[key])
        except TeacherNotFound as e:
            raise ServiceError(422, f"{key}: {e}") from None
        if job_model is not None:
            by_id |= {runs[key]: name, resolved[key]: name}
    update: dict[str, Any] = {"data": data, "teacher": config.teacher.model_copy(update={"name": runs["teacher.name"]})}
    if "student.model" in runs:
        update["student"] = config.student.model_copy(update={"model": runs["student.model"]})
    runnable = config.model_copy(update=update)
    # A student the models cannot give: refused now, not once the job has prepared its teacher. Not for hub ids:
    # from_pretrained here would read a relative directory of that name in the server's working directory; the
    # job checks them first thing, in its own directory.
    if not any(name.startswith(HUB_PREFIX) for name in runs.values()):
        student = runnable.student if runs.get("student.model") in by_id else config.student  # a path as given
        try:
            check_student(student, resolved["teacher.name"], max_length=config.data.max_length, task=config.task,
                          intermediate_losses=config.loss.intermediate, value_relations=config.loss.value_kl > 0)
        except ConfigError as e:
            message = str(e)
            for directory, model_id in by_id.items():
                message = message.replace(directory, model_id)
            raise ServiceError(422, message) from None
    # The jobs whose directories it reads: those it names, and one whose student the named teacher is.
    jobs_dir = settings.jobs_dir.resolve()
    source_jobs = sorted({Path(d).relative_to(jobs_dir).parts[0] for d in resolved.values()
                          if Path(d).is_absolute() and Path(d).is_relative_to(jobs_dir)})
    return CheckedJob(config, runnable, dataset_id, source_jobs)


def _server_model_name(key: str, name: str, settings: Settings) -> str:
    """The name a job runs with for a model a client named: a registered teacher as it is; a hub id as `hub:` + id,
    never a directory of that relative name on the server; a path only under the server's model roots, absolute.
    Decided by the name's shape before anything on disk is looked at, so a refusal reads the same whether the path
    exists or not."""
    if "\x00" in name:
        raise ServiceError(422, f"{key}: contains a NUL byte")
    kind = name_kind(name)
    if kind == "hub" and not name.startswith(HUB_PREFIX):
        return HUB_PREFIX + name
    if kind != "path":
        return name
    try:
        path = Path(name).expanduser().resolve()
    except RuntimeError:  # `~user` of a user the server does not have
        raise ServiceError(422, f"{key}: {name!r} starts with a '~' this server cannot expand") from None
    if not any(path.is_relative_to(root.resolve()) for root in settings.model_roots):
        roots = PublicPaths(settings)(", ".join(map(str, settings.model_roots)))
        raise ServiceError(422, f"{key}: {name!r} is neither a registered teacher ({registered_names()}) nor a "
                                f"hub id ('org/name', or 'hub:name' for a one-word one such as 'hub:gpt2'), and "
                                f"this server reads model directories only under {roots} (more with "
                                f"DISTILL_MODEL_DIRS)")
    return str(path)


class Runner:
    def __init__(self, settings: Settings, store: Store, catalog: ModelCatalog) -> None:
        self.settings, self.store, self.catalog = settings, store, catalog
        self.public = PublicPaths(settings)  # what events and errors show a client
        self._lock = threading.Lock()  # guards the dicts/sets below and claim + launch as one step
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._watchers: dict[str, threading.Thread] = {}
        self._cancelling: set[str] = set()
        self._spawn_failures: Counter[str] = Counter()  # per queued job: its process could not be started
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._dispatcher is not None and self._dispatcher.is_alive() and not self._stopping.is_set()

    def start(self) -> None:
        self._recover()
        self._dispatcher = threading.Thread(target=self._dispatch, name="job-dispatcher", daemon=True)
        self._dispatcher.start()

    def stop(self) -> None:
        """Stop the dispatcher and the job processes; their jobs stay `running` and resume at the next start."""
        self._stopping.set()
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join()
        with self._lock:
            procs, watchers = list(self._procs.values()), list(self._watchers.values())
        for proc in procs:
            proc.terminate()
        for proc in procs:
            self._reap(proc)
        for watcher in watchers:
            watcher.join()

    def submit(self, body: dict[str, Any]) -> Job:
        """Validate, write the job's directory and config, and queue it (422 / 429 when it cannot be)."""
        checked = check_job(body, self.settings, self.store, self.catalog)
        job_id = uuid.uuid4().hex[:12]
        directory = job_dir(self.settings, job_id)
        capacity = self.settings.max_concurrent_jobs + self.settings.max_queued_jobs
        try:  # a job not queued leaves no directory (start-up sweeps no unrecorded ones)
            directory.mkdir(parents=True)
            runnable = checked.runnable.model_copy(update={"output_dir": directory})
            (directory / CONFIG_FILE).write_text(runnable.model_dump_json(indent=2), encoding="utf-8")
            job = self.store.create_job(job_id, checked.submitted.model_dump(mode="json", exclude={"output_dir"}),
                                        checked.dataset_id, capacity, checked.source_jobs)
            if job is None:
                raise ServiceError(429, f"the job queue is full ({self.settings.max_concurrent_jobs} running and "
                                        f"{self.settings.max_queued_jobs} waiting at most); retry later",
                                   headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        except DatasetGone:
            shutil.rmtree(directory, ignore_errors=True)
            raise ServiceError(422, f"data.dataset: the uploaded dataset {checked.dataset_id!r} was deleted just "
                                    f"now; upload it again with POST /v1/datasets") from None
        except SourceJobGone as e:
            shutil.rmtree(directory, ignore_errors=True)
            raise ServiceError(422, f"job {e.args[0]!r}, whose model this job trains from, is not a succeeded job "
                                    f"(deleted just now, or its end not recorded yet: GET /v1/jobs/{e.args[0]})"
                                    ) from None
        except BaseException:  # the 429 above, a full disk, the store refusing the record
            shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info("job queued", extra={"job_id": job_id})
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> None:
        """Cancel a queued job at once; stop a running one (terminate, kill after the grace period) and return when
        its watcher has recorded it `cancelled` with the events it had written."""
        with self._lock:
            if self.store.cancel_queued(job_id):
                log.info("job cancelled before it started", extra={"job_id": job_id})
                return
            proc, watcher = self._procs.get(job_id), self._watchers.get(job_id)
            if proc is not None:
                self._cancelling.add(job_id)
        if proc is not None:
            proc.terminate()
            self._reap(proc)
        if watcher is not None:  # without a process: it ended meanwhile, and its watcher may still be recording it
            watcher.join()

    def _reap(self, proc: subprocess.Popen[str]) -> None:
        try:
            proc.wait(self.settings.cancel_grace_seconds)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)  # not waited for, so not gone: at worst a zombie
            proc.wait()

    def _recover(self) -> None:
        for job_id in self.store.job_ids("running"):
            job = self.store.get_job(job_id)
            assert job is not None
            directory = job_dir(self.settings, job_id)
            if job.pid is not None:
                _stop_orphan(job.pid, directory, self.settings.cancel_grace_seconds)
            if (test := _test_metrics(directory)) is not None:  # the server died as the job's process was exiting
                self.store.finish(job_id, "succeeded", test=test)
                continue
            if not (directory / CONFIG_FILE).is_file():
                self.store.finish(job_id, "failed", self.public(f"the server stopped while this job ran and its "
                                                                f"directory {directory} is gone, so it cannot resume"))
                continue
            self.store.requeue(job_id, "the server stopped while this job ran; it resumes from its last checkpoint")
            log.info("job requeued to resume", extra={"job_id": job_id})

    def _dispatch(self) -> None:
        start_after = 0.0  # once no process could start (too many open files, memory), none is tried for a while
        while not self._stopping.is_set():
            if time.monotonic() >= start_after:
                with self._lock:
                    while not self._stopping.is_set() and len(self._procs) < self.settings.max_concurrent_jobs:
                        job = self.store.claim_next()
                        if job is None:
                            break
                        if not self._launch(job):
                            start_after = time.monotonic() + SPAWN_RETRY_SECONDS
                            break
            # Woken by submit and by every job's end; the timeout is a safety net, or the end of the wait to start.
            until_start = start_after - time.monotonic()
            self._wake.wait(timeout=until_start if 0 < until_start < 1 else 1.0)
            self._wake.clear()

    def _launch(self, job: Job) -> bool:
        """Start the job's process (called holding the lock, so cancel never sees a claimed job without one)."""
        directory = job_dir(self.settings, job.id)
        args = [str(directory), *(["--resume"] if job.runs > 1 else [])]
        # Data-parallel jobs run as torchrun workers; only rank 0 writes events to the stdout they share.
        parallel = DistributedConfig.model_validate(job.config.get("distributed", {}))
        command = (torchrun_command(parallel, job.id, "distill.pipeline", *args) if wanted(parallel)
                   else [sys.executable, "-m", "distill.pipeline", *args])
        # The job runs in its own directory, so that neither our code nor transformers' from_pretrained takes a hub id
        # `org/name` for a relative directory of the server's; the project stays importable from there.
        env = {**os.environ, "DISTILL_HOME": str(self.settings.home),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            with (directory / STDERR_FILE).open("a", encoding="utf-8") as stderr:
                # A session of its own: Ctrl-C on the server's terminal must not kill jobs before stop() says so.
                proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=directory,
                                        text=True, encoding="utf-8", errors="replace", start_new_session=True)
        except OSError as e:
            why = self.public(str(e))
            # Another try later, back in its place in the queue: one failure must not fail every queued job at once.
            self._spawn_failures[job.id] += 1
            if self._spawn_failures[job.id] < SPAWN_ATTEMPTS:
                self.store.requeue(job.id, f"could not start the job process ({why}); trying again in "
                                           f"{SPAWN_RETRY_SECONDS:g} s", started=False)
            else:
                del self._spawn_failures[job.id]
                self.store.finish(job.id, "failed", f"could not start the job process ({SPAWN_ATTEMPTS} tries): {why}")
            return False
        self._spawn_failures.pop(job.id, None)
        self.store.set_pid(job.id, proc.pid)
        watcher = threading.Thread(target=self._watch, args=(job, proc), name=f"job-{job.id}", daemon=True)
        self._procs[job.id], self._watchers[job.id] = proc, watcher
        watcher.start()
        log.info("job started", extra={"job_id": job.id, "pid": proc.pid, "run": job.runs})
        return True

    def _watch(self, job: Job, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        error, stored_progress = None, (None, -float("inf"))  # the stage and time of the last progress stored
        for line in proc.stdout:
            kind, data = _parse_event(line)
            if kind == "error":  # becomes the job's error, in its final status event
                error = self.public(data.get("message"))
                continue
            if kind == "progress":
                stage, at = data.get("stage"), time.monotonic()
                if (stage == stored_progress[0] and data.get("step") != data.get("total_steps")
                        and at - stored_progress[1] < self.settings.progress_event_seconds):
                    continue
                stored_progress = (stage, at)
            try:
                self.store.add_event(job.id, kind, self.public(data))
            except sqlite3.Error:  # a full disk, say: keep reading the pipe, or the job blocks once it fills
                log.exception("could not record a job event", extra={"job_id": job.id, "kind": kind})
        code = proc.wait()
        with self._lock:
            self._procs.pop(job.id, None)  # its slot is free; the watcher stays listed until the job is recorded
            cancelled = job.id in self._cancelling
            self._cancelling.discard(job.id)
        try:
            self._record_end(job, code, error, cancelled=cancelled)
        except Exception:  # noqa: BLE001 - the slot is free either way; a job left `running` resumes at the next start
            log.exception("could not record how the job ended", extra={"job_id": job.id, "exit_code": code})
        finally:
            with self._lock:  # after the record: a cancel that found no process joins this watcher until then
                self._watchers.pop(job.id, None)
            self._wake.set()

    def _record_end(self, job: Job, code: int, error: str | None, *, cancelled: bool) -> None:
        stopped = self._stopping.is_set() and not cancelled
        # A job that wrote its report is complete, however its process ended after it (a cancel or the server's stop
        # as it sent `done` and exited); its models are served from that report either way.
        if (test := _test_metrics(job_dir(self.settings, job.id))) is not None:
            self.store.finish(job.id, "succeeded", test=test)
        elif stopped:
            return  # the server is stopping: the job stays `running` and resumes at the next start
        elif cancelled and error is None:  # an error came before the cancel's SIGTERM (which sends none): failed
            self.store.finish(job.id, "cancelled")
        else:
            reason = error or self.public(_exit_reason(code, job_dir(self.settings, job.id) / STDERR_FILE))
            self.store.finish(job.id, "failed", f"resuming failed: {reason}" if job.runs > 1 else reason)
        final = self.store.get_job(job.id)
        assert final is not None and final.status in TERMINAL
        log.info(f"job {final.status}", extra={"job_id": job.id, "exit_code": code})


def _test_metrics(directory: Path) -> dict[str, Any] | None:
    """The headline numbers of the job in `directory` if it finished (the pipeline writes report.json last:
    distill.pipeline.finish), else None."""
    try:
        return dict(json.loads((directory / REPORT_FILE).read_text(encoding="utf-8")).get("headline", {}))
    except FileNotFoundError:
        return None


def _parse_event(line: str) -> tuple[str, dict[str, Any]]:
    try:
        event = json.loads(line)
        return str(event["kind"]), dict(event["data"])
    except (ValueError, KeyError, TypeError):  # not an event line: keep it as a log message
        return "log", {"message": line.rstrip()}


def _exit_reason(code: int, stderr: Path) -> str:
    how = f"was killed by signal {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
    try:
        tail = [line for line in stderr.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        tail = []
    return f"the job process {how}" + (f": {tail[-1].strip()}" if tail else "")


def _stop_orphan(pid: int, directory: Path, grace_seconds: float) -> None:
    """Stop a job process left by a crashed server, so two processes never write one job directory: SIGTERM, and
    SIGKILL after `grace_seconds`. SIGTERM first because torchrun's workers run in sessions of their own: torchrun
    stops them on SIGTERM, while a SIGKILLed torchrun leaves them running.

    Such an orphan dies by itself at its next event (its stdout pipe is broken), but it may be between events for
    a while. The pid is checked against /proc/<pid>/cmdline, because it may belong to another process by now.
    """
    def alive() -> bool:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone (or no /proc: then it is left to die at its next event)
            return False
        return b"distill.pipeline" in args and str(directory).encode() in args

    if not alive():
        return
    log.warning("stopping the job process left by the previous server", extra={"pid": pid})
    for stop, wait_seconds in ((functools.partial(os.kill, pid, signal.SIGTERM), grace_seconds),
                               (functools.partial(_kill_tree, pid), 10.0)):
        try:
            stop()
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_seconds
        while alive() and time.monotonic() < deadline:  # a zombie has an empty cmdline: this ends once it died
            time.sleep(0.05)
        if not alive():
            return


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it. torchrun's workers run in sessions of their own, out of its process
    group: a worker that outlived a SIGKILLed torchrun (SIGTERM ignored, or torchrun's own grace not yet over) kept
    the job's stdout open, and its watcher, and a cancel waiting for it, waited as long. The tree is read from
    /proc/<pid>/task/*/children before anything is killed (an orphan is no one's child); without /proc, `pid` alone."""
    tree, unseen = [pid], [pid]
    while unseen:
        for children in Path(f"/proc/{unseen.pop()}/task").glob("*/children"):
            try:
                found = [int(child) for child in children.read_text().split()]
            except OSError:  # ended while we looked
                continue
            tree += found
            unseen += found
    for child in tree[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)  # ProcessLookupError when it had ended, for the caller to see


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal (34 and up) has no name in the enum
        return str(number)
