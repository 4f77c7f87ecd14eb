"""The jobs and datasets API through TestClient: real job subprocesses on tiny seeded models, and every refusal."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from fastapi.testclient import TestClient

from service import datasets as datasets_module
from service import runner
from service.app import create_app
from service.routes.jobs import _files, log_as_written_now
from service.runner import PublicPaths, _server_model_name, check_job
from service.schemas import ServiceError
from service.settings import Settings
from service.store import Store
from teachers.registry import resolve_teacher
from tests.conftest import synthetic_rows, write_csv, write_tiny_gpt2

TERMINAL = ("succeeded", "failed", "cancelled")


def tiny_job(teacher_dir: Path, dataset: str, epochs: int = 2, **train: Any) -> dict[str, Any]:
    """A job that trains a 1-layer, 16-wide student in seconds (the subprocess spends most of it importing torch)."""
    return {"teacher": {"name": str(teacher_dir), "head_epochs": 1, "head_lr": 1e-2, "finetune_epochs": 0,
                        "batch_size": 16},
            "data": {"dataset": dataset, "max_length": 16},
            "student": {"init": "fresh", "num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32},
            "train": {"epochs": epochs, "batch_size": 16, "lr": 5e-3, **train},
            "export": {"onnx": False}}


def upload(client: Any, path: Path, **fields: str) -> Any:
    with path.open("rb") as f:
        return client.post("/v1/datasets", files={"file": (path.name, f, "text/csv")}, data=fields)


def wait_for(client: Any, job_id: str, until: Any, timeout: float = 60) -> dict[str, Any]:
    """Poll the job until `until(job)` holds; fail with its last state after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job did not get there in {timeout}s: {job}"
        time.sleep(0.1)


def all_events(client: Any, job_id: str) -> list[dict[str, Any]]:
    """Every event, page by page through the `after` cursor."""
    events: list[dict[str, Any]] = []
    while page := client.get(f"/v1/jobs/{job_id}/events", params={"after": len(events)}).json()["events"]:
        events += page
    return events


def sse_events(text: str) -> list[dict[str, Any]]:
    """Parse a text/event-stream body: the `data:` of each frame, checked against its `id:` and `event:`."""
    events = []
    for frame in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        event = json.loads(fields["data"])
        assert (fields["id"], fields["event"]) == (str(event["seq"]), event["kind"])
        events.append(event)
    return events


