"""Benchmark: one cached-KD training step of the 3-layer MiniLM student, with and without dropout; table + JSON.

    python bench/train_step.py                 # 80 timed steps per row after 10 warm-up, bf16 autocast

Why: on CPU, dropout draws its masks with a slow random-number generator, and without dropout PyTorch's SDPA takes
a fused kernel whose backward is slower than plain (eager) attention at these lengths. Rows:
  dropout 0.1, SDPA    MiniLM's own config (SDPA falls back to its math path when it has to drop attention);
  dropout 0,   SDPA    the same model built with its dropout probabilities at 0;
  dropout 0,   eager   what `train.dropout: 0` does (engine.set_dropout: every nn.Dropout at 0, eager attention).
Each step as engine.fit runs it: batch of 32 reviews texts drawn at random (seeded, the same for every row), padded
to the longest; forward under autocast; α·CE + (1 − α)·kd_kl against fixed random teacher logits; backward; gradient
clipping; fused AdamW. Milliseconds per step (mean) and the share in forward+loss, backward and optimizer. Writes
bench/results/train_step.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill import losses
from distill.config import DataConfig
from distill.data import load_task_data, pull_dataset
from distill.engine import set_dropout
from distill.tasks import autocast, fast_precision
from teachers.registry import resolve_teacher

RESULTS = Path(__file__).parent / "results" / "train_step.json"
ROWS = {"dropout 0.1, SDPA": ("sdpa", None), "dropout 0, SDPA": ("sdpa", 0.0), "dropout 0, eager": ("eager", 0.0)}


def student(name: str) -> transformers.PreTrainedModel:
    attention, dropout = ROWS[name]
    zero = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if dropout == 0 else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_teacher("minilm-l6"), num_hidden_layers=3, num_labels=2, attn_implementation="sdpa", **zero)
    if attention == "eager":
        set_dropout(model, 0.0, torch.device("cpu"))
    assert model.config._attn_implementation == attention
    return model


def time_steps(model: transformers.PreTrainedModel, batches: list[dict[str, torch.Tensor]], precision: str,
               warmup: int) -> dict[str, float]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    parts = {"forward_ms": 0.0, "backward_ms": 0.0, "optimizer_ms": 0.0}
    for step, batch in enumerate(batches):
        if step == warmup:
            parts = dict.fromkeys(parts, 0.0)
        labels, teacher = batch["labels"], batch["teacher"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "teacher")}
        started = time.perf_counter()
        with autocast(precision, torch.device("cpu")):
            logits = model(**inputs).logits
            loss = 0.5 * losses.hard_ce(logits, labels) + 0.5 * losses.LOSSES["kd_kl"](logits, teacher, 2.0, None)
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = time.perf_counter()
        parts["forward_ms"] += forward - started
        parts["backward_ms"] += backward - forward
        parts["optimizer_ms"] += done - backward
    timed = len(batches) - warmup
    parts = {k: 1000 * v / timed for k, v in parts.items()}
    return {"step_ms": sum(parts.values()), **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        default=fast_precision(torch.device("cpu")),
                        help="bf16 where the CPU has its kernels (AVX512-BF16), else fp32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    pull_dataset("reviews")
    texts = [e.text for e in load_task_data(DataConfig(dataset="reviews", max_length=64)).train]
    tokenizer = AutoTokenizer.from_pretrained(resolve_teacher("minilm-l6"))
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.warmup + args.steps):
        picked = [texts[rng.randrange(len(texts))] for _ in range(32)]
        batch = dict(tokenizer(picked, truncation=True, max_length=64, padding=True, return_tensors="pt"))
        batches.append({**batch, "labels": torch.randint(0, 2, (32,), generator=generator),
                        "teacher": torch.randn(32, 2, generator=generator)})

    rows = {name: time_steps(student(name), batches, args.precision, args.warmup) for name in ROWS}
    base = rows["dropout 0.1, SDPA"]["step_ms"]
    print(f"\n3-layer MiniLM, batch 32, {args.precision}, {torch.get_num_threads()} threads, {args.steps} steps\n")
    print("| student | ms/step | forward + loss | backward | clip + AdamW | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        r["speedup"] = base / r["step_ms"]
        print(f"| {name} | {r['step_ms']:.1f} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} | "
              f"{r['optimizer_ms']:.1f} | {r['speedup']:.2f}x |")
    result = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]),
              "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "precision": args.precision, "steps": args.steps, "batch_size": 32, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
