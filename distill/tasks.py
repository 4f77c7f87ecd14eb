"""The task interface the engine is shaped around: how a batch is built, what is distilled, how it is scored.

Sequence classification is the one task today; sentence embeddings and causal LMs plug in as new entries of TASKS.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import ModelOutput

from distill.config import Precision
from distill.losses import IGNORE_INDEX

Encoded = dict[str, list[int]]  # one example's token ids, unpadded


class Task(Protocol):
    name: str

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[Encoded]: ...

    def collate(self, tokenizer: PreTrainedTokenizerBase, examples: list[Encoded]) -> dict[str, Tensor]: ...

    def forward(self, model: PreTrainedModel, inputs: dict[str, Tensor], *, internals: bool = False) -> ModelOutput:
        """Run the model; `internals` also returns hidden states and attentions for intermediate losses."""
        ...

    def distilled(self, output: ModelOutput) -> Tensor:
        """The output the KD loss matches: (B, C) logits for classification."""
        ...

    def correct(self, distilled: Tensor, labels: Tensor) -> Tensor:
        """(B,) bool: which labelled examples the model gets right (unlabelled rows are False)."""
        ...


class SequenceClassification:
    name = "sequence-classification"

    def encode(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[Encoded]:
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        return [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]

    def collate(self, tokenizer: PreTrainedTokenizerBase, examples: list[Encoded]) -> dict[str, Tensor]:
        return dict(tokenizer.pad(examples, return_tensors="pt"))  # pads to the longest in the batch

    def forward(self, model: PreTrainedModel, inputs: dict[str, Tensor], *, internals: bool = False) -> ModelOutput:
        return model(**inputs, output_hidden_states=internals, output_attentions=internals)

    def distilled(self, output: ModelOutput) -> Tensor:
        return output.logits

    def correct(self, distilled: Tensor, labels: Tensor) -> Tensor:
        return (distilled.argmax(dim=-1) == labels) & (labels != IGNORE_INDEX)


TASKS: dict[str, Task] = {"sequence-classification": SequenceClassification()}

def autocast(precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 matmuls with fp32 weights (torch autocast): about 2x faster on CPUs with AVX512-BF16/AMX."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    """(N, C) float32 outputs in the original order; the model is put in eval() mode."""
    model.eval()
    out: list[Tensor | None] = [None] * len(encoded)
    for idx in length_sorted_batches(encoded, batch_size):
        with autocast(precision):
            output = task.forward(model, task.collate(tokenizer, [encoded[i] for i in idx]))
        logits = task.distilled(output).float()
        for row, i in enumerate(idx):
            out[i] = logits[row]
    return torch.stack(out) if out else torch.empty(0)
