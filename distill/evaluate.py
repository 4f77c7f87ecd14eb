"""Several models side by side on the same texts: quality, agreement, latency, throughput, size → a report.

The models are all classifiers (`Predictor`s: accuracy against the labels, agreement = the share of equal labels),
all sentence encoders (`Embedder`s: cosine to the reference's embedding of the same text, when the widths match,
and recall@10 agreement of each text's nearest neighbours among the others, which needs no common width), or all
causal LMs (`LanguageModel`s: perplexity over every predicted token of the texts, and next-token agreement = the
share of those tokens where the model's top-1 guess is the reference's, when both tokenize the texts alike).

What is timed, and how:
- Every timing is `predict` end to end, as a caller sees it: tokenization, the model, the softmax or normalization
  (a causal LM's `predict` scores the text: one forward pass, no generation).
- The timing texts are `latency_text` when given (every call the same length, which is what a FLOP count or a
  "latency at sequence length N" needs; `text_of_length` makes one), otherwise the evaluation texts cycled in order.
- Latency: `warmup_calls` untimed calls, then `latency_calls` calls at batch 1; p50/p90/p99 in milliseconds.
- Throughput: one untimed batch, then `throughput_batches` batches of `throughput_batch` timing texts (padded to
  the longest in the batch); texts per second over all of them.
- Accuracy and agreement (or embeddings) come from one untimed pass over all texts in batches of `throughput_batch`.
Models are measured one after another in the caller's order, so they never compete for the CPU.

Memory: `ru_maxrss` is the peak of the whole process, every model loaded so far included, so the report holds one
process-wide number, not one per model.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
import transformers
from onnx import numpy_helper
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distill.runtime import (
    Embedder,
    HFPredictor,
    LanguageModel,
    OnnxModel,
    Predictor,
    TextScores,
    TorchModel,
    available_cpus,
    onnx_file,
)
from teachers.registry import count_parameters

Progress = Callable[[str], None]
Model = Predictor | Embedder | LanguageModel

NEIGHBOURS = 10  # k of recall@k agreement

# /proc/cpuinfo flags that decide how fast INT8 runs: VNNI does u8·s8 dot products in one instruction (512- or
# 256-bit), AMX has tile matrix-multiply units; without any of them INT8 GEMMs can be slower than fp32 ones.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Initializer types that hold weights: float tensors and 8-bit quantized ones (int64 initializers are shapes/ids).
WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8}


class EvaluateError(ValueError):
    """The models or inputs cannot be compared as asked; the message says what differs."""


def evaluate_models(models: Mapping[str, Model], texts: list[str], labels: list[int] | None, *,
                    reference: str | None = None, latency_calls: int = 200, warmup_calls: int = 20,
                    latency_text: str | None = None, throughput_batch: int = 32, throughput_batches: int = 10,
                    sizes: dict[str, int] | None = None, params: dict[str, int] | None = None,
                    on_progress: Progress | None = None,
                    on_measured: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Measure every model on the same texts (see the module docstring for what is timed); a JSON-ready dict.

    models: all classifiers, all embedders or all language models. labels: class ids in the classifiers' label
    order (all must have the same label names), or None; embedders and language models take none. reference: the
    model agreement and speed-ups are relative to (default: the first). sizes (bytes) and params are copied into
    the rows of the models they name. on_progress gets a line before and after each model, on_measured (models
    measured, how many) after each.
    """
    if not models:
        raise EvaluateError("models is empty; give at least one model")
    if not texts:
        raise EvaluateError("texts is empty; give at least one text")
    if labels is not None and len(labels) != len(texts):
        raise EvaluateError(f"{len(labels)} labels for {len(texts)} texts; give one label per text")
    reference = reference or next(iter(models))
    if reference not in models:
        raise EvaluateError(f"reference {reference!r} is not one of the models: {', '.join(models)}")
    tasks = {name: task_of(model) for name, model in models.items()}
    if len(set(tasks.values())) > 1:
        raise EvaluateError(f"models of different tasks cannot be compared with each other: {tasks}")
    task = tasks[reference]
    if task != "sequence-classification" and labels is not None:
        raise EvaluateError(f"labels: {task} models have no classes to score; give no labels")
    if task == "sequence-classification":
        names = {name: cast(Predictor, p).label_names for name, p in models.items()}
        if any(n != names[reference] for n in names.values()):
            raise EvaluateError(f"the models name their classes differently, so their answers cannot be compared: "
                                f"{names}")
    if min(latency_calls, throughput_batch, throughput_batches) < 1 or warmup_calls < 0:
        raise EvaluateError("latency_calls, throughput_batch and throughput_batches must be at least 1, "
                            "warmup_calls at least 0")
    say = on_progress or (lambda line: None)
    timing_texts = [latency_text] if latency_text is not None else texts

    rows: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[int] | Tensor | tuple[list[list[int]], list[np.ndarray]]] = {}
    for i, (name, model) in enumerate(models.items(), start=1):
        say(f"[{i}/{len(models)}] {name}: measuring")
        for call in range(warmup_calls):
            model.predict([timing_texts[call % len(timing_texts)]])
        latency_ms = [model.predict([timing_texts[call % len(timing_texts)]]).seconds * 1000
                      for call in range(latency_calls)]
        texts_per_second = _throughput(model, timing_texts, throughput_batch, throughput_batches)
        if isinstance(model, Embedder):
            answers[name] = model.embed(texts, throughput_batch)
            quality = {"dimension": answers[name].shape[1]}
        elif isinstance(model, LanguageModel):
            scores = [model.predict(texts[start:start + throughput_batch])
                      for start in range(0, len(texts), throughput_batch)]
            answers[name] = (model.encode(texts), [g for s in scores for g in s.guesses])
            quality = {"perplexity": corpus_perplexity(scores)}
        else:
            answers[name] = predict_labels(model, texts, throughput_batch)
            quality = {"accuracy": _fraction_equal(answers[name], labels) if labels is not None else None}
        p50, p90, p99 = (float(v) for v in np.percentile(latency_ms, [50, 90, 99]))
        rows[name] = {
            "format": _format(model),
            "device": str(model.device) if isinstance(model, TorchModel) else "cpu",  # onnxruntime: the CPU here
            "threads": _threads(model),
            "params": (params or {}).get(name),
            "size_bytes": (sizes or {}).get(name),
            **quality,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "mean": float(np.mean(latency_ms))},
            "latency_sequence_length": _sequence_length(model, latency_text),
            "throughput_texts_per_second": texts_per_second,
        }
        score = next((f"{key} {rows[name][key]:.4f}, " for key in ("accuracy", "perplexity")
                      if rows[name].get(key) is not None), "")
        say(f"[{i}/{len(models)}] {name}: {score}p50 {p50:.2f} ms, {texts_per_second:.1f} texts/s")
        if on_measured is not None:
            on_measured(i, len(models))

    ref = rows[reference]
    for name, row in rows.items():
        if task == "sentence-embedding":
            row.update(embedding_agreement(cast(Tensor, answers[name]), cast(Tensor, answers[reference])))
        elif task == "causal-lm":
            row["next_token_agreement"] = next_token_agreement(*answers[name], *answers[reference])
        else:
            row["agreement"] = _fraction_equal(answers[name], answers[reference])
        row["speedup_b1"] = ref["latency_ms"]["p50"] / row["latency_ms"]["p50"]  # p50 over p50
        row["throughput_ratio"] = row["throughput_texts_per_second"] / ref["throughput_texts_per_second"]
    return {
        "task": task,
        "reference": reference,
        "texts": len(texts),
        "labelled": labels is not None,
        "settings": {"latency_batch": 1, "latency_calls": latency_calls, "warmup_calls": warmup_calls,
                     "timing_texts": "latency_text" if latency_text is not None else "texts cycled",
                     "throughput_batch": throughput_batch, "throughput_batches": throughput_batches},
        "machine": machine_facts(),
        "process_peak_rss_bytes": _peak_rss_bytes(),
        "process_peak_rss_note": "ru_maxrss: the peak of the whole process, all models loaded so far together",
        "models": rows,
    }


