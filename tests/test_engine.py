"""The training loop on tiny seeded models: resume exactness, the logit cache, failure on a non-finite loss."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
)

from distill.config import LossConfig, TrainConfig
from distill.engine import (
    BEST,
    CHECKPOINT,
    VALUE_PROJECTIONS,
    Split,
    Teacher,
    TrainingError,
    _capture_values,
    _value_loss,
    epoch_order,
    fit,
    set_dropout,
)
from distill.tasks import SequenceClassification, predict_distilled
from tests.conftest import synthetic_rows, write_tiny_tokenizer

TASK = SequenceClassification()


def _classifier(tokenizer_len: int, seed: int, layers: int = 2, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer_len, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=hidden * 2, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config)


@pytest.fixture
def setup(tmp_path: Path):
    tokenizer = write_tiny_tokenizer(tmp_path / "tok")
    rows = synthetic_rows(96, seed=3)
    encoded = TASK.encode(tokenizer, [t for t, _ in rows], 16)
    labels = torch.tensor([int(label == "positive") for _, label in rows])
    teacher = Teacher(_classifier(len(tokenizer), seed=7).eval(), tokenizer)
    train = Split(encoded[:64], labels[:64], teacher_inputs=encoded[:64])
    validation = Split(encoded[64:], labels[64:], teacher_inputs=encoded[64:])
    validation.teacher_outputs = predict_distilled(TASK, teacher.model, tokenizer, validation.teacher_inputs)
    return tokenizer, teacher, train, validation


def _weights(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter, flattened, on the CPU (fit leaves the model where it trained)."""
    return torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()


CFG = TrainConfig(epochs=2, batch_size=8, lr=1e-3, checkpoint_every=3)


@pytest.mark.parametrize(("grouped", "ema_decay"), [(False, None), (True, None), (False, 0.9)])
def test_resume_equals_uninterrupted(setup, tmp_path: Path, grouped: bool, ema_decay: float | None) -> None:
    tokenizer, teacher, train, validation = setup
    if grouped:  # lengths 1..12, so that grouping reorders: the resumed run rebuilds the order from (seed, epoch)
        train.student_inputs = [{key: ids[:1 + i % 12] for key, ids in example.items()}
                                for i, example in enumerate(train.student_inputs)]
    cfg = CFG.model_copy(update={"group_by_length": grouped, "ema_decay": ema_decay})
    uninterrupted = _classifier(len(tokenizer), seed=1)
    fit(TASK, uninterrupted, tokenizer, train, validation, cfg, run_dir=tmp_path / "a", seed=5, teacher=teacher)

    class Crash(Exception):
        pass

    def crash_after_step_9(kind: str, data: dict) -> None:  # a checkpoint was written at step 9 (every 3)
        if kind == "progress" and data["step"] == 10:
            raise Crash

    interrupted = _classifier(len(tokenizer), seed=1)
    with pytest.raises(Crash):
        fit(TASK, interrupted, tokenizer, train, validation, cfg, run_dir=tmp_path / "b", seed=5, teacher=teacher,
            on_event=crash_after_step_9)
    events: list[tuple[str, dict]] = []
    resumed = _classifier(len(tokenizer), seed=99)  # a fresh process: weights come from the checkpoint
    result = fit(TASK, resumed, tokenizer, train, validation, cfg, run_dir=tmp_path / "b", seed=5, teacher=teacher,
                 resume=True, on_event=lambda k, d: events.append((k, d)))
    assert ("resumed", {"stage": "distill", "step": 9, "total_steps": 16}) in events
    assert result.steps == 16
    assert torch.equal(_weights(resumed), _weights(uninterrupted))
    kept = [_weights(AutoModelForSequenceClassification.from_pretrained(tmp_path / run / "best")) for run in "ab"]
    assert torch.equal(*kept)  # with ema_decay, the average continued exactly too


def test_ema_decay_keeps_the_moving_average_of_the_trained_weights(setup, tmp_path: Path) -> None:
    tokenizer, teacher, train, validation = setup
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-2, checkpoint_every=1, ema_decay=0.25)  # 2 steps
    after_step_1: dict[str, torch.Tensor] = {}

    def keep_step_1(kind: str, data: dict) -> None:
        if kind == "checkpoint":
            after_step_1.update(torch.load(tmp_path / CHECKPOINT, weights_only=False)["model"])

    model = _classifier(len(tokenizer), seed=1)
    result = fit(TASK, model, tokenizer, train, validation, cfg, run_dir=tmp_path, seed=5, teacher=teacher,
                 on_event=keep_step_1)
    kept = AutoModelForSequenceClassification.from_pretrained(tmp_path / "best")
    trained = model.state_dict()
    # The first step's weights start the average; the second moves it 1 - 0.25 of the way to the new weights.
    for name, weights in kept.state_dict().items():
        if weights.is_floating_point():
            expected = 0.25 * after_step_1[name] + 0.75 * trained[name].cpu()
            torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    assert not torch.equal(_weights(kept), _weights(model))
    scored = {f"unaveraged_{k}": v for k, v in TASK.evaluate(model, tokenizer, validation, "fp32").items()}
    assert result.best_metrics == {"epoch": 1, **TASK.evaluate(kept, tokenizer, validation, "fp32"), **scored}


