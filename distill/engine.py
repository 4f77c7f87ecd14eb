"""The training loop: fine-tunes a teacher (no teacher given) or distills a student (teacher given).

One loop for both modes: AdamW, linear warmup then decay, gradient clipping, evaluation each epoch (of an exponential
moving average of the weights when `train.ema_decay` is set), the best epoch kept, resumable checkpoints every N steps
(model, its average, optimizer, scheduler, step, RNG; the data order is a function of (seed, epoch), so it needs no
state; with `train.group_by_length` batches group texts of similar length).
Progress goes to an event callback; the CLI draws it, the service stores it.

Under torchrun (distill/distributed.py) the same loop is data-parallel: every rank walks the same global batches and
trains on its slice of each, DistributedDataParallel averages the gradients, and rank 0 alone writes files and emits
events. `train.batch_size` is the global batch either way, so N processes take the same steps as one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup
from transformers.trainer_pt_utils import get_length_grouped_indices

from distill import atomic, distributed, losses
from distill.config import LossConfig, TrainConfig
from distill.tasks import Encoded, Precision, Task, autocast, on_device

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
    teacher_outputs: Tensor | None = None  # (N, ...) float32 distilled outputs, from the teacher-output cache

    def __len__(self) -> int:
        return len(self.student_inputs)

    def update_digest(self, digest: Any) -> None:
        """Feed the student token ids and labels into a hashlib `digest` (cache keys and checkpoints tell splits
        apart by them)."""
        for example, label in zip(self.student_inputs, self.labels.tolist(), strict=True):
            digest.update(json.dumps([example["input_ids"], label]).encode())


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
    train_seconds: float = 0.0  # in training steps, over every process of a resumed run
    examples_per_second: float = 0.0  # over those steps; 0 when none were timed


def fit(task: Task, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: Split, validation: Split,
        cfg: TrainConfig, *, run_dir: Path, seed: int, teacher: Teacher | None = None,
        loss: LossConfig | None = None, layer_map: list[int] | None = None, resume: bool = False,
        on_event: EventSink | None = None, stage: str = "distill", precision: Precision = "fp32",
        identity: dict[str, Any] | None = None) -> FitResult:
    """Train `model` on `train`, keep the best epoch (validation accuracy) under run_dir/best; return metrics.

    Without `teacher` and without `train.teacher_outputs` this is plain fine-tuning (the task's loss on labels).
    `identity`: flat settings outside fit's own arguments that make the run this run (a job's teacher and student
    specs); `resume` continues a checkpoint only when they, the training settings and the data are the same.
    """
    emit = on_event if on_event is not None and distributed.is_main() else _ignore  # rank 0 speaks for all
    loss = loss or LossConfig(alpha=1.0)
    intermediate = loss.intermediate
    distilling = teacher is not None or train.teacher_outputs is not None
    if intermediate and (teacher is None or train.teacher_inputs is None):
        raise TrainingError("hidden_mse/attention_kl/value_kl need the teacher at every step (no output cache)")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    device = distributed.device()
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout, device)
    model.to(device)
    projection = _projection(model, teacher) if loss.hidden_mse > 0 else None
    if projection is not None:
        projection.to(device)
    trainable = [*model.parameters(), *(projection.parameters() if projection else [])]
    # fused: one kernel over all parameters; the default per-tensor loop costs ~10x more per step on CPU
    # (54 ms vs 5 ms for a 3-layer MiniLM, most of it the 11.7M-parameter embedding table).
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    # The weights evaluated and kept: an exponential moving average of the trained ones when train.ema_decay is set
    # (every rank averages the same weights, so all keep the same average).
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay else None
    kept = averaged.module if averaged is not None else model
    if distributed.active():
        torch.manual_seed(seed + distributed.rank())  # each rank its own dropout masks (the checkpoint keeps each)
    state = {"step": 0, "history": [], "best": None, "examples": 0, "train_seconds": 0.0}
    run = _run_settings(cfg, seed, loss, train, validation, total_steps) | {"precision": precision, **(identity or {})}
    if resume and (payload := _read_checkpoint(run_dir / CHECKPOINT, emit)) is not None:
        state = {**state, **_restore(run_dir / CHECKPOINT, payload, model, projection, averaged, optimizer,
                                     scheduler, run)}
        emit("resumed", {"stage": stage, "step": state["step"], "total_steps": total_steps})
        if distributed.is_main():  # best/ as the checkpoint knows it, should a crash have come mid-swap
            atomic.restore_replaced(run_dir / BEST)
    net = _data_parallel(model, projection, device) if distributed.active() else model

    if teacher is not None:
        teacher.model.eval().to(device)
    final_norm = _final_norm(teacher.model) if teacher is not None and loss.hidden_mse > 0 else None
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    values = ((_capture_values(model, hooks), _capture_values(teacher.model, hooks))
              if teacher and loss.value_kl > 0 else None)
    step, examples, train_seconds = state["step"], state["examples"], state["train_seconds"]
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        order = epoch_order(train, cfg.batch_size, seed, epoch, cfg.group_by_length)
        net.train()
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            started = time.perf_counter()
            batch = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            idx, share = _shard(batch)
            inputs = on_device(task.collate(tokenizer, [train.student_inputs[i] for i in idx]), device)
            labels = train.labels[idx].to(device)
            with autocast(precision, device), distributed.standing_in(share == 0):
                output = task.forward(net, inputs, internals=intermediate)
                teacher_output, teacher_distilled = (_teacher_view(task, teacher, train, idx, intermediate, device)
                                                     if distilling else (None, None))
                value = task.loss(task.distilled(output, inputs), teacher_distilled, inputs, labels, loss)
                if distilling:
                    if loss.hidden_mse > 0:
                        hidden = _hidden_loss(output, teacher_output, inputs, layer_map, projection, final_norm)
                        value = value + loss.hidden_mse * hidden
                    if loss.attention_kl > 0:
                        value = value + loss.attention_kl * _attention_loss(output, teacher_output, inputs, layer_map)
                    if values is not None:
                        value = value + loss.value_kl * _value_loss(*values, inputs, layer_map)
            batch_loss = distributed.sum_across(value * share)  # the global batch's mean loss, the same on every rank
            if not torch.isfinite(batch_loss):
                raise TrainingError(f"{stage}: the loss became {batch_loss.item()} at step {step + 1} (epoch "
                                    f"{epoch + 1}); lower train.lr (now {cfg.lr}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients; scaled by its share x world size, each rank's slice weighs what its
            # examples weigh in the global batch's mean, also when the slices differ in size.
            (value * (share * distributed.world_size())).backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
            step += 1
            examples += len(batch)
            if device.type == "cuda":  # the backward pass and the update are only queued until the GPU is waited on
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - started
            if step % cfg.checkpoint_every == 0 and b + 1 < steps_per_epoch:  # epoch ends checkpoint after eval
                state.update(step=step, examples=examples, train_seconds=train_seconds)
                _save_checkpoint(run_dir / CHECKPOINT, model, projection, averaged, optimizer, scheduler, state, run)
                emit("checkpoint", {"stage": stage, "step": step})
            emit("progress", {"stage": stage, "step": step, "total_steps": total_steps, "epoch": epoch + 1,
                              "loss": batch_loss.item(), "lr": scheduler.get_last_lr()[0]})

        # Every rank evaluates the same weights on the same split, so all agree on the best epoch without a message.
        metrics = {"epoch": epoch + 1, **task.evaluate(kept, tokenizer, validation, precision)}
        if averaged is not None:  # what the averaging is worth, epoch by epoch
            metrics |= {f"unaveraged_{k}": v for k, v in task.evaluate(model, tokenizer, validation, precision).items()}
        state["history"].append(metrics)
        if state["best"] is None or task.better(metrics, state["best"]):
            state["best"] = metrics
            if distributed.is_main():
                with atomic.building(run_dir / BEST) as staged:
                    task.save(kept, tokenizer, staged)
        emit("metrics", {"stage": stage, **{f"validation_{k}": v for k, v in metrics.items() if k != "epoch"},
                         "epoch": epoch + 1})
        state.update(step=step, examples=examples, train_seconds=train_seconds)
        _save_checkpoint(run_dir / CHECKPOINT, model, projection, averaged, optimizer, scheduler, state, run)

    for hook in hooks:
        hook.remove()
    distributed.barrier()  # every rank returns once rank 0 has written best/ and the last checkpoint
    best = state["best"]
    return FitResult(best_epoch=int(best["epoch"]), best_metrics=best, history=state["history"], steps=step,
                     train_seconds=train_seconds,
                     examples_per_second=examples / train_seconds if train_seconds else 0.0)


def epoch_order(train: Split, batch_size: int, seed: int, epoch: int, grouped: bool) -> list[int]:
    """The epoch's example order, a function of (seed, epoch) alone: shuffled, or `grouped`: shuffled, sorted by
    length within groups of 50 batches (transformers' LengthGroupedSampler) so that each batch pads little and
    still meets other texts every epoch, and then the batches shuffled (without that, each group runs from its
    longest texts to its shortest: causal LMs and sentence embeddings trained worse)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if not grouped:
        return torch.randperm(len(train), generator=generator).tolist()
    lengths = [len(example["input_ids"]) for example in train.student_inputs]
    order = get_length_grouped_indices(lengths, batch_size, generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    full = len(order) // batch_size  # a short last batch stays last, or every batch after it would straddle two
    shuffled = torch.randperm(full, generator=generator).tolist() + list(range(full, len(batches)))
    return [i for b in shuffled for i in batches[b]]


def set_dropout(model: nn.Module, p: float, device: torch.device) -> None:
    """Every nn.Dropout of `model` drops with probability p (transformers' attention functions read their p too).

    Without dropout, CPU training also switches SDPA to eager attention: with no dropout SDPA takes its fused CPU
    kernel, whose backward is slower at these lengths (`bench/train_step.py` times the three cases).
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif (isinstance(module, PreTrainedModel) and p == 0 and device.type == "cpu"
              and module.config._attn_implementation == "sdpa"):
            module.set_attn_implementation("eager")


def _ignore(kind: str, data: dict[str, Any]) -> None:
    """The event sink of ranks other than 0."""


class _Trained(nn.Module):
    """The student and the modules only its loss uses (the hidden-state projection) as one module for DDP, which
    averages the gradients of every parameter it holds, used inside forward() or after it."""

    def __init__(self, model: PreTrainedModel, projection: nn.Module | None) -> None:
        super().__init__()
        self.model, self.projection = model, projection

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def _data_parallel(model: PreTrainedModel, projection: nn.Module | None, device: torch.device) -> nn.Module:
    # Buffers are synced once, here (with rank 0's parameters), not before every forward: the encoders' buffers are
    # constants (position ids), so a broadcast per step would buy nothing.
    return DistributedDataParallel(_Trained(model, projection), forward_sync_buffers=False,
                                   device_ids=[device.index] if device.type == "cuda" else None)


def _shard(batch: list[int]) -> tuple[list[int], float]:
    """This rank's examples of a global batch and their share of it (all of it, 1.0, in a single process).

    A rank left without examples (a last batch smaller than the world) runs one example with share 0: DDP needs
    every rank in every backward pass, and a zero weight keeps that example out of the gradient (and
    `distributed.standing_in` keeps it out of in-batch losses, which read every rank's rows).
    """
    own = batch[distributed.rank()::distributed.world_size()]
    return (own, len(own) / len(batch)) if own else (batch[:1], 0.0)


def _teacher_view(task: Task, teacher: Teacher | None, train: Split, idx: list[int], internals: bool,
                  device: torch.device) -> tuple[Any, Tensor]:
    """The teacher's outputs for a batch: from the logit cache when possible, else a frozen forward pass."""
    if train.teacher_outputs is not None and not internals:
        return None, train.teacher_outputs[idx].to(device)
    assert teacher is not None and train.teacher_inputs is not None
    # no_grad, not inference_mode: the losses may save the teacher's tensors for backward (MSE keeps its target),
    # which autograd refuses for inference tensors.
    with torch.no_grad():
        inputs = on_device(task.collate(teacher.tokenizer, [train.teacher_inputs[i] for i in idx]), device)
        output = task.forward(teacher.model, inputs, internals=internals)
    return output, task.distilled(output, inputs).float()


def _projection(model: PreTrainedModel, teacher: Teacher | None) -> nn.Linear | None:
    """A learned map from student to teacher width (TinyBERT); None when the widths already match."""
    assert teacher is not None
    s, t = model.config.hidden_size, teacher.model.config.hidden_size
    return nn.Linear(s, t) if s != t else None


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The norm a pre-LN decoder applies to its last hidden state alone (GPT-2's `ln_f`, Llama's `norm`), or None:
    an encoder's layers each end in their own norm."""
    base = getattr(model, "base_model", model)  # a sentence encoder wraps its transformer and has none
    found = (getattr(base, name, None) for name in ("ln_f", "norm", "final_layer_norm"))
    return next((module for module in found if isinstance(module, nn.Module)), None)


def _hidden_loss(output: Any, teacher_output: Any, inputs: dict[str, Tensor], layer_map: list[int] | None,
                 projection: nn.Module | None, final_norm: nn.Module | None) -> Tensor:
    """hidden_mse over the mapped layers. In a pre-LN decoder the student's last state has been through its final
    norm and a teacher block's mid-stack output has not: the teacher's final norm is applied to it too (without
    it, a student that copies the teacher's blocks exactly was pulled away from the last one)."""
    assert layer_map is not None
    targets = [teacher_output.hidden_states[i] for i in layer_map]
    if final_norm is not None and layer_map[-1] != len(teacher_output.hidden_states) - 1:
        with torch.no_grad():
            targets[-1] = final_norm(targets[-1])
    pairs = zip(output.hidden_states[1:], targets, strict=True)
    terms = [losses.hidden_mse(s, t, inputs["attention_mask"], projection) for s, t in pairs]
    return torch.stack(terms).mean()


def _attention_loss(output: Any, teacher_output: Any, inputs: dict[str, Tensor], layer_map: list[int] | None) -> Tensor:
    assert layer_map is not None  # attentions[i] belongs to hidden_states[i + 1]
    pairs = zip(output.attentions, (teacher_output.attentions[i - 1] for i in layer_map), strict=True)
    return torch.stack([losses.attention_kl(s, t, inputs["attention_mask"]) for s, t in pairs]).mean()


# Each architecture's value projection inside self-attention, whose output is V for value_relation_kl: BERT/RoBERTa,
# MPNet, Llama-style decoders (Mistral, Qwen2; V has their key-value heads), and GPT-2's c_attn, which computes Q, K
# and V in one matmul (V is its last third).
VALUE_PROJECTIONS = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\."
                               r"(?:attention\.self\.value|attention\.attn\.v|self_attn\.v_proj|attn\.c_attn)$")
FUSED_QKV = "c_attn"


def value_projections(model: nn.Module) -> list[tuple[int, nn.Module, bool]]:
    """(layer index, value projection, whether its output is Q, K and V together) of each self-attention layer; none
    for an architecture not in VALUE_PROJECTIONS, and none unless exactly one per layer is found: an encoder-decoder
    (BART) or two towers (CLIP) name two stacks alike, and GPT-BigCode's c_attn is not GPT-2's three equal thirds."""
    found = [(int(m.group(1)), module, name.endswith(FUSED_QKV)) for name, module in model.named_modules()
             if (m := VALUE_PROJECTIONS.search(name))]
    if sorted(layer for layer, _, _ in found) != list(range(model.config.num_hidden_layers)):
        return []
    if any(fused for _, _, fused in found) and model.config.model_type != "gpt2":
        return []
    return found


def _capture_values(model: nn.Module, hooks: list[torch.utils.hooks.RemovableHandle]) -> dict[int, Tensor]:
    """Hooks (appended to `hooks`) that keep each layer's latest value vectors, (B, heads, L, d) by layer index."""
    config, captured = model.config, {}
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # grouped-query: V's own
    found = value_projections(model)
    if not found:
        raise TrainingError(f"loss.value_kl: cannot find the value projections of {type(model).__name__}; supported "
                            f"are BERT-, RoBERTa-, MPNet-, GPT-2- and Llama-style models")

    def keep(layer: int, fused: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            if fused:
                out = out.chunk(3, dim=-1)[2]  # (B, L, 3E) → V (B, L, E)
            b, length, width = out.shape
            captured[layer] = out.view(b, length, heads, width // heads).transpose(1, 2)  # (B, heads, L, d)
        return hook

    hooks += [module.register_forward_hook(keep(layer, fused)) for layer, module, fused in found]
    return captured


def _value_loss(student_values: dict[int, Tensor], teacher_values: dict[int, Tensor], inputs: dict[str, Tensor],
                layer_map: list[int] | None) -> Tensor:
    assert layer_map is not None  # hidden-state index i is the output of layer i - 1
    terms = [losses.value_relation_kl(student_values[j], teacher_values[i - 1], inputs["attention_mask"])
             for j, i in enumerate(layer_map)]
    return torch.stack(terms).mean()


def _run_settings(cfg: TrainConfig, seed: int, loss: LossConfig, train: Split, validation: Split,
                  total_steps: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint to continue it exactly (flat keys, so
    a refusal can name them): the training settings but checkpoint_every, the seed, the loss, the training data,
    and the validation data (the best epoch so far was chosen on it)."""
    digests = {}
    for name, split in (("training data", train), ("validation data", validation)):
        digest = hashlib.sha256()
        split.update_digest(digest)
        digests[name] = digest.hexdigest()[:16]
    return {"total_steps": total_steps, **digests, **config_settings(cfg, seed, loss)}


def config_settings(cfg: TrainConfig, seed: int, loss: LossConfig) -> dict[str, Any]:
    """The run settings a config gives alone (no data): the seed, the training settings but checkpoint_every, the
    loss."""
    return {"seed": seed,
            **{f"train.{k}": v for k, v in cfg.model_dump(mode="json", exclude={"checkpoint_every"}).items()},
            **{f"loss.{k}": v for k, v in loss.model_dump(mode="json").items()}}


def check_resumable(path: Path, settings: dict[str, Any]) -> None:
    """TrainingError when the checkpoint at `path` was written with other values of `settings` (some of the run
    settings fit compares, those a job's config gives), for a job to refuse --resume of another run before its
    first stage: the teacher's outputs for the other settings would replace the saved ones first. No checkpoint,
    or an unreadable one, passes: fit deals with it."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)["run"]
    except Exception:  # noqa: BLE001 - absent, cut or older: fit reads it again and says so
        return
    _refuse_other_run(path, saved, {key: value for key, value in settings.items() if key in saved})


def _refuse_other_run(path: Path, saved: dict[str, Any], run: dict[str, Any]) -> None:
    """TrainingError naming each of `run`'s settings that `saved` (the checkpoint's) has otherwise."""
    changed = [(f"the {key} differ" if key.endswith((" data", " files")) else f"{key}: {saved[key]!r} then, "
                f"{run.get(key)!r} now") for key in run if saved.get(key) != run.get(key)]
    if changed:
        raise TrainingError(f"{path} was written by another run ({'; '.join(changed)}); --resume continues the same "
                            f"run only: restore those settings, or start over (--overwrite instead of --resume, or "
                            f"another output directory)")


def _save_checkpoint(path: Path, model: nn.Module, projection: nn.Module | None, averaged: AveragedModel | None,
                     optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
                     run: dict[str, Any]) -> None:
    """Called on every rank (each one's dropout RNG goes in: the CPU's, and the GPU's when it trains on one);
    rank 0 writes."""
    device = distributed.device()
    rng = distributed.gather(torch.get_rng_state())
    cuda_rng = distributed.gather(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    if not distributed.is_main():
        return
    payload = {"model": model.state_dict(), "projection": projection.state_dict() if projection else None,
               "averaged": averaged.state_dict() if averaged else None,
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state,
               "run": run, "rng": rng, "cuda_rng": cuda_rng}
    atomic.save_torch(payload, path)


def _read_checkpoint(path: Path, emit: EventSink) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None: there is none, or a crash left it unreadable (renamed into place
    before it reached the disk), and then the stage starts afresh, which is all that can be continued."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # the RNG states must stay on the CPU
    except Exception as e:  # noqa: BLE001 - an empty or cut file reads as EOFError, UnpicklingError, RuntimeError, ...
        emit("log", {"message": f"{path} cannot be read ({type(e).__name__}: {e}); this stage starts afresh"})
        return None


def _restore(path: Path, payload: dict[str, Any], model: nn.Module, projection: nn.Module | None,
             averaged: AveragedModel | None, optimizer: torch.optim.Optimizer, scheduler: Any,
             run: dict[str, Any]) -> dict[str, Any]:
    saved = payload.get("run", {"total_steps": payload.get("total_steps")})  # older checkpoints kept the steps only
    _refuse_other_run(path, saved, {key: run.get(key) for key in saved})
    model.load_state_dict(payload["model"])
    if projection is not None:
        projection.load_state_dict(payload["projection"])
    if averaged is not None:
        if payload.get("averaged") is None:  # a checkpoint older than train.ema_decay
            raise TrainingError(f"{path} holds no averaged weights; start over (--overwrite instead of --resume)")
        averaged.load_state_dict(payload["averaged"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    rng, cuda_rng = payload["rng"], payload.get("cuda_rng")  # one per rank; resumed with another world size (or
    torch.set_rng_state(rng[distributed.rank() % len(rng)])  # on another device), dropout cannot continue exactly
    device = distributed.device()
    if cuda_rng and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng[distributed.rank() % len(cuda_rng)], device)
    return payload["state"]
