"""The real server: `python -m service` under uvicorn on a free loopback port, killed mid-job and started again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_service_jobs import all_events, sse_events, tiny_job, upload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m service` process; its stderr (the JSON log) goes to a file."""

    def __init__(self, home: Path, port: int, log: Path) -> None:
        env = {**os.environ, "DISTILL_HOME": str(home), "DISTILL_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DISTILL_MODEL_DIRS": json.dumps([str(home.parent)])}  # where the tests' tiny teachers are
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "service"], env=env, stderr=stderr)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"the server exited: {log.read_text()}"
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server did not answer in 30 s: {log.read_text()}"
            time.sleep(0.1)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()  # graceful: uvicorn runs the lifespan's shutdown
            self.process.wait(timeout=30)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


@pytest.fixture
def servers(distill_home: Path, tmp_path: Path) -> Iterator[Any]:
    port, started = free_port(), []

    def start() -> Server:
        started.append(Server(distill_home, port, tmp_path / f"server{len(started)}.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.mark.slow  # starts several processes: tens of seconds
def test_a_job_survives_a_killed_server_resumes_from_its_checkpoint_and_streams_events(
        servers: Any, tiny_teacher_dir: Path, synthetic_csv: Path) -> None:
    first = servers()
    reference = upload(first.http, synthetic_csv).json()["reference"]
    config = tiny_job(tiny_teacher_dir, reference, epochs=30, checkpoint_every=5) | {
        "export": {"onnx": True, "teacher": False}, "evaluate": {"latency_calls": 10}}
    job_id = first.http.post("/v1/jobs", json=config).json()["id"]
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while not any(e["kind"] == "checkpoint" and e["data"]["stage"] == "distill" for e in seen):
        assert time.monotonic() < deadline, seen
        page = first.http.get(f"/v1/jobs/{job_id}/events", params={"after": len(seen)}).json()
        seen += page["events"]
        time.sleep(0.05)
    first.kill()  # SIGKILL: no shutdown code runs; the store still says `running`

    second = servers()
    # Live server-sent events from where the first server's history stopped; the stream ends with the job.
    with second.http.stream("GET", f"/v1/jobs/{job_id}/events", params={"after": len(seen)},
                            headers={"Accept": "text/event-stream"}, timeout=120) as stream:
        streamed = sse_events("".join(stream.iter_text()))
    job = second.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["runs"] == 2 and job["error"] is None, job

    events = all_events(second.http, job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert streamed == events[len(seen):]
    assert [e["data"]["status"] for e in events if e["kind"] == "status"] == [
        "queued", "running", "queued", "running", "succeeded"]
    resumed = next(e["data"] for e in events if e["kind"] == "resumed")
    assert resumed["stage"] == "distill" and resumed["step"] >= 5 and resumed["step"] % 5 == 0
    steps = [e["data"]["step"] for e in events if e["kind"] == "progress" and e["data"]["stage"] == "distill"]
    assert steps[-1] == resumed["total_steps"] == 30 * 20  # 320 training rows / batch 16 = 20 steps per epoch

    int8 = second.http.get(f"/v1/jobs/{job_id}/artifacts/student-onnx/model_int8.onnx")
    report = second.http.get(f"/v1/jobs/{job_id}/report").json()
    assert int8.status_code == 200 and len(int8.content) == report["compress"]["int8_bytes"]
    metrics = second.http.get("/metrics").text
    assert 'route="/v1/jobs/{job_id}/artifacts/{name:path}",status="200"' in metrics
    assert 'distill_jobs{status="succeeded"} 1.0' in metrics

    # A PyTorch model loaded by the server: transformers' load report and progress bar are JSON lines too.
    assert second.http.post(f"/v1/models/{job_id}.teacher/predict", json={"texts": ["fine"]}).status_code == 200
    requests = [line for line in first.log_lines() if line["message"] == "request"]
    assert {"time", "level", "method", "path", "route", "status", "duration_ms"} <= set(requests[0])
    assert any(r["method"] == "POST" and r["path"] == "/v1/jobs" and r["status"] == 202 for r in requests)
    assert any(line.get("job_id") == job_id and line["message"] == "job requeued to resume"
               for line in second.log_lines())
