"""Shared fixtures: tiny seeded models (2 layers, hidden 32) saved to disk and loaded like real teachers."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, MPNetConfig, MPNetModel, MPNetTokenizer

POSITIVE = ["good", "great", "fine", "superb", "lovely", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "terrible"]
NEUTRAL = ["the", "movie", "film", "plot", "actor", "scene", "story", "was", "is", "a", "very", "and", "it", "this"]


@pytest.fixture(autouse=True)
def distill_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own $DISTILL_HOME: nothing leaks between tests or into the user's cache."""
    home = tmp_path_factory.mktemp("distill-home")
    monkeypatch.setenv("DISTILL_HOME", str(home))
    return home


def write_tiny_tokenizer(directory: Path) -> BertTokenizerFast:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *NEUTRAL]
    # transformers 5 takes the vocabulary as `vocab=` (a `vocab_file=` keyword is silently ignored: all [UNK]).
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(directory)
    return tokenizer


def write_tiny_encoder(directory: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A seeded BERT encoder without a task head, saved like a sentence-encoder teacher (config + weights +
    tokenizer)."""
    tokenizer = write_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory


def write_tiny_mpnet_encoder(directory: Path, seed: int = 0) -> Path:
    """The same, as MPNet (the mpnet-base teacher's architecture: no token_type_ids, no SDPA, relative positions)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", *POSITIVE, *NEGATIVE, *NEUTRAL]
    tokenizer = MPNetTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=66)
    MPNetModel(config).save_pretrained(directory)
    return directory


def synthetic_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Texts of 4–9 words holding one sentiment word; the label says which kind."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        words = rng.choices(NEUTRAL, k=rng.randint(3, 8))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture
def tiny_teacher_dir(tmp_path: Path) -> Path:
    return write_tiny_encoder(tmp_path / "tiny-teacher")


@pytest.fixture
def synthetic_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "synthetic.csv", synthetic_rows(400, seed=1))