@pytest.fixture
def make_client(distill_home: Path) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        # Tests name their tiny teachers by their directories under pytest's temporary root.
        settings = {"model_dirs": [distill_home.parent], "cancel_grace_seconds": 5, **settings}
        client = TestClient(create_app(Settings(home=distill_home, **settings)))
        clients.append(client.__enter__())  # runs the lifespan: store, runner, recovery
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_a_job_goes_queued_running_succeeded_with_ordered_events_report_and_artifacts(
        make_client: Any, tiny_teacher_dir: Path, synthetic_csv: Path, distill_home: Path) -> None:
    client = make_client()
    dataset = upload(client, synthetic_csv)
    assert dataset.status_code == 201, dataset.text
    assert dataset.json() | {"id": "x", "created_at": "x", "size_bytes": 0} == {
        "id": "x", "kind": "upload", "reference": f"upload:{dataset.json()['id']}", "name": "synthetic.csv",
        "description": None, "pulled": True, "rows": 400, "labels": ["negative", "positive"],
        "label_counts": dict(Counter(label for _, label in synthetic_rows(400, seed=1))), "text_column": "text",
        "label_column": "label", "size_bytes": 0, "created_at": "x"}

    created = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, dataset.json()["reference"]))
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.headers["location"] == f"/v1/jobs/{job_id}"
    assert created.json()["status"] == "queued"
    assert created.json()["config"]["data"]["dataset"] == dataset.json()["reference"]  # as submitted
    job = wait_for(client, job_id, lambda j: j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1 and job["runs"] == 1 and job["error"] is None
    assert job["metrics"]["distill"]["epoch"] == 2 and "student_test_accuracy" in job["metrics"]["test"]
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]

    events = all_events(client, job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    statuses = [e["data"]["status"] for e in events if e["kind"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    kinds = [e["kind"] for e in events]
    assert kinds.index("stage") < kinds.index("progress") < kinds.index("done") < len(kinds) - 1
    page = client.get(f"/v1/jobs/{job_id}/events", params={"after": 3, "limit": 4}).json()
    assert [e["seq"] for e in page["events"]] == [4, 5, 6, 7] and page["next_after"] == 7
    assert client.get(f"/v1/jobs/{job_id}/events", params={"after": len(events)}).json()["events"] == []
    stream = client.get(f"/v1/jobs/{job_id}/events", params={"after": 2}, headers={"Accept": "text/event-stream"})
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert sse_events(stream.text) == events[2:]  # the stream ends because the job has ended
    resumed = client.get(f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "5"})
    assert [e["seq"] for e in sse_events(resumed.text)] == [e["seq"] for e in events[5:]]

    report = client.get(f"/v1/jobs/{job_id}/report")
    assert report.status_code == 200 and report.json()["student"]["test_accuracy"] == \
        job["metrics"]["test"]["student_test_accuracy"]
    # The server's directories stay its own: the upload by its reference, the job's files by the job.
    assert str(distill_home) not in json.dumps(events) + report.text
    assert [e["data"]["report"] for e in events if e["kind"] == "done"] == [f"jobs/{job_id}/report.json"]
    assert report.json()["config"]["data"]["train"] == dataset.json()["reference"]
    assert report.json()["student"]["dir"] == f"jobs/{job_id}/student"
    files = client.get(f"/v1/jobs/{job_id}/artifacts").json()["files"]
    assert {"config.json", "report.json", "report.md", "student/config.json", "stderr.log"} <= set(files)
    markdown = client.get(f"/v1/jobs/{job_id}/artifacts/report.md")
    assert markdown.status_code == 200 and markdown.text.startswith("# Distillation report")
    for alias in ("stderr.log", "stderr.log/", "%2e/stderr.log"):  # each sent as the growing log (the test below)
        log = client.get(f"/v1/jobs/{job_id}/artifacts/{alias}")
        assert log.status_code == 200 and log.headers["content-type"].startswith("text/plain"), alias
        assert log.content == (distill_home / "jobs" / job_id / "stderr.log").read_bytes()
    directory = client.get(f"/v1/jobs/{job_id}/artifacts/student")
    assert directory.status_code == 400 and "student/config.json" in directory.json()["detail"]
    escape = client.get(f"/v1/jobs/{job_id}/artifacts/%2E%2E%2F%2E%2E%2Fservice.sqlite3")
    assert escape.status_code == 400 and "leaves the job directory" in escape.json()["detail"]
    nul = client.get(f"/v1/jobs/{job_id}/artifacts/report%00.md")
    assert nul.status_code == 400 and "holds a NUL byte" in nul.json()["detail"]
    missing = client.get(f"/v1/jobs/{job_id}/artifacts/student-onnx/model_int8.onnx")
    assert missing.status_code == 404 and "report.md" in missing.json()["detail"]
    too_long = client.get(f"/v1/jobs/{job_id}/artifacts/{'x' * 300}")  # the OS refuses to look it up
    assert too_long.status_code == 404 and "report.md" in too_long.json()["detail"]
    # Past SQLite's integers: refused as out of range, not a 500 from binding them.
    for path, params, headers in [("/v1/jobs", {"offset": 10**20}, {}),
                                  (f"/v1/jobs/{job_id}/events", {"after": 10**20}, {}),
                                  (f"/v1/jobs/{job_id}/events", {}, {"Accept": "text/event-stream",
                                                                     "Last-Event-ID": str(10**20)})]:
        huge = client.get(path, params=params, headers=headers)
        assert huge.status_code == 422 and "less than or equal to 9223372036854775807" in huge.text, huge.text

    listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == job_id
    assert client.get("/v1/jobs", params={"status": "running"}).json() == {
        "items": [], "total": 0, "limit": 20, "offset": 0}
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    assert client.delete(f"/v1/datasets/{dataset.json()['id']}").status_code == 204  # no active job uses it


def test_server_paths_reach_clients_as_references(tmp_path: Path) -> None:
    home = tmp_path / "distill"
    public = PublicPaths(Settings(home=home))
    assert public({"message": [f"read {home}/uploads/ab12/data.csv, wrote {home}/jobs/j1/student.",
                               f"reusing the prepared teacher {home}/prepared/bert-1f2e", f"{home}-old/x", 3]}) == {
        "message": ["read upload:ab12, wrote jobs/j1/student.", "reusing the prepared teacher "
                    "$DISTILL_HOME/prepared/bert-1f2e", f"{home}-old/x", 3]}
    # Texts alone (a causal LM's upload); a packaged teacher's directory; the server's code and Python, which a
    # crashed job's last line of stderr names.
    assert public(f"{home}/uploads/cd34/data.txt") == "upload:cd34"
    assert public(f"{resolve_teacher('minilm-l6')}/config.json") == "minilm-l6/config.json"
    assert public(f"ImportError: cannot import name 'x' ({runner.PROJECT_ROOT}/distill/student.py)") == (
        "ImportError: cannot import name 'x' (<distill>/distill/student.py)")
    assert public(f"{sys.prefix}/lib/site.py") == "<python>/lib/site.py"


def test_cancel_stops_a_running_job_and_a_full_queue_answers_429(
        make_client: Any, tiny_teacher_dir: Path, synthetic_csv: Path, distill_home: Path) -> None:
    client = make_client(max_concurrent_jobs=1, max_queued_jobs=1)
    reference = upload(client, synthetic_csv).json()["reference"]
    running = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference, epochs=500)).json()
    waiting = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference)).json()
    full = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference))
    assert full.status_code == 429 and full.headers["retry-after"].isdigit()
    assert "queue is full" in full.json()["detail"]
    in_use = client.delete(f"/v1/datasets/{reference.removeprefix('upload:')}")
    assert in_use.status_code == 409 and running["id"] in in_use.json()["detail"]

    job = wait_for(client, running["id"], lambda j: j["stage"] == "distill" and j["progress"] > 0)
    assert job["status"] == "running" and client.get(f"/v1/jobs/{waiting['id']}").json()["status"] == "queued"
    # A server told to stop ends a running job's event stream after the stored events (it used to hold it open
    # until uvicorn's grace ran out and cancelled it with a traceback).
    client.app.state.stopping = lambda: True
    streamed = sse_events(client.get(f"/v1/jobs/{running['id']}/events",
                                     headers={"Accept": "text/event-stream"}).text)
    client.app.state.stopping = lambda: False
    assert [event["data"].get("status") for event in streamed[:2]] == ["queued", "running"]
    assert client.get(f"/v1/jobs/{running['id']}").json()["status"] == "running"
    cancelled = client.post(f"/v1/jobs/{waiting['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert [e["data"] for e in all_events(client, waiting["id"])] == [{"status": "queued"}, {"status": "cancelled"}]

    started = time.monotonic()
    stopped = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
    assert time.monotonic() - started < 5  # SIGTERM ends it at once; SIGKILL would come after the 5 s grace
    events = all_events(client, running["id"])
    assert any(e["kind"] == "progress" for e in events)  # the partial history is kept
    assert events[-1]["data"] == {"status": "cancelled"}
    report = client.get(f"/v1/jobs/{running['id']}/report")
    assert report.status_code == 404 and "it is cancelled" in report.json()["detail"]
    assert not (distill_home / "jobs" / running["id"] / "report.json").exists()
    assert client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference, epochs=1)).status_code == 202


def processes_of(directory: Path) -> list[int]:
    """Pids of the live processes whose command line names `directory` (a job's torchrun and its workers)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(directory) in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # ended while we looked
            continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads processes from /proc")
def test_cancel_stops_every_process_of_a_multi_process_job(make_client: Any, tiny_teacher_dir: Path,
                                                           synthetic_csv: Path, distill_home: Path) -> None:
    client = make_client(max_job_processes=2)
    reference = upload(client, synthetic_csv).json()["reference"]
    job = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference, epochs=500)
                      | {"distributed": {"nproc_per_node": 2}}).json()
    wait_for(client, job["id"], lambda j: j["stage"] == "distill" and j["progress"] > 0, timeout=120)
    directory = distill_home / "jobs" / job["id"]
    assert len(processes_of(directory)) == 3  # torchrun and its two workers

    stopped = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled"
    assert processes_of(directory) == []


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads processes from /proc")
def test_cancel_kills_a_worker_that_ignores_sigterm_and_holds_the_jobs_output(
        make_client: Any, tiny_teacher_dir: Path, synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As torchrun's workers may: in a session of their own, SIGTERM ignored, the job's stdout inherited. Once the
    grace period is over the whole tree is killed; before, the worker outlived its SIGKILLed parent, kept the pipe
    open, and the cancel waited for it."""
    ignores_sigterm = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    script = (ignores_sigterm + "import json, subprocess, sys; worker = subprocess.Popen([sys.executable, '-c', "
              f"{ignores_sigterm + 'time.sleep(300)'!r}], start_new_session=True); "
              "print(json.dumps({'kind': 'log', 'data': {'message': f'worker {worker.pid}'}}), flush=True); "
              "time.sleep(300)")
    popen = subprocess.Popen
    monkeypatch.setattr(runner.subprocess, "Popen",
                        lambda command, **kwargs: popen([sys.executable, "-c", script], **kwargs))
    client = make_client(cancel_grace_seconds=0.5)
    reference = upload(client, synthetic_csv).json()["reference"]
    job_id = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference)).json()["id"]
    deadline, worker = time.monotonic() + 60, None
    while worker is None:
        assert time.monotonic() < deadline
        messages = [e["data"].get("message", "") for e in all_events(client, job_id)]
        worker = next((int(m.split()[1]) for m in messages if m.startswith("worker ")), None)
        time.sleep(0.05)
    answers: list[Any] = []
    cancel = threading.Thread(target=lambda: answers.append(client.post(f"/v1/jobs/{job_id}/cancel")), daemon=True)
    cancel.start()
    cancel.join(60)  # the worker would hold the pipe for 300 s
    assert answers and answers[0].json()["status"] == "cancelled"
    assert not _running(worker)


