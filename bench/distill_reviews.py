"""Benchmark: distill `reviews` teachers into MiniLM students; print a table, write JSON.

    python bench/distill_reviews.py                      # mpnet-base and minilm-l6 teachers (about 2 h on 2 cores)
    python bench/distill_reviews.py --teachers minilm-l6 # the quick one

For each teacher: the whole pipeline with the teacher-logit cache and a 3-layer MiniLM student (teacher accuracy,
student accuracy, retention, params, wall time of every stage). For the first teacher, the distill stage again with
the teacher run at every step instead, same data, same student, same epochs count; its examples/s is measured over
--uncached-epochs epochs (the rate is the same every epoch, since nothing is cached) and compared with the cached
run's examples/s over all epochs, the cache build included (the train set's teacher outputs; both runs compute the
validation/test outputs). Then, for the first teacher, the compact student: all
6 MiniLM layers with the vocabulary trimmed to the training texts' tokens (student.trim_vocabulary), the largest
MiniLM within 20% of mpnet-base's parameters, trained on the same cached teacher outputs for --compact-epochs.
Students train without dropout (train.dropout 0). Writes
bench/results/distill_reviews.json (its headline numbers are the compact student's); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers

from distill.config import DataConfig, ExportConfig, FromModel, JobConfig, LossConfig, TeacherConfig, TrainConfig
from distill.data import pull_dataset
from distill.pipeline import TEACHER_LOGITS, run
from teachers.registry import distill_home, pull_teacher

RESULTS = Path(__file__).parent / "results" / "distill_reviews.json"


def job(teacher: str, out: Path, epochs: int, cache: bool, args: argparse.Namespace, *, compact: bool = False,
        onnx: bool = True) -> JobConfig:
    return JobConfig(
        seed=0, precision=args.precision,
        teacher=TeacherConfig(name=teacher, head_epochs=4, finetune_epochs=1, finetune_lr=3e-5),
        data=DataConfig(dataset="reviews", max_length=64, limit=args.limit,
                        transfer="builtin" if args.transfer else None, augment=args.augment),
        student=FromModel(init="model", model="minilm-l6", num_layers=6 if compact else 3, trim_vocabulary=compact),
        loss=LossConfig(temperature=2.0, alpha=0.5),
        # dropout 0: 1.36x faster distill stage at the same test accuracy (3 layers: 0.8400 vs 0.8428 with BERT's 0.1)
        train=TrainConfig(epochs=epochs, batch_size=32, lr=1e-4, cache_teacher_logits=cache, dropout=0.0),
        export=ExportConfig(onnx=cache and onnx),  # the uncached run is only timed
        output_dir=out)


def log(kind: str, data: dict) -> None:
    if kind == "progress" and data["step"] % 50:
        return
    print(f"  [{time.strftime('%H:%M:%S')}] {kind} {data}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=["mpnet-base", "minilm-l6"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--uncached-epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="training examples (default: all 8456)")
    parser.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True,
                        help="the built-in transfer texts (13,098 unlabelled snippets the teacher labels)")
    parser.add_argument("--augment", type=int, default=3,
                        help="perturbed copies of each training text for the teacher to label (data.augment)")
    parser.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                        help="also the compact student (6 layers, trimmed vocabulary) for the first teacher")
    parser.add_argument("--compact-epochs", type=int, default=5,
                        help="the compact student's epochs (its validation accuracy still rose at epoch 3 of 3)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                        help="bf16 autocast: faster on CPUs with AVX512-BF16; what the README quotes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    pull_dataset("reviews", progress=print)
    work = distill_home() / "bench" / "distill_reviews"

    rows = []
    for teacher in args.teachers:
        if teacher == "mpnet-base":
            pull_teacher(teacher, progress=print)
        print(f"== {teacher}: pipeline with the logit cache", flush=True)
        first = teacher == args.teachers[0]
        # The compact student's run exports to ONNX and measures deployment; this one only when it is the last.
        report = run(job(teacher, work / teacher, args.epochs, True, args, onnx=not (first and args.compact)),
                     log).report
        t = report["timings_seconds"]
        row = {"teacher": teacher, "student": "minilm-l6, 3 layers", "teacher_params": report["teacher"]["params"],
               "student_params": report["student"]["params"], "param_ratio": report["param_ratio"],
               "teacher_accuracy": report["teacher"]["test_accuracy"],
               "student_accuracy": report["student"]["test_accuracy"],
               "student_agreement": report["student"]["test_agreement"], "retention": report["retention"],
               "teacher_prepared_from_cache": report["teacher"]["prepared_from_cache"],
               "teacher_preparation": report["teacher"]["preparation"], "stage_seconds": t}
        if first:
            train_examples = report["data"]["splits"]["train"]["rows"] + report["data"]["transfer"]
            print(f"== {teacher}: distill stage with the teacher at every step", flush=True)
            uncached = run(job(teacher, work / f"{teacher}-uncached", args.uncached_epochs, False, args), log).report
            u = uncached["timings_seconds"]
            # Both runs compute the teacher's validation/test outputs (for agreement) in their teacher-logits stage;
            # the cache's own cost is the rest of that stage: the train set's outputs.
            cache_build = t["teacher-logits"] - u["teacher-logits"]
            row["cache_build_seconds"] = cache_build
            row["cached_examples_per_second"] = train_examples * args.epochs / (cache_build + t["distill"])
            row["uncached_examples_per_second"] = train_examples * args.uncached_epochs / u["distill"]
            row["cache_speedup"] = row["cached_examples_per_second"] / row["uncached_examples_per_second"]
            # The same without the one-off cache build: what each further epoch gains.
            row["cache_speedup_per_epoch"] = (train_examples * args.epochs / t["distill"]
                                              / row["uncached_examples_per_second"])
            row["uncached_stage_seconds"] = u
        rows.append(row)
        if first and args.compact:
            rows.append(compact_student(teacher, work, args))

    print()
    print(f"{'teacher':<11} {'student':<29} {'params':>11} {'student':>11} {'ratio':>6} {'teacher acc':>11} "
          f"{'student acc':>11} {'retention':>9} {'agree':>6}")
    for r in rows:
        print(f"{r['teacher']:<11} {r['student']:<29} {r['teacher_params']:>11,} {r['student_params']:>11,} "
              f"{r['param_ratio']:>6.3f} {r['teacher_accuracy']:>11.4f} {r['student_accuracy']:>11.4f} "
              f"{r['retention']:>9.4f} {r['student_agreement']:>6.3f}")
    for r in rows:
        print(f"{r['teacher']} stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items()))
        if "cache_speedup" in r:
            print(f"{r['teacher']} training examples/s: cached {r['cached_examples_per_second']:.1f} "
                  f"(cache build included), teacher every step {r['uncached_examples_per_second']:.1f} "
                  f"-> {r['cache_speedup']:.2f}x ({r['cache_speedup_per_epoch']:.2f}x without the cache build)")

    headline = rows[1] if args.compact else rows[0]
    result = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]),
              "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
              "precision": args.precision,
              "teacher": headline["teacher"], "student": headline["student"],
              "teacher_accuracy": headline["teacher_accuracy"], "student_accuracy": headline["student_accuracy"],
              "retention": headline["retention"], "param_ratio": headline["param_ratio"],
              "cache_speedup": rows[0].get("cache_speedup"), "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def compact_student(teacher: str, work: Path, args: argparse.Namespace) -> dict:
    """The 6-layer trimmed-vocabulary student on the 3-layer run's teacher outputs: they depend only on the prepared
    teacher, the precision and the teacher's token ids, so `resume` finds them valid and skips the build."""
    print(f"== {teacher}: compact student (6 MiniLM layers, trimmed vocabulary), cached teacher outputs", flush=True)
    out = work / f"{teacher}-compact"
    shutil.rmtree(out, ignore_errors=True)  # no stale checkpoint for `resume` to pick up
    out.mkdir(parents=True)
    shutil.copy(work / teacher / TEACHER_LOGITS, out / TEACHER_LOGITS)
    report = run(job(teacher, out, args.compact_epochs, True, args, compact=True), log, resume=True).report
    return {"teacher": teacher, "student": "minilm-l6, 6 layers, trimmed",
            "teacher_params": report["teacher"]["params"],
            "student_params": report["student"]["params"], "param_ratio": report["param_ratio"],
            "teacher_accuracy": report["teacher"]["test_accuracy"],
            "student_accuracy": report["student"]["test_accuracy"],
            "student_agreement": report["student"]["test_agreement"], "retention": report["retention"],
            "epochs": args.compact_epochs, "student_history": report["student"]["history"],
            "stage_seconds": report["timings_seconds"]}


if __name__ == "__main__":
    main()