def task_of(model: Model) -> str:
    """The task a loaded model serves, by its runtime class."""
    if isinstance(model, Embedder):
        return "sentence-embedding"
    if isinstance(model, LanguageModel):
        return "causal-lm"
    return "sequence-classification"


def next_token_agreement(ids: list[list[int]], guesses: list[np.ndarray], reference_ids: list[list[int]],
                         reference_guesses: list[np.ndarray]) -> float | None:
    """The share of predicted tokens where two language models' top-1 guesses are equal; None when they tokenize
    the texts differently (their positions do not line up)."""
    if ids != reference_ids:
        return None
    same = sum(int((g == r).sum()) for g, r in zip(guesses, reference_guesses, strict=True))
    return same / sum(len(g) for g in guesses)


def corpus_perplexity(scores: list[TextScores]) -> float:
    """exp(mean −log p) over every predicted token of every text (texts weigh by their tokens)."""
    return math.exp(sum(float(s.nll.sum()) for s in scores) / sum(int(s.tokens.sum()) for s in scores))


def embedding_agreement(embeddings: Tensor, reference: Tensor, k: int = NEIGHBOURS) -> dict[str, float | None]:
    """Cosine agreement (mean cos(e_i, r_i); None when the widths differ) and recall@k agreement
    (`neighbour_recall`; None for k + 1 texts or fewer, where each text's k neighbours are all the others and any
    two models agree fully). Embeddings (N, D) × (N, D_r)."""
    cosine = (F.cosine_similarity(embeddings.float(), reference.float(), dim=-1).mean().item()
              if embeddings.shape[1] == reference.shape[1] else None)
    recall = neighbour_recall(embeddings, reference, k) if len(embeddings) > k + 1 else None
    return {"cosine": cosine, f"recall_at_{NEIGHBOURS}": recall}


