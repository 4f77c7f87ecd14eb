"""Predictors, embedders and language models: one interface over a PyTorch model directory and an ONNX file (used
by evaluate, service, bench) for classifiers (`predict` → labels, probabilities), sentence encoders (`embed` →
vectors) and causal LMs (`predict` → how well each text is predicted, `generate` → a continuation).

Each kind tokenizes the same way for both formats (the HF fast tokenizer, padding to the longest text in the batch,
truncation to max_length) and finishes the same way (softmax in float32; L2 normalization), so any difference
between a PyTorch and an ONNX model on the same texts comes from the model, not from the plumbing around it.
"""

from __future__ import annotations

import inspect
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile
from safetensors import SafetensorError, safe_open
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

ONNX_FILE = "model.onnx"  # the fp32 graph inside an exported model directory (see distill.export)
OPTIMIZED_FILE = "model_optimized.onnx"  # the same graph after ORT's fusions (see distill.compress)
OUTPUT_NAME = "logits"  # a graph's (first) output: (B, C) for a classifier, (B, L, V) for a causal LM
# A causal LM's graph also takes the KV cache of the tokens before and returns it grown (distill.causal_lm's
# NextTokenLogits): (n_layer, B, H, P, D), stacked over layers.
PAST_KEYS, PAST_VALUES, PRESENT_KEYS, PRESENT_VALUES = "past_keys", "past_values", "present_keys", "present_values"
EMBEDDING_OUTPUT = "sentence_embedding"  # an embedding graph's output, (B, D) L2-normalized, as sentence-transformers

Inputs = dict[str, np.ndarray]  # input name → (B, L) int64 token ids / masks
CPU = torch.device("cpu")  # where the PyTorch models run unless told otherwise; ONNX models always run there


@dataclass
class Prediction:
    labels: list[int]  # argmax class per text
    probabilities: np.ndarray  # (B, C) float32, rows sum to 1
    seconds: float  # wall time of the whole call, tokenization included

    def rows(self, start: int, end: int) -> Prediction:
        """The prediction of texts[start:end] (`seconds` stays the whole call's)."""
        return Prediction(self.labels[start:end], self.probabilities[start:end], self.seconds)


class Predictor(Protocol):
    name: str
    num_labels: int
    label_names: list[str]  # index = class id, from config.id2label

    def predict(self, texts: list[str]) -> Prediction: ...


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one, e.g. a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class UnreadableModel(ValueError):
    """A model's files that cannot be read: an ONNX graph onnxruntime cannot load, an HF directory without weights
    or with a safetensors file cut short. The message names the file."""


