"""Benchmark: what the HTTP server adds to a prediction, and what micro-batching buys under concurrent load.

    python bench/serve.py --job-dir DIR             # a finished job's output directory (holds report.json)
    python bench/serve.py --home HOME [--job ID]    # a DISTILL_HOME; its newest finished job by default

The model is the job's served student (`<job>.student`: ONNX INT8 when the accuracy gate passed). Steps:

1. in process: the same file loaded as the server loads it (service.models.open_model: same tokenizer, max_length
   and thread count), --requests sequential predict calls of one text → p50/p99.
2. server A, the default micro-batching (DISTILL_BATCH_MAX_SIZE / _WAIT_MS as set, else the defaults), started
   with `python -m service` in a subprocess on a free loopback port: --requests sequential POST /predict of one text
   on one keep-alive connection → p50/p99 as the client sees them; overhead_p50_ms = server p50 − in-process p50.
   Then --clients concurrent clients (httpx.AsyncClient, a connection each) send --per-client requests each →
   throughput (requests/s), latency p50/p99, errors.
3. server B, DISTILL_BATCH_MAX_SIZE=1 (no merging), the same concurrent load; batching_throughput_ratio = A / B.

The client runs on the same machine and takes CPU from the server, as a sidecar would. --job-dir is served from a
temporary home whose jobs/ links to it. Prints a table and writes bench/results/serve.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

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


def sequential(url: str, model_id: str, requests: int, warmup: int) -> tuple[list[float], int]:
    """Client-side milliseconds of `requests` one-text POSTs on one keep-alive connection, and the errors."""
    latencies, errors = [], 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(warmup + requests):
            started = time.perf_counter()
            response = client.post(f"/v1/models/{model_id}/predict", json={"texts": [TEXTS[i % len(TEXTS)]]})
            elapsed = (time.perf_counter() - started) * 1000
            errors += response.status_code != 200
            if i >= warmup:
                latencies.append(elapsed)
    return latencies, errors


async def concurrent(url: str, model_id: str, clients: int, per_client: int) -> dict[str, Any]:
    """`clients` clients, each sending `per_client` one-text requests back to back, all at once (after one
    untimed round): throughput over the wall time, latency percentiles, errors."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one(i: int, timed: bool) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                response = await client.post(f"/v1/models/{model_id}/predict", json={"texts": [TEXTS[i % len(TEXTS)]]})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if timed:
                latencies.append((time.perf_counter() - started) * 1000)
                errors += not ok

        async def client_loop(c: int) -> None:
            for r in range(per_client):
                await one(c + r, timed=True)

        await asyncio.gather(*(one(c, timed=False) for c in range(clients)))  # opens the connections
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(clients)))
        seconds = time.perf_counter() - started
    return {"requests": clients * per_client, "seconds": seconds,
            "requests_per_second": clients * per_client / seconds, "latency_ms": percentiles(latencies),
            "errors": errors}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--job-dir", type=Path, help="a finished job's output directory")
    where.add_argument("--home", type=Path, help="a DISTILL_HOME holding jobs/<id>/report.json")
    parser.add_argument("--job", help="with --home: the job id (default: the newest finished job)")
    parser.add_argument("--variant", default="student", help="teacher, student, student-fp32 or student-torch")
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
        model_id = f"{job_id}.{args.variant}"
        info = ModelCatalog(Settings(home=home)).get(model_id)
        print(f"== {model_id}: {info.format}, {info.path}", flush=True)

        predictor = open_model(info, args.threads)
        for i in range(args.warmup):
            predictor.predict([TEXTS[i % len(TEXTS)]])
        in_process = [predictor.predict([TEXTS[i % len(TEXTS)]]).seconds * 1000 for i in range(args.requests)]
        del predictor

        env = {"DISTILL_INFERENCE_THREADS": str(args.threads)}
        runs: dict[str, dict[str, Any]] = {}
        for name, extra in (("batching", {}), ("no_batching", {"DISTILL_BATCH_MAX_SIZE": "1"})):
            with Server(home, {**env, **extra}, tmp / f"server-{name}.log") as server:
                print(f"== server {name} on {server.url}", flush=True)
                latencies, errors = sequential(server.url, model_id, args.requests, args.warmup)
                load = asyncio.run(concurrent(server.url, model_id, args.clients, args.per_client))
                runs[name] = {"settings": extra or "defaults", "sequential_latency_ms": percentiles(latencies),
                              "sequential_errors": errors, "concurrent": load}

    local = percentiles(in_process)
    served = runs["batching"]["sequential_latency_ms"]
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "model": model_id, "format": info.format, "path": str(info.path), "threads": args.threads,
        "requests": {"sequential": args.requests, "warmup": args.warmup, "clients": args.clients,
                     "per_client": args.per_client},
        "in_process_latency_ms": local,
        "server_latency_ms": served,
        "overhead_p50_ms": served["p50"] - local["p50"],
        "overhead_p99_ms": served["p99"] - local["p99"],
        "runs": runs,
        "batching_throughput_ratio": (runs["batching"]["concurrent"]["requests_per_second"]
                                      / runs["no_batching"]["concurrent"]["requests_per_second"]),
        "errors": sum(r["sequential_errors"] + r["concurrent"]["errors"] for r in runs.values()),
        "machine": machine_facts(),
    }

    print(f"\n{model_id} ({info.format}), {args.threads} threads; one text per request\n")
    print("| measurement | p50 ms | p99 ms | requests/s | errors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| in process, sequential | {local['p50']:.2f} | {local['p99']:.2f} | | |")
    for name, run in runs.items():
        seq, load = run["sequential_latency_ms"], run["concurrent"]
        print(f"| server {name}, sequential | {seq['p50']:.2f} | {seq['p99']:.2f} | | {run['sequential_errors']} |")
        print(f"| server {name}, {args.clients} clients | {load['latency_ms']['p50']:.2f} | "
              f"{load['latency_ms']['p99']:.2f} | {load['requests_per_second']:.1f} | {load['errors']} |")
    print(f"\noverhead p50 {result['overhead_p50_ms']:.2f} ms (target ≤ 1.5), micro-batching throughput "
          f"x{result['batching_throughput_ratio']:.2f}, errors {result['errors']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
