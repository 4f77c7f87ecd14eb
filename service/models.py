"""Inference over the models jobs produced: the catalog, an LRU cache of loaded models, micro-batching, comparisons.

Ids. A succeeded job is a directory `jobs_dir/<job_id>/` holding `report.json`; it yields up to four models, each
`<job_id>.<variant>` (URL-safe; the variant never contains a dot, so the last dot splits an id):

    <job_id>.teacher        the prepared teacher (PyTorch)
    <job_id>.student        the student the job serves: report.served (ONNX INT8 or fp32), PyTorch without ONNX export
    <job_id>.student-fp32   the fp32 ONNX student (the ORT-optimized graph when compress made one)
    <job_id>.student-torch  the student as PyTorch

Classifier jobs' models answer /predict; sentence-embedding jobs' models answer /embed, causal-LM jobs' models
/score (perplexity of each text) and /generate (their teacher is the one the job was given, and a causal-LM job's
`student` is INT8 unless its gate kept fp32); /v1/compare takes models of one task.

A job may name a model by its id as teacher.name or student.model (ModelCatalog.trainable_dir): a student distilled
further, a prepared teacher reused, or an embedding job's student as the start of a task job (two-stage
distillation); PyTorch variants only. A job whose models a queued or running job trains from is not deleted until
that one ends.

Listing reads only report.json files, cached by modification time; a lookup by id reads one job's report.

Cache. Models load on first use, in a worker thread, and stay in an LRU cache capped at settings.model_cache_bytes.
A model's memory is *estimated* from the bytes of its weight files (the .onnx file; *.safetensors / *.bin): the
weights dominate what a loaded model holds, while activations, ORT's arena and the tokenizer come on top and are
not counted. The estimate is known before loading, so room is made first (least recently used models go) and a
load never overshoots the cap; a single model larger than the cap is still loaded, alone. Two ids that name the
same file (a job serving its fp32 student, a prepared teacher shared by jobs) share one loaded model; a file
rewritten in place is loaded anew, and the old copy ages out of the cache.

Micro-batching: see MicroBatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch

from distill.config import DataConfig
from distill.data import BUILTIN_DATASETS, DataError, load_task_data
from distill.evaluate import EvaluateError, evaluate_models, render_markdown
from distill.runtime import (
    CPU,
    ONNX_FILE,
    OPTIMIZED_FILE,
    Embedder,
    Embeddings,
    Generation,
    HFPredictor,
    InputError,
    LanguageModel,
    OnnxEmbedder,
    OnnxLanguageModel,
    OnnxPredictor,
    Prediction,
    TextScores,
    TorchEmbedder,
    TorchLanguageModel,
    TorchPredictor,
)
from service.runner import REPORT_FILE as REPORT
from service.runner import PublicPaths
from service.settings import Settings
from teachers.registry import distill_home

log = logging.getLogger("distill.service.models")

VARIANTS = ("teacher", "student", "student-fp32", "student-torch")
JOB_ID = re.compile(r"[0-9A-Za-z_-]+")  # what a job's directory is named (the runner's are 12 hex digits)
JOB_DATASET_PREFIX = "job:"

Kind = Literal["teacher", "student"]
Format = Literal["torch", "onnx-fp32", "onnx-int8"]
Task = Literal["sequence-classification", "sentence-embedding", "causal-lm"]
ROUTES: dict[str, tuple[str, ...]] = {"sequence-classification": ("predict",), "sentence-embedding": ("embed",),
                                      "causal-lm": ("score", "generate")}  # what each task's models answer
Model = HFPredictor | Embedder | LanguageModel  # a loaded model: predict(texts) → its Answer
Answer = Prediction | Embeddings | TextScores  # each gives the rows of texts[start:end]: rows(start, end)


class UnknownModelError(LookupError):
    """No model has this id; the message says how to find the ids."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"no model {model_id!r}; GET /v1/models lists the ids (each succeeded job has "
                         f"<job_id>.teacher, <job_id>.student, <job_id>.student-fp32 and <job_id>.student-torch)")


