"""Shared fixtures: tiny seeded models (2 layers, hidden 32) saved to disk and loaded like real teachers."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BartConfig,
    BartModel,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    MPNetConfig,
    MPNetModel,
    MPNetTokenizer,
)

from distill import distributed
from distill.causal_lm import train_tokenizer

POSITIVE = ["good", "great", "fine", "superb", "lovely", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "terrible"]
NEUTRAL = ["the", "movie", "film", "plot", "actor", "scene", "story", "was", "is", "a", "very", "and", "it", "this"]


@pytest.fixture(autouse=True)
def distill_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own $DISTILL_HOME: nothing leaks between tests or into the user's cache."""
    home = tmp_path_factory.mktemp("distill-home")
    monkeypatch.setenv("DISTILL_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def placed_as_a_new_job() -> None:
    """Every test starts where a job with the default `device: auto` computes (the GPU when there is one), not
    wherever the previous test's job was placed: tests calling engine.fit directly read that choice."""
    distributed.place("auto")


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


def write_tiny_bart(directory: Path, seed: int = 0) -> Path:
    """The same as an encoder-decoder (BART: BART-MNLI's kind of classifier), [SEP] as its end of text."""
    tokenizer = write_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        decoder_start_token_id=tokenizer.cls_token_id)
    BartModel(config).save_pretrained(directory)
    return directory


def write_tiny_gpt2(directory: Path, layers: int = 2, seed: int = 0) -> Path:
    """A seeded, untrained GPT-2 (hidden 32) with a BPE tokenizer learned from synthetic texts, saved like a hub
    model."""
    return _write_tiny_lm(directory, seed, "gpt2", n_positions=64, n_embd=32, n_layer=layers, n_head=2)


def write_tiny_llama(directory: Path, layers: int = 2, seed: int = 0, model_type: str = "llama",
                     **settings: Any) -> Path:
    """The same as a Llama-style decoder (`model_type` llama, mistral, qwen2, ...): blocks under `model.layers`,
    RMSNorm, rotary positions, and grouped-query attention (4 query heads share 2 key-value heads)."""
    return _write_tiny_lm(directory, seed, model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **settings)


def _write_tiny_lm(directory: Path, seed: int, model_type: str, **sizes: Any) -> Path:
    tokenizer = train_tokenizer([text for text, _ in synthetic_rows(240, seed=5)], vocab_size=300)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **sizes)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
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


def write_sentence_teacher(directory: Path) -> Path:
    """The tiny MPNet laid out as the packaged mpnet-base is: modules.json with mean pooling and Normalize (whose
    directory the real one does not ship either)."""
    write_tiny_mpnet_encoder(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
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


def run_tiny_embedding_job(root: Path, output_dir: Path) -> Path:
    """A finished tiny sentence-embedding job in output_dir (its inputs under root): MPNet teacher (32 wide,
    normalized) → one layer of a 16-wide BERT + projection, exported to ONNX fp32 and INT8."""
    from distill.config import DataConfig, FromModel, JobConfig, LossConfig, TeacherConfig, TrainConfig
    from distill.pipeline import run

    run(JobConfig(
        task="sentence-embedding", teacher=TeacherConfig(name=str(write_sentence_teacher(root / "teacher"))),
        data=DataConfig(dataset="files", train=write_csv(root / "data.csv", synthetic_rows(200, seed=1)),
                        max_length=16),
        student=FromModel(init="model", model=str(write_tiny_encoder(root / "other", seed=3, hidden=16)),
                          num_layers=1),
        loss=LossConfig(embedding_mse=1.0, embedding_cosine=1.0), train=TrainConfig(epochs=2, batch_size=16, lr=5e-3),
        output_dir=output_dir))
    return output_dir


def models_client(settings: Any) -> Iterator[Any]:
    """A TestClient of the /v1/models and /v1/compare routers on an app wired as service.app's lifespan wires them
    (one event loop for the whole client, as in a server). For module-scoped fixtures of the service tests."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.app import add_error_handlers
    from service.models import ModelCatalog
    from service.routes import compare, models

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings, app.state.models = settings, ModelCatalog(settings)
        yield
        await app.state.models.close()

    app = FastAPI(lifespan=lifespan)
    add_error_handlers(app)
    app.include_router(models.router)
    app.include_router(compare.router)
    with TestClient(app) as client:
        yield client


def compare_in_background(client: Any, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """POST /v1/compare on a dataset (answered 202, run in the background), then poll it until it has ended."""
    response = client.post("/v1/compare", json=body)
    assert response.status_code == 202, response.text
    location = response.headers["location"]
    assert location == f"/v1/compare/{response.json()['id']}"
    deadline = time.monotonic() + timeout
    while (comparison := client.get(location).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, comparison
        time.sleep(0.05)
    return comparison


@pytest.fixture
def tiny_teacher_dir(tmp_path: Path) -> Path:
    return write_tiny_encoder(tmp_path / "tiny-teacher")


@pytest.fixture
def synthetic_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "synthetic.csv", synthetic_rows(400, seed=1))


def merged_concurrently(predictor: Any, requests: list[list[str]]) -> tuple[list[Any], list[list[str]]]:
    """Every request sent at once through one service MicroBatcher (8 texts a call at most, 5 ms wait): the answers
    in request order, and the texts of each model call it made."""
    from service.models import MicroBatcher

    calls: list[list[str]] = []

    class Counting:
        name = predictor.name

        def predict(self, texts: list[str]) -> Any:
            calls.append(list(texts))
            return predictor.predict(texts)

    async def concurrently() -> list[Any]:
        batcher = MicroBatcher(Counting(), max_size=8, max_wait_s=0.005)
        answers = await asyncio.gather(*(batcher.predict(texts) for texts in requests))
        await batcher.aclose()
        return answers

    return asyncio.run(concurrently()), calls
