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
With --two-stage, for the first teacher, the two-stage compact student once per --seeds seed (the README's best
method, examples/reviews-embedding-compact.yaml then examples/reviews-mpnet-compact-gd.yaml): stage 1 teaches the
compact student the teacher's sentence embeddings (no labels, --stage1-epochs), stage 2 distills the task into it
as the compact student is (--two-stage-augment perturbed copies, --epochs; --stage1-layer-losses: stage 1 also
matches the teacher layer by layer, in jobs of their own); each stage's teacher outputs are
computed once and reused by every seed (they depend on the texts, not on the seed). Students train without dropout
(train.dropout 0). --no-three-layer skips the 3-layer student and the cache timing (for the two-stage seeds alone).
--resume keeps the jobs under $DISTILL_HOME/bench/distill_reviews: a finished one (its report.json, made from the
same config) is read back, an interrupted one continues from its checkpoint, so a run longer than a session is the
same command again; it does not time the cache (a resumed job's stage timings are one process's part). Writes
bench/results/distill_reviews.json (its headline numbers are the two-stage students' mean
when run, else the compact student's) each time a job ends, `"complete": false` until the last; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from bench_log import log_event

from distill.config import (
    DataConfig,
    ExportConfig,
    FromModel,
    JobConfig,
    LossConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from distill.data import pull_dataset
from distill.pipeline import REPORT, TEACHER_LOGITS, run
from distill.tasks import fast_precision
from teachers.registry import distill_home, pull_teacher

RESULTS = Path(__file__).parent / "results" / "distill_reviews.json"


COMPACT = FromModel(init="model", model="minilm-l6", num_layers=6, trim_vocabulary=True)
COMPACT_NAME = "minilm-l6, 6 layers, trimmed"


def data(args: argparse.Namespace, augment: int) -> DataConfig:
    return DataConfig(dataset="reviews", max_length=64, limit=args.limit, transfer="builtin" if args.transfer else None,
                      augment=augment)


def job(teacher: str, out: Path, epochs: int, cache: bool, args: argparse.Namespace, *,
        student: StudentConfig | None = None, augment: int | None = None, seed: int = 0,
        onnx: bool = True) -> JobConfig:
    """The task job; the student is 3 MiniLM layers unless given, on --augment perturbed copies unless given."""
    return JobConfig(
        seed=seed, precision=args.precision,
        # One prepared teacher for every student seed: their outputs and retentions then share one teacher.
        teacher=TeacherConfig(name=teacher, head_epochs=4, finetune_epochs=args.teacher_finetune_epochs,
                              finetune_lr=3e-5, seed=0),
        data=data(args, args.augment if augment is None else augment),
        student=student or FromModel(init="model", model="minilm-l6", num_layers=3),
        loss=LossConfig(temperature=2.0, alpha=0.5),
        # dropout 0: 1.36x faster distill stage at the same test accuracy (3 layers: 0.8400 vs 0.8428 with BERT's 0.1)
        train=TrainConfig(epochs=epochs, batch_size=32, lr=1e-4, cache_teacher_logits=cache, dropout=0.0,
                          group_by_length=args.group_by_length, ema_decay=args.ema_decay),
        export=ExportConfig(onnx=cache and onnx),  # the uncached run is only timed
        output_dir=out)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=["mpnet-base", "minilm-l6"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--uncached-epochs", type=int, default=1)
    parser.add_argument("--teacher-finetune-epochs", type=int, default=1,
                        help="epochs of the teacher's unfrozen fine-tuning (0: head only, for a timing-only run: "
                             "the cache ratio does not depend on the head's accuracy)")
    parser.add_argument("--limit", type=int, default=None, help="training examples (default: all 8456)")
    parser.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=True,
                        help="the built-in transfer texts (13,098 unlabelled snippets the teacher labels)")
    parser.add_argument("--augment", type=int, default=3,
                        help="perturbed copies of each training text for the teacher to label (data.augment)")
    parser.add_argument("--three-layer", action=argparse.BooleanOptionalAction, default=True,
                        help="the 3-layer student and the cache timing (teacher at every step) for each teacher")
    parser.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                        help="also the compact student (6 layers, trimmed vocabulary) for the first teacher")
    parser.add_argument("--compact-epochs", type=int, default=5,
                        help="the compact student's epochs (its validation accuracy still rose at epoch 3 of 3)")
    parser.add_argument("--two-stage", action=argparse.BooleanOptionalAction, default=False,
                        help="also the two-stage compact student for the first teacher, once per --seeds seed")
    parser.add_argument("--stage1-epochs", type=int, default=3, help="two-stage: epochs of embedding distillation")
    parser.add_argument("--stage1-layer-losses", action=argparse.BooleanOptionalAction, default=False,
                        help="two-stage: stage 1 also matches the teacher's hidden states and attention layer by "
                             "layer (the teacher then runs at every step: about 3x the time)")
    parser.add_argument("--two-stage-augment", type=int, default=8,
                        help="two-stage: perturbed copies of each training text in stage 2 (stage 1 uses --augment)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="two-stage: the students' seeds")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        default=fast_precision(torch.device("cpu")),
                        help="bf16 autocast: faster on CPUs with AVX512-BF16, the default there (what the README "
                             "quotes); 60x slower on others, whose default is fp32")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
                        help="length-grouped batches for every student (train.group_by_length)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="train.ema_decay of the task jobs (not two-stage's stage 1): keep a moving average of "
                             "the student's weights")
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished jobs and continue interrupted ones (default: every job starts fresh)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    pull_dataset("reviews", progress=print)
    work = distill_home() / "bench" / "distill_reviews"

    if not (args.three_layer or args.compact or args.two_stage):
        raise SystemExit("nothing to run: --no-three-layer needs --compact or --two-stage")
    rows: list[dict] = []

    def record(row: dict) -> None:
        """Keep a finished job's row and write the JSON at once: a run lost midway keeps what it finished."""
        rows.append(row)
        write_results(rows, args, complete=False)

    for teacher in args.teachers:
        if teacher == "mpnet-base":
            pull_teacher(teacher, progress=print)
        first = teacher == args.teachers[0]
        if args.three_layer:
            record(three_layer_student(teacher, work, first, args))
        if first and args.compact:
            record(compact_student(teacher, work, args))
        if first and args.two_stage:
            two_stage_students(teacher, work, args, record)

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

    write_results(rows, args, complete=True)
    print(f"wrote {args.out}")


def write_results(rows: list[dict], args: argparse.Namespace, *, complete: bool) -> None:
    """The JSON: headline numbers (the two-stage students' mean when run, else the compact student's, else the
    first row's), the command and every row; `complete` is false while jobs of the command are still to run."""
    two_stage = [r for r in rows if "seed" in r]
    if two_stage:
        headline = {**two_stage[0], "student": f"{COMPACT_NAME}, two-stage, mean of {len(two_stage)} seed(s)",
                    "student_accuracy": statistics.fmean(r["student_accuracy"] for r in two_stage)}
        headline["retention"] = headline["student_accuracy"] / headline["teacher_accuracy"]
        if complete:
            print("two-stage retention by seed: " + ", ".join(f"{r['seed']}: {r['retention']:.4f}"
                                                            for r in two_stage)
                  + f"; mean accuracy {headline['student_accuracy']:.4f}, retention {headline['retention']:.4f}")
    else:
        headline = next((r for r in rows if r["student"] == COMPACT_NAME), rows[0])
    result = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]), "complete": complete,
              "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
              "precision": args.precision,
              "teacher": headline["teacher"], "student": headline["student"],
              "teacher_accuracy": headline["teacher_accuracy"], "student_accuracy": headline["student_accuracy"],
              "retention": headline["retention"], "param_ratio": headline["param_ratio"],
              "retention_by_seed": {r["seed"]: r["retention"] for r in two_stage} or None,
              "cache_speedup": rows[0].get("cache_speedup"),  # timed with the first row's student, not the headline's
              "cache_speedup_student": rows[0]["student"] if "cache_speedup" in rows[0] else None,
              "group_by_length": args.group_by_length,
              "ema_decay": args.ema_decay, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