class WrongTaskError(ValueError):
    """The model is asked for what its task does not give (embeddings of a classifier, labels of an encoder)."""

    def __init__(self, info: ModelInfo, route: str) -> None:
        answers = " and ".join(f"POST /v1/models/{info.id}/{r}" for r in ROUTES[info.task])
        super().__init__(f"{info.id} is a {info.task} model, which answers {answers}, not /{route}")


class ModelLoadError(RuntimeError):
    """A listed model's files could not be loaded (removed or corrupt since the job wrote them)."""


class ComparisonsBusy(RuntimeError):
    """As many comparisons are queued or running as settings.max_pending_comparisons allows."""


class CompareError(ValueError):
    """The comparison cannot run as asked; the message says what is wrong."""


@dataclass(frozen=True)
class ModelInfo:
    id: str
    job_id: str
    variant: str
    task: Task
    kind: Kind
    format: Format
    path: Path  # the .onnx file, or the HF directory PyTorch loads
    max_length: int  # the job's data.max_length: texts are truncated as in training
    params: int | None
    size_bytes: int  # of the weight files; also the memory estimate of the cache
    test_accuracy: float | None  # classifiers only
    test_perplexity: float | None  # causal LMs only
    label_names: list[str]  # classifiers only
    dimension: int | None  # embedding models only
    created_at: datetime  # when the job's report was written
    file_mtime_ns: int  # of path: a model rewritten in place (a job run again) is a new cache entry

    @property
    def cache_key(self) -> CacheKey:
        return CacheKey(self.task, self.path, self.max_length, self.file_mtime_ns)


class CacheKey(NamedTuple):
    """What a loaded model is shared by: the same files loaded for the same task (a classifier directory that is
    also an embedding job's teacher loads twice: a predictor and an embedder) with the same truncation."""
    task: Task
    path: Path
    max_length: int
    file_mtime_ns: int


# ----------------------------------------------------------------------------------------------------------
# Micro-batching

@dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future[Answer]


class MicroBatcher:
    """Merges concurrent predict calls to one model into one model call, run in a worker thread.

    One task per model serves a queue: it takes the first waiting request, then more until the batch holds
    max_size texts (a request that would overflow it opens the next batch; one larger than max_size runs alone).
    It waits up to max_wait_s for more only while traffic is concurrent, i.e. the previous call merged several
    requests: a lone caller never waits, so sequential latency is the model's own, and under load requests pile up
    during a call anyway. Each caller gets its own rows of the answer (Prediction or Embeddings); `seconds` is the
    whole call's.
    """

    def __init__(self, predictor: Model, max_size: int, max_wait_s: float) -> None:
        self.predictor, self.max_size, self.max_wait_s = predictor, max_size, max_wait_s
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()  # None: wakes the server to stop
        self._held: _Request | None = None  # the request that did not fit into the previous batch
        self._concurrent = False
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    async def predict(self, texts: list[str]) -> Answer:
        if self._closed:  # cannot happen through ModelCatalog: it hands out a batcher and enqueues without a pause
            raise RuntimeError("this model was unloaded; call the catalog again")
        if self._task is None:  # started on first use, so it lives on the loop that serves the requests
            self._task = asyncio.create_task(self._serve(), name=f"batcher:{self.predictor.name}")
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(texts, future))
        return await future

    def close(self) -> None:
        """Stop taking requests; the ones already queued are still answered, then the task ends."""
        self._closed = True
        self._queue.put_nowait(None)

    async def aclose(self) -> None:
        self.close()
        if self._task is not None:
            await self._task

    async def _serve(self) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._answer(batch)

    async def _answer(self, batch: list[_Request]) -> None:
        texts = [text for request in batch for text in request.texts]
        try:
            answer = await asyncio.to_thread(self.predictor.predict, texts)
        except Exception as e:
            if len(batch) > 1:  # whose texts failed? each request again on its own, so the others get answers
                for request in batch:
                    await self._answer([request])
            elif not batch[0].future.done():  # its caller gets the error, the server goes on
                batch[0].future.set_exception(e)
            return
        start = 0
        for request in batch:
            end = start + len(request.texts)
            if not request.future.done():  # done: the caller went away (cancelled)
                request.future.set_result(answer.rows(start, end))
            start = end

    async def _next_batch(self) -> list[_Request] | None:
        first = self._held or await self._queue.get()
        self._held = None
        if first is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.max_wait_s if self._concurrent else 0.0)
        batch, size = [first], len(first.texts)
        while size < self.max_size:
            if self._queue.empty():
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    request = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    break
            else:
                request = self._queue.get_nowait()
            if request is None:  # closing: answer this batch, then stop
                self._queue.put_nowait(None)
                break
            if size + len(request.texts) > self.max_size:
                self._held = request
                break
            batch.append(request)
            size += len(request.texts)
        self._concurrent = len(batch) > 1
        return batch