def neighbour_recall(embeddings: Tensor, reference: Tensor, k: int = NEIGHBOURS) -> float:
    """For each text, the share of its k nearest neighbours among the other texts (by cosine) that are also among
    the reference's, averaged. (N, D) × (N, D_r): the widths may differ; N > k + 1 (with fewer, the neighbours
    are every other text, and the answer 1 whatever the models)."""
    if len(embeddings) <= k + 1:
        raise ValueError(f"recall@{k} ranks neighbours among more than {k + 1} texts; got {len(embeddings)}")
    neighbours = [_nearest(e, k) for e in (embeddings, reference)]  # (N, k) each
    shared = (neighbours[0].unsqueeze(-1) == neighbours[1].unsqueeze(-2)).any(dim=-1).sum(dim=-1)  # (N,)
    return (shared.float() / k).mean().item()


def _nearest(embeddings: Tensor, k: int) -> Tensor:
    """(N, D) → (N, k) indices of each row's k most cosine-similar other rows."""
    unit = F.normalize(embeddings.float(), dim=-1)
    similarity = (unit @ unit.T).fill_diagonal_(-math.inf)
    return similarity.topk(k, dim=-1).indices


def retention_interval(student_correct: Tensor, teacher_correct: Tensor, *, level: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """How far a retention (student accuracy / teacher accuracy on one split) could move with other texts from the
    same distribution: the percentile interval of a paired bootstrap (both models scored on each resample of the
    texts, so what they get right together cancels). Inputs (N,) bool: each text answered right or not."""
    n = len(student_correct)
    rows = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    student, teacher = (c.float()[rows].mean(dim=1) for c in (student_correct, teacher_correct))
    ratios = student / teacher.clamp_min(1 / n)
    low, high = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2])).tolist()
    return {"level": level, "low": low, "high": high, "resamples": resamples,
            "method": "paired bootstrap over the texts, percentile interval"}


def predict_labels(predictor: Predictor, texts: list[str], batch_size: int = 32) -> list[int]:
    """The predicted class id of every text, in batches; EvaluateError where a model outputs NaN or ±inf (argmax
    would read such a row as class 0 and score it as an answer)."""
    labels: list[int] = []
    for start in range(0, len(texts), batch_size):
        prediction = predictor.predict(texts[start:start + batch_size])
        if not np.isfinite(prediction.probabilities).all():
            raise EvaluateError(f"{predictor.name} outputs NaN or infinite logits on texts {start}–"
                                f"{start + len(prediction.labels) - 1}; its answers cannot be scored")
        labels += prediction.labels
    return labels


def accuracy(predictor: Predictor, texts: list[str], labels: list[int], batch_size: int = 32) -> float:
    return _fraction_equal(predict_labels(predictor, texts, batch_size), labels)


