"""The task interface the engine is shaped around: how a batch is built, what is distilled, the objective on the
distilled outputs, how a model is scored and saved.

The engine owns the loop (optimizer, schedule, checkpoints, intermediate-layer losses); a task owns everything that
depends on what the model is for. `JobConfig.task` picks one; `pipeline.run` hands sentence-embedding and
causal-lm jobs to their modules (distill/embedding.py, distill/causal_lm.py), which define theirs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import ModelOutput

from distill import losses
from distill.config import LossConfig, Precision
from distill.losses import IGNORE_INDEX

if TYPE_CHECKING:
    from distill.engine import Split

Encoded = dict[str, list[int]]  # one example's token ids, unpadded


class Task(Protocol):
    name: str
    cache_teacher: bool  # the teacher's distilled outputs are small enough to keep per example (the logit cache)

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[Encoded]: ...

    def collate(self, tokenizer: PreTrainedTokenizerBase, examples: list[Encoded]) -> dict[str, Tensor]: ...

    def forward(self, model: PreTrainedModel, inputs: dict[str, Tensor], *, internals: bool = False) -> ModelOutput:
        """Run the model; `internals` also returns hidden states and attentions for intermediate losses."""
        ...

    def distilled(self, output: ModelOutput, inputs: dict[str, Tensor]) -> Tensor:
        """The output the KD loss matches and the cache keeps: (B, C) logits for classification."""
        ...

    def loss(self, student: Tensor, teacher: Tensor | None, inputs: dict[str, Tensor], labels: Tensor,
             cfg: LossConfig) -> Tensor:
        """The objective on distilled outputs; `teacher` None means plain fine-tuning (no teacher)."""
        ...

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: Split,
                 precision: Precision) -> dict[str, float]:
        """Validation metrics of an epoch (agreement with the teacher when its outputs are cached for the split)."""
        ...

    def better(self, new: dict[str, float], old: dict[str, float]) -> bool:
        """Whether the epoch with metrics `new` beats the best so far."""
        ...

    def save(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
        """Write a loadable model directory (target does not exist yet)."""
        ...


class SequenceClassification:
    name = "sequence-classification"
    cache_teacher = True

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[Encoded]:
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        return [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]

    def collate(self, tokenizer: PreTrainedTokenizerBase, examples: list[Encoded]) -> dict[str, Tensor]:
        return dict(tokenizer.pad(examples, return_tensors="pt"))  # pads to the longest in the batch

    def forward(self, model: PreTrainedModel, inputs: dict[str, Tensor], *, internals: bool = False) -> ModelOutput:
        return model(**inputs, output_hidden_states=internals, output_attentions=internals)

    def distilled(self, output: ModelOutput, inputs: dict[str, Tensor]) -> Tensor:
        return output.logits

    def loss(self, student: Tensor, teacher: Tensor | None, inputs: dict[str, Tensor], labels: Tensor,
             cfg: LossConfig) -> Tensor:
        """alpha·CE(labels) + (1 − alpha)·divergence(teacher, student); CE alone without a teacher."""
        if teacher is None:
            return losses.hard_ce(student, labels)
        return cfg.alpha * losses.hard_ce(student, labels) + (1 - cfg.alpha) * logit_divergence(student, teacher, cfg)

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: Split,
                 precision: Precision) -> dict[str, float]:
        return self.score(predict_distilled(self, model, tokenizer, split.student_inputs, precision=precision), split)

    def score(self, logits: Tensor, split: Split) -> dict[str, float]:
        """Accuracy on labelled rows of (N, C) logits; agreement when the split has the teacher's."""
        labelled = split.labels != IGNORE_INDEX
        correct = (logits.argmax(dim=-1) == split.labels) & labelled
        metrics = {"accuracy": correct.sum().item() / max(int(labelled.sum()), 1)}
        if split.teacher_outputs is not None:
            metrics["agreement"] = agreement(logits, split.teacher_outputs)
        return metrics

    def better(self, new: dict[str, float], old: dict[str, float]) -> bool:
        key = lambda m: (m["accuracy"], m.get("agreement", 0.0))  # noqa: E731 - agreement breaks accuracy ties
        return key(new) > key(old)

    def save(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)


def logit_divergence(student: Tensor, teacher: Tensor, cfg: LossConfig, mask: Tensor | None = None) -> Tensor:
    """The configured divergence (kd_kl, reverse_kl or jsd) between logits (B, C), or (B, L, V) masked by (B, L)."""
    if cfg.divergence == "jsd":
        return losses.jsd(student, teacher, cfg.temperature, mask, beta=cfg.jsd_beta)
    return losses.LOSSES[cfg.divergence](student, teacher, cfg.temperature, mask)


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 matmuls with fp32 weights (torch autocast) on `device`: about 2x faster on CPUs with AVX512-BF16/AMX."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_is_slow(device: torch.device) -> bool:
    """Whether bf16 autocast on `device` falls back to reference kernels: a CPU without the bf16 instructions oneDNN
    needs (AVX512 and up). There a 512×768 @ 768×768 matmul measured 60× slower than in fp32 (an AVX2-only EPYC)."""
    return device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fast_precision(device: torch.device) -> Precision:
    """bf16 where its kernels are fast on `device`, fp32 where autocast would fall back to reference code."""
    return "fp32" if bf16_is_slow(device) else "bf16"


def on_device(inputs: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A collated batch moved to `device` (collate builds it on the CPU)."""
    return {key: value.to(device) for key, value in inputs.items()}


def agreement(student: Tensor, teacher: Tensor) -> float:
    """Fraction of rows where the student's top class is the teacher's. (N, C) × (N, C)."""
    return (student.argmax(dim=-1) == teacher.argmax(dim=-1)).float().mean().item()


def length_sorted_batches(encoded: list[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar length: inference-only passes pad far less (reviews range 1–60 tokens)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def predict_distilled(task: Task, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      encoded: list[Encoded], batch_size: int = 64, precision: Precision = "fp32") -> Tensor:
    """(N, ...) float32 distilled outputs in the original order, on the CPU; the model is put in eval() mode."""
    model.eval()
    out: list[Tensor | None] = [None] * len(encoded)
    for idx in length_sorted_batches(encoded, batch_size):
        inputs = on_device(task.collate(tokenizer, [encoded[i] for i in idx]), model.device)
        with autocast(precision, model.device):
            logits = task.distilled(task.forward(model, inputs), inputs).float()
        for row, i in enumerate(idx):
            out[i] = logits[row].cpu()  # scores and the teacher-output cache live on the CPU, wherever the model ran
    return torch.stack(out) if out else torch.empty(0)