def test_length_grouped_batches_pad_less_and_still_cover_every_example_in_a_new_order() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (2000,), generator=generator).tolist()
    train = Split([{"input_ids": [1] * n} for n in lengths], torch.zeros(len(lengths), dtype=torch.long))

    def padded_tokens(order: list[int]) -> int:  # what collate pads each batch to: its longest text
        return sum(max(lengths[i] for i in order[b:b + 32]) * len(order[b:b + 32]) for b in range(0, len(order), 32))

    grouped = epoch_order(train, 32, seed=5, epoch=0, grouped=True)
    shuffled = epoch_order(train, 32, seed=5, epoch=0, grouped=False)
    assert sorted(grouped) == sorted(shuffled) == list(range(len(lengths)))
    assert padded_tokens(grouped) < 1.1 * sum(lengths) < 1.5 * sum(lengths) < padded_tokens(shuffled)
    # The batches are shuffled too: the first group of 15 batches (2000 // (32 * 4)) does not run long → short.
    longest = [max(lengths[i] for i in grouped[b:b + 32]) for b in range(0, len(grouped), 32)]
    assert longest[:15] != sorted(longest[:15], reverse=True)
    assert epoch_order(train, 32, seed=5, epoch=0, grouped=True) == grouped  # resume rebuilds the same order
    assert epoch_order(train, 32, seed=5, epoch=1, grouped=True) != grouped


def test_resume_refuses_a_checkpoint_of_another_run_and_names_what_changed(setup, tmp_path: Path) -> None:
    """Continuing with another learning rate, seed, data, precision, or the caller's identity (a job's teacher and
    student) would silently train something that is neither run (the optimizer state keeps the old learning rate;
    another seed reorders the epoch mid-way; another student's weights would load where shapes allow)."""
    tokenizer, teacher, train, validation = setup
    identity = {"student.num_layers": 1}
    first = fit(TASK, _classifier(len(tokenizer), 1), tokenizer, train, validation, CFG, run_dir=tmp_path, seed=5,
                teacher=teacher, identity=identity)
    assert (tmp_path / CHECKPOINT).exists()
    reversed_train = Split(train.student_inputs[::-1], train.labels.flip(0), teacher_inputs=train.teacher_inputs[::-1])
    changes = [({"cfg": CFG.model_copy(update={"epochs": 3})}, "total_steps: 16 then, 24 now; train.epochs: 2 then"),
               ({"cfg": CFG.model_copy(update={"lr": 2 * CFG.lr})}, f"train.lr: {CFG.lr!r} then, {2 * CFG.lr!r} now"),
               ({"seed": 6}, "seed: 5 then, 6 now"),
               ({"train": reversed_train}, "(the training data differ)"),
               ({"validation": train}, "(the validation data differ)"),
               ({"precision": "bf16"}, "precision: 'fp32' then, 'bf16' now"),
               ({"identity": {"student.num_layers": 2}}, "student.num_layers: 1 then, 2 now"),
               ({"identity": {}}, "student.num_layers: 1 then, None now); --resume continues the same run only: "
                                  "restore those settings, or start over (--overwrite instead of --resume, or another "
                                  "output directory)")]
    for change, message in changes:
        run = {"cfg": CFG, "seed": 5, "train": train, "validation": validation, "precision": "fp32",
               "identity": identity} | change
        with pytest.raises(TrainingError, match=re.escape(message)):
            fit(TASK, _classifier(len(tokenizer), 1), tokenizer, run["train"], run["validation"], run["cfg"],
                run_dir=tmp_path, seed=run["seed"], teacher=teacher, resume=True, precision=run["precision"],
                identity=run["identity"])
    # How often checkpoints are written does not change the run: it resumes (finished, nothing left to train).
    resumed = fit(TASK, _classifier(len(tokenizer), 1), tokenizer, train, validation,
                  CFG.model_copy(update={"checkpoint_every": 1000}), run_dir=tmp_path, seed=5, teacher=teacher,
                  resume=True, identity=identity)
    assert resumed.steps == 16
    # Its throughput is the run's (kept in the checkpoint), not 0 for a process that trained nothing.
    assert (resumed.train_seconds, resumed.examples_per_second) == (first.train_seconds, first.examples_per_second)
    assert first.examples_per_second > 0
    # Renamed into place, never written to the disk (a crash did it): the stage starts afresh, and being seeded it
    # ends where the first run ended.
    (tmp_path / CHECKPOINT).write_bytes(b"")
    events: list[tuple[str, dict]] = []
    model = _classifier(len(tokenizer), 1)
    again = fit(TASK, model, tokenizer, train, validation, CFG, run_dir=tmp_path, seed=5, teacher=teacher,
                resume=True, identity=identity, on_event=lambda kind, data: events.append((kind, data)))
    assert any(k == "log" and "cannot be read" in d["message"] and "starts afresh" in d["message"] for k, d in events)
    assert not any(k == "resumed" for k, _ in events)
    assert (again.steps, again.history) == (first.steps, first.history)