# ----------------------------------------------------------------------------------------------------------
# The catalog and the cache

@dataclass
class _Loaded:
    predictor: Model
    batcher: MicroBatcher
    memory_bytes: int


class ModelCatalog:
    """What app.state.models holds: lists the models of succeeded jobs, loads them, runs predictions; owns the
    comparisons. Use from one event loop (the server's); `list` and `get` are also safe from worker threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.public = PublicPaths(settings)
        self._reports: dict[str, tuple[int, dict[str, ModelInfo]]] = {}  # job id → (report mtime_ns, models)
        self._cache: OrderedDict[CacheKey, _Loaded] = OrderedDict()  # least recently used first
        self._load_lock = asyncio.Lock()  # one load at a time: a second request for a model waits for the first
        self._held: Counter[CacheKey] = Counter()  # cache keys in use by a comparison: not unloaded
        # Generations hold a thread for every token: their own pool, so that a few long ones never take the
        # default executor's threads that micro-batches and model loads run in.
        self._generations = ThreadPoolExecutor(max_workers=settings.max_concurrent_generations,
                                               thread_name_prefix="generate")
        self.comparisons = Comparisons(self)

    # Listing -------------------------------------------------------------------------------------------------

    def list(self) -> list[ModelInfo]:
        """Every model of every succeeded job, jobs oldest first."""
        jobs_dir = self.settings.jobs_dir
        job_ids = sorted(p.name for p in jobs_dir.iterdir() if (p / REPORT).is_file()) if jobs_dir.is_dir() else []
        for gone in set(self._reports) - set(job_ids):
            self._reports.pop(gone, None)
        models = [info for job_id in job_ids for info in self._job_models(job_id).values()]
        return sorted(models, key=lambda m: (m.created_at, m.job_id, VARIANTS.index(m.variant)))

    def get(self, model_id: str) -> ModelInfo:
        job_id, _, variant = model_id.rpartition(".")
        if not job_id or Path(job_id).name != job_id or job_id in (".", "..") or "\0" in job_id:  # a plain name
            raise UnknownModelError(model_id)
        info = self._job_models(job_id).get(variant)
        if info is None:
            raise UnknownModelError(model_id)
        return info

    def trainable_dir(self, name: str) -> Path | None:
        """The PyTorch directory of model `name` for a new job to train from (its teacher.name or student.model);
        None for a name not shaped as an id. UnknownModelError for an id of no model, ValueError for an ONNX one."""
        job_id, _, variant = name.rpartition(".")
        if variant not in VARIANTS or not JOB_ID.fullmatch(job_id):
            return None
        info = self.get(name)
        if info.format != "torch":
            raise ValueError(f"{name!r} is an {info.format} graph, which a job cannot train from; use "
                             f"'{job_id}.student-torch'")
        return info.path

    def served_from(self, job_id: str) -> list[str]:
        """Other jobs' models whose files lie in this job's directory: an embedding or causal-LM job's teacher is
        the directory it was given, which may be this job's student."""
        directory = self.settings.jobs_dir / job_id
        return [info.id for info in self.list() if info.job_id != job_id and info.path.is_relative_to(directory)]

    def forget_job(self, job_id: str) -> None:
        """A deleted job's models: out of the listing, and unloaded unless a comparison holds them (it unloads
        them with the least recently used once it ends). Its teacher lies in the shared $DISTILL_HOME/prepared:
        unloaded too, unless a job still listed serves the same one."""
        _, models = self._reports.pop(job_id, (None, {}))
        directory = self.settings.jobs_dir / job_id
        served = {info.cache_key for _, others in self._reports.values() for info in others.values()}
        own = {info.cache_key for info in models.values()} - served
        for key in [key for key in self._cache
                    if (key.path.is_relative_to(directory) or key in own) and not self._held[key]]:
            self._cache.pop(key).batcher.close()

    def is_loaded(self, info: ModelInfo) -> bool:
        return info.cache_key in self._cache

    def _job_models(self, job_id: str) -> dict[str, ModelInfo]:
        """The job's models by variant, from its report.json (re-read only when the file changed). Threads may
        race here; the worst case is a report parsed twice."""
        path = self.settings.jobs_dir / job_id / REPORT
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            self._reports.pop(job_id, None)
            return {}
        cached = self._reports.get(job_id)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            models = _models_of_report(job_id, path.parent, json.loads(path.read_text()), self.settings.home,
                                       datetime.fromtimestamp(mtime / 1e9, UTC))
        except (OSError, ValueError, KeyError, TypeError) as e:  # half-copied or foreign report: skip the job
            log.warning("skipping job %s: unreadable %s (%s)", job_id, path, e)
            models = {}
        self._reports[job_id] = (mtime, models)
        return models

    # Loading and predicting ----------------------------------------------------------------------------------

    async def predict(self, model_id: str, texts: list[str]) -> tuple[ModelInfo, Prediction]:
        """A classifier's labels and probabilities (WrongTaskError for another task's model)."""
        info, answer = await self._answer(model_id, texts, "sequence-classification")
        return info, cast(Prediction, answer)

    async def embed(self, model_id: str, texts: list[str]) -> tuple[ModelInfo, Embeddings]:
        """An embedding model's L2-normalized embeddings (WrongTaskError for another task's model)."""
        info, answer = await self._answer(model_id, texts, "sentence-embedding")
        return info, cast(Embeddings, answer)

    async def score(self, model_id: str, texts: list[str]) -> tuple[ModelInfo, TextScores]:
        """A causal LM's perplexity of each text (WrongTaskError for another task's model)."""
        info, answer = await self._answer(model_id, texts, "causal-lm", "score")
        return info, cast(TextScores, answer)

    async def generate(self, model_id: str, prompt: str, max_new_tokens: int, temperature: float,
                       seed: int | None) -> tuple[ModelInfo, Generation]:
        """A causal LM's continuation of the prompt, in the generation pool (not micro-batched: each step depends on
        the last; past settings.max_concurrent_generations they wait their turn there); distill.runtime.InputError
        when the prompt leaves no room to generate."""
        info = self._of_task(model_id, "causal-lm", "generate")
        model = cast(LanguageModel, (await self._loaded(info)).predictor)
        return info, await asyncio.get_running_loop().run_in_executor(
            self._generations, model.generate, prompt, max_new_tokens, temperature, seed)

    async def _answer(self, model_id: str, texts: list[str], task: Task,
                      route: str | None = None) -> tuple[ModelInfo, Answer]:
        info = self._of_task(model_id, task, route or ROUTES[task][0])
        loaded = await self._loaded(info)
        return info, await loaded.batcher.predict(texts)

    def _of_task(self, model_id: str, task: Task, route: str) -> ModelInfo:
        info = self.get(model_id)
        if info.task != task:
            raise WrongTaskError(info, route)
        return info

    @contextlib.asynccontextmanager
    async def holding(self, infos: list[ModelInfo]) -> AsyncIterator[dict[str, Model]]:
        """The loaded models by id (loaded when needed), for callers that run them themselves: kept in the cache
        until the block ends, so a request meanwhile uses the same copy instead of loading a second one past the
        cap. Only models not held are unloaded to make room."""
        keys: list[CacheKey] = []
        try:
            models = {}
            for info in infos:
                models[info.id] = (await self._loaded(info)).predictor
                self._held[info.cache_key] += 1  # no await since the load: nothing unloaded it meanwhile
                keys.append(info.cache_key)
            yield models
        finally:
            self._held.subtract(keys)
            self._held = +self._held  # drop the zeros

    async def _loaded(self, info: ModelInfo) -> _Loaded:
        loaded = self._cache.get(info.cache_key)
        if loaded is None:
            async with self._load_lock:
                loaded = self._cache.get(info.cache_key)
                if loaded is None:
                    self._make_room(info.size_bytes)
                    try:
                        predictor = await asyncio.to_thread(open_model, info, self.settings.inference_threads,
                                                            self.settings.inference_spinning,
                                                            self.settings.torch_device)
                    except ModelLoadError as e:  # the server's log has the paths, the client the reason
                        log.exception("could not load %s", info.id)
                        raise ModelLoadError(self.public(str(e))) from None
                    finally:
                        # Its job deleted meanwhile: no model (404), not a failed load (500), and none cached.
                        self.get(info.id)
                    batcher = MicroBatcher(predictor, self.settings.batch_max_size,
                                           self.settings.batch_max_wait_ms / 1000)
                    loaded = self._cache[info.cache_key] = _Loaded(predictor, batcher, info.size_bytes)
        self._cache.move_to_end(info.cache_key)
        return loaded

    def _make_room(self, needed: int) -> None:
        """Unload least recently used models not held until `needed` more bytes fit under the cap (or none is
        left to unload)."""
        cap = self.settings.model_cache_bytes
        while sum(m.memory_bytes for m in self._cache.values()) + needed > cap:
            key = next((key for key in self._cache if not self._held[key]), None)
            if key is None:
                log.warning("loading %d bytes past model_cache_bytes=%d: the models loaded are in use by a "
                            "comparison, or this one is larger than the cap", needed, cap)
                return
            evicted = self._cache.pop(key)
            evicted.batcher.close()  # its queued requests are still answered; then the predictor is freed
            log.info("unloaded %s (%d bytes) to make room for %d bytes", key.path, evicted.memory_bytes, needed)

    async def close(self) -> None:
        """Answer what is queued, then drop every model; cancel running comparisons."""
        await self.comparisons.close()
        self._generations.shutdown(wait=False, cancel_futures=True)
        loaded, self._cache = list(self._cache.values()), OrderedDict()
        await asyncio.gather(*(m.batcher.aclose() for m in loaded))


