"""Predictors: one interface over a PyTorch model directory and an ONNX file (used by evaluate, service, bench).

Both tokenize the same way (the HF fast tokenizer, padding to the longest text in the batch, truncation to
max_length) and turn logits into probabilities the same way (softmax in float32, in numpy), so any difference
between two predictors on the same texts comes from the model, not from the plumbing around it.
"""

from __future__ import annotations

import inspect
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

ONNX_FILE = "model.onnx"  # the fp32 graph inside an exported model directory (see distill.export)
OPTIMIZED_FILE = "model_optimized.onnx"  # the same graph after ORT's fusions (see distill.compress)
OUTPUT_NAME = "logits"  # the graph's one output, (B, C)

Inputs = dict[str, np.ndarray]  # input name → (B, L) int64 token ids / masks


@dataclass
class Prediction:
    labels: list[int]  # argmax class per text
    probabilities: np.ndarray  # (B, C) float32, rows sum to 1
    seconds: float  # wall time of the whole call, tokenization included


class Predictor(Protocol):
    name: str
    num_labels: int
    label_names: list[str]  # index = class id, from config.id2label

    def predict(self, texts: list[str]) -> Prediction: ...


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one, e.g. a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def softmax(logits: np.ndarray) -> np.ndarray:
    """(B, C) logits → (B, C) float32 probabilities."""
    z = logits.astype(np.float32)
    z -= z.max(axis=-1, keepdims=True)  # exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class HFPredictor(ABC):
    """What both predictors share: tokenizer, label names, predict(); subclasses say which inputs the model takes
    and implement logits()."""

    input_names: list[str]  # the tokenizer outputs the model is fed, in order

    def __init__(self, name: str, tokenizer_dir: Path, max_length: int) -> None:
        self.name = name
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        # transformers 5 builds an empty-vocabulary tokenizer from config.json alone when the tokenizer files are
        # missing, which would turn every word into [UNK] without a word of warning.
        if len(self.tokenizer) <= len(self.tokenizer.all_special_tokens):
            raise FileNotFoundError(f"{tokenizer_dir} holds no tokenizer files (tokenizer.json, vocab.txt, ...); "
                                    "save the tokenizer next to config.json")
        config = AutoConfig.from_pretrained(tokenizer_dir)
        self.num_labels: int = config.num_labels
        self.label_names = [config.id2label[i] for i in range(config.num_labels)]

    def encode(self, texts: list[str]) -> Inputs:
        """Texts → the model's inputs, each (B, L) int64, padded to the longest text, truncated to max_length."""
        if not texts:
            raise ValueError("texts is empty; give at least one text")
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="np")
        return {name: encoded[name].astype(np.int64) for name in self.input_names}

    @abstractmethod
    def logits(self, inputs: Inputs) -> np.ndarray:
        """(B, L) inputs → (B, C) float32 logits."""

    def predict(self, texts: list[str]) -> Prediction:
        started = time.perf_counter()
        probabilities = softmax(self.logits(self.encode(texts)))
        labels = probabilities.argmax(axis=-1).tolist()
        return Prediction(labels, probabilities, time.perf_counter() - started)


class TorchPredictor(HFPredictor):
    """A saved AutoModelForSequenceClassification directory, run by PyTorch in eval() under inference_mode.

    `threads` calls torch.set_num_threads, which is process-wide; None leaves PyTorch's setting alone.
    """

    def __init__(self, model_dir: Path, max_length: int = 128, threads: int | None = None, *,
                 attn_implementation: str | None = None, name: str | None = None) -> None:
        model_dir = Path(model_dir)
        super().__init__(name or f"torch:{model_dir.name}", model_dir, max_length)
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, attn_implementation=attn_implementation).eval()
        # In forward's order: the TorchScript exporter binds inputs by signature position, so export names them in
        # this order. MPNet's forward takes no token_type_ids (and its tokenizer makes none).
        produced = set(self.tokenizer.model_input_names)
        self.input_names = [n for n in inspect.signature(self.model.forward).parameters if n in produced]

    def logits(self, inputs: Inputs) -> np.ndarray:
        with torch.inference_mode():
            output = self.model(**{name: torch.from_numpy(inputs[name]) for name in self.input_names})
        return output.logits.float().numpy()


class OnnxPredictor(HFPredictor):
    """An ONNX file run by onnxruntime on the CPU; the tokenizer and config.json come from tokenizer_dir.

    The thread count is always set explicitly (default: every CPU this process may use) so latency numbers say
    what they were measured with; inter-op parallelism is 1 because the graph is one chain of layers. `spinning`:
    the threads busy-wait for the next call after each one (ORT's default), which serves back-to-back calls a bit
    faster but burns CPU between calls.
    """

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, max_length: int = 128, threads: int | None = None,
                 *, name: str | None = None, spinning: bool = True) -> None:
        onnx_path = Path(onnx_path)
        super().__init__(name or f"onnx:{onnx_path.parent.name}/{onnx_path.name}", tokenizer_dir, max_length)
        options = ort.SessionOptions()
        options.intra_op_num_threads = available_cpus() if threads is None else threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = set(self.input_names) - set(self.tokenizer.model_input_names)
        if missing:
            raise ValueError(f"{onnx_path} takes {sorted(missing)}, which the tokenizer in {tokenizer_dir} does "
                             f"not produce (it gives {self.tokenizer.model_input_names})")

    def logits(self, inputs: Inputs) -> np.ndarray:
        (logits,) = self.session.run([OUTPUT_NAME], {name: inputs[name] for name in self.input_names})
        return logits.astype(np.float32)


def load_predictor(path: Path, max_length: int = 128, threads: int | None = None) -> HFPredictor:
    """An .onnx file, or a directory holding model.onnx (an exported model), runs on onnxruntime with the
    tokenizer next to it; any other directory is loaded by PyTorch."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxPredictor(path, path.parent, max_length, threads)
    for name in (OPTIMIZED_FILE, ONNX_FILE):  # the fused graph is the faster one, when compress made it
        if (path / name).is_file():
            return OnnxPredictor(path / name, path, max_length, threads)
    return TorchPredictor(path, max_length, threads)