STAND_IN_HEADLINE = {"student_test_accuracy": 0.9}


def _stand_in(*events: dict[str, Any], report: bool, wait: bool) -> str:
    """A job process's stand-in script: with `report` it writes report.json (headline STAND_IN_HEADLINE) in its
    working directory (the job's), as the pipeline does last; then it prints `events` as the pipeline does and, with
    `wait`, waits (to be stopped) instead of exiting."""
    report_json = json.dumps({"headline": STAND_IN_HEADLINE})
    return ("import json, pathlib, time; "
            + (f"pathlib.Path('report.json').write_text({report_json!r}); " if report else "")
            + f"[print(json.dumps(e), flush=True) for e in {events!r}]" + ("; time.sleep(60)" if wait else ""))


def _job_processes_run(monkeypatch: pytest.MonkeyPatch, *events: dict[str, Any], report: bool = False,
                       wait: bool) -> None:
    """Job processes become `_stand_in(*events, report=report, wait=wait)`."""
    popen, script = subprocess.Popen, _stand_in(*events, report=report, wait=wait)
    monkeypatch.setattr(runner.subprocess, "Popen",
                        lambda command, **kwargs: popen([sys.executable, "-c", script], **kwargs))


def _processes_finish_then_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    _job_processes_run(monkeypatch, {"kind": "done", "data": {}}, report=True, wait=True)


def _job_that_finished(client: Any, teacher_dir: Path, csv: Path) -> str:
    reference = upload(client, csv).json()["reference"]
    job_id = client.post("/v1/jobs", json=tiny_job(teacher_dir, reference)).json()["id"]
    _wait_for_event(client, job_id, lambda event: event["kind"] == "done")
    return job_id


def _wait_for_event(client: Any, job_id: str, matches: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(matches(event) for event in all_events(client, job_id)):
        assert time.monotonic() < deadline, f"no such event in {timeout}s: {all_events(client, job_id)}"
        time.sleep(0.05)


def test_a_job_that_finished_as_the_server_stopped_is_succeeded_not_run_again(
        tiny_teacher_dir: Path, synthetic_csv: Path, distill_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server stopping as a job that wrote its report exits records it succeeded, where before it stayed
    `running` and the next start ran it again. The job process is a stand-in that writes its report, sends `done`
    and then waits to be stopped."""
    _processes_finish_then_wait(monkeypatch)
    settings = Settings(home=distill_home, model_dirs=[distill_home.parent])
    with TestClient(create_app(settings)) as client:
        job_id = _job_that_finished(client, tiny_teacher_dir, synthetic_csv)
    with TestClient(create_app(settings)) as client:  # the next start
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert (job["status"], job["runs"]) == ("succeeded", 1)


def test_a_job_that_wrote_its_report_before_the_server_died_is_succeeded_at_the_next_start(
        tiny_teacher_dir: Path, distill_home: Path) -> None:
    """A server killed (no graceful stop) between a job's report and its process's exit leaves the job `running`
    with its report written and maybe no `done` event; the next start records it succeeded (with its report's
    headline as its test metrics) instead of running it again over its served models."""
    settings = Settings(home=distill_home, model_dirs=[distill_home.parent])
    store = Store(settings.database)
    config = {"teacher": {"name": str(tiny_teacher_dir)}, "data": {"dataset": "reviews"},
              "student": {"init": "teacher", "layers": [0]}}
    assert store.create_job("finished", config, None, capacity=10) is not None
    assert store.claim_next() is not None
    store.close()
    (settings.jobs_dir / "finished").mkdir(parents=True)
    (settings.jobs_dir / "finished" / "report.json").write_text(json.dumps({"headline": STAND_IN_HEADLINE}))
    with TestClient(create_app(settings)) as client:
        job = client.get("/v1/jobs/finished").json()
    assert (job["status"], job["runs"], job["metrics"]["test"]) == ("succeeded", 1, STAND_IN_HEADLINE)


def test_a_job_whose_events_cannot_be_stored_still_ends_and_frees_its_slot(
        make_client: Any, tiny_teacher_dir: Path, synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that refuses an event (a full disk) loses that event, not the job: the pipe is still read, the end
    is recorded and the next job starts. The job process is a stand-in that sends a log event and `done`."""
    _job_processes_run(monkeypatch, {"kind": "log", "data": {"message": "x"}}, {"kind": "done", "data": {}},
                       report=True, wait=False)
    add_event = Store.add_event

    def full_disk(self: Store, job_id: str, kind: str, data: dict[str, Any]) -> None:
        if kind == "log":
            raise sqlite3.OperationalError("database or disk is full")
        add_event(self, job_id, kind, data)

    monkeypatch.setattr(Store, "add_event", full_disk)
    client = make_client()
    reference = upload(client, synthetic_csv).json()["reference"]
    first, second = (client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference)).json()["id"]
                     for _ in range(2))
    for job_id in (first, second):  # one job at a time: the second starts only once the first's slot is free
        assert wait_for(client, job_id, lambda j: j["status"] != "running" and j["status"] != "queued")[
            "status"] == "succeeded"


