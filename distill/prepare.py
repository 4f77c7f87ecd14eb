"""Teacher preparation: give a pretrained encoder a task head and fine-tune it, cached by what determines the result.

Stage 1 trains only the head on frozen-encoder features computed once (seconds, not an epoch of the encoder).
Stage 2 (optional) unfreezes everything at a lower learning rate through the engine's fine-tune mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from distill import atomic, distributed
from distill.config import JobConfig, TrainConfig
from distill.engine import BEST, EventSink, Split, fit
from distill.student import label_settings
from distill.tasks import Encoded, Precision, Task, autocast, length_sorted_batches, on_device
from teachers.registry import TeacherNotFound, distill_home, local_dir

HEAD_FILE = "head.pt"  # the trained head, kept in the job's scratch until the preparation is done


@dataclass
class PreparedTeacher:
    path: Path
    cached: bool
    summary: dict[str, Any]  # how it was prepared: stages run, their validation accuracy


def _bert_head(model: PreTrainedModel, cls: Tensor) -> Tensor:
    return model.classifier(model.dropout(model.bert.pooler(cls[:, None, :])))


def _sequence_head(model: PreTrainedModel, cls: Tensor) -> Tensor:
    return model.classifier(cls[:, None, :])  # *ClassificationHead reads features[:, 0]


# How each architecture's sequence-classification head turns the first token's final hidden state into logits.
HEADS: dict[str, Callable[[PreTrainedModel, Tensor], Tensor]] = {
    "bert": _bert_head, "mpnet": _sequence_head, "roberta": _sequence_head, "xlm-roberta": _sequence_head,
}


def prepare_teacher(config: JobConfig, teacher_dir: str, labels: list[str], task: Task,
                    train: Split, validation: Split, on_event: EventSink | None = None, *,
                    resume: bool = False) -> PreparedTeacher:
    """An HF directory holding `teacher_dir` with a head for `labels`, fine-tuned on `train`. `train`/`validation`
    carry the teacher's own token ids (student_inputs of these splits are the teacher's). With `resume`, an
    interrupted preparation of the same job continues: its trained head and fine-tuning checkpoint are kept."""
    emit = on_event or (lambda kind, data: None)
    if _has_head_for(teacher_dir, labels):
        return PreparedTeacher(Path(teacher_dir), cached=True, summary={"stages": [], "note": "already has the head"})
    key = _cache_key(config, teacher_dir, labels, train, validation)
    target = distill_home() / "prepared" / key
    # Rank 0's answer for every rank: a job publishing this key meanwhile could make ranks disagree, and the ones
    # preparing would wait at the barriers below for those that returned.
    if distributed.broadcast((target / "prepared.json").exists() if distributed.is_main() else None):
        emit("log", {"message": f"reusing the prepared teacher {target}"})
        if distributed.is_main():
            _sweep_staged(target)
        return PreparedTeacher(target, cached=True, summary=json.loads((target / "prepared.json").read_text()))

    tc = config.teacher
    torch.manual_seed(preparation_seed(config))
    model = AutoModelForSequenceClassification.from_pretrained(
        teacher_dir, **label_settings(AutoConfig.from_pretrained(teacher_dir), labels)).to(distributed.device())
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    stages: list[dict[str, Any]] = []
    # The job's own scratch directory (two jobs may prepare one teacher at once); under torchrun every rank
    # prepares the teacher (the fine-tuning is data-parallel) and rank 0 alone writes.
    work = Path(config.output_dir or target.parent) / "teacher-preparation.tmp"
    marker = work / "preparing"  # resumed only for the same key
    if distributed.is_main() and not (resume and marker.exists() and marker.read_text() == key):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        marker.write_text(key)
    distributed.barrier()
    head = HEADS.get(model.config.model_type)
    trained_head = work / HEAD_FILE
    saved_head = _read_head(trained_head, emit) if tc.head_epochs and head is not None else None
    distributed.barrier()  # every rank has read it before this run's rank 0 writes it
    encoder = {id(p) for p in model.base_model.parameters()}
    head_params = [p for p in model.parameters() if id(p) not in encoder]
    if tc.head_epochs and head is None:
        emit("log", {"message": f"no frozen-feature head stage for model_type {model.config.model_type!r}; "
                                f"known: {sorted(HEADS)}. Fine-tuning the whole model instead"})
    if saved_head is not None:
        with torch.no_grad():
            for p, value in zip(head_params, saved_head["params"], strict=True):
                p.copy_(value)
        stages.append(saved_head["stage"])
        emit("log", {"message": f"reusing the head trained before the interruption ({trained_head})"})
    elif tc.head_epochs and head is not None:
        emit("stage", {"stage": "teacher-head", "detail": "head on frozen features"})
        features = _first_token_features(task, model, tokenizer, {"train": train.student_inputs,
                                                                  "validation": validation.student_inputs},
                                         tc.batch_size * 2, config.precision, emit)
        accuracy = _train_head(model, head_params, head, features, train.labels.to(model.device),
                               validation.labels.to(model.device), tc.head_epochs, tc.head_lr,
                               tc.batch_size, emit)
        stages.append({"stage": "head", "epochs": tc.head_epochs, "validation_accuracy": accuracy})
        if distributed.is_main():
            atomic.save_torch({"params": [p.detach().cpu() for p in head_params], "stage": stages[-1]}, trained_head)
    if tc.finetune_epochs or head is None:
        emit("stage", {"stage": "teacher-finetune", "detail": "whole teacher unfrozen"})
        cfg = TrainConfig(epochs=max(tc.finetune_epochs, 1), batch_size=tc.batch_size, lr=tc.finetune_lr)
        result = fit(task, model, tokenizer, train, validation, cfg, run_dir=work, seed=preparation_seed(config),
                     resume=resume, on_event=on_event, stage="teacher-finetune", precision=config.precision)
        model = AutoModelForSequenceClassification.from_pretrained(work / BEST)
        stages.append({"stage": "finetune", "epochs": cfg.epochs, "best_epoch": result.best_epoch,
                       "validation_accuracy": result.best_metrics["accuracy"]})
    summary = {"teacher": teacher_dir, "labels": labels, "stages": stages}
    if distributed.is_main():
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        (work / "model" / "prepared.json").write_text(json.dumps(summary, indent=2))
        _publish(work / "model", target)
    # Every rank has loaded work/best/ above before rank 0 removes it (a slow rank once found it gone), and the
    # prepared teacher is in place for the other ranks.
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(work, ignore_errors=True)
    return PreparedTeacher(target, cached=False, summary=summary)


@torch.inference_mode()
def _first_token_features(task: Task, model: PreTrainedModel, tokenizer: Any, splits: dict[str, list[Encoded]],
                          batch_size: int, precision: Precision, emit: EventSink) -> dict[str, Tensor]:
    """Per split, (N, H) final hidden state of the first token, the input of every HF sequence-classification head;
    on the model's device. The teacher's pass over the training set takes minutes on a CPU: progress events count
    examples, as the teacher-output pass does."""
    model.eval()
    total, done = sum(len(encoded) for encoded in splits.values()), 0
    features = {}
    for name, encoded in splits.items():
        out = torch.empty(len(encoded), model.config.hidden_size, device=model.device)
        for idx in length_sorted_batches(encoded, batch_size):
            inputs = on_device(task.collate(tokenizer, [encoded[i] for i in idx]), model.device)
            with autocast(precision, model.device):
                hidden = model.base_model(**inputs).last_hidden_state
            out[idx] = hidden[:, 0]  # (B, H)
            done += len(idx)
            emit("progress", {"stage": "teacher-head", "step": done, "total_steps": total})
        features[name] = out
    return features


def _train_head(model: PreTrainedModel, params: list[nn.Parameter], head: Callable[[PreTrainedModel, Tensor], Tensor],
                features: dict[str, Tensor], train_labels: Tensor, validation_labels: Tensor, epochs: int, lr: float,
                batch_size: int, emit: EventSink) -> float:
    """Train `params` (the head: everything outside the base model) only; return the best validation accuracy."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_labels)).to(train_labels.device)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(head(model, features["train"][idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            accuracy = (head(model, features["validation"]).argmax(-1) == validation_labels).float().mean().item()
        emit("metrics", {"stage": "teacher-head", "epoch": epoch + 1, "validation_accuracy": accuracy})
        if accuracy > best:
            best, best_state = accuracy, {id(p): p.detach().clone() for p in params}
    with torch.no_grad():
        for p in params:
            p.copy_(best_state[id(p)])
    return best