def run_job(config: JobConfig, args: argparse.Namespace, cached: Path | None = None) -> dict:
    """Run `config` in an emptied output_dir (no stale checkpoint for `resume` to pick up), or with --resume in the
    one it left; reuse the teacher outputs in `cached` (another job's teacher_logits.pt) when given and present:
    they depend only on the prepared teacher, the precision and the teacher's token ids of the texts, so `resume`
    finds them valid and skips the build."""
    out = config.output_dir
    assert out is not None
    config_json = json.loads(config.model_dump_json())
    if args.resume and (out / REPORT).exists():
        report = json.loads((out / REPORT).read_text())
        if report["config"] != config_json:
            raise SystemExit(f"--resume: {out} holds a job made from another config; remove it or run without "
                             "--resume")
        print(f"== reusing the finished job in {out}", flush=True)
        return report
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if cached is not None and cached.exists() and not (out / TEACHER_LOGITS).exists():
        shutil.copy(cached, out / TEACHER_LOGITS)
    return run(config, log_event, resume=args.resume or (out / TEACHER_LOGITS).exists()).report


def three_layer_student(teacher: str, work: Path, first: bool, args: argparse.Namespace) -> dict:
    """The 3-layer student with the logit cache; for the first teacher also timed against the teacher run at
    every step (its own job, --uncached-epochs)."""
    print(f"== {teacher}: pipeline with the logit cache", flush=True)
    # The compact student's run exports to ONNX and measures deployment; this one only when it is the last.
    report = run_job(job(teacher, work / teacher, args.epochs, True, args, onnx=not (first and args.compact)), args)
    t = report["timings_seconds"]
    row = {**student_row(teacher, "minilm-l6, 3 layers", report),
           "teacher_prepared_from_cache": report["teacher"]["prepared_from_cache"],
           "teacher_preparation": report["teacher"]["preparation"]}
    if not first:
        return row
    if args.resume:  # a resumed job's stage timings cover this process's part only; a read-back one, another run's
        print("== --resume: the teacher-output cache is not timed", flush=True)
        return row
    train_examples = report["data"]["splits"]["train"]["rows"] + report["data"]["transfer"]
    print(f"== {teacher}: distill stage with the teacher at every step", flush=True)
    uncached = run_job(job(teacher, work / f"{teacher}-uncached", args.uncached_epochs, False, args), args)
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
    return row


