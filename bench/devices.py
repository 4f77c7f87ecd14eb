"""Benchmark: the engine's training throughput on each device this machine has (the CPU, and the GPU when torch sees
one), by precision and batch size; table + JSON.

    python bench/devices.py                                  # 3 layers of minilm-l6, 2,048 reviews texts, 1 epoch
    python bench/devices.py --model DIR --batch-sizes 32 256

Each row is engine.fit itself, the loop `distill run` uses (cached teacher logits, α·CE + (1 − α)·kd_kl, clipping,
fused AdamW, one validation pass), placed by `distributed.place` as a job's `device` setting places it. Every row
trains the same freshly loaded student on the same texts, seed and teacher logits (random and fixed: speed does not
depend on their values). Each row trains twice and times the second: the first pays the one-time costs (the CUDA
context; on a GPU, picking kernels for each new padded length, which in bf16 took longer than the epoch itself).
examples/s is the engine's own measure: the training steps' wall time, each step ended by waiting for the GPU (the
runs in the README were timed before that wait: each step's backward pass and update ran partly after its timer).
Writes bench/results/devices.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill import distributed
from distill.config import DataConfig, TrainConfig
from distill.data import load_task_data, pull_dataset
from distill.engine import Split, fit
from distill.tasks import SequenceClassification
from teachers.registry import resolve_teacher

RESULTS = Path(__file__).parent / "results" / "devices.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6", help="teacher name or HF directory; the student is its "
                                                             "first 3 layers")
    parser.add_argument("--texts", type=int, default=2048, help="training texts (one epoch)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    pull_dataset("reviews")
    data = load_task_data(DataConfig(dataset="reviews", max_length=64))
    model_dir = resolve_teacher(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = SequenceClassification()
    train_rows, validation_rows = data.train[:args.texts], data.validation[:256]
    generator = torch.Generator().manual_seed(0)
    train = Split(task.encode(tokenizer, [e.text for e in train_rows], 64),
                  torch.tensor([e.label for e in train_rows]),
                  teacher_outputs=torch.randn(len(train_rows), 2, generator=generator))
    validation = Split(task.encode(tokenizer, [e.text for e in validation_rows], 64),
                       torch.tensor([e.label for e in validation_rows]),
                       teacher_outputs=torch.randn(len(validation_rows), 2, generator=generator))

    devices = ["cpu", *(["cuda"] * torch.cuda.is_available())]
    rows = []
    for device in devices:
        placed = distributed.place(device)
        for precision in ("fp32", "bf16"):
            for batch_size in args.batch_sizes:
                cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-4, checkpoint_every=10**9)
                for _ in ("warm-up", "timed"):
                    student = AutoModelForSequenceClassification.from_pretrained(model_dir, num_hidden_layers=3,
                                                                                 num_labels=2)
                    with tempfile.TemporaryDirectory() as run_dir:
                        result = fit(task, student, tokenizer, train, validation, cfg, run_dir=Path(run_dir),
                                     seed=0, precision=precision)
                rows.append({"device": str(placed), "precision": precision, "batch_size": batch_size,
                             "steps": result.steps, "train_seconds": result.train_seconds,
                             "examples_per_second": result.examples_per_second})
    cpu = {(r["precision"], r["batch_size"]): r["examples_per_second"] for r in rows if r["device"] == "cpu"}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"\n3 layers of {args.model}, {len(train_rows)} texts, 1 epoch; CPU threads {torch.get_num_threads()}; "
          f"GPU {gpu}\n")
    print("| device | precision | batch | steps | train s | examples/s | vs CPU |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        r["vs_cpu"] = r["examples_per_second"] / cpu[r["precision"], r["batch_size"]]
        print(f"| {r['device']} | {r['precision']} | {r['batch_size']} | {r['steps']} | {r['train_seconds']:.2f} | "
              f"{r['examples_per_second']:.0f} | {r['vs_cpu']:.1f}x |")
    result = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]),
              "machine": {"cpu_threads": torch.get_num_threads(), "gpu": gpu, "platform": platform.platform(),
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "texts": len(train_rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