def open_model(info: ModelInfo, threads: int | None = None, spinning: bool = True,
               device: torch.device = CPU) -> Model:
    """The model as the server runs it: PyTorch on `device` for torch, onnxruntime on the CPU (tokenizer next to
    the file) otherwise."""
    try:
        if info.task == "sentence-embedding":
            if info.format == "torch":
                return TorchEmbedder(info.path, info.max_length, threads, name=info.id, device=device)
            return OnnxEmbedder(info.path, info.max_length, threads, name=info.id, spinning=spinning)
        if info.task == "causal-lm":
            if info.format == "torch":
                return TorchLanguageModel(info.path, info.max_length, threads, name=info.id, device=device)
            return OnnxLanguageModel(info.path, info.max_length, threads, name=info.id, spinning=spinning)
        if info.format == "torch":
            return TorchPredictor(info.path, info.max_length, threads, name=info.id, device=device)
        return OnnxPredictor(info.path, info.path.parent, info.max_length, threads, name=info.id, spinning=spinning)
    except Exception as e:
        raise ModelLoadError(f"could not load {info.id} from {info.path}: {e}") from e


def _models_of_report(job_id: str, job_dir: Path, report: dict[str, Any], home: Path,
                      created_at: datetime) -> dict[str, ModelInfo]:
    """A job's models by variant. Paths are taken relative to the job directory (and a prepared teacher's to
    home/prepared when its recorded path is gone), so a home moved or mounted elsewhere still works; a model
    whose files are missing is left out, and so is every model of a task not served."""
    task = report["config"]["task"]
    if task not in ROUTES:
        return {}
    teacher_dir: Path | None
    if task != "sequence-classification":  # nothing prepared: where the job loaded it from (an older report's hub
        recorded = Path(report["teacher"]["dir"])  # id is left out: never a directory of the server's own)
        teacher_dir = recorded if recorded.is_absolute() else None
    else:
        teacher_dir = Path(report["teacher"]["prepared_dir"])
        if not teacher_dir.is_dir():
            teacher_dir = home / "prepared" / teacher_dir.name
    onnx_dir = job_dir / "student-onnx"
    fp32 = next((onnx_dir / n for n in (OPTIMIZED_FILE, ONNX_FILE) if (onnx_dir / n).is_file()), None)
    served = report.get("served")
    # (variant, kind, format, path or None, its evaluate_models row: params and test accuracy when present, else
    # the report's teacher/student section has them)
    candidates: list[tuple[str, Kind, Format, Path | None, str]] = [
        ("teacher", "teacher", "torch", teacher_dir, "teacher-torch"),
        ("student", "student", served["format"], onnx_dir / Path(served["path"]).name,
         "student-onnx-int8" if served["format"] == "onnx-int8" else "student-onnx-fp32")
        if served else ("student", "student", "torch", job_dir / "student", "student-torch"),
        ("student-fp32", "student", "onnx-fp32", fp32, "student-onnx-fp32"),
        ("student-torch", "student", "torch", job_dir / "student", "student-torch"),
    ]
    rows = report.get("evaluation", {}).get("models", {})  # evaluate_models rows, when a classifier job exported
    models = {}
    for variant, kind, format, path, row_name in candidates:
        if path is None or not path.exists():
            continue
        row = rows.get(row_name, {})
        section = report["teacher"] if kind == "teacher" else report["student"]
        models[variant] = ModelInfo(
            id=f"{job_id}.{variant}", job_id=job_id, variant=variant, task=task, kind=kind, format=format, path=path,
            max_length=report["config"]["data"]["max_length"],
            params=row.get("params") or section.get("params"), size_bytes=_weight_bytes(path),
            test_accuracy=row.get("accuracy", section.get("test_accuracy")),
            test_perplexity=row.get("test_perplexity", section.get("test_perplexity")),
            label_names=list(report["data"]["labels"]) if task == "sequence-classification" else [],
            dimension=report["teacher"]["dimension"] if task == "sentence-embedding" else None,
            created_at=created_at, file_mtime_ns=path.stat().st_mtime_ns)
    return models