def student_row(teacher: str, student: str, report: dict) -> dict:
    return {"teacher": teacher, "student": student, "teacher_params": report["teacher"]["params"],
            "student_params": report["student"]["params"], "param_ratio": report["param_ratio"],
            "teacher_accuracy": report["teacher"]["test_accuracy"],
            "student_accuracy": report["student"]["test_accuracy"],
            "student_agreement": report["student"]["test_agreement"], "retention": report["retention"],
            "retention_interval": report["retention_interval"], "student_history": report["student"]["history"],
            "stage_seconds": report["timings_seconds"],
            # The exported models side by side (a job that exported): what the README quotes of deployment.
            **({"served": report["served"], "compress_gate": report.get("compress", {}).get("gate"),
                "deployment": {name: {k: row.get(k) for k in ("format", "size_bytes", "accuracy", "agreement",
                                                              "latency_ms", "speedup_b1")}
                               for name, row in report["evaluation"]["models"].items()}}
               if "evaluation" in report else {})}


def compact_student(teacher: str, work: Path, args: argparse.Namespace) -> dict:
    """The 6-layer trimmed-vocabulary student on the 3-layer run's teacher outputs."""
    print(f"== {teacher}: compact student (6 MiniLM layers, trimmed vocabulary), cached teacher outputs", flush=True)
    report = run_job(job(teacher, work / f"{teacher}-compact", args.compact_epochs, True, args, student=COMPACT),
                     args, work / teacher / TEACHER_LOGITS)
    return {**student_row(teacher, COMPACT_NAME, report), "epochs": args.compact_epochs}


def two_stage_students(teacher: str, work: Path, args: argparse.Namespace,
                       record: Callable[[dict], None]) -> None:
    """For each seed: stage 1, the compact student taught the teacher's sentence embeddings (MSE + cosine, no
    labels; the settings of examples/reviews-embedding-compact.yaml); stage 2, the task distilled into it as into
    the compact student. The first seed's jobs compute each stage's teacher outputs, the others reuse them (stage 2's
    come from the 3-layer run when it used as many perturbed copies). Each seed's row goes to `record` as it ends."""
    embeddings = None
    logits = work / teacher / TEACHER_LOGITS if args.two_stage_augment == args.augment else None
    for seed in args.seeds:
        print(f"== {teacher}: two-stage compact student, seed {seed}: stage 1 (sentence embeddings)", flush=True)
        variant = "-layers" if args.stage1_layer_losses else ""
        stage1_dir = work / f"{teacher}-stage1{variant}-seed{seed}"
        # The layer losses' weights start each term near the cosine loss (README, "Layer by layer").
        layers = {"hidden_mse": 10.0, "attention_kl": 0.1} if args.stage1_layer_losses else {}
        stage1 = run_job(JobConfig(
            task="sentence-embedding", seed=seed, precision=args.precision, teacher=TeacherConfig(name=teacher),
            data=data(args, args.augment), student=COMPACT,
            loss=LossConfig(embedding_mse=1.0, embedding_cosine=1.0, similarity_kl=0.0, **layers),
            train=TrainConfig(epochs=args.stage1_epochs, batch_size=32, lr=5e-4, dropout=0.0,
                              group_by_length=args.group_by_length),
            export=ExportConfig(onnx=False), output_dir=stage1_dir), args, embeddings)
        embeddings = embeddings or stage1_dir / TEACHER_LOGITS
        print(f"== {teacher}: two-stage compact student, seed {seed}: stage 2 (the task)", flush=True)
        stage2_dir = work / f"{teacher}-two-stage{variant}-seed{seed}"
        student = FromModel(init="model", model=stage1["student"]["dir"], num_layers=6)  # trimmed in stage 1
        report = run_job(job(teacher, stage2_dir, args.epochs, True, args, student=student,
                             augment=args.two_stage_augment, seed=seed, onnx=False), args, logits)
        logits = logits or stage2_dir / TEACHER_LOGITS
        record({**student_row(teacher, f"{COMPACT_NAME}, two-stage (seed {seed})", report), "seed": seed,
                     "stage1": {key: stage1["student"][key] for key in ("test_cosine", "test_recall_at_10")}
                     | {"epochs": args.stage1_epochs, "layer_losses": layers,
                        "stage_seconds": stage1["timings_seconds"]}})


if __name__ == "__main__":
    main()