def test_a_running_job_is_deleted_only_once_it_has_ended(make_client: Any, tiny_teacher_dir: Path,
                                                         synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DELETE of a running job is a 409 that says to cancel it first; once cancelled, the delete takes its directory
    too, and a directory a delete was removing when the server stopped is removed at the next start. The job
    process is a stand-in that writes its report, sends `done` and then waits."""
    _processes_finish_then_wait(monkeypatch)
    client = make_client()
    job_id = _job_that_finished(client, tiny_teacher_dir, synthetic_csv)
    refused = client.delete(f"/v1/jobs/{job_id}")
    assert refused.status_code == 409 and f"POST /v1/jobs/{job_id}/cancel" in refused.json()["detail"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "succeeded"
    jobs_dir = client.app.state.settings.jobs_dir
    assert (jobs_dir / job_id).is_dir()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert not (jobs_dir / job_id).exists() and client.get(f"/v1/jobs/{job_id}").status_code == 404
    left = jobs_dir / runner.DELETING / "cut-short"
    left.mkdir()
    make_client()  # the next start
    assert not left.exists()


def test_a_job_trains_from_another_jobs_models_named_by_id_which_stay_until_it_ends(
        client_and_dataset: tuple[Any, str], tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two-stage distillation (or a student distilled further, a prepared teacher reused) over HTTP: teacher.name
    and student.model take model ids as GET /v1/models lists them; the job runs with their directories."""
    client, dataset = client_and_dataset
    first = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, dataset)).json()["id"]
    assert wait_for(client, first, lambda j: j["status"] in TERMINAL)["status"] == "succeeded"
    popen, started = subprocess.Popen, threading.Event()  # the next job's process starts once the test says so
    monkeypatch.setattr(runner.subprocess, "Popen", lambda *args, **kwargs: started.wait(30) and popen(*args, **kwargs))
    job = tiny_job(tiny_teacher_dir, dataset) | {"student": {"init": "model", "model": f"{first}.student-torch",
                                                             "num_layers": 1}}
    job["teacher"] |= {"name": f"{first}.teacher"}
    for key, change, message in (
            ("student", {"model": f"{first}.student-fp32"}, f"student.model: no model '{first}.student-fp32'"),
            ("teacher", {"name": "0123456789ab.teacher"}, "teacher.name: no model '0123456789ab.teacher'"),
            # named by its id, not by the server's directory
            ("student", {"num_layers": 2}, f"student.num_layers: 2, but '{first}.student-torch' has 1 layers")):
        refused = client.post("/v1/jobs", json=job | {key: job[key] | change})
        assert refused.status_code == 422 and refused.json()["detail"].startswith(message), refused.text
    second = client.post("/v1/jobs", json=job)
    assert second.status_code == 202, second.text
    second_id = second.json()["id"]
    assert second.json()["config"]["student"]["model"] == f"{first}.student-torch"  # as submitted
    jobs_dir = client.app.state.settings.jobs_dir
    runs = json.loads((jobs_dir / second_id / "config.json").read_text())
    first_report = json.loads((jobs_dir / first / "report.json").read_text())
    assert runs["student"]["model"] == str(jobs_dir / first / "student")
    assert runs["teacher"]["name"] == first_report["teacher"]["prepared_dir"]
    refused = client.delete(f"/v1/jobs/{first}")
    assert refused.status_code == 409 and refused.json()["detail"] == (
        f"job {first}'s models are what the queued or running jobs {second_id} train from; delete it once they have "
        f"ended (or cancel them)")
    assert (jobs_dir / first).is_dir() and client.get(f"/v1/models/{first}.student-torch").status_code == 200
    started.set()
    assert wait_for(client, second_id, lambda j: j["status"] in TERMINAL)["status"] == "succeeded"
    report = json.loads((jobs_dir / second_id / "report.json").read_text())
    assert report["teacher"]["test_accuracy"] == first_report["teacher"]["test_accuracy"]  # the same teacher, as is
    assert report["student"]["params"] == first_report["student"]["params"]
    assert client.delete(f"/v1/jobs/{first}").status_code == 204


def test_a_job_is_not_queued_on_a_job_deleted_after_its_check(client_and_dataset: tuple[Any, str],
                                                              tiny_teacher_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    client, dataset = client_and_dataset
    first = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, dataset)).json()["id"]
    assert wait_for(client, first, lambda j: j["status"] in TERMINAL)["status"] == "succeeded"
    store = client.app.state.store

    def check_then_delete(*args: Any) -> Any:
        checked = check_job(*args)
        assert store.delete_job(first, lambda: None)[0]
        return checked

    monkeypatch.setattr(runner, "check_job", check_then_delete)
    response = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, dataset) | {
        "student": {"init": "model", "model": f"{first}.student-torch", "num_layers": 1}})
    assert response.status_code == 422 and response.json()["detail"] == (
        f"job {first!r}, whose model this job trains from, is not a succeeded job (deleted just now, or its end not "
        f"recorded yet: GET /v1/jobs/{first})"), response.text
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_job_process_that_cannot_start_is_tried_again_without_failing_the_queue(
        make_client: Any, tiny_teacher_dir: Path, synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Popen failing once (too many open files, say) puts the job back in its place and tries again later; the
    queued job behind it is not failed meanwhile. One that never starts is failed after SPAWN_ATTEMPTS tries."""
    popen, calls = subprocess.Popen, Counter()
    finishes = _stand_in({"kind": "done", "data": {}}, report=True, wait=False)

    def flaky(command: list[str], **kwargs: Any) -> subprocess.Popen:
        calls["all"] += 1
        if calls["all"] == 1 or calls["fail always"]:
            raise OSError(24, "Too many open files")
        return popen([sys.executable, "-c", finishes], **kwargs)

    monkeypatch.setattr(runner.subprocess, "Popen", flaky)
    monkeypatch.setattr(runner, "SPAWN_RETRY_SECONDS", 0.2)
    client = make_client()
    reference = upload(client, synthetic_csv).json()["reference"]
    first, second = (client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference)).json()["id"]
                     for _ in range(2))
    for job_id in (first, second):
        job = wait_for(client, job_id, lambda j: j["status"] not in ("queued", "running"))
        assert (job["status"], job["runs"]) == ("succeeded", 1)
    messages = [e["data"].get("message", "") for e in all_events(client, first)]
    assert any(m.startswith("could not start the job process ([Errno 24] Too many open files)") for m in messages)

    calls["fail always"] = 1
    never = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference)).json()["id"]
    job = wait_for(client, never, lambda j: j["status"] not in ("queued", "running"))
    assert (job["status"], job["runs"]) == ("failed", 1)
    assert job["error"] == (f"could not start the job process ({runner.SPAWN_ATTEMPTS} tries): "
                            f"[Errno 24] Too many open files")


def test_a_job_process_that_cannot_start_waits_its_retry_however_often_the_queue_is_woken(
        make_client: Any, tiny_teacher_dir: Path, synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each submit wakes the dispatcher: it used to try the failed job again at once, so a few submits used up its
    SPAWN_ATTEMPTS within milliseconds of the first failure instead of SPAWN_RETRY_SECONDS apart."""
    calls = Counter()

    def failing(command: list[str], **kwargs: Any) -> subprocess.Popen:
        calls["all"] += 1
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(runner.subprocess, "Popen", failing)
    monkeypatch.setattr(runner, "SPAWN_RETRY_SECONDS", 60.0)
    client = make_client()
    job = tiny_job(tiny_teacher_dir, upload(client, synthetic_csv).json()["reference"])
    first = client.post("/v1/jobs", json=job).json()["id"]
    _wait_for_event(client, first, lambda e: e["data"].get("message", "").startswith("could not start"))
    submits = runner.SPAWN_ATTEMPTS + 1
    for _ in range(submits):
        client.post("/v1/jobs", json=job)
    time.sleep(0.5)
    assert calls["all"] == 1, f"{calls['all']} tries after {submits} submits"
    assert client.get(f"/v1/jobs/{first}").json()["status"] == "queued"


def test_a_job_that_failed_on_its_own_as_a_cancel_came_is_failed_with_its_error(
        make_client: Any, tiny_teacher_dir: Path, synthetic_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's `error` event comes before its exit, and a cancel's SIGTERM brings none: a job that sent one
    failed on its own, and keeps its error, when a cancel lands before its end is recorded. The job process is a
    stand-in that sends an error and then waits."""
    _job_processes_run(monkeypatch, {"kind": "error", "data": {"message": "out of memory"}},
                       {"kind": "log", "data": {"message": "after"}}, wait=True)
    client = make_client()
    reference = upload(client, synthetic_csv).json()["reference"]
    job_id = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference)).json()["id"]
    deadline = time.monotonic() + 60  # the lines are read in order: the error is in once the log after it is
    while not any(e["data"].get("message") == "after" for e in all_events(client, job_id)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job = client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert (job["status"], job["error"]) == ("failed", "out of memory")


def test_a_job_killed_by_a_real_time_signal_is_failed_naming_its_number(tmp_path: Path) -> None:
    """Real-time signals (34 and up) have no name in Python's enum: the reason says the number instead of the
    watcher raising ValueError and leaving the job `running`."""
    assert runner._exit_reason(-9, tmp_path / "none.log") == "the job process was killed by signal SIGKILL"
    assert runner._exit_reason(-40, tmp_path / "none.log") == "the job process was killed by signal 40"


def test_a_job_cancelled_after_it_wrote_its_report_is_succeeded(make_client: Any, tiny_teacher_dir: Path,
                                                                  synthetic_csv: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel after report.json is written (the models are served from it) and before the process exits stops the
    process with SIGTERM; the job is complete, not `cancelled` with its models listed, also when `done` was not yet
    sent. The job process is a stand-in that writes its report, logs, and then waits."""
    _job_processes_run(monkeypatch, {"kind": "log", "data": {"message": "reported"}}, report=True, wait=True)
    client = make_client()
    reference = upload(client, synthetic_csv).json()["reference"]
    job_id = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference)).json()["id"]
    _wait_for_event(client, job_id, lambda event: event["data"].get("message") == "reported")
    answered = client.post(f"/v1/jobs/{job_id}/cancel")
    assert (answered.status_code, answered.json()["status"]) == (200, "succeeded")
    assert answered.json()["metrics"]["test"] == STAND_IN_HEADLINE  # from the report: no `done` came