def _weight_bytes(path: Path) -> int:
    """Bytes of the weights a load reads: the .onnx file, or an HF directory's *.safetensors / *.bin files."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern))


# ----------------------------------------------------------------------------------------------------------
# Comparisons

WARMUP_CALLS = 5
THROUGHPUT_BATCHES = 5
INLINE_TIMED_CALLS = 200  # texts given and at most this many timed calls over all models: answered in the request
KEPT_COMPARISONS = 100  # finished comparisons kept in memory, oldest dropped first

Status = Literal["queued", "running", "succeeded", "failed"]


@dataclass
class Comparison:
    id: str
    models: list[str]
    background: bool
    created_at: datetime
    status: Status = "queued"
    finished_at: datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    error_status: int | None = None  # 422: the inputs cannot be compared; 500: the server failed
    task: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass
class _Inputs:
    """What to run the models on: texts given in the request, or a dataset split loaded in the worker."""
    texts: list[str] | None
    labels: list[str] | None  # label names, one per text
    dataset: str | None
    split: Literal["test", "validation"]
    limit: int | None


class Comparisons:
    """Several models of one task on the same inputs with distill.evaluate.evaluate_models: for classifiers,
    accuracy (when labels are known) and agreement with the first model; for sentence encoders, cosine and recall@10
    agreement with the first model; for causal LMs, perplexity and next-token agreement with the first model; for
    all, latency percentiles, throughput, size, speed-ups against the first.

    Kept in an in-memory dict (lost on restart; the last KEPT_COMPARISONS are kept). They run one at a time in one
    worker thread, so two comparisons never skew each other's timings; /predict traffic still shares the CPU, and
    a model loaded for a comparison is the cached one that /predict also uses.
    """

    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog
        self._items: OrderedDict[str, Comparison] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compare")
        # One comparison's turn at a time: its models are loaded when it starts, not held while it waits.
        self._turn = asyncio.Lock()

    def start(self, models: list[str], *, texts: list[str] | None = None, labels: list[str] | None = None,
              dataset: str | None = None, split: Literal["test", "validation"] = "test", limit: int | None = None,
              repeats: int = 20) -> Comparison:
        """Check what can be checked now (UnknownModelError, CompareError), then run in the background. The caller
        awaits `comparison.task` when `comparison.background` is False (texts given, few timed calls)."""
        if len(set(models)) != len(models):
            raise CompareError(f"models: {models} lists a model twice; list each once")
        limit_pending = self.catalog.settings.max_pending_comparisons
        if sum(c.status in ("queued", "running") for c in self._items.values()) >= limit_pending:
            raise ComparisonsBusy(f"{limit_pending} comparisons are queued or running "
                                  f"(DISTILL_MAX_PENDING_COMPARISONS); retry when one has finished")
        infos = [self.catalog.get(model_id) for model_id in models]
        tasks = {info.id: info.task for info in infos}
        if len(set(tasks.values())) > 1:
            raise CompareError(f"models: a comparison runs models of one task (classifiers, sentence encoders or "
                               f"causal LMs); these are {tasks}")
        if infos[0].task != "sequence-classification":
            if labels is not None:
                raise CompareError(f"labels: {infos[0].task} models have no classes to score; send texts only "
                                   f"(sentence encoders are compared by cosine and recall@10 agreement with the "
                                   f"first model, causal LMs by perplexity and next-token agreement)")
        else:
            names = {info.id: info.label_names for info in infos}
            if any(n != infos[0].label_names for n in names.values()):
                raise CompareError(f"the models name their classes differently, so their answers cannot be "
                                   f"compared: {names}")
            unknown = sorted(set(labels or []) - set(infos[0].label_names))
            if unknown:
                raise CompareError(f"labels: {unknown} are not label names of the models; they are "
                                   f"{infos[0].label_names}")
        # An unknown dataset or job, or data these models cannot be scored on: refused now, not in the background.
        if dataset is not None and not _dataset(self.catalog, dataset).labelled and (
                infos[0].task == "sequence-classification"):
            raise CompareError(f"dataset {dataset!r} holds texts without labels (a causal-LM job's data), and "
                               f"classifiers are scored against labels; give a built-in dataset, another job's data "
                               f"or texts")
        background = texts is None or repeats * len(models) > INLINE_TIMED_CALLS
        comparison = Comparison(uuid.uuid4().hex[:12], models, background, datetime.now(UTC))
        self._keep(comparison)
        inputs = _Inputs(texts, labels, dataset, split, limit)
        comparison.task = asyncio.create_task(self._run(comparison, infos, inputs, repeats))
        return comparison

    def get(self, comparison_id: str) -> Comparison | None:
        return self._items.get(comparison_id)

    async def _run(self, comparison: Comparison, infos: list[ModelInfo], inputs: _Inputs, repeats: int) -> None:
        try:
            async with self._turn:
                comparison.status = "running"
                async with self.catalog.holding(infos) as predictors:
                    comparison.result = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._measure, predictors, infos, inputs, repeats)
            comparison.status = "succeeded"
        except (CompareError, DataError, EvaluateError, InputError) as e:
            comparison.status, comparison.error, comparison.error_status = "failed", str(e), 422
        except UnknownModelError as e:  # its job deleted while the comparison waited for its turn
            comparison.status, comparison.error, comparison.error_status = "failed", str(e), 404
        except ModelLoadError as e:
            comparison.status, comparison.error, comparison.error_status = "failed", str(e), 500
        except Exception as e:  # a bug: say so in the comparison instead of losing it in a task nobody awaits
            log.exception("comparison %s failed", comparison.id)
            comparison.status, comparison.error_status = "failed", 500
            comparison.error = f"internal error: {type(e).__name__}: {e}"
        if comparison.error is not None:  # a data file's error names it: as the client knows it
            comparison.error = self.catalog.public(comparison.error)
        comparison.finished_at = datetime.now(UTC)

    def _measure(self, predictors: dict[str, Model], infos: list[ModelInfo], inputs: _Inputs,
                 repeats: int) -> dict[str, Any]:
        """In the worker thread: load the inputs, run evaluate_models, add speed-ups and the Markdown table.
        Sentence encoders and causal LMs get a dataset's texts without its labels."""
        label_names = infos[0].label_names
        if inputs.texts is not None:
            texts, names = inputs.texts, inputs.labels
        else:
            assert inputs.dataset is not None  # the route requires one of them
            texts, names = _load_split(self.catalog, inputs.dataset, inputs.split, inputs.limit, infos[0].task)
            missing = sorted(set(names or []) - set(label_names))
            if missing:
                raise CompareError(f"dataset {inputs.dataset!r} has labels {missing} the models do not know; "
                                   f"theirs are {label_names}")
        labels = [label_names.index(n) for n in names] if names is not None else None
        report = evaluate_models(
            predictors, texts, labels, latency_calls=repeats, warmup_calls=min(WARMUP_CALLS, repeats),
            throughput_batch=min(self.catalog.settings.batch_max_size, len(texts)),
            throughput_batches=THROUGHPUT_BATCHES,
            sizes={i.id: i.size_bytes for i in infos}, params={i.id: i.params for i in infos if i.params is not None})
        report["inputs"] = ({"texts": len(texts)} if inputs.dataset is None else
                            {"dataset": inputs.dataset, "split": inputs.split, "limit": inputs.limit})
        report["speedups"] = {name: {"latency_p50": row["speedup_b1"], "throughput": row["throughput_ratio"]}
                              for name, row in report["models"].items()}
        report["markdown"] = render_markdown(report)
        return report

    def _keep(self, comparison: Comparison) -> None:
        self._items[comparison.id] = comparison
        finished = [c.id for c in self._items.values() if c.status in ("succeeded", "failed")]
        for old in finished[:max(0, len(self._items) - KEPT_COMPARISONS)]:
            del self._items[old]

    async def close(self) -> None:
        for comparison in self._items.values():
            if comparison.task is not None:
                comparison.task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Dataset:
    config: DataConfig
    labelled: bool  # a causal-LM job's data are texts alone