def text_of_length(tokenizer: PreTrainedTokenizerBase | HFPredictor | Embedder | LanguageModel | Path | str,
                   n: int) -> str:
    """A text the model is fed as exactly n tokens, special tokens ([CLS], [SEP], <s>, a language model's start
    and end tokens, ...) included: one single-token word repeated. tokenizer: a tokenizer, a model, or a directory
    holding a tokenizer."""
    if isinstance(tokenizer, LanguageModel):
        encode = tokenizer.encode  # with the start and end tokens its training added
    else:
        if isinstance(tokenizer, HFPredictor | Embedder):
            tokenizer = tokenizer.tokenizer
        elif isinstance(tokenizer, Path | str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        hf_tokenizer = tokenizer

        def encode(texts: list[str]) -> list[list[int]]:
            return hf_tokenizer(texts)["input_ids"]
    words = n - len(encode([""])[0])
    if words < 1:
        raise ValueError(f"{n} tokens leave no room for a word beside the special tokens; give more")
    for word in ("the", "a", "good", "movie", "x"):  # common words are one token in BERT/MPNet/RoBERTa vocabularies
        text = " ".join([word] * words)
        if len(encode([text])[0]) == n:
            return text
    raise ValueError(f"found no word this tokenizer keeps as one token; cannot make a text of {n} tokens")


def machine_facts() -> dict[str, Any]:
    """What changes the numbers: CPU model, INT8 instruction sets (None where /proc/cpuinfo is missing: not
    Linux), CPUs available, torch's thread count, library versions."""
    cpu, flags = platform.processor() or platform.machine(), None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            cpu = value.strip()
        elif key.strip() == "flags" and flags is None:
            present = set(value.split())
            flags = {flag: flag in present for flag in INT8_FLAGS}
    return {"cpu": cpu, "int8_flags": flags, "cpus_available": available_cpus(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}}


def footprint(path: Path) -> tuple[int, int | None]:
    """(size in bytes, parameter count) of a model as runtime.load_model reads it.

    ONNX (the graph `runtime.onnx_file` picks, as load_model does): the file's size, and the elements of its float and
    8-bit weight initializers: the PyTorch count, plus quantization scales and zero points, minus repeats (the
    exporter stores identical tensors once, e.g. the all-zero biases of an untrained model, and a tied output
    projection twice, as the embedding and its transpose: counted once). An HF directory: its *.safetensors / *.bin
    files, with those of its sentence-transformers modules (a Dense projection), and the float tensors in their
    safetensors headers (None without safetensors).
    """
    path = Path(path)
    if (onnx_path := onnx_file(path)) is not None:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        return onnx_path.stat().st_size, _onnx_weights(graph)
    modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").is_file() else []
    folders = [path, *(path / m["path"] for m in modules if m["path"])]
    files = [f for folder in folders for f in (*folder.glob("*.safetensors"), *folder.glob("*.bin"))]
    params = (sum(count_parameters(folder) for folder in folders if any(folder.glob("*.safetensors")))
              if any(f.suffix == ".safetensors" for f in files) else None)
    return sum(f.stat().st_size for f in files), params


def _onnx_weights(graph: onnx.GraphProto) -> int:
    """Elements of the weight initializers, a non-square matrix stored again as its transpose counted once."""
    total, matrices = 0, {}
    for tensor in graph.initializer:
        if tensor.data_type not in WEIGHT_TYPES:
            continue
        dims = tuple(tensor.dims)
        if len(dims) == 2 and dims[0] != dims[1]:
            array = numpy_helper.to_array(tensor)
            twin = matrices.get(dims[::-1])
            if twin is not None and np.array_equal(twin, array.T):
                continue
            matrices[dims] = array
        total += math.prod(dims)
    return total


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table, one row per model, then the settings and the machine in two lines."""
    settings, machine = report["settings"], report["machine"]
    task = report.get("task")
    quality = {"sentence-embedding": ["dim", "cosine", f"recall@{NEIGHBOURS}"],
               "causal-lm": ["perplexity", "next-token agreement"]}.get(task, ["accuracy", "agreement"])
    lines = ["| model | format | params | size MB | " + " | ".join(quality) + " | p50 ms | p90 ms | p99 ms | texts/s "
             "| speed-up p50 | speed-up b{} |".format(settings["throughput_batch"]),
             "| --- | --- | ---: | ---: | " + " | ".join(["---:"] * len(quality)) + " | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    for name, row in report["models"].items():
        latency = row["latency_ms"]
        if task == "sentence-embedding":
            scores = [str(row["dimension"]), _maybe(row["cosine"], "{:.4f}"),
                      _maybe(row[f"recall_at_{NEIGHBOURS}"], "{:.4f}")]
        elif task == "causal-lm":
            scores = [f"{row['perplexity']:.3f}", _maybe(row["next_token_agreement"], "{:.4f}")]
        else:
            scores = [_maybe(row["accuracy"], "{:.4f}"), f"{row['agreement']:.4f}"]
        where = row.get("device", "cpu")  # reports before devices were recorded: all on the CPU
        cells = [name, row["format"] if where == "cpu" else f"{row['format']} ({where})", _maybe(row["params"], "{:,}"),
                 _maybe(row["size_bytes"] and row["size_bytes"] / 1e6, "{:.1f}"), *scores,
                 f"{latency['p50']:.2f}", f"{latency['p90']:.2f}", f"{latency['p99']:.2f}",
                 f"{row['throughput_texts_per_second']:.1f}", f"{row['speedup_b1']:.2f}x",
                 f"{row['throughput_ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lengths = {row["latency_sequence_length"] for row in report["models"].values()}
    timing = ("a fixed text of " + "/".join(str(n) for n in sorted(lengths)) + " tokens"
              if settings["timing_texts"] == "latency_text" else "the texts cycled")
    counts = {name: row["threads"] for name, row in report["models"].items()}
    threads = (f"{counts[report['reference']]} for every model" if len(set(counts.values())) == 1
               else ", ".join(f"{name} {n}" for name, n in counts.items()))
    flags = machine["int8_flags"]
    int8 = ("unknown (no /proc/cpuinfo)" if flags is None
            else ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in flags.items()))
    rss = report["process_peak_rss_bytes"]
    lines += ["",
              f"{report['texts']} texts; agreement and speed-ups vs {report['reference']}. Latency: batch 1, "
              f"{settings['latency_calls']} calls after {settings['warmup_calls']} warm-up, on {timing}; throughput: "
              f"{settings['throughput_batches']} batches of {settings['throughput_batch']}; tokenization included.",
              f"Machine: {machine['cpu']}, {machine['cpus_available']} CPUs; INT8: {int8}; threads: {threads}; "
              f"process peak RSS {_maybe(rss and rss / 1e9, '{:.2f}')} GB (all models together)."]
    return "\n".join(lines)


def _throughput(predictor: Model, texts: list[str], batch: int, batches: int) -> float:
    """Texts per second over `batches` batches of `batch` texts taken cyclically, after one untimed batch."""
    def take(k: int) -> list[str]:
        return [texts[(k * batch + j) % len(texts)] for j in range(batch)]

    predictor.predict(take(0))  # the first big batch grows the allocators' arenas
    seconds = sum(predictor.predict(take(k)).seconds for k in range(batches))
    return batch * batches / seconds


def _fraction_equal(a: list[int], b: list[int]) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def _format(predictor: Model) -> str:
    if isinstance(predictor, TorchModel):
        return "pytorch"
    if isinstance(predictor, OnnxModel):
        return "onnxruntime"
    return type(predictor).__name__


def _threads(predictor: Model) -> int | None:
    """Intra-op threads the model ran with: the ORT session's, or PyTorch's process-wide setting."""
    if isinstance(predictor, OnnxModel):
        return predictor.session.get_session_options().intra_op_num_threads
    if isinstance(predictor, TorchModel):
        return torch.get_num_threads()
    return None


def _sequence_length(predictor: Model, text: str | None) -> int | None:
    """Tokens the model is fed for `text` (after its truncation), where the model exposes its tokenizer."""
    if text is None or not isinstance(predictor, HFPredictor | Embedder | LanguageModel):
        return None
    if isinstance(predictor, LanguageModel):
        return len(predictor.encode([text])[0])
    return len(predictor.tokenizer(text, truncation=True, max_length=predictor.max_length)["input_ids"])


def _peak_rss_bytes() -> int | None:
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _maybe(value: float | int | None, spec: str) -> str:
    return "—" if value is None else spec.format(value)
