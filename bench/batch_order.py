"""Benchmark: the distill stage with shuffled batches against length-grouped ones (train.group_by_length), side by
side in one run; print a table, write JSON.

    python bench/batch_order.py --teacher minilm-l6 --seeds 0 1 --precision fp32

For each seed, the same job twice — the 3-layer MiniLM student of bench/distill_reviews.py on the reviews snippets
and the built-in transfer texts, the teacher's outputs computed once and reused — once with shuffled batches and
once grouped by length: training examples/s of the distill stage, the best validation accuracy, test accuracy,
agreement and retention. A batch pads to its longest text, so random batches of these snippets carry about twice
their real tokens. Writes bench/results/batch_order.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))

from distill_reviews import job, run_job, student_row  # noqa: E402

from distill.data import pull_dataset  # noqa: E402
from distill.pipeline import TEACHER_LOGITS  # noqa: E402
from teachers.registry import distill_home, pull_teacher  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "batch_order.json"
ORDERS = {"shuffled": False, "grouped by length": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="minilm-l6")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--teacher-finetune-epochs", type=int, default=1,
                        help="epochs of the teacher's unfrozen fine-tuning (0: head only)")
    parser.add_argument("--limit", type=int, default=None, help="training examples (default: all 8456)")
    parser.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--augment", type=int, default=0, help="perturbed copies of each training text")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--resume", action="store_true",
                        help="read back finished jobs and continue an interrupted one from its checkpoint")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.group_by_length = False  # distill_reviews.job reads it; each row below sets its own order
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    pull_dataset("reviews", progress=print)
    if args.teacher == "mpnet-base":
        pull_teacher(args.teacher, progress=print)
    work = distill_home() / "bench" / "batch_order"

    rows, cached = [], None
    for seed in args.seeds:
        for order, grouped in ORDERS.items():
            print(f"== seed {seed}, {order}", flush=True)
            config = job(args.teacher, work / f"seed{seed}-{'grouped' if grouped else 'shuffled'}", args.epochs,
                         True, args, seed=seed, onnx=False)
            config = config.model_copy(update={"train": config.train.model_copy(
                update={"group_by_length": grouped})})
            report = run_job(config, args, cached)
            cached = cached or config.output_dir / TEACHER_LOGITS
            student = report["student"]
            rows.append({**student_row(args.teacher, "minilm-l6, 3 layers", report), "order": order, "seed": seed,
                         "distill_seconds": report["timings_seconds"]["distill"],
                         "train_examples_per_second": student["train_examples_per_second"],
                         "best_validation_accuracy": max(e["accuracy"] for e in student["history"])})

    print("\n| seed | batches | distill s | train examples/s | best val acc | test acc | agreement | retention |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['seed']} | {r['order']} | {r['distill_seconds']:.0f} | {r['train_examples_per_second']:.1f} | "
              f"{r['best_validation_accuracy']:.4f} | {r['student_accuracy']:.4f} | {r['student_agreement']:.3f} | "
              f"{r['retention']:.3f} |")
    summary = {}
    for order in ORDERS:
        mine = [r for r in rows if r["order"] == order]
        summary[order] = {key: statistics.mean(r[key] for r in mine) for key in (
            "train_examples_per_second", "best_validation_accuracy", "student_accuracy", "retention")}
    speedups = [g["train_examples_per_second"] / s["train_examples_per_second"]
                for s, g in zip(rows[0::2], rows[1::2], strict=True)]
    print(f"\ngrouped / shuffled training examples/s, per seed: {', '.join(f'{x:.2f}x' for x in speedups)}")
    for order, means in summary.items():
        print(f"{order}: mean test accuracy {means['student_accuracy']:.4f}, "
              f"validation {means['best_validation_accuracy']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": shlex.join(["python", *sys.argv]), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "speedup_by_seed": speedups, "summary": summary, "rows": rows},
        indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