def test_a_resumed_run_puts_back_the_best_checkpoint_a_crash_mid_swap_left_aside(setup, tmp_path: Path) -> None:
    """best/ is swapped in by two renames, the old one aside first; a resume that trains no better epoch (here: a
    finished run) never swaps again, and the job then read a best/ that was not there."""
    tokenizer, teacher, train, validation = setup
    fit(TASK, _classifier(len(tokenizer), 1), tokenizer, train, validation, CFG, run_dir=tmp_path, seed=5,
        teacher=teacher)
    best = (tmp_path / BEST / "model.safetensors").read_bytes()
    (tmp_path / BEST).rename(tmp_path / (BEST + ".old"))  # the crash came between the renames
    fit(TASK, _classifier(len(tokenizer), 1), tokenizer, train, validation, CFG, run_dir=tmp_path, seed=5,
        teacher=teacher, resume=True)
    assert (tmp_path / BEST / "model.safetensors").read_bytes() == best and not (tmp_path / (BEST + ".old")).exists()


def test_logit_cache_trains_like_running_the_teacher_every_step(setup, tmp_path: Path) -> None:
    tokenizer, teacher, train, validation = setup
    live = _classifier(len(tokenizer), seed=1)
    fit(TASK, live, tokenizer, train, validation, CFG, run_dir=tmp_path / "live", seed=5, teacher=teacher)
    cached_train = Split(train.student_inputs, train.labels,
                         teacher_outputs=predict_distilled(TASK, teacher.model, tokenizer, train.teacher_inputs))
    cached = _classifier(len(tokenizer), seed=1)
    fit(TASK, cached, tokenizer, cached_train, validation, CFG, run_dir=tmp_path / "cached", seed=5, teacher=None)
    # Only the padding of the teacher's batches differs, so the float noise is tiny.
    assert torch.allclose(_weights(cached), _weights(live), atol=1e-4)


def test_non_finite_loss_stops_with_a_clear_error(setup, tmp_path: Path) -> None:
    tokenizer, _, train, validation = setup
    poisoned = Split(train.student_inputs, train.labels, teacher_outputs=torch.full((len(train), 2), float("nan")))
    with pytest.raises(TrainingError, match=r"loss became nan at step 1 \(epoch 1\).*lower train.lr"):
        fit(TASK, _classifier(len(tokenizer), 1), tokenizer, poisoned, validation, CFG, run_dir=tmp_path, seed=5)


def test_best_epoch_is_saved_loadable_and_reported(setup, tmp_path: Path) -> None:
    tokenizer, teacher, train, validation = setup
    result = fit(TASK, _classifier(len(tokenizer), 1), tokenizer, train, validation, CFG, run_dir=tmp_path, seed=5,
                 teacher=teacher, loss=LossConfig(alpha=0.3, temperature=3.0))
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.best_metrics == max(result.history, key=lambda m: (m["accuracy"], m["agreement"]))
    best = AutoModelForSequenceClassification.from_pretrained(tmp_path / "best")
    assert AutoTokenizer.from_pretrained(tmp_path / "best").get_vocab() == tokenizer.get_vocab()
    best_metrics = {k: v for k, v in result.best_metrics.items() if k != "epoch"}
    assert TASK.evaluate(best, tokenizer, validation, "fp32") == best_metrics


