"""The training loop: fine-tunes a teacher (no teacher given) or distills a student (teacher given).

One loop for both modes: AdamW, linear warmup then decay, gradient clipping, evaluation each epoch, the best model
kept, resumable checkpoints every N steps (model, optimizer, scheduler, step, RNG; the data order is a function of
(seed, epoch), so it needs no state). Progress goes to an event callback; the CLI draws it, the service stores it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from distill import atomic, losses
from distill.config import LossConfig, TrainConfig
from distill.tasks import Encoded, Precision, Task, agreement, autocast, predict_distilled

EventSink = Callable[[str, dict[str, Any]], None]
CHECKPOINT = "checkpoint.pt"
BEST = "best"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not match the run)."""


@dataclass
class Split:
    """Examples as the engine sees them: student token ids, labels (IGNORE_INDEX when unlabelled), and the teacher's
    view: its own token ids (its tokenizer may differ) and/or its cached outputs."""
    student_inputs: list[Encoded]
    labels: Tensor  # (N,) long
    teacher_inputs: list[Encoded] | None = None
    teacher_logits: Tensor | None = None  # (N, C) float32, from the logit cache

    def __len__(self) -> int:
        return len(self.student_inputs)


@dataclass
class Teacher:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    examples_per_second: float = 0.0


def fit(task: Task, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: Split, validation: Split,
        cfg: TrainConfig, *, run_dir: Path, seed: int, teacher: Teacher | None = None,
        loss: LossConfig | None = None, layer_map: list[int] | None = None, resume: bool = False,
        on_event: EventSink | None = None, stage: str = "distill", precision: Precision = "fp32") -> FitResult:
    """Train `model` on `train`, keep the best epoch (validation accuracy) under run_dir/best; return metrics.

    Without `teacher` and without `train.teacher_logits` this is plain fine-tuning (CE on labels).
    """
    emit = on_event or (lambda kind, data: None)
    loss = loss or LossConfig(alpha=1.0)
    intermediate = loss.hidden_mse > 0 or loss.attention_kl > 0
    distilling = teacher is not None or train.teacher_logits is not None
    if intermediate and (teacher is None or train.teacher_inputs is None):
        raise TrainingError("hidden_mse/attention_kl need the teacher at every step (no logit cache)")
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    projection = _projection(model, teacher) if loss.hidden_mse > 0 else None
    trainable = [*model.parameters(), *(projection.parameters() if projection else [])]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    state = {"step": 0, "history": [], "best": None}
    if resume and (run_dir / CHECKPOINT).exists():
        state = _load_checkpoint(run_dir / CHECKPOINT, model, projection, optimizer, scheduler, total_steps)
        emit("resumed", {"stage": stage, "step": state["step"], "total_steps": total_steps})

    if teacher is not None:
        teacher.model.eval()
    step, examples, train_seconds = state["step"], 0, 0.0
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        model.train()
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            started = time.perf_counter()
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist()
            inputs = task.collate(tokenizer, [train.student_inputs[i] for i in idx])
            labels = train.labels[idx]
            with autocast(precision):
                output = task.forward(model, inputs, internals=intermediate)
                student_logits = task.distilled(output)
                value = loss.alpha * losses.hard_ce(student_logits, labels)
                if distilling:
                    teacher_output, teacher_logits = _teacher_view(task, teacher, train, idx, intermediate)
                    value = value + (1 - loss.alpha) * losses.kd_kl(student_logits, teacher_logits, loss.temperature)
                    if loss.hidden_mse > 0:
                        hidden = _hidden_loss(output, teacher_output, inputs, layer_map, projection)
                        value = value + loss.hidden_mse * hidden
                    if loss.attention_kl > 0:
                        value = value + loss.attention_kl * _attention_loss(output, teacher_output, inputs, layer_map)
            if not torch.isfinite(value):
                raise TrainingError(f"{stage}: the loss became {value.item()} at step {step + 1} (epoch {epoch + 1}); "
                                    f"lower train.lr (now {cfg.lr}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            examples += len(idx)
            train_seconds += time.perf_counter() - started
            if step % cfg.checkpoint_every == 0 and b + 1 < steps_per_epoch:  # epoch ends checkpoint after eval
                state.update(step=step)
                _save_checkpoint(run_dir / CHECKPOINT, model, projection, optimizer, scheduler, state, total_steps)
                emit("checkpoint", {"stage": stage, "step": step})
            emit("progress", {"stage": stage, "step": step, "total_steps": total_steps, "epoch": epoch + 1,
                              "loss": value.item(), "lr": scheduler.get_last_lr()[0]})

        metrics = {"epoch": epoch + 1, **evaluate(task, model, tokenizer, validation, precision)}
        state["history"].append(metrics)
        if state["best"] is None or _better(metrics, state["best"]):
            state["best"] = metrics
            _save_model_atomically(model, tokenizer, run_dir / BEST)
        emit("metrics", {"stage": stage, **{f"validation_{k}": v for k, v in metrics.items() if k != "epoch"},
                         "epoch": epoch + 1})
        state.update(step=step)
        _save_checkpoint(run_dir / CHECKPOINT, model, projection, optimizer, scheduler, state, total_steps)

    best = state["best"]
    return FitResult(best_epoch=int(best["epoch"]), best_metrics=best, history=state["history"], steps=step,
                     train_seconds=train_seconds,
                     examples_per_second=examples / train_seconds if train_seconds else 0.0)


def evaluate(task: Task, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: Split,
             precision: Precision = "fp32") -> dict[str, float]:
    """Accuracy on labelled rows, and agreement with the teacher when its outputs are cached for the split."""
    return score(task, predict_distilled(task, model, tokenizer, split.student_inputs, precision=precision), split)


def score(task: Task, outputs: Tensor, split: Split) -> dict[str, float]:
    """The metrics of `evaluate` for outputs (N, C) already computed."""
    labelled = split.labels != losses.IGNORE_INDEX
    metrics = {"accuracy": task.correct(outputs, split.labels).sum().item() / max(int(labelled.sum()), 1)}
    if split.teacher_logits is not None:
        metrics["agreement"] = agreement(outputs, split.teacher_logits)
    return metrics


def _better(new: dict[str, float], old: dict[str, float]) -> bool:
    key = lambda m: (m["accuracy"], m.get("agreement", 0.0))  # noqa: E731 - accuracy first, agreement breaks ties
    return key(new) > key(old)


def _teacher_view(task: Task, teacher: Teacher | None, train: Split, idx: list[int],
                  internals: bool) -> tuple[Any, Tensor]:
    """The teacher's outputs for a batch: from the logit cache when possible, else a frozen forward pass."""
    if train.teacher_logits is not None and not internals:
        return None, train.teacher_logits[idx]
    assert teacher is not None and train.teacher_inputs is not None
    with torch.inference_mode():
        inputs = task.collate(teacher.tokenizer, [train.teacher_inputs[i] for i in idx])
        output = task.forward(teacher.model, inputs, internals=internals)
    return output, task.distilled(output).float()


def _projection(model: PreTrainedModel, teacher: Teacher | None) -> nn.Linear | None:
    """A learned map from student to teacher width (TinyBERT); None when the widths already match."""
    assert teacher is not None
    s, t = model.config.hidden_size, teacher.model.config.hidden_size
    return nn.Linear(s, t) if s != t else None


def _hidden_loss(output: Any, teacher_output: Any, inputs: dict[str, Tensor], layer_map: list[int] | None,
                 projection: nn.Module | None) -> Tensor:
    assert layer_map is not None
    pairs = zip(output.hidden_states[1:], (teacher_output.hidden_states[i] for i in layer_map), strict=True)
    terms = [losses.hidden_mse(s, t, inputs["attention_mask"], projection) for s, t in pairs]
    return torch.stack(terms).mean()


def _attention_loss(output: Any, teacher_output: Any, inputs: dict[str, Tensor], layer_map: list[int] | None) -> Tensor:
    assert layer_map is not None  # attentions[i] belongs to hidden_states[i + 1]
    pairs = zip(output.attentions, (teacher_output.attentions[i - 1] for i in layer_map), strict=True)
    return torch.stack([losses.attention_kl(s, t, inputs["attention_mask"]) for s, t in pairs]).mean()


def _save_checkpoint(path: Path, model: nn.Module, projection: nn.Module | None, optimizer: torch.optim.Optimizer,
                     scheduler: Any, state: dict[str, Any], total_steps: int) -> None:
    payload = {"model": model.state_dict(), "projection": projection.state_dict() if projection else None,
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state,
               "total_steps": total_steps, "rng": torch.get_rng_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def _load_checkpoint(path: Path, model: nn.Module, projection: nn.Module | None, optimizer: torch.optim.Optimizer,
                     scheduler: Any, total_steps: int) -> dict[str, Any]:
    payload = torch.load(path, weights_only=False)
    if payload["total_steps"] != total_steps:
        raise TrainingError(f"{path} was written by a run of {payload['total_steps']} steps, this one has "
                            f"{total_steps}: the config changed; start afresh without --resume")
    model.load_state_dict(payload["model"])
    if projection is not None:
        projection.load_state_dict(payload["projection"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"])
    return payload["state"]


def _save_model_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    staged = atomic.staging(target)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    atomic.replace_dir(staged, target)
