"""Compare sentence-embedding losses cheaply: one variant per call, trained on a seeded subset of an embedding job's
training texts with that job's cached teacher embeddings (no teacher pass), scored on its validation split
(cosine and recall@10 agreement after each epoch). Student and training settings are the config's (for
examples/reviews-embedding.yaml: the first 3 MiniLM-L6 layers + a 384 → 768 projection started by least squares, lr
5e-4, batch 32), with dropout 0 as bench/tasks.py trains, --epochs, and shuffled batches unless --group-by-length.

    python bench/embedding_losses.py --config JOB.yaml --job-dir DIR --name NAME --loss '{"anchor_kl": 1}'

JOB.yaml and DIR: a sentence-embedding job's config and output directory (its teacher_logits.pt is read, and must be
that config's). Variants run as separate calls (side by side on a machine with cores to spare); each call adds its
row, by NAME, to bench/results/embedding_losses.json and prints the table so far.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModel

from distill import distributed, engine
from distill.config import JobConfig, LossConfig, parse_config
from distill.data import TaskData, load_task_data
from distill.embedding import SentenceEmbedding, anchor_rows, encoder_like, fit_projection, load_sentence_encoder
from distill.engine import Split
from distill.evaluate import NEIGHBOURS
from distill.losses import IGNORE_INDEX
from distill.pipeline import TEACHER_LOGITS
from distill.student import build_student
from teachers.registry import resolve_teacher

RESULTS = Path(__file__).parent / "results" / "embedding_losses.json"


def load_job(config_path: Path, job_dir: Path,
             ) -> tuple[JobConfig, TaskData, dict[str, list[str]], dict[str, torch.Tensor]]:
    """An embedding job's config, data, texts by split (train: its training texts then transfer texts, as the job
    orders them) and cached teacher embeddings by split; refused when the cache is not that config's."""
    config = parse_config(yaml.safe_load(config_path.read_text()))
    data = load_task_data(config.data)
    texts = {"train": [e.text for e in data.train] + data.transfer, "validation": [e.text for e in data.validation]}
    cached = torch.load(job_dir / TEACHER_LOGITS)["logits"]
    if len(cached["train"]) != len(texts["train"]):
        raise SystemExit(f"{job_dir / TEACHER_LOGITS} holds {len(cached['train'])} training rows, {config_path} "
                         f"makes {len(texts['train'])}: not that config's job")
    return config, data, texts, cached


def training_pick(texts: int, rows: int) -> torch.Tensor:
    """The training texts a run uses: `rows` of `texts` drawn with seed 0, in their order (bench/embedding_gap.py
    draws the same)."""
    return torch.randperm(texts, generator=torch.Generator().manual_seed(0))[:rows].sort().values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--loss", default="{}", help="LossConfig keys as JSON, over MSE 1 + cosine 1 + nothing else")
    parser.add_argument("--rows", type=int, default=12000, help="training texts drawn (seed 0)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
                        help="length-grouped batches (train.group_by_length; shuffled by default, as the config's)")
    parser.add_argument("--save", type=Path, help="keep the run here (the best student: SAVE/best)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    config, data, texts, cached = load_job(args.config, args.job_dir)
    loss = LossConfig(**{"embedding_mse": 1.0, "embedding_cosine": 1.0, "similarity_kl": 0.0,
                         **json.loads(args.loss)})
    distributed.place("cpu")
    torch.manual_seed(0)
    teacher_dir = resolve_teacher(config.teacher.name)
    teacher = load_sentence_encoder(teacher_dir)
    built = build_student(config.student, teacher.encoder, teacher_dir, auto_class=AutoModel, texts=texts["train"])
    student = encoder_like(teacher, built.model)
    task = SentenceEmbedding(config.data.max_length)
    pick = training_pick(len(texts["train"]), args.rows)
    inputs = task.encode(built.tokenizer, [texts["train"][i] for i in pick], config.data.max_length)
    train = Split(inputs, torch.full((len(pick),), IGNORE_INDEX), teacher_outputs=cached["train"][pick])
    validation = Split(task.encode(built.tokenizer, texts["validation"], config.data.max_length),
                       torch.zeros(len(texts["validation"]), dtype=torch.long), teacher_outputs=cached["validation"])
    if loss.anchor_kl > 0:  # from every training text, as a job takes them
        task.anchors = cached["train"][anchor_rows(len(cached["train"]), loss.anchor_count)]
    if student.projection is not None:
        fit_projection(student, built.tokenizer, inputs, train.teacher_outputs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        result = engine.fit(task, student, built.tokenizer, train, validation,
                            config.train.model_copy(update={"epochs": args.epochs, "dropout": 0.0,
                                                            "checkpoint_every": 10**9,
                                                            "group_by_length": args.group_by_length}),
                            run_dir=args.save or Path(scratch), seed=0, loss=loss)
    row = {"loss": json.loads(loss.model_dump_json(include={"embedding_mse", "embedding_cosine", "similarity_kl",
                                                               "similarity_temperature", "anchor_kl",
                                                               "anchor_count"})),
           "rows": len(pick), "epochs": args.epochs, "group_by_length": args.group_by_length,
           "history": result.history, "seconds": round(time.perf_counter() - started),
           "train_examples_per_second": result.examples_per_second, "command": " ".join(sys.argv)}
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    table[args.name] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2))
    recall = f"recall_at_{NEIGHBOURS}"
    print(f"| variant | loss | validation cosine by epoch | validation recall@{NEIGHBOURS} by epoch |\n"
          "| --- | --- | --- | --- |")
    for name, saved in table.items():
        cosines = " / ".join(f"{h['cosine']:.4f}" for h in saved["history"])
        recalls = " / ".join(f"{h[recall]:.4f}" for h in saved["history"])
        print(f"| {name} | {json.dumps(saved['loss'])} | {cosines} | {recalls} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