def cpu_session(onnx_path: Path, threads: int | None, spinning: bool) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` intra-op threads (default: PyTorch's, torch.get_num_threads(), so
    that the two runtimes timed side by side in one process use as many: under torchrun, whose workers get
    OMP_NUM_THREADS=1, every CPU for onnxruntime against one for PyTorch made the speed-ups up to that factor too
    high); inter-op parallelism 1, since the graphs are one chain of layers."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads() if threads is None else threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except (Fail, InvalidGraph, InvalidProtobuf, NoSuchFile) as e:  # a truncated or damaged file: ORT's traceback
        raise UnreadableModel(f"{onnx_path} is not a readable ONNX graph ({e}); export it again") from None


def torch_inputs(inputs: Inputs, device: torch.device, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The (B, L) inputs as tensors on the model's device: those of `names` the inputs have, or all."""
    return {name: torch.from_numpy(inputs[name]).to(device) for name in (names or inputs) if name in inputs}


def check_weights(model_dir: Path) -> None:
    """UnreadableModel for an HF directory without weights, or with a safetensors file whose header cannot be read:
    transformers' own errors come later (a job's teacher preparation) or as safetensors' traceback."""
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards and not any((model_dir / name).is_file() for name in ("pytorch_model.bin",
                                                                        "pytorch_model.bin.index.json")):
        raise UnreadableModel(f"{model_dir} holds no weights (model.safetensors or pytorch_model.bin); save the "
                              f"model there with save_pretrained")
    for shard in shards:
        try:
            with safe_open(shard, "pt"):  # its header only
                pass
        except (SafetensorError, OSError) as e:
            raise UnreadableModel(f"{shard} is not a readable safetensors file ({e}); save or download the model "
                                  f"again") from None


def load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `tokenizer_dir`; FileNotFoundError when its files are missing, where transformers 5
    would build an empty-vocabulary tokenizer from config.json alone and turn every word into [UNK] silently."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise FileNotFoundError(f"{tokenizer_dir} holds no tokenizer files (tokenizer.json, vocab.txt, ...); "
                                "save the tokenizer next to config.json")
    return tokenizer


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
        self.tokenizer = load_tokenizer(tokenizer_dir)
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
    """A saved AutoModelForSequenceClassification directory, run by PyTorch in eval() under inference_mode on
    `device` (answers come back to the CPU as numpy, which waits for a GPU, so timings are whole).

    `threads` calls torch.set_num_threads, which is process-wide; None leaves PyTorch's setting alone.
    """

    def __init__(self, model_dir: Path, max_length: int = 128, threads: int | None = None, *,
                 attn_implementation: str | None = None, name: str | None = None,
                 device: torch.device = CPU) -> None:
        model_dir = Path(model_dir)
        super().__init__(name or f"torch:{model_dir.name}", model_dir, max_length)
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = device
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, attn_implementation=attn_implementation).eval().to(device)
        # In forward's order: the TorchScript exporter binds inputs by signature position, so export names them in
        # this order. MPNet's forward takes no token_type_ids (and its tokenizer makes none).
        produced = set(self.tokenizer.model_input_names)
        self.input_names = [n for n in inspect.signature(self.model.forward).parameters if n in produced]

    def logits(self, inputs: Inputs) -> np.ndarray:
        with torch.inference_mode():
            output = self.model(**torch_inputs(inputs, self.device, self.input_names))
        return output.logits.float().cpu().numpy()


class OnnxPredictor(HFPredictor):
    """An ONNX file run by onnxruntime on the CPU; the tokenizer and config.json come from tokenizer_dir.

    The thread count is always set explicitly (cpu_session) so latency numbers say what they were measured with.
    `spinning`: the threads busy-wait for the next call after each one (ORT's default), which serves back-to-back
    calls a bit faster but burns CPU between calls.
    """

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, max_length: int = 128, threads: int | None = None,
                 *, name: str | None = None, spinning: bool = True) -> None:
        onnx_path = Path(onnx_path)
        super().__init__(name or f"onnx:{onnx_path.parent.name}/{onnx_path.name}", tokenizer_dir, max_length)
        self.session = cpu_session(onnx_path, threads, spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]
        missing = set(self.input_names) - set(self.tokenizer.model_input_names)
        if missing:
            raise ValueError(f"{onnx_path} takes {sorted(missing)}, which the tokenizer in {tokenizer_dir} does "
                             f"not produce (it gives {self.tokenizer.model_input_names})")

    def logits(self, inputs: Inputs) -> np.ndarray:
        (logits,) = self.session.run([OUTPUT_NAME], {name: inputs[name] for name in self.input_names})
        return logits.astype(np.float32)


@dataclass
class Embeddings:
    vectors: np.ndarray  # (B, D) float32, L2-normalized
    seconds: float  # wall time of the whole call, tokenization included

    def rows(self, start: int, end: int) -> Embeddings:
        """The embeddings of texts[start:end] (`seconds` stays the whole call's)."""
        return Embeddings(self.vectors[start:end], self.seconds)


class Embedder(ABC):
    """What both embedders share: the tokenizer (padding to the longest text, truncation to max_length), batches,
    and L2-normalized (N, D) output, so PyTorch and ONNX answers differ only by the model."""

    def __init__(self, name: str, tokenizer_dir: Path, max_length: int) -> None:
        self.name, self.max_length = name, max_length
        self.tokenizer = load_tokenizer(tokenizer_dir)

    @abstractmethod
    def _embed_batch(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        """(B, L) int64 inputs → (B, D) float32 embeddings."""

    def embed(self, texts: list[str], batch_size: int = 64) -> Tensor:
        """(N, D) float32 L2-normalized embeddings, in order."""
        if not texts:
            raise ValueError("texts is empty; give at least one text")
        rows = []
        for start in range(0, len(texts), batch_size):
            encoded = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="np")
            rows.append(torch.from_numpy(self._embed_batch({k: v.astype("int64") for k, v in encoded.items()})))
        return F.normalize(torch.cat(rows).float(), dim=-1)

    def predict(self, texts: list[str]) -> Embeddings:
        """`embed` in one batch, timed: what the service's micro-batcher calls and throughput is measured with (a
        batch of 128 was two of 64)."""
        started = time.perf_counter()
        vectors = self.embed(texts, batch_size=len(texts)).numpy()
        return Embeddings(vectors, time.perf_counter() - started)


class TorchEmbedder(Embedder):
    """A sentence-transformers (or plain HF encoder) directory run by PyTorch in eval() under inference_mode on
    `device`. `threads` calls torch.set_num_threads, which is process-wide; None leaves PyTorch's setting alone."""

    def __init__(self, model_dir: Path, max_length: int = 128, threads: int | None = None, *,
                 name: str | None = None, device: torch.device = CPU) -> None:
        from distill.embedding import load_sentence_encoder  # here: that module imports the training stack

        super().__init__(name or f"torch:{Path(model_dir).name}", model_dir, max_length)
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = device
        self.model = load_sentence_encoder(model_dir).eval().to(device)

    def _embed_batch(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            output = self.model(**torch_inputs(encoded, self.device,
                                               ("input_ids", "attention_mask", "token_type_ids")))
        return output.embedding.float().cpu().numpy()


class OnnxEmbedder(Embedder):
    """An exported embedding directory (model.onnx or model_int8.onnx + tokenizer) run by onnxruntime on the CPU;
    threads and spinning as distill.runtime.OnnxPredictor's."""

    def __init__(self, onnx_path: Path, max_length: int = 128, threads: int | None = None, *,
                 name: str | None = None, spinning: bool = True) -> None:
        onnx_path = Path(onnx_path)
        super().__init__(name or f"onnx:{onnx_path.parent.name}/{onnx_path.name}", onnx_path.parent, max_length)
        self.session = cpu_session(onnx_path, threads, spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _embed_batch(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        (embedding,) = self.session.run([EMBEDDING_OUTPUT], {n: encoded[n] for n in self.input_names})
        return embedding


def next_tokens(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """What a causal LM's logits[:, :-1] predict: targets (B, L − 1) = input_ids shifted left, and the mask
    (B, L − 1) of positions where both the token and its successor are real."""
    mask = inputs["attention_mask"]
    return inputs["input_ids"][:, 1:], mask[:, :-1] * mask[:, 1:]


def token_nll(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """−log p(next token) per position (B, L − 1), 0 where masked; logits (B, L, V), softmax in float32."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return nll * mask


class InputError(ValueError):
    """An input this model cannot take (a prompt as long as its max_length); the message says what is allowed."""


@dataclass
class TextScores:
    """How well a causal LM predicts each text: the summed −log p of its predicted tokens (every token after the
    first, the end-of-text token included), their count, and the model's top-1 guess at each of them."""
    nll: np.ndarray  # (B,) float64 nats, summed over the text's predicted tokens
    tokens: np.ndarray  # (B,) int64 predicted tokens per text
    guesses: list[np.ndarray]  # per text, (tokens,) int64 argmax of the model's next-token distribution
    seconds: float  # wall time of the whole call, tokenization included

    @property
    def perplexity(self) -> np.ndarray:
        """(B,) exp(mean −log p per predicted token) of each text."""
        return np.exp(self.nll / self.tokens)

    def rows(self, start: int, end: int) -> TextScores:
        """The scores of texts[start:end] (`seconds` stays the whole call's)."""
        return TextScores(self.nll[start:end], self.tokens[start:end], self.guesses[start:end], self.seconds)


@dataclass
class Generation:
    text: str  # the continuation alone, special tokens left out
    tokens: int  # tokens generated (an end-of-text token included)
    finish_reason: Literal["end_of_text", "max_new_tokens", "max_length"]
    seconds: float


class LanguageModel(ABC):
    """What both causal-LM runtimes share: texts encoded as in training (BOS text EOS, truncated to max_length;
    right padding), per-text scores, and generation one token at a time through `next_logits` (here the whole
    sequence each step, O(n²); both runtimes keep a KV cache instead unless told not to)."""

    def __init__(self, name: str, tokenizer_dir: Path, max_length: int) -> None:
        self.name, self.max_length = name, max_length
        self.tokenizer = load_tokenizer(tokenizer_dir)
        if self.tokenizer.pad_token is None:  # GPT-2's own tokenizer has none; padded positions are masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    @abstractmethod
    def logits(self, inputs: Inputs) -> np.ndarray:
        """(B, L) input_ids and attention_mask → (B, L, V) float32 next-token logits."""

    def next_logits(self, tokens: list[int], state: Any = None) -> tuple[np.ndarray, Any]:
        """(V,) float32 logits of the token after `tokens`, and a state for the call on `tokens` plus one more
        token (None here: each call re-runs the whole sequence)."""
        return self.logits(_padded([tokens], self.tokenizer.pad_token_id))[0, -1], None

    def encode(self, texts: list[str]) -> list[list[int]]:
        """BOS text EOS (where the tokenizer has them), truncated to max_length: as distill.causal_lm trains."""
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [(self._bos + row + eos)[:self.max_length] for row in ids]

    def predict(self, texts: list[str]) -> TextScores:
        """Every text's next-token scores (one model call): what the micro-batcher and evaluate_models call."""
        if not texts:
            raise ValueError("texts is empty; give at least one text")
        started = time.perf_counter()
        rows = self.encode(texts)
        short = [i for i, row in enumerate(rows) if len(row) < 2]
        if short:
            raise InputError(f"texts{short} give no token to predict (one token in all, with the special tokens); "
                             f"give longer texts")
        inputs = _padded(rows, self.tokenizer.pad_token_id)
        logits = torch.from_numpy(self.logits(inputs))
        batch = {name: torch.from_numpy(value) for name, value in inputs.items()}
        targets, mask = next_tokens(batch)
        nll = token_nll(logits, targets, mask).double().sum(dim=1).numpy()
        guesses = logits[:, :-1].argmax(dim=-1).numpy()
        lengths = [len(row) - 1 for row in rows]
        return TextScores(nll, np.asarray(lengths, dtype=np.int64),
                          [guesses[i, :n] for i, n in enumerate(lengths)], time.perf_counter() - started)

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int | None = None) -> Generation:
        """The prompt's continuation: the most likely token each step (temperature 0), or sampled from the
        distribution at `temperature` (seeded); ends at the end-of-text token, after max_new_tokens, or when the
        sequence reaches max_length tokens. InputError when the prompt leaves no room for a token, or is empty
        without a start token."""
        started = time.perf_counter()
        ids = self._bos + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError("prompt: empty, and this model's tokenizer has no start token to generate after; "
                             "give a prompt of at least one token")
        if len(ids) >= self.max_length:
            raise InputError(f"prompt: {len(ids)} tokens (with the start token) leave no room to generate within "
                             f"this model's {self.max_length} tokens; give at most {self.max_length - 1}")
        rng = np.random.default_rng(seed)
        new: list[int] = []
        reason: Literal["end_of_text", "max_new_tokens", "max_length"] = "max_new_tokens"
        state = None
        while len(new) < max_new_tokens:
            if len(ids) + len(new) >= self.max_length:
                reason = "max_length"
                break
            logits, state = self.next_logits(ids + new, state)
            if temperature == 0:
                token = int(logits.argmax())
            else:  # float64: numpy's choice wants probabilities that sum to 1 within 1e-8; the max subtracted
                # first, so that a tiny temperature gives 0 / t = 0 at the top, never inf - inf
                with np.errstate(over="ignore"):  # -x / tiny is -inf, and exp(-inf) the 0 it should be
                    p = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
                token = int(rng.choice(len(p), p=p / p.sum()))
            new.append(token)
            if token == self.tokenizer.eos_token_id:
                reason = "end_of_text"
                break
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(text, len(new), reason, time.perf_counter() - started)


def _padded(rows: list[list[int]], pad_id: int) -> Inputs:
    """Token rows → right-padded (B, L) int64 input_ids and attention_mask (GPT-2 numbers positions from the left)."""
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


class TorchLanguageModel(LanguageModel):
    """A saved AutoModelForCausalLM directory, run by PyTorch in eval() under inference_mode on `device`; generation
    keeps transformers' KV cache, so each new token costs one position, not the whole sequence (`kv_cache=False`
    re-runs it). `threads` calls torch.set_num_threads, which is process-wide."""

    def __init__(self, model_dir: Path, max_length: int = 128, threads: int | None = None, *,
                 name: str | None = None, device: torch.device = CPU, kv_cache: bool = True) -> None:
        model_dir = Path(model_dir)
        super().__init__(name or f"torch:{model_dir.name}", model_dir, max_length)
        if threads is not None:
            torch.set_num_threads(threads)
        self.device, self.kv_cache = device, kv_cache
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval().to(device)

    def logits(self, inputs: Inputs) -> np.ndarray:
        with torch.inference_mode():
            output = self.model(**torch_inputs(inputs, self.device), use_cache=False)
        return output.logits.float().cpu().numpy()

    def next_logits(self, tokens: list[int], state: Any = None) -> tuple[np.ndarray, Any]:
        """The state is the model's KV cache of the tokens of the call before: only the new token runs."""
        if not self.kv_cache:
            return super().next_logits(tokens)
        new = tokens if state is None else tokens[state.get_seq_length():]
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([new], device=self.device), cache=state, use_cache=True)
        return output.logits[0, -1].float().cpu().numpy(), output.cache


class OnnxLanguageModel(LanguageModel):
    """An exported causal LM (model.onnx or model_int8.onnx, the tokenizer next to it) run by onnxruntime on the
    CPU; threads and spinning as OnnxPredictor's. Its graph takes input_ids, attention_mask and the KV cache of
    the tokens before (past_keys, past_values: empty to score texts) → logits (B, L, V) and the grown cache, which
    generation keeps (`kv_cache=False` re-runs the sequence instead). Graphs exported without a cache (before it
    had one) take input_ids and attention_mask alone, and generate by re-running."""

    def __init__(self, onnx_path: Path, max_length: int = 128, threads: int | None = None, *,
                 name: str | None = None, spinning: bool = True, kv_cache: bool = True) -> None:
        onnx_path = Path(onnx_path)
        super().__init__(name or f"onnx:{onnx_path.parent.name}/{onnx_path.name}", onnx_path.parent, max_length)
        self.session = cpu_session(onnx_path, threads, spinning)
        past = next((i for i in self.session.get_inputs() if i.name == PAST_KEYS), None)
        self._cache_dims = None if past is None else (past.shape[0], past.shape[2], past.shape[4])  # n_layer, H, D
        self.kv_cache = kv_cache and past is not None

    def _no_past(self, batch_size: int) -> Inputs:
        if self._cache_dims is None:
            return {}
        layers, heads, head_dim = self._cache_dims
        empty = np.zeros((layers, batch_size, heads, 0, head_dim), dtype=np.float32)
        return {PAST_KEYS: empty, PAST_VALUES: empty}

    def logits(self, inputs: Inputs) -> np.ndarray:
        (logits,) = self.session.run([OUTPUT_NAME], inputs | self._no_past(len(inputs["input_ids"])))
        return logits.astype(np.float32)

    def next_logits(self, tokens: list[int], state: Any = None) -> tuple[np.ndarray, Any]:
        """The state is the graph's present keys and values of the tokens of the call before: only the new token
        runs."""
        if not self.kv_cache:
            return super().next_logits(tokens)
        past = self._no_past(1) if state is None else {PAST_KEYS: state[0], PAST_VALUES: state[1]}
        new = tokens[past[PAST_KEYS].shape[3]:]
        logits, keys, values = self.session.run(
            [OUTPUT_NAME, PRESENT_KEYS, PRESENT_VALUES],
            {"input_ids": np.array([new], dtype=np.int64), "attention_mask": np.ones((1, len(tokens)), np.int64)}
            | past)
        return logits[0, -1].astype(np.float32), (keys, values)


TorchModel = TorchPredictor | TorchEmbedder | TorchLanguageModel  # run by PyTorch, on their `device`
OnnxModel = OnnxPredictor | OnnxEmbedder | OnnxLanguageModel  # run by onnxruntime, on the CPU


# Their position ids start after the padding index: a table's first pad_token_id + 1 rows are never a token's.
POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert",
                           "data2vec-text", "ibert", "longformer", "mpnet")


def usable_positions(config: PretrainedConfig) -> int | None:
    """How many tokens a model reads at most: its position table's rows, less those RoBERTa-style models never use
    (mpnet-base: 514 rows, 512 tokens); None without a table."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and config.model_type in POSITIONS_AFTER_PADDING:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def onnx_file(path: Path) -> Path | None:
    """The graph load_model runs for `path`: the .onnx file itself, or a directory's fused graph before its plain
    export (faster), or None for a PyTorch directory."""
    if path.suffix == ".onnx":
        return path
    return next((path / name for name in (OPTIMIZED_FILE, ONNX_FILE) if (path / name).is_file()), None)


def model_kind(config: PretrainedConfig) -> Literal["classifier", "language-model", "encoder"]:
    """What a saved model is, by its config.json's architectures: *ForSequenceClassification a classifier,
    *ForCausalLM / *LMHeadModel a language model, anything else an encoder."""
    architectures = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classifier"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "language-model"
    return "encoder"


def load_model(path: Path, max_length: int = 128,
               threads: int | None = None) -> HFPredictor | Embedder | LanguageModel:
    """An .onnx file, or a directory holding model.onnx (an exported model), runs on onnxruntime with the tokenizer
    next to it; any other directory is loaded by PyTorch. By its config.json's architectures: a
    *ForSequenceClassification becomes a predictor, a *ForCausalLM / *LMHeadModel a language model, any other
    encoder an embedder (pooled as its sentence-transformers files say, mean otherwise) — never a classifier with a
    random head. Texts are cut to the tokens the model has positions for when max_length asks for more (this
    project's LMs have 64, below the default 128)."""
    path = Path(path)
    onnx_path = onnx_file(path)
    directory = path if onnx_path is None else onnx_path.parent
    config = AutoConfig.from_pretrained(directory)
    max_length = min(max_length, usable_positions(config) or max_length)
    kind = model_kind(config)
    if onnx_path is None:
        check_weights(directory)
    if kind == "classifier":
        if onnx_path is None:
            return TorchPredictor(path, max_length, threads)
        return OnnxPredictor(onnx_path, directory, max_length, threads)
    if kind == "language-model":
        if onnx_path is None:
            return TorchLanguageModel(path, max_length, threads)
        return OnnxLanguageModel(onnx_path, max_length, threads)
    if onnx_path is None:
        return TorchEmbedder(path, max_length, threads)
    return OnnxEmbedder(onnx_path, max_length, threads)