def _has_head_for(teacher_dir: str, labels: list[str]) -> bool:
    config = AutoConfig.from_pretrained(teacher_dir)
    has_head = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    return has_head and [config.id2label[i] for i in range(len(config.id2label))] == labels


def preparation_seed(config: JobConfig) -> int:
    return config.seed if config.teacher.seed is None else config.teacher.seed


def update_with_files(digest: Any, model: str | Path) -> None:
    """Feed a model's files as they are now into a hashlib `digest`: name, size, modification time. Cheap (no
    weights are read), and it changes when a model is saved again at the same path. A hub id feeds the revision
    its hub cache holds (teachers.registry.local_dir's snapshot, named by its commit), not the files, which arrive
    as they are loaded: another revision fetched is another model; one never fetched feeds nothing."""
    try:
        root = local_dir(str(model))
    except TeacherNotFound:
        return
    if not Path(model).is_absolute():  # a hub id (resolve_teacher gives local directories absolute)
        digest.update(f"revision {root.name}".encode())
        return
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())


def _cache_key(config: JobConfig, teacher_dir: str, labels: list[str], train: Split, validation: Split) -> str:
    """Everything the prepared weights depend on: teacher (its files as they are now: one retrained in place at its
    path is another teacher), training data, labels, settings, seed, and the validation split, which picks the best
    head and fine-tuning epoch. The settings count without `seed`, which counts as the seed used (the job's own or
    `teacher.seed`): jobs of other seeds share a teacher prepared with one."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"teacher": str(teacher_dir), "labels": labels,
                              "settings": config.teacher.model_dump(exclude={"seed"}),
                              "max_length": config.data.max_length, "seed": preparation_seed(config),
                              "precision": config.precision}, sort_keys=True).encode())
    update_with_files(digest, teacher_dir)
    train.update_digest(digest)
    validation.update_digest(digest)
    name = Path(str(teacher_dir)).name or "teacher"
    return f"{name}-{digest.hexdigest()[:16]}"


def _read_head(path: Path, emit: EventSink) -> dict[str, Any] | None:
    """The head an interrupted preparation trained, or None: none was saved, or a crash left the file unreadable,
    and then the head is trained again."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - an empty or cut file reads as EOFError, UnpicklingError, RuntimeError, ...
        emit("log", {"message": f"{path} cannot be read ({type(e).__name__}: {e}); training the head again"})
        return None


def _publish(model_dir: Path, target: Path) -> None:
    """Move a prepared teacher to its key. Only a complete directory ever appears there, and one there is never
    replaced (jobs may be using it; another with the same key has the same weights). The move is staged beside the
    target: the job's directory may be on another filesystem, where a rename cannot reach."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        shutil.move(model_dir, staged)
        os.replace(staged, target)
    except OSError:  # shutil.Error too
        if not (target / "prepared.json").exists():
            raise
        # another job prepared the same teacher meanwhile: theirs stays (and it may have swept our staging away)
    _sweep_staged(target)


def _sweep_staged(target: Path) -> None:
    """Remove what a crash between staging and renaming left beside `target` (a whole teacher's size). Once the
    prepared teacher is in place, any staging of the same key is redundant: a job still moving one finds the
    target there and keeps it."""
    for staged in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(staged, ignore_errors=True)
