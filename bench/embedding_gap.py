"""How much of a sentence-embedding student's disagreement with its teacher is generalization: its cosine and
recall@10 agreement on texts it trained on, on training texts it did not see, and on the validation split, each
a pool of as many texts as the validation split (recall@k depends on the pool's size).

    python bench/embedding_gap.py --config JOB.yaml --job-dir DIR --student SAVE/best --rows 12000

JOB.yaml, DIR and --rows as given to bench/embedding_losses.py, whose --save SAVE kept the student: the same seeded
draw of training texts is "seen", the rest of the job's training texts "unseen" (perturbed copies of seen snippets
among them: data.augment makes them). Prints a table, writes bench/results/embedding_gap.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from embedding_losses import load_job, training_pick
from transformers import AutoTokenizer

from distill.embedding import SentenceEmbedding, load_sentence_encoder
from distill.evaluate import NEIGHBOURS, embedding_agreement
from distill.tasks import predict_distilled

RESULTS = Path(__file__).parent / "results" / "embedding_gap.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--rows", type=int, required=True, help="the training texts the student was trained on")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    config, data, texts, cached = load_job(args.config, args.job_dir)
    train_texts = texts["train"]
    seen = training_pick(len(train_texts), args.rows)
    unseen = torch.ones(len(train_texts), dtype=torch.bool).index_fill_(0, seen, False).nonzero().squeeze(1)
    size = len(data.validation)
    generator = torch.Generator().manual_seed(1)
    pools = {"seen training texts": seen[torch.randperm(len(seen), generator=generator)[:size]],
             "unseen training texts": unseen[torch.randperm(len(unseen), generator=generator)[:size]]}
    task, tokenizer = SentenceEmbedding(config.data.max_length), AutoTokenizer.from_pretrained(args.student)
    student = load_sentence_encoder(args.student)

    def agreement(texts: list[str], teacher: torch.Tensor) -> dict[str, float | None]:
        encoded = task.encode(tokenizer, texts, config.data.max_length)
        return embedding_agreement(predict_distilled(task, student, tokenizer, encoded), teacher)

    # A pool holds fewer texts than the validation split when --rows leaves fewer: each row records its own count.
    rows = {name: {"texts": len(pool), **agreement([train_texts[i] for i in pool.tolist()], cached["train"][pool])}
            for name, pool in pools.items()}
    rows["validation"] = {"texts": size, **agreement(texts["validation"], cached["validation"])}
    recall = f"recall_at_{NEIGHBOURS}"
    print(f"| texts | count | cosine to the teacher | recall@{NEIGHBOURS} agreement |\n| --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['texts']} | {row['cosine']:.4f} | {row[recall]:.4f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "student": str(args.student), "rows": args.rows,
                                    "agreement": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