def _dataset(catalog: ModelCatalog, dataset: str) -> _Dataset:
    """`reviews` (a built-in dataset, pulled) or `job:<job_id>` (the data that job was trained and tested on, its
    files still there), or a CompareError saying why not."""
    if dataset.startswith(JOB_DATASET_PREFIX):
        job_id = dataset.removeprefix(JOB_DATASET_PREFIX)
        report = catalog.settings.jobs_dir / job_id / REPORT
        try:
            found = Path(job_id).name == job_id and job_id not in ("", ".", "..") and report.is_file()
        except OSError:  # a name too long for the filesystem
            found = False
        if not found:
            raise CompareError(f"dataset {dataset!r}: no succeeded job {job_id!r}; GET /v1/jobs lists the jobs")
        job = json.loads(report.read_text())["config"]
        config = DataConfig(**job["data"])
        files = [config.train, config.validation, config.test] if config.dataset == "files" else []
        if not all(Path(f).is_file() for f in files if f is not None):
            raise CompareError(f"dataset {dataset!r}: the data job {job_id!r} read are gone (an upload deleted "
                               f"since); compare on texts, another job's data or a built-in dataset")
        return _Dataset(config, labelled=job["task"] != "causal-lm")
    if dataset in BUILTIN_DATASETS:
        if not BUILTIN_DATASETS[dataset].cache_path(distill_home()).exists():
            raise CompareError(f"dataset {dataset!r}: the built-in dataset is not downloaded on the server yet; run "
                               f"`distill datasets pull {dataset}` there, or compare on texts or a job's data")
        return _Dataset(DataConfig(dataset=dataset), labelled=True)
    raise CompareError(f"dataset {dataset!r} is not known; give a built-in dataset "
                       f"({', '.join(BUILTIN_DATASETS)}) or 'job:<job_id>' for the data a job was tested on")


def _load_split(catalog: ModelCatalog, dataset: str, split: Literal["test", "validation"], limit: int | None,
                task: Task) -> tuple[list[str], list[str] | None]:
    """(texts, label names: classifiers only) of a dataset split: the same seeded split the jobs use, first `limit`
    rows. Read as the job that made it read it (a causal-LM job's: texts alone, a .txt file or no label column),
    and without labels for causal LMs."""
    source = _dataset(catalog, dataset)
    data = load_task_data(source.config, labelled=source.labelled and task != "causal-lm")
    examples = (data.test if split == "test" else data.validation)[:limit]
    names = [data.labels[e.label] for e in examples] if task == "sequence-classification" else None
    return [e.text for e in examples], names
