"""/v1/models: the models succeeded jobs produced, and their answers (see service.models): labels from classifiers
(/predict), embeddings from sentence-embedding models (/embed), perplexities (/score) and continuations (/generate)
from causal LMs. All but /generate are micro-batched."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field

from distill.runtime import InputError
from service.deps import SettingsDep
from service.models import (
    Format,
    Kind,
    ModelCatalog,
    ModelInfo,
    ModelLoadError,
    Task,
    UnknownModelError,
    WrongTaskError,
)
from service.routing import TextJsonRoute
from service.schemas import error_responses
from service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=TextJsonRoute)


async def get_catalog(request: Request) -> ModelCatalog:
    return request.app.state.models


CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]


class ModelPublic(BaseModel):
    id: str = Field(examples=["3f9a1c2b7d4e.student"], description="<job_id>.<variant>")
    job_id: str
    task: Task = Field(description="sequence-classification models answer /predict, sentence-embedding ones /embed, "
                                   "causal-lm ones /score and /generate.")
    kind: Kind
    format: Format = Field(description="torch runs in PyTorch; onnx-fp32 / onnx-int8 in onnxruntime.")
    params: int | None
    size_bytes: int = Field(description="Bytes of the weight files; the model cache's memory estimate.")
    test_accuracy: float | None = Field(description="Classifiers: on the job's test split, from its report.")
    test_perplexity: float | None = Field(description="Causal LMs: on the job's test split, from its report.")
    label_names: list[str] = Field(description="Classifiers: the class names, in class-id order.")
    dimension: int | None = Field(description="Embedding models: the length of an embedding.")
    max_length: int = Field(description="Tokens per text; longer texts are truncated.")
    loaded: bool = Field(description="In the model cache now (the next prediction needs no load).")
    created_at: datetime

    @classmethod
    def of(cls, info: ModelInfo, loaded: bool) -> ModelPublic:
        return cls(id=info.id, job_id=info.job_id, task=info.task, kind=info.kind, format=info.format,
                   params=info.params, size_bytes=info.size_bytes, test_accuracy=info.test_accuracy,
                   test_perplexity=info.test_perplexity,
                   label_names=info.label_names, dimension=info.dimension, max_length=info.max_length,
                   loaded=loaded, created_at=info.created_at)


class ModelList(BaseModel):
    items: list[ModelPublic]


class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(description="1 to DISTILL_MAX_BATCH_TEXTS (64) texts, each at most "
                                         "DISTILL_MAX_TEXT_CHARS (5,000) characters.",
                             examples=[["a gripping, beautifully shot film", "dull and far too long"]])


class PredictResponse(BaseModel):
    model: str
    labels: list[str] = Field(description="The predicted label name of each text.")
    label_ids: list[int]
    probabilities: list[list[float]] = Field(description="(texts, classes); columns in label_names order.")
    server_ms: float = Field(description="Time in the server: waiting for a batch, tokenization, the model.")


class EmbedResponse(BaseModel):
    model: str
    dimension: int
    embeddings: list[list[float]] = Field(description="(texts, dimension), each L2-normalized: dot products are "
                                                      "cosine similarities.")
    server_ms: float = Field(description="Time in the server: waiting for a batch, tokenization, the model.")


class ScoreResponse(BaseModel):
    model: str
    perplexities: list[float] = Field(description="Per text: exp(mean −log p) over its predicted tokens (each token "
                                                  "after the start token, the end-of-text token included).")
    tokens: list[int] = Field(description="Predicted tokens per text (after truncation to max_length).")
    server_ms: float = Field(description="Time in the server: waiting for a batch, tokenization, the model.")


class GenerateRequest(BaseModel):
    # allow_inf_nan=False: a NaN temperature was refused as "less than or equal to 5".
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = Field(examples=["a gripping, beautifully"], description="Text to continue; may be empty where "
                                                                          "the model's tokenizer has a start token.")
    max_new_tokens: int = Field(32, ge=1, le=256, description="At most this many tokens are generated (fewer when "
                                                              "the end-of-text token or max_length comes first).")
    temperature: float = Field(0.0, ge=0, le=5, description="0: the most likely token at each step (greedy, "
                                                             "deterministic); above 0: sampled at this temperature.")
    seed: int | None = Field(None, ge=0, description="Seeds the sampling (temperature > 0): the same seed, the same "
                                                     "text.")


class GenerateResponse(BaseModel):
    model: str
    text: str = Field(description="The continuation alone, without the prompt and special tokens.")
    tokens: int = Field(description="Tokens generated, an end-of-text token included.")
    finish_reason: Literal["end_of_text", "max_new_tokens", "max_length"]
    server_ms: float = Field(description="Time in the server: tokenization and one model call per token.")


def check_texts(texts: list[str], settings: Settings) -> None:
    """The request limits of /predict, /embed, /score and /compare: 422 for an empty list or a long text, 413 for too
    many."""
    if not texts:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "texts is empty; give at least one text")
    if len(texts) > settings.max_batch_texts:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                            f"{len(texts)} texts; at most {settings.max_batch_texts} per request "
                            f"(DISTILL_MAX_BATCH_TEXTS): split them over several requests")
    for i, text in enumerate(texts):
        check_text(text, f"texts[{i}]", settings)


def check_text(text: str, field: str, settings: Settings) -> None:
    """422 for a text longer than max_text_chars (one that is not Unicode text never gets here: service.routing)."""
    if len(text) > settings.max_text_chars:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"{field} has {len(text)} characters; at most {settings.max_text_chars} "
                            f"(DISTILL_MAX_TEXT_CHARS)")


def find_model(catalog: ModelCatalog, model_id: str) -> ModelInfo:
    try:
        return catalog.get(model_id)
    except UnknownModelError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None


@router.get("", response_model=ModelList, summary="List the models of succeeded jobs")
async def list_models(catalog: CatalogDep) -> ModelList:
    infos = await anyio.to_thread.run_sync(catalog.list)  # reads report.json files the first time
    return ModelList(items=[ModelPublic.of(info, catalog.is_loaded(info)) for info in infos])


@router.get("/{model_id}", response_model=ModelPublic, responses=error_responses(404), summary="One model")
async def get_model(model_id: str, catalog: CatalogDep) -> ModelPublic:
    info = find_model(catalog, model_id)
    return ModelPublic.of(info, catalog.is_loaded(info))


@router.post("/{model_id}/predict", response_model=PredictResponse,
             responses=error_responses(404, 409, 413, 422, 500), summary="Classify texts with a classifier")
async def predict(model_id: str, body: TextsRequest, catalog: CatalogDep, settings: SettingsDep) -> PredictResponse:
    started = time.perf_counter()
    check_texts(body.texts, settings)
    async with model_errors():
        info, prediction = await catalog.predict(model_id, body.texts)
    return PredictResponse(model=info.id, labels=[info.label_names[i] for i in prediction.labels],
                           label_ids=prediction.labels, probabilities=prediction.probabilities.tolist(),
                           server_ms=(time.perf_counter() - started) * 1000)


@router.post("/{model_id}/embed", response_model=EmbedResponse, responses=error_responses(404, 409, 413, 422, 500),
             summary="Embed texts with a sentence-embedding model")
async def embed(model_id: str, body: TextsRequest, catalog: CatalogDep, settings: SettingsDep) -> EmbedResponse:
    started = time.perf_counter()
    check_texts(body.texts, settings)
    async with model_errors():
        info, embeddings = await catalog.embed(model_id, body.texts)
    return EmbedResponse(model=info.id, dimension=embeddings.vectors.shape[1],
                         embeddings=embeddings.vectors.tolist(), server_ms=(time.perf_counter() - started) * 1000)


@router.post("/{model_id}/score", response_model=ScoreResponse, responses=error_responses(404, 409, 413, 422, 500),
             summary="Perplexity of texts under a causal LM")
async def score(model_id: str, body: TextsRequest, catalog: CatalogDep, settings: SettingsDep) -> ScoreResponse:
    started = time.perf_counter()
    check_texts(body.texts, settings)
    async with model_errors():
        info, scores = await catalog.score(model_id, body.texts)
    return ScoreResponse(model=info.id, perplexities=scores.perplexity.tolist(), tokens=scores.tokens.tolist(),
                         server_ms=(time.perf_counter() - started) * 1000)


@router.post("/{model_id}/generate", response_model=GenerateResponse,
             responses=error_responses(404, 409, 422, 500), summary="Continue a prompt with a causal LM")
async def generate(model_id: str, body: GenerateRequest, catalog: CatalogDep,
                   settings: SettingsDep) -> GenerateResponse:
    started = time.perf_counter()
    check_text(body.prompt, "prompt", settings)
    async with model_errors():
        info, generation = await catalog.generate(model_id, body.prompt, body.max_new_tokens, body.temperature,
                                                  body.seed)
    return GenerateResponse(model=info.id, text=generation.text, tokens=generation.tokens,
                            finish_reason=generation.finish_reason, server_ms=(time.perf_counter() - started) * 1000)


@asynccontextmanager
async def model_errors() -> AsyncIterator[None]:
    """The catalog's errors as HTTP answers: 404 unknown id, 409 the model's task answers another route, 422 an
    input the model cannot take (a prompt as long as the model's max_length), 500 a model whose files no longer
    load."""
    try:
        yield
    except UnknownModelError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None
    except WrongTaskError as e:
        raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from None
    except InputError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None
    except ModelLoadError as e:
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(e)) from None