def test_intermediate_losses_train_with_a_projection(setup, tmp_path: Path) -> None:
    tokenizer, _, train, validation = setup
    teacher_model = _classifier(len(tokenizer), seed=7)
    teacher_model.config._attn_implementation = "eager"  # SDPA returns no attention maps
    teacher = Teacher(teacher_model.eval(), tokenizer)
    student = _classifier(len(tokenizer), seed=1, layers=1, hidden=16)
    student.config._attn_implementation = "eager"
    loss = LossConfig(hidden_mse=1.0, attention_kl=1.0, value_kl=1.0)
    result = fit(TASK, student, tokenizer, train, validation, CFG.model_copy(update={"epochs": 1}),
                 run_dir=tmp_path, seed=5, teacher=teacher, loss=loss, layer_map=[2])
    assert result.steps == 8
    values = [m for model in (student, teacher_model) for name, m in model.named_modules()
              if VALUE_PROJECTIONS.search(name)]
    assert len(values) == 3 and not any(m._forward_hooks for m in values)  # the capturing hooks are removed

    def trained(loss: LossConfig, run_dir: Path) -> torch.Tensor:
        """The same student, seed and data, trained with `loss`: its weights, flattened."""
        model = _classifier(len(tokenizer), seed=1, layers=1, hidden=16)
        model.config._attn_implementation = "eager"
        # No dropout: the projection's initialization draws random numbers, which must not be what differs.
        fit(TASK, model, tokenizer, train, validation, CFG.model_copy(update={"epochs": 1, "dropout": 0.0}),
            run_dir=run_dir, seed=5, teacher=teacher, loss=loss, layer_map=[2])
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    # Each intermediate term, alone beside the logit loss, changes what the student learns.
    plain = trained(LossConfig(), tmp_path / "plain")
    for term in ("hidden_mse", "attention_kl", "value_kl"):
        assert not torch.allclose(trained(LossConfig(**{term: 1.0}), tmp_path / term), plain), term


def test_value_relation_kl_alone_moves_the_student_towards_the_teacher(setup, tmp_path: Path) -> None:
    tokenizer, teacher, train, validation = setup
    student = _classifier(len(tokenizer), seed=1, layers=1)
    loss = LossConfig(alpha=0.0, value_kl=1.0)

    def value_gap() -> float:
        hooks: list = []
        values = _capture_values(student, hooks), _capture_values(teacher.model, hooks)
        inputs = {k: v.to(student.device) for k, v in TASK.collate(tokenizer, validation.student_inputs).items()}
        teacher.model.to(student.device)  # fit moves both where it trains
        with torch.no_grad():
            student(**inputs), teacher.model(**inputs)
        gap = _value_loss(*values, inputs, [2]).item()
        for hook in hooks:
            hook.remove()
        return gap

    before = value_gap()
    fit(TASK, student, tokenizer, train, validation, CFG.model_copy(update={"lr": 3e-3}), run_dir=tmp_path, seed=5,
        teacher=teacher, loss=loss, layer_map=[2])
    assert value_gap() < 0.5 * before


def test_bf16_autocast_trains_and_predicts_close_to_fp32(setup, tmp_path: Path) -> None:
    tokenizer, teacher, train, validation = setup
    fp32 = predict_distilled(TASK, teacher.model, tokenizer, validation.teacher_inputs)
    bf16 = predict_distilled(TASK, teacher.model, tokenizer, validation.teacher_inputs, precision="bf16")
    assert bf16.dtype == torch.float32
    assert torch.allclose(fp32, bf16, atol=0.05)  # bfloat16 keeps ~3 significant digits
    model = _classifier(len(tokenizer), seed=1)
    before = _weights(model)
    result = fit(TASK, model, tokenizer, train, validation, CFG, run_dir=tmp_path, seed=5, teacher=teacher,
                 precision="bf16")
    assert result.steps == 16 and not torch.equal(_weights(model), before)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights


def test_dropout_zero_makes_training_forward_deterministic(setup) -> None:
    tokenizer, _, train, _ = setup
    model = _classifier(len(tokenizer), seed=1)
    model.set_attn_implementation("sdpa")
    inputs = TASK.collate(tokenizer, train.student_inputs[:8])
    model.train()
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)  # BERT's default dropout 0.1 is on
    set_dropout(model, 0.0, torch.device("cpu"))
    assert model.config._attn_implementation == "eager"  # faster than SDPA's fused CPU kernel without dropout
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    trained = model(**inputs).logits
    assert torch.allclose(trained, model.eval()(**inputs).logits, atol=1e-6)


def test_dropout_setting_reaches_the_student_in_fit(setup, tmp_path: Path) -> None:
    tokenizer, teacher, train, validation = setup
    student = _classifier(len(tokenizer), seed=1)
    attention = student.config._attn_implementation
    fit(TASK, student, tokenizer, train, validation, CFG.model_copy(update={"dropout": 0.25, "epochs": 1}),
        run_dir=tmp_path / "run", seed=0, teacher=teacher)
    assert {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}
    assert student.config._attn_implementation == attention  # only dropout 0 switches attention