def test_a_cancel_as_the_job_ends_answers_with_how_it_ended(make_client: Any, tiny_teacher_dir: Path,
                                                            synthetic_csv: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Between its process's exit and its record, a job is in neither the runner's processes nor a final status:
    a cancel then waits for the record instead of answering `running`."""
    client = make_client()
    reference = upload(client, synthetic_csv).json()["reference"]
    exited, finish = threading.Event(), Store.finish

    def slow_finish(store: Store, job_id: str, status: str, error: str | None = None,
                    test: dict[str, Any] | None = None) -> None:
        exited.set()
        time.sleep(1.0)  # the gap, widened
        finish(store, job_id, status, error, test)

    monkeypatch.setattr(Store, "finish", slow_finish)
    job = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference, epochs=1)).json()
    assert exited.wait(60)
    answered = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert (answered.status_code, answered.json()["status"]) == (200, "succeeded")


@pytest.fixture
def client_and_dataset(make_client: Any, synthetic_csv: Path) -> tuple[Any, str]:
    client = make_client()
    return client, upload(client, synthetic_csv).json()["reference"]


@pytest.mark.parametrize("change, message", [
    ({"train": {"epoch": 3}}, "train.epoch: unknown key; allowed keys: batch_size"),
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
    ({"output_dir": "/tmp/elsewhere"}, "output_dir: chosen by the server"),
    ({"tecaher": {}}, "tecaher: unknown key; allowed keys: compress, data, device, distributed, evaluate, export, "
                      "loss, precision, seed"),  # not output_dir, which the server refuses
    ({"teacher": {"name": "no-such-teacher"}}, "teacher.name: 'no-such-teacher' is neither a registered teacher "
                                               "(minilm-l6, mpnet-base) nor a hub id ('org/name', or 'hub:name' "
                                               "for a one-word one such as 'hub:gpt2'), and this server reads "
                                               "model directories only under "),
    ({"teacher": {"name": "~no-such-user/model"}}, "teacher.name: '~no-such-user/model' starts with a '~' this "
                                                   "server cannot expand"),
    ({"student": {"init": "model", "model": "nope", "num_layers": 1}}, "student.model: 'nope' is neither"),
    ({"data": {"dataset": "upload:0123456789ab"}}, "data.dataset: no uploaded dataset '0123456789ab'"),
    ({"data": {"dataset": "imdb"}}, "data.dataset: unknown dataset 'imdb'; allowed: the built-in 'reviews'"),
    ({"data": {"dataset": "reviews"}}, "built-in dataset 'reviews' is not downloaded on the server yet"),
    ({"data": {"dataset": "reviews", "label_column": "sentiment"}}, "data.label_column: 'sentiment', but the "
                                                                   "built-in dataset 'reviews' has its own columns"),
    ({"data": {"dataset": "files", "train": "/etc/hosts"}}, "data.dataset: 'files' reads paths on the server"),
    ({"student": {"init": "teacher", "layers": [0, 2]}}, "student.layers must be distinct increasing indices in 0..1"),
    ({"distributed": {"nproc_per_node": 10_000}}, "distributed.nproc_per_node: 10000 is more than this server starts "
                                                  "for one job; allowed: 1 to"),
    ({"distributed": {"nnodes": 2, "rdzv_endpoint": "elsewhere.example:29500"}},
     "distributed.nnodes: 2 machines, but this server runs jobs on itself only"),
])
def test_a_bad_job_is_refused_with_422_naming_the_key(client_and_dataset: tuple[Any, str], tiny_teacher_dir: Path,
                                                      change: dict[str, Any], message: str) -> None:
    client, dataset = client_and_dataset
    response = client.post("/v1/jobs", json={**tiny_job(tiny_teacher_dir, dataset), **change})
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_job_body_that_is_nan_is_a_422(client_and_dataset: tuple[Any, str]) -> None:
    client, _ = client_and_dataset
    response = client.post("/v1/jobs", content="NaN", headers={"content-type": "application/json"})
    assert (response.status_code, response.json()) == (422, {"detail": "body: Input should be a valid dictionary"}), \
        response.text


def test_a_lone_surrogate_in_a_job_body_is_a_422_naming_where(client_and_dataset: tuple[Any, str]) -> None:
    """JSON's \\ud800 escape decodes to a string no UTF-8 encoder takes: SQLite failed on it with a 500."""
    client, _ = client_and_dataset
    for body, message in (('{"data": {"dataset": "upload:\\ud800"}}', "data.dataset holds a lone surrogate (\\ud800) "
                                                                     "at character 7"),
                          ('{"\\ud800": 1}', "a key of the body holds a lone surrogate")):
        response = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422 and message in response.json()["detail"], response.text
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_body_that_is_not_plain_json_is_refused_saying_why(client_and_dataset: tuple[Any, str],
                                                             tiny_teacher_dir: Path) -> None:
    """A key given twice trained with the last value; a body without the JSON content type was validated as bytes
    ("Input should be a valid dictionary"); one not UTF-8 got "There was an error parsing the body"."""
    client, dataset = client_and_dataset
    job = json.dumps(tiny_job(tiny_teacher_dir, dataset, epochs=1))
    twice = job.replace('"epochs": 1', '"epochs": 1, "epochs": 500', 1)
    assert twice != job
    for body, content_type, status, message in (
            (twice, "application/json", 422, "body: the key 'epochs' is given more than once in one object; give it "
                                              "once"),
            (job, None, 415, "send the body as JSON, with the header Content-Type: application/json (this "
                             "request's: none)"),
            (job, "application/x-www-form-urlencoded", 415, "(this request's: application/x-www-form-urlencoded)"),
            (b'{"seed": "\xff"}', "application/json", 422, "body: not UTF-8 (byte 10); send JSON encoded as UTF-8"),
            (job.encode("utf-16"), "application/json", 422, "body: not UTF-8 (byte 0)"),  # json.loads took it
            ("[" * 100_000 + "]" * 100_000, "application/json", 422, "body: values nested too deep to read"),
            ('{"seed": ' + "1" * 5000 + "}", "application/json", 422, "body: not readable as JSON (Exceeds the limit")):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post("/v1/jobs", content=body, headers=headers)
        assert response.status_code == status and message in response.json()["detail"], response.text
    assert client.get("/v1/jobs").json()["total"] == 0
    accepted = client.post("/v1/jobs", content=job, headers={"content-type": "application/json; charset=utf-8"})
    assert accepted.status_code == 202 and accepted.json()["config"]["train"]["epochs"] == 1, accepted.text


def test_an_uploads_columns_are_named_at_upload_not_in_the_job(client_and_dataset: tuple[Any, str],
                                                                tiny_teacher_dir: Path) -> None:
    client, dataset = client_and_dataset
    job = tiny_job(tiny_teacher_dir, dataset)
    for key, name in (("text_column", "review"), ("label_column", "sentiment")):
        response = client.post("/v1/jobs", json=job | {"data": job["data"] | {key: name}})
        assert response.status_code == 422 and response.json()["detail"].startswith(
            f"data.{key}: {name!r}, but an upload's columns are named when it is uploaded"), response.text
    assert client.get("/v1/jobs").json()["total"] == 0


def test_a_job_reads_server_directories_only_under_the_model_roots_and_learns_nothing_of_others(
        make_client: Any, synthetic_csv: Path, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """teacher.name / student.model name a server directory only under $DISTILL_HOME/teachers or DISTILL_MODEL_DIRS;
    elsewhere the refusal reads the same whether the path exists or not (symlinks and `..` resolved first)."""
    roots = tmp_path / "models"
    shutil.copytree(tiny_teacher_dir, roots / "teacher")
    (roots / "link").symlink_to(tiny_teacher_dir)  # under a root, pointing out of it
    client = make_client(model_dirs=[roots])
    dataset = upload(client, synthetic_csv).json()["reference"]
    accepted = client.post("/v1/jobs", json=tiny_job(roots / "teacher", dataset))
    assert accepted.status_code == 202
    runs = json.loads((client.app.state.settings.jobs_dir / accepted.json()["id"] / "config.json").read_text())
    assert runs["teacher"]["name"] == str((roots / "teacher").resolve())
    details = {}
    for name in (tiny_teacher_dir, tiny_teacher_dir / "missing", Path("/etc"), roots / ".." / tiny_teacher_dir.name,
                 roots / "link"):
        response = client.post("/v1/jobs", json=tiny_job(name, dataset))
        assert response.status_code == 422
        details[name] = response.json()["detail"].replace(repr(str(name)), "NAME")
    assert len(set(details.values())) == 1
    # The operator's DISTILL_MODEL_DIRS as they are (a client names directories under them), the home not.
    assert f"reads model directories only under $DISTILL_HOME/teachers, {roots} (more with" in details[Path("/etc")]
    body = tiny_job(roots / "teacher", dataset) | {
        "student": {"init": "model", "model": str(tiny_teacher_dir), "num_layers": 1}}
    assert client.post("/v1/jobs", json=body).json()["detail"].startswith("student.model: ")


def test_a_hub_id_is_the_hubs_never_a_relative_directory_of_the_server(tiny_teacher_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`org/name` is also a relative path: a job runs it as `hub:org/name`, which resolves to the hub id even where
    the server's working directory holds a model directory of that name."""
    settings = Settings(home=tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    names = []
    for exists in (False, True):
        if exists:
            shutil.copytree(tiny_teacher_dir, tmp_path / "org" / "model")
        names.append(_server_model_name("teacher.name", "org/model", settings))
        assert resolve_teacher(names[-1]) == "org/model"
    assert names == ["hub:org/model"] * 2
    assert resolve_teacher("org/model") == str(tmp_path / "org" / "model")  # what the unprefixed name would read
    with pytest.raises(ServiceError, match="teacher.name: contains a NUL byte"):
        _server_model_name("teacher.name", "a\x00b", settings)


def test_a_job_is_not_queued_on_an_upload_deleted_after_its_check(client_and_dataset: tuple[Any, str],
                                                                  tiny_teacher_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """DELETE /v1/datasets/<id> between the job's check and its insert: the insert sees the upload is gone."""
    client, dataset = client_and_dataset
    store = client.app.state.store

    def check_then_delete(*args: Any) -> Any:
        checked = check_job(*args)
        assert store.delete_dataset(dataset.removeprefix("upload:")) == (True, [])  # no job uses it yet
        return checked

    monkeypatch.setattr(runner, "check_job", check_then_delete)
    response = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, dataset))
    assert response.status_code == 422, response.text
    assert "data.dataset: the uploaded dataset" in response.json()["detail"] and "deleted" in response.text
    assert client.get("/v1/jobs").json()["total"] == 0
    assert not list(client.app.state.settings.jobs_dir.iterdir())  # its directory is removed too


def test_of_two_deletes_of_one_upload_one_answers_204_the_other_404(client_and_dataset: tuple[Any, str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Both found the upload before either deleted it (the stale read widened to always)."""
    client, dataset = client_and_dataset
    record = client.app.state.store.get_dataset(dataset.removeprefix("upload:"))
    monkeypatch.setattr(Store, "get_dataset", lambda self, dataset_id: record)
    answers = [client.delete(f"/v1/datasets/{record.id}") for _ in range(2)]
    assert [a.status_code for a in answers] == [204, 404]
    assert answers[1].json()["detail"].startswith(f"no dataset {record.id!r}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a server without a GPU")
def test_a_cuda_job_is_refused_by_a_server_without_a_gpu(client_and_dataset: tuple[Any, str],
                                                         tiny_teacher_dir: Path) -> None:
    client, dataset = client_and_dataset
    response = client.post("/v1/jobs", json={**tiny_job(tiny_teacher_dir, dataset), "device": "cuda"})
    assert response.status_code == 422
    assert "device: 'cuda', but torch sees no GPU on this machine" in response.json()["detail"]


def test_a_full_disk_is_a_507_that_keeps_nothing(make_client: Any, tiny_teacher_dir: Path, synthetic_csv: Path,
                                               distill_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job submitted or a file uploaded on a full disk was a plain-text 500, and the job's directory (its
    config.json written before the record) stayed for good: start-up sweeps no unrecorded job directory."""
    client = make_client()
    reference = upload(client, synthetic_csv).json()["reference"]
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(client.app.state.store, "create_job", lambda *args, **kwargs: (_ for _ in ()).throw(full))
    submitted = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, reference))
    assert submitted.status_code == 507 and "the server's disk is full" in submitted.json()["detail"]
    assert list((distill_home / "jobs").iterdir()) == []
    monkeypatch.setattr(datasets_module, "_copy_capped", lambda *args: (_ for _ in ()).throw(full))
    uploaded = client.post("/v1/datasets", files={"file": ("more.csv", synthetic_csv.read_bytes(), "text/csv")})
    assert uploaded.status_code == 507 and "the server's disk is full" in uploaded.json()["detail"]
    assert [d.name for d in (distill_home / "uploads").iterdir()] == [reference.removeprefix("upload:")]


def test_uploads_are_checked_like_the_cli_and_capped(make_client: Any, tmp_path: Path) -> None:
    client = make_client(max_upload_bytes=4000)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood film,positive\n  ,negative\n")
    response = upload(client, bad)
    assert response.status_code == 422
    assert response.json()["detail"] == "bad.csv, line 3: empty text in column 'text'"
    columns = upload(client, write_csv(tmp_path / "small.csv", synthetic_rows(20, seed=2)), text_column="review")
    assert columns.status_code == 422
    assert columns.json()["detail"] == "small.csv, line 1: no column 'review'; the header has columns: 'text', 'label'"
    same = upload(client, write_csv(tmp_path / "small.csv", synthetic_rows(20, seed=2)), label_column="text")
    assert (same.status_code, same.json()["detail"]) == (422, "small.csv: the text and the label are both read from "
                                                               "column 'text'; label_column must name another column")
    lone = tmp_path / "lone.jsonl"  # a label JSON decodes to a lone surrogate: stored, it broke GET /v1/datasets
    lone.write_text('{"text": "a fine film", "label": "positive"}\n{"text": "a dull film", "label": "\\ud800"}\n')
    assert upload(client, lone).json()["detail"].startswith("lone.jsonl, line 2: 'label' holds an unpaired UTF-16")
    listed = client.get("/v1/datasets")
    assert listed.status_code == 200 and "lone.jsonl" not in [d["name"] for d in listed.json()["items"]]
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"text": f"film {i}", "label": "positive"}) + "\n" for i in range(9)))
    assert "distillation needs at least 2 classes" in upload(client, one_class).json()["detail"]
    repeated = write_csv(tmp_path / "repeated.csv", [("the same film", "positive"), ("the same film", "negative")] * 10)
    assert upload(client, repeated).json()["detail"].startswith("repeated.csv: every training row is also a "
                                                                "validation/test text")
    small = tmp_path / "small.csv"
    as_file = client.post("/v1/datasets", files={"file": ("small.csv", small.read_bytes(), "text/csv"),
                                                 "text_column": ("c.txt", b"text", "text/plain")})
    assert (as_file.status_code, as_file.json()["detail"]) == (422, "text_column: must be a text field naming a "
                                                                    "column, not a file")
    as_file = client.post("/v1/datasets", files={"file": ("small.csv", small.read_bytes(), "text/csv"),
                                                 "labelled": ("l.txt", b"true", "text/plain")})
    assert (as_file.status_code, as_file.json()["detail"]) == (422, "labelled: must be a text field (true or false), "
                                                                    "not a file")
    misspelt = upload(client, small, label_colum="sentiment")  # it was ignored: the default column, silently
    assert (misspelt.status_code, misspelt.json()["detail"]) == (422, "label_colum: unknown form part; allowed: file, "
                                                                      "text_column, label_column, labelled")
    crowded = client.post("/v1/datasets", files={"file": ("small.csv", small.read_bytes(), "text/csv")},
                          data={"a": "1", "b": "2", "c": "3", "d": "4"})
    assert crowded.status_code == 400 and crowded.json()["detail"].endswith(
        "; the form's parts are file, text_column, label_column, labelled"), crowded.text
    notes = tmp_path / "notes.md"
    notes.write_text("text,label\n")
    assert "name it .csv, .jsonl or .json" in upload(client, notes).json()["detail"]

    big = write_csv(tmp_path / "big.csv", synthetic_rows(200, seed=3))  # ~9 kB: read, then refused at 4,000 bytes
    assert big.stat().st_size < 4000 + 64 * 1024
    too_big = upload(client, big)
    assert too_big.status_code == 413 and "limited to 4,000 bytes" in too_big.json()["detail"]
    huge = write_csv(tmp_path / "huge.csv", synthetic_rows(3000, seed=4))  # over the limit plus form overhead
    refused = upload(client, huge)
    assert refused.status_code == 413 and "the request body is" in refused.json()["detail"]
    assert client.post("/v1/datasets", json={"file": "x"}).status_code == 415
    # A chunked body says no size: it would be stored whole before the limit could refuse it.
    chunked = client.post("/v1/datasets", content=iter([big.read_bytes()]),
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"]

    listed = client.get("/v1/datasets").json()["items"]
    assert [(d["id"], d["kind"], d["pulled"]) for d in listed] == [("reviews", "builtin", False)]
    assert not list((client.app.state.settings.datasets_dir).iterdir())  # nothing half-written is left
    assert client.delete("/v1/datasets/reviews").status_code == 409
    assert client.get("/v1/datasets/nope").status_code == 404


def test_an_upload_a_stopped_server_was_checking_is_removed_at_the_next_start(make_client: Any,
                                                                              synthetic_csv: Path) -> None:
    """What a stopped server left in uploads/: a folder it was still checking, and one it had published but not
    recorded."""
    client = make_client()
    kept = upload(client, synthetic_csv).json()["id"]
    datasets_dir = client.app.state.settings.datasets_dir
    (datasets_dir / "0123456789ab.tmp").mkdir()
    (datasets_dir / "0123456789ab.tmp" / "data.csv").write_text("text,label\n")
    (datasets_dir / "ba9876543210").mkdir()  # published, then the server stopped before recording it
    (datasets_dir / "ba9876543210" / "data.csv").write_text("text,label\n")
    make_client()  # the next start
    assert sorted(p.name for p in datasets_dir.iterdir()) == [kept]


def test_texts_alone_are_uploaded_for_causal_lm_jobs_only(make_client: Any, tiny_teacher_dir: Path,
                                                           tmp_path: Path) -> None:
    client = make_client()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{text}\n" for text, _ in synthetic_rows(60, seed=5)), encoding="utf-8")
    assert "send labelled=false with it" in upload(client, corpus).json()["detail"]
    assert "labelled: 'maybe'; allowed: true" in upload(client, corpus, labelled="maybe").json()["detail"]
    texts = upload(client, corpus, labelled="false")
    assert texts.status_code == 201, texts.text
    assert (texts.json()["rows"], texts.json()["labels"], texts.json()["label_counts"]) == (60, [], {})
    classifier = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, texts.json()["reference"]))
    assert classifier.status_code == 422 and "holds texts without labels" in classifier.json()["detail"]
    lm = client.post("/v1/jobs", json={
        "task": "causal-lm", "teacher": {"name": str(write_tiny_gpt2(tmp_path / "gpt2"))},
        "data": {"dataset": texts.json()["reference"], "max_length": 16}, "student": {"init": "teacher", "layers": [0]},
        "train": {"epochs": 1, "batch_size": 16}, "export": {"onnx": False}})
    assert lm.status_code == 202, lm.text
    job = wait_for(client, lm.json()["id"], lambda j: j["status"] in TERMINAL, timeout=120)
    assert job["status"] == "succeeded", job
    report = client.get(f"/v1/jobs/{lm.json()['id']}/report").json()
    assert job["metrics"]["test"]["student_test_perplexity"] == report["student"]["test_perplexity"]


