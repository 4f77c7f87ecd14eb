"""Benchmark: what the HTTP server adds to a prediction, and what micro-batching buys under concurrent load.

    python bench/serve.py --job-dir DIR             # a finished job's output directory (holds report.json)
    python bench/serve.py --home HOME [--job ID]    # a DISTILL_HOME; its newest finished job by default

Models: --variants, by default `student` (the job's served student: ONNX INT8 when the accuracy gate passed; the
issue's targets are about it) and `teacher` (the prepared teacher in PyTorch: a model whose call, not HTTP,
dominates a request). For each, in turn:

1. in process: the model loaded as the server loads it (service.models.open_model: same tokenizer, max_length and
   thread count), --requests sequential predict calls of one text → p50/p99; then texts/s in calls of --clients
   texts against calls of one: model_batch_ratio, the most that merging one-text requests could gain.
2. server A, the default micro-batching (DISTILL_BATCH_MAX_SIZE / _WAIT_MS as set, else the defaults), started
   with `python -m service` in a subprocess on a free loopback port: --requests sequential POST /predict of one text
   on one keep-alive connection → p50/p99 as the client sees them; overhead_p50_ms = server p50 − in-process p50.
   The same with httpx, for scale (its own CPU per request is most of what it adds). Then --clients concurrent
   clients (a connection each) send --per-client requests each → throughput (requests/s), latency p50/p99, errors.
3. server B, DISTILL_BATCH_MAX_SIZE=1, the same: batching_throughput_ratio = A / B under the concurrent load. B is
   the same MicroBatcher making calls of one text: one predictor call at a time, in one worker thread, with the
   model's threads, as in A; so B is the server without merging, not a server whose calls fight over the cores.
4. ONNX models: server A again with DISTILL_INFERENCE_SPINNING=false (ONNX Runtime's threads sleep between calls
   instead of busy-waiting, its default and the server's), for what that costs and saves.

The client runs on the same machine and takes CPU from the server, as a sidecar would. It is a minimal HTTP/1.1
client on asyncio streams (Connection), so that the CPU a request costs is the server's: httpx's AsyncClient spends
about 3 ms of CPU per request, more than the server, and the first version of this benchmark measured mostly that.
--job-dir is served from a temporary home whose jobs/ links to it. Prints a table and writes
bench/results/serve.json (the top-level overhead and ratio are the first variant's); asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvloop

from distill.evaluate import machine_facts
from distill.runtime import available_cpus
from service.models import REPORT, ModelCatalog, open_model
from service.settings import Settings

RESULTS = Path(__file__).parent / "results" / "serve.json"
TEXTS = [  # one per request, cycled; review-like, 10-25 tokens
    "a gripping, beautifully shot film with a story that stays with you",
    "dull and far too long, the plot goes nowhere",
    "the actors are fine but the script is lazy and predictable",
    "one of the most lovely and brilliant films of the year",
    "an awful mess: boring scenes, poor dialogue and a terrible ending",
    "it is a good movie, though the middle drags a little",
]


def percentiles(ms: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(ms, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "mean": float(np.mean(ms))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m service` in a subprocess with DISTILL_* settings; stopped on exit (SIGTERM, then kill)."""

    def __init__(self, home: Path, env: dict[str, str], log: Path) -> None:
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "DISTILL_HOME": str(home), "DISTILL_LOG_LEVEL": "WARNING", **env}
        full_env.pop("DISTILL_API_KEY", None)
        with log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port",
                                          str(self.port)], env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=Path(__file__).resolve().parent.parent)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server did not answer within 120 s:\n{self.log.read_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Connection:
    """One keep-alive HTTP/1.1 connection: writes a prepared request, reads the status line, the headers and
    Content-Length bytes of body (what uvicorn sends for a JSON answer). Microseconds of client CPU per request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, request: bytes) -> int:
        """The status code of the answer to `request`."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
        if length is None:
            raise ValueError(f"an answer without content-length: {head!r}")
        await self.reader.readexactly(int(length[1]))
        return int(head.split(b" ", 2)[1])

    def close(self) -> None:
        self.writer.close()


def predict_requests(model_id: str) -> list[bytes]:
    """The raw POST /predict of each text of TEXTS."""
    path = f"/v1/models/{model_id}/predict".encode()
    bodies = [json.dumps({"texts": [text]}).encode() for text in TEXTS]
    return [b"POST %b HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (path, len(body), body) for body in bodies]


async def sequential(port: int, requests: list[bytes], count: int, warmup: int) -> tuple[list[float], int]:
    """Client-side milliseconds of `count` requests (cycled) on one keep-alive connection, and the errors."""
    latencies, errors = [], 0
    connection = await Connection.open(port)
    for i in range(warmup + count):
        started = time.perf_counter()
        status = await connection.send(requests[i % len(requests)])
        elapsed = (time.perf_counter() - started) * 1000
        errors += status != 200
        if i >= warmup:
            latencies.append(elapsed)
    connection.close()
    return latencies, errors


def sequential_httpx(url: str, model_id: str, count: int, warmup: int) -> list[float]:
    """The same as `sequential` with httpx.Client, as a Python caller of the API would send them."""
    latencies = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(warmup + count):
            started = time.perf_counter()
            client.post(f"/v1/models/{model_id}/predict", json={"texts": [TEXTS[i % len(TEXTS)]]}).raise_for_status()
            if i >= warmup:
                latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def concurrent(port: int, requests: list[bytes], clients: int, per_client: int,
                     server_cpu: Callable[[], float]) -> dict[str, Any]:
    """`clients` clients, a connection each, each sending `per_client` requests back to back, all at once (after
    one untimed round): throughput over the wall time, latency percentiles, errors, and the CPU seconds of this
    process and of the server (`server_cpu()`: its total so far) over the timed requests alone."""
    latencies: list[float] = []
    errors = 0

    async def one(connection: Connection, i: int) -> float:
        nonlocal errors
        started = time.perf_counter()
        try:
            errors += await connection.send(requests[i % len(requests)]) != 200
        except (OSError, ValueError, asyncio.IncompleteReadError):
            errors += 1
        return (time.perf_counter() - started) * 1000

    async def client_loop(c: int) -> None:
        for r in range(per_client):
            latencies.append(await one(connections[c], c + r))

    warm = await asyncio.gather(*(Connection.open(port) for _ in range(clients)))
    await asyncio.gather(*(one(connection, c) for c, connection in enumerate(warm)))
    errors = 0  # the untimed round's do not count
    # New connections: the first ones answered in the untimed round may have idled past uvicorn's keep-alive
    # timeout (5 s) while the slowest waited, and the server closes those.
    connections = await asyncio.gather(*(Connection.open(port) for _ in range(clients)))
    for connection in warm:
        connection.close()
    started, cpu, server = time.perf_counter(), time.process_time(), server_cpu()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    seconds, cpu, server = time.perf_counter() - started, time.process_time() - cpu, server_cpu() - server
    for connection in connections:
        connection.close()
    return {"requests": clients * per_client, "seconds": seconds,
            "requests_per_second": clients * per_client / seconds, "latency_ms": percentiles(latencies),
            "errors": errors, "client_cpu_seconds": cpu, "server_cpu_seconds": server}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def texts_per_second(predictor: Any, batch: int, min_seconds: float = 2.0) -> float:
    """Texts/s of predict calls of `batch` texts (TEXTS cycled), over at least min_seconds and 3 calls."""
    texts = [TEXTS[i % len(TEXTS)] for i in range(batch)]
    predictor.predict(texts)  # warm-up: first call of this shape
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < min_seconds:
        predictor.predict(texts)
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def pick_job(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """(home, job id): --home (+ --job, else the newest finished job), or --job-dir linked into a temp home."""
    if args.job_dir is not None:
        job_dir = args.job_dir.resolve()
        if not (job_dir / REPORT).is_file():
            sys.exit(f"{job_dir} holds no {REPORT}: not a finished job")
        (tmp / "jobs").mkdir(parents=True)
        (tmp / "jobs" / job_dir.name).symlink_to(job_dir, target_is_directory=True)
        return tmp, job_dir.name
    home = args.home.resolve()
    if args.job is not None:
        return home, args.job
    finished = sorted((home / "jobs").glob(f"*/{REPORT}"), key=lambda p: p.stat().st_mtime)
    if not finished:
        sys.exit(f"no finished job under {home / 'jobs'}; give --job-dir or run a job first")
    return home, finished[-1].parent.name


def bench_model(home: Path, model_id: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Steps 1-3 of the module docstring for one model."""
    info = ModelCatalog(Settings(home=home)).get(model_id)
    print(f"== {model_id}: {info.format}, {info.path}", flush=True)
    predictor = open_model(info, args.threads)
    for i in range(args.warmup):
        predictor.predict([TEXTS[i % len(TEXTS)]])
    in_process = [predictor.predict([TEXTS[i % len(TEXTS)]]).seconds * 1000 for i in range(args.requests)]
    batched = {1: texts_per_second(predictor, 1), args.clients: texts_per_second(predictor, args.clients)}
    del predictor  # the servers load their own copy; one model in memory at a time

    requests = predict_requests(model_id)
    runs: dict[str, dict[str, Any]] = {}
    servers = [("batching", {}), ("no_batching", {"DISTILL_BATCH_MAX_SIZE": "1"})]
    if info.format != "torch":
        servers.append(("batching_no_spinning", {"DISTILL_INFERENCE_SPINNING": "false"}))
    for name, extra in servers:
        env = {"DISTILL_INFERENCE_THREADS": str(args.threads), **extra}
        with Server(home, env, tmp / f"server-{model_id}-{name}.log") as server:
            print(f"== server {name} on {server.url}", flush=True)
            latencies, errors = uvloop.run(sequential(server.port, requests, args.requests, args.warmup))
            run: dict[str, Any] = {"settings": extra or "defaults", "sequential_latency_ms": percentiles(latencies),
                                   "sequential_errors": errors}
            if name == "batching":
                run["sequential_httpx_latency_ms"] = percentiles(
                    sequential_httpx(server.url, model_id, args.requests, args.warmup))
            run["concurrent"] = uvloop.run(concurrent(server.port, requests, args.clients, args.per_client,
                                                      functools.partial(cpu_seconds, server.proc.pid)))
            runs[name] = run

    local = percentiles(in_process)
    served = runs["batching"]["sequential_latency_ms"]
    return {
        "model": model_id, "format": info.format, "path": str(info.path),
        "in_process_latency_ms": local,
        "in_process_texts_per_second": {f"batch_{size}": rate for size, rate in batched.items()},
        "model_batch_ratio": batched[args.clients] / batched[1],
        "server_latency_ms": served,
        "overhead_p50_ms": served["p50"] - local["p50"],
        "overhead_p99_ms": served["p99"] - local["p99"],
        "runs": runs,
        "batching_throughput_ratio": (runs["batching"]["concurrent"]["requests_per_second"]
                                      / runs["no_batching"]["concurrent"]["requests_per_second"]),
        "errors": sum(r["sequential_errors"] + r["concurrent"]["errors"] for r in runs.values()),
    }


def print_table(models: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{args.threads} threads per model; one text per request\n")
    print("| model | measurement | p50 ms | p99 ms | requests/s | CPU ms/request (client + server) | errors |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for model in models.values():
        name, local = f"{model['model']} ({model['format']})", model["in_process_latency_ms"]
        rates = model["in_process_texts_per_second"]
        print(f"| {name} | in process, sequential | {local['p50']:.2f} | {local['p99']:.2f} | "
              f"{rates['batch_1']:.1f} (b1), {rates[f'batch_{args.clients}']:.1f} (b{args.clients}) texts/s | | |")
        for run_name, run in model["runs"].items():
            seq, load = run["sequential_latency_ms"], run["concurrent"]
            print(f"| {name} | server {run_name}, sequential | {seq['p50']:.2f} | {seq['p99']:.2f} | | | "
                  f"{run['sequential_errors']} |")
            if "sequential_httpx_latency_ms" in run:
                httpx_seq = run["sequential_httpx_latency_ms"]
                print(f"| {name} | server {run_name}, sequential, httpx client | {httpx_seq['p50']:.2f} | "
                      f"{httpx_seq['p99']:.2f} | | | |")
            cpu = [1000 * load[k] / load["requests"] for k in ("client_cpu_seconds", "server_cpu_seconds")]
            print(f"| {name} | server {run_name}, {args.clients} clients | {load['latency_ms']['p50']:.2f} | "
                  f"{load['latency_ms']['p99']:.2f} | {load['requests_per_second']:.1f} | "
                  f"{cpu[0]:.2f} + {cpu[1]:.2f} | {load['errors']} |")
    print()
    for model in models.values():
        print(f"{model['model']}: overhead p50 {model['overhead_p50_ms']:.2f} ms (target ≤ 1.5), micro-batching "
              f"throughput x{model['batching_throughput_ratio']:.2f} (target ≥ 4; the model alone, b{args.clients} "
              f"vs b1: x{model['model_batch_ratio']:.2f}), errors {model['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--job-dir", type=Path, help="a finished job's output directory")
    where.add_argument("--home", type=Path, help="a DISTILL_HOME holding jobs/<id>/report.json")
    parser.add_argument("--job", help="with --home: the job id (default: the newest finished job)")
    parser.add_argument("--variants", default="student,teacher",
                        help="comma-separated, of teacher, student, student-fp32, student-torch; the first one's "
                             "numbers are also the top-level ones")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests (and in-process calls)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=25, help="requests per concurrent client")
    parser.add_argument("--threads", type=int, default=available_cpus(), help="intra-op threads of the model")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        home, job_id = pick_job(args, tmp / "home")
        models = {variant: bench_model(home, f"{job_id}.{variant}", args, tmp)
                  for variant in args.variants.split(",")}

    first = next(iter(models.values()))
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "threads": args.threads,
        "requests": {"sequential": args.requests, "warmup": args.warmup, "clients": args.clients,
                     "per_client": args.per_client},
        **{key: first[key] for key in ("model", "overhead_p50_ms", "overhead_p99_ms", "batching_throughput_ratio")},
        "errors": sum(model["errors"] for model in models.values()),
        "models": models,
        "machine": machine_facts(),
    }
    print_table(models, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
