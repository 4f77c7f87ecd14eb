"""Benchmark of the non-classification tasks: each part trains/distills on the reviews texts and returns its quality
numbers, params and latency ratio (ORT INT8 student vs PyTorch teacher); printed, and merged into
bench/results/tasks.json (a part run alone with --only keeps the other parts' numbers there).

    DISTILL_HOME=... python bench/tasks.py                  # every part
    DISTILL_HOME=... python bench/tasks.py --only causal-lm
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # the parts live next to this script

import tasks_causal_lm  # noqa: E402
import tasks_embedding  # noqa: E402

from distill.evaluate import machine_facts  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "tasks.json"
# name → (add its command-line options, run it in a work directory and return its numbers)
PARTS = {"causal-lm": (tasks_causal_lm.add_arguments, tasks_causal_lm.run_causal_lm_bench),
         "sentence-embedding": (tasks_embedding.add_arguments, tasks_embedding.run_embedding_bench)}
PREFIXES = {"causal-lm": "lm_", "sentence-embedding": "embedding_"}  # every key a part returns starts with its own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PARTS), nargs="+", default=sorted(PARTS))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 autocast pays off only on CPUs with AVX512-BF16/AMX")
    parser.add_argument("--out", type=Path, default=RESULTS)
    for add_arguments, _ in PARTS.values():
        add_arguments(parser)
    args = parser.parse_args()

    numbers: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.only:
            numbers[name] = PARTS[name][1](args, Path(work) / name)
            print(f"\n{name}:")
            for key, value in numbers[name].items():
                print(f"  {key}: {value}")
    # Read only now: a part run alone meanwhile (they take many minutes) keeps its numbers.
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    omp = os.environ.get("OMP_NUM_THREADS")
    for name, part in numbers.items():
        prefix = PREFIXES[name]
        results = {k: v for k, v in results.items() if not k.startswith(prefix)}  # no stale keys of a past run
        results.update(part)
        results[f"command_{name}"] = (f"OMP_NUM_THREADS={omp} " if omp else "") + "python bench/tasks.py " + \
            shlex.join(sys.argv[1:])
        # Each part's own: the parts may run on different machines (the CPU and its INT8/bf16 flags set the numbers).
        results[f"machine_{name}"] = machine_facts()
        results.pop(f"torch_threads_{name}", None)  # earlier runs' keys: machine_facts holds the thread count
    results.pop("machine", None)  # the shared key of earlier runs, which said only the last part's versions
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