def test_api_key_guards_every_route_but_healthz_and_the_page(make_client: Any) -> None:
    client = make_client(api_key="s3cret")
    missing = client.get("/v1/jobs")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["detail"]
    wrong = client.get("/v1/datasets", headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["detail"]
    for header in ("s3cret", "Basic czNjcmV0"):  # the key without its scheme, or another scheme: not "missing"
        malformed = client.get("/v1/jobs", headers={"Authorization": header})
        assert (malformed.status_code, malformed.json()["detail"]) == (
            401, "the Authorization header is not 'Bearer <key>'; send the key after the word Bearer")
    assert client.get("/readyz").status_code == 401 and client.get("/metrics").status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200  # the API's description is open, as the page is
    page = client.get("/")  # redirected to /ui: the page holds no data, its script sends the key the user types
    assert page.status_code == 200 and page.url.path == "/ui" and page.headers["content-type"].startswith("text/html")
    ok = {"Authorization": "Bearer s3cret"}
    assert client.get("/v1/jobs", headers=ok).status_code == 200
    assert client.get("/readyz", headers=ok).json() == {"ready": True, "store": True, "runner": True,
                                                         "jobs_dir": True}


def test_progress_events_are_stored_at_most_as_often_as_set(make_client: Any, tiny_teacher_dir: Path,
                                                            synthetic_csv: Path) -> None:
    """Each stage's first and last progress events are kept, the steps between only every progress_event_seconds:
    a job on a GPU takes tens of steps a second, each one an SQLite write and an event for every client."""
    client = make_client(progress_event_seconds=3600)
    dataset = client.post("/v1/datasets", files={"file": ("synthetic.csv", synthetic_csv.read_bytes())})
    job = client.post("/v1/jobs", json=tiny_job(tiny_teacher_dir, dataset.json()["reference"])).json()
    assert wait_for(client, job["id"], lambda j: j["status"] in TERMINAL)["status"] == "succeeded"
    progress = [e["data"] for e in all_events(client, job["id"]) if e["kind"] == "progress"]
    total = next(d["total_steps"] for d in progress if d["stage"] == "distill")
    assert [d["step"] for d in progress if d["stage"] == "distill"] == [1, total] and total > 2


def test_readyz_fails_when_new_jobs_could_not_be_written(make_client: Any) -> None:
    client = make_client()
    jobs_dir = client.app.state.settings.jobs_dir
    moved = jobs_dir.rename(jobs_dir.with_name("jobs-moved"))
    jobs_dir.write_text("not a directory")  # as root, a read-only mode would not stop the write: this does
    try:
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.json() == {"ready": False, "store": True, "runner": True, "jobs_dir": False}
    finally:
        jobs_dir.unlink()
        moved.rename(jobs_dir)
    assert client.get("/readyz").status_code == 200


def test_metrics_use_route_templates_and_count_jobs(make_client: Any) -> None:
    client = make_client()
    assert client.get("/v1/jobs/0123456789ab").status_code == 404
    docs = client.get("/docs")  # Swagger UI from the server's own files: an offline server's page is not blank
    assert docs.status_code == 200 and "cdn." not in docs.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f'"/static-offline-docs/{asset}"' in docs.text
        assert client.get(f"/static-offline-docs/{asset}").status_code == 200
    text = client.get("/metrics").text
    assert ('distill_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0'
            in text)
    assert 'route="/docs",status="200"' in text
    assert 'distill_jobs{status="queued"} 0.0' in text and "distill_job_queue_depth 0.0" in text
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert "teacher" in body["schema"]["properties"] and "output_dir" not in body["schema"]["properties"]
    assert body["examples"]["reviews"]["value"]["data"]["dataset"] == "reviews"


def test_the_pages_script_calls_routes_the_api_has(make_client: Any, tmp_path: Path) -> None:
    """Every /v1 path the page's script builds is a route of the app, and the script parses (node, where present)."""
    import re
    import shutil
    import subprocess

    client = make_client()
    page = client.get("/ui").text
    script = page.split("<script>")[1].split("</script>")[0]
    called = set(re.findall(r'"(/v1/[a-z]+)[?"]', script)) | set(re.findall(r"`(/v1/[a-z]+)/\$\{", script))
    assert called == {"/v1/jobs", "/v1/models", "/v1/compare"}
    routes = set(client.get("/openapi.json").json()["paths"])
    assert called <= routes and {"/v1/models/{model_id}/" + r for r in ("predict", "embed", "generate")} <= routes
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the script's syntax is not checked")
    (tmp_path / "ui.js").write_text(script)
    checked = subprocess.run(["node", "--check", str(tmp_path / "ui.js")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_a_log_that_grows_while_it_is_sent_is_sent_as_long_as_it_was(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    written = os.urandom(3 * 64 * 1024 + 5)  # several chunks and a short one
    log.write_bytes(written)
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.start":  # the job writes on while the download runs
            with log.open("ab") as more:
                more.write(b"x" * 100_000)

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()  # no disconnect: the body is sent whole

    anyio.run(log_as_written_now(log), {"type": "http", "method": "GET", "headers": []}, receive, send)
    declared = dict(messages[0]["headers"])[b"content-length"]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    assert int(declared) == len(written) and body == written


def test_the_artifact_list_of_a_running_job_skips_staging_and_what_vanishes_mid_walk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running job renames and deletes directories (atomic.replace_dir's `best.tmp` → `best`, `best` → `best.old`;
    the teacher-output pieces once joined): a directory listed by its parent and gone before it is read is skipped,
    not a 500, and staged or replaced copies and compress's work directories are not offered for download."""
    for name in ("best/model.safetensors", "best.tmp/model.safetensors", "best.old/model.safetensors",
                 "report.json.tmp", "teacher_logits.pt.parts/train-0-4096.pt",
                 "student-onnx/.quantize-x1/prepared.onnx"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    scandir = os.scandir

    def vanished_parts(path: Any) -> Any:
        if Path(path).name == "teacher_logits.pt.parts":
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", vanished_parts)
    assert _files(tmp_path) == ["best/model.safetensors"]
    assert _files(tmp_path / "missing") == []
