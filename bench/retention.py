"""Benchmark: how sure a classification job's retention is. For finished job directories (their report.json,
student/ and teacher_logits.pt), the student scores its test split again; the teacher's test answers come from the
job's cached outputs; retention and its paired-bootstrap interval (distill.evaluate.retention_interval, what new
reports hold as `retention_interval`) are printed for each, on the test split and, as a check on one split's
luck, on validation (which picked the best epoch, so it flatters the student). A job trained with `train.ema_decay`
kept the moving average of its weights; the weights as trained (its last checkpoint: the last epoch) are scored
beside it, on the same texts, as `unaveraged`.

    python bench/retention.py /tmp/s5/aug8/job /tmp/c20/job --json bench/results/retention.json

Writes the JSON with the command line; asserts nothing, but stops when a job's test accuracy does not come out as
its report says (the student or the data changed since).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill.config import DataConfig
from distill.data import load_task_data
from distill.engine import CHECKPOINT
from distill.evaluate import retention_interval
from distill.pipeline import REPORT, STUDENT, TEACHER_LOGITS
from distill.tasks import SequenceClassification, predict_distilled


def measure(job_dir: Path, resamples: int) -> dict:
    report = json.loads((job_dir / REPORT).read_text())
    config, task = report["config"], SequenceClassification()
    data = load_task_data(DataConfig(**config["data"]))
    tokenizer = AutoTokenizer.from_pretrained(job_dir / STUDENT)
    student = AutoModelForSequenceClassification.from_pretrained(job_dir / STUDENT)
    teacher_logits = torch.load(job_dir / TEACHER_LOGITS)["logits"]
    students = {"student": student}
    if config["train"].get("ema_decay"):
        trained = AutoModelForSequenceClassification.from_pretrained(job_dir / STUDENT)
        trained.load_state_dict(torch.load(job_dir / CHECKPOINT, weights_only=False)["model"])
        students["unaveraged"] = trained
    reported = report["student"]["test_accuracy"]
    row = {"job": str(job_dir), "student_params": report["student"]["params"], "param_ratio": report["param_ratio"]}
    for split, examples in (("test", data.test), ("validation", data.validation)):
        labels = torch.tensor([e.label for e in examples])
        encoded = task.encode(tokenizer, [e.text for e in examples], config["data"]["max_length"])
        teacher_right = teacher_logits[split].argmax(dim=-1) == labels
        teacher_accuracy = teacher_right.float().mean().item()
        for name, model in students.items():
            student_right = predict_distilled(task, model, tokenizer, encoded,
                                              precision=config["precision"]).argmax(dim=-1) == labels
            accuracy = student_right.float().mean().item()
            if name == "student" and split == "test" and abs(accuracy - reported) > 0.5 / len(examples):
                sys.exit(f"{job_dir}: the student's test accuracy is {accuracy:.4f} now, {reported:.4f} in its "
                         "report; the student or the data changed since")
            interval = retention_interval(student_right, teacher_right, resamples=resamples)
            key = split if name == "student" else f"{split}_{name}"
            row[key] = {"texts": len(examples), "student_accuracy": accuracy, "teacher_accuracy": teacher_accuracy,
                        "retention": accuracy / teacher_accuracy,
                        "interval_low": interval["low"], "interval_high": interval["high"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", type=Path, nargs="+", help="finished sequence-classification job directories")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "retention.json")
    args = parser.parse_args()
    rows = [measure(job, args.resamples) for job in args.jobs]
    print(f"{'job':<28} {'split':<21} {'student':>7} {'teacher':>7} {'retention':>9}  95% interval")
    for row in rows:
        for split in (key for key in row if key.startswith(("test", "validation"))):
            r = row[split]
            print(f"{row['job'][-28:]:<28} {split:<21} {r['student_accuracy']:>7.4f} {r['teacher_accuracy']:>7.4f} "
                  f"{r['retention']:>9.4f}  {r['interval_low']:.3f}–{r['interval_high']:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": shlex.join(["python", *sys.argv]), "level": 0.95,
                                     "resamples": args.resamples, "jobs": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
