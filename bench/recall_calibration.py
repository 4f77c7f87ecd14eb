"""What cosine to the teacher a recall@10 agreement needs: the teacher's own embeddings of one split with isotropic
Gaussian noise added (then renormalized) at several strengths, scored as a student is (evaluate.embedding_agreement).
With `--student DIR --config JOB.yaml` also that student's embeddings of the same texts, and where its error lies:
the share of its squared error inside the teacher's top-k principal directions, against the share of the teacher's
own variance there (isotropic noise puts k / D of its energy there). Also how close the teacher's 10th and 11th
nearest neighbours are (the margin a student's error must stay under).

    python bench/recall_calibration.py JOB_DIR/teacher_logits.pt [--split test] [--student DIR --config JOB.yaml]

Prints a table and writes bench/results/recall_calibration.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from transformers import AutoTokenizer

from distill.config import parse_config
from distill.data import load_task_data
from distill.embedding import SentenceEmbedding, load_sentence_encoder
from distill.evaluate import NEIGHBOURS, embedding_agreement
from distill.tasks import predict_distilled

RESULTS = Path(__file__).parent / "results" / "recall_calibration.json"
NOISE = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04)  # std of the noise per coordinate (unit-norm embeddings)
DIRECTIONS = (10, 50, 200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher_outputs", type=Path, help="an embedding job's teacher_logits.pt")
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    parser.add_argument("--student", type=Path, help="a sentence-transformers directory the job wrote")
    parser.add_argument("--config", type=Path, help="the job's config (its data section gives the split's texts)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if (args.student is None) != (args.config is None):
        parser.error("--student and --config go together")

    teacher = torch.load(args.teacher_outputs)["logits"][args.split]  # (N, D)
    generator = torch.Generator().manual_seed(0)
    noisy = []
    for std in NOISE:
        embeddings = F.normalize(teacher + std * torch.randn(teacher.shape, generator=generator), dim=-1)
        noisy.append({"noise_std": std, **embedding_agreement(embeddings, teacher)})
    unit = F.normalize(teacher, dim=-1)
    similarity = (unit @ unit.T).fill_diagonal_(-1.0)  # cosines; a text is not its own neighbour
    nearest = similarity.topk(NEIGHBOURS + 1, dim=-1).values
    margin = (nearest[:, NEIGHBOURS - 1] - nearest[:, NEIGHBOURS]).median().item()
    result: dict[str, Any] = {"command": " ".join(sys.argv), "split": args.split, "texts": len(teacher),
                              "isotropic_noise": noisy, "median_cosine_gap_between_neighbours_10_and_11": margin}
    print(f"median cosine gap between a text's {NEIGHBOURS}th and {NEIGHBOURS + 1}th nearest neighbours under the "
          f"teacher: {margin:.4f}")
    print(f"| noise std | cosine to the teacher | recall@{NEIGHBOURS} agreement |\n| ---: | ---: | ---: |")
    for row in noisy:
        print(f"| {row['noise_std']} | {row['cosine']:.3f} | {row[f'recall_at_{NEIGHBOURS}']:.3f} |")

    if args.student is not None:
        result["student"] = _student_error(args.student, args.config, args.split, teacher)
        print(f"\nstudent {args.student}: cosine {result['student']['cosine']:.3f}, recall@{NEIGHBOURS} "
              f"{result['student'][f'recall_at_{NEIGHBOURS}']:.3f}\n"
              "| teacher's top-k principal directions | teacher variance there | student error there | "
              "isotropic noise there |\n| ---: | ---: | ---: | ---: |")
        for row in result["student"]["error_in_top_directions"]:
            print(f"| {row['k']} | {row['teacher_variance_share']:.2f} | {row['student_error_share']:.2f} | "
                  f"{row['isotropic_share']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


def _student_error(student_dir: Path, config_path: Path, split: str, teacher: torch.Tensor) -> dict[str, Any]:
    config = parse_config(yaml.safe_load(config_path.read_text()))
    texts = [e.text for e in getattr(load_task_data(config.data), split)]
    if len(texts) != len(teacher):
        raise SystemExit(f"{config_path}: its {split} split has {len(texts)} texts, the teacher outputs "
                         f"{len(teacher)}: not the same job")
    task, tokenizer = SentenceEmbedding(config.data.max_length), AutoTokenizer.from_pretrained(student_dir)
    student = predict_distilled(task, load_sentence_encoder(student_dir), tokenizer,
                                task.encode(tokenizer, texts, config.data.max_length))
    centered, error = teacher - teacher.mean(dim=0), student - teacher
    _, _, directions = torch.linalg.svd(centered, full_matrices=False)  # rows: principal directions, by variance
    shares = []
    for k in DIRECTIONS:
        top = directions[:k].T  # (D, k)
        shares.append({"k": k, "teacher_variance_share": ((centered @ top).pow(2).sum() / centered.pow(2).sum()).item(),
                       "student_error_share": ((error @ top).pow(2).sum() / error.pow(2).sum()).item(),
                       "isotropic_share": k / teacher.shape[1]})
    return {"dir": str(student_dir), **embedding_agreement(student, teacher), "error_in_top_directions": shares}


if __name__ == "__main__":
    sys.exit(main())
