"""run(config, on_event) → student + report: the ONE place that chains the stages.

data → prepare teacher → build student → teacher logits (cached once) → distill → test evaluation → report.json
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from distill import atomic, distributed, engine
from distill.compress import INT8_OVERFLOW_ADVICE, CompressError, accuracy_gate, compress, optimize
from distill.config import ConfigError, JobConfig
from distill.data import Example, TaskData, check_builtin_keys, load_task_data
from distill.engine import EventSink, Split, Teacher
from distill.evaluate import EvaluateError, accuracy, evaluate_models, footprint, render_markdown, retention_interval
from distill.export import export_model_dir
from distill.losses import IGNORE_INDEX
from distill.prepare import prepare_teacher, update_with_files
from distill.runtime import ONNX_FILE, OPTIMIZED_FILE, OnnxPredictor, Predictor, TorchPredictor
from distill.student import (
    Student,
    build_student,
    check_aligned_tokens,
    check_student,
    count_params,
    size_warning,
)
from distill.tasks import Encoded, Precision, SequenceClassification, Task, bf16_is_slow, predict_distilled
from teachers.registry import resolve_teacher

STUDENT = "student"
STUDENT_ONNX = "student-onnx"
TEACHER_ONNX = "teacher-onnx"
REPORT = "report.json"
REPORT_MD = "report.md"
TEACHER_LOGITS = "teacher_logits.pt"


@dataclass
class RunResult:
    output_dir: Path
    student_dir: Path
    report: dict[str, Any]


def run(config: JobConfig, on_event: EventSink | None = None, *, resume: bool = False) -> RunResult | None:
    """Run a whole job; artifacts land under config.output_dir (student/, report.json, checkpoint.pt).

    Under torchrun every rank runs this: all prepare the teacher and distill together, rank 0 alone computes the
    teacher's outputs, writes files, emits events and runs the stages after training; the others return None once
    training is done.
    """
    if config.task == "causal-lm":
        from distill import causal_lm  # which imports this module's stage helpers

        return causal_lm.run(config, on_event, resume=resume)
    if config.task == "sentence-embedding":
        from distill import embedding  # which imports this module's stage helpers

        return embedding.run(config, on_event, resume=resume)
    out, emit = start_job(config, on_event, resume)
    task = SequenceClassification()
    timings: dict[str, float] = {}
    clock = functools.partial(timed_stage, timings=timings, emit=emit)

    with clock("data"):
        data = read_data(config, resume, emit)
        teacher_dir = resolve_teacher(config.teacher.name)
        transfer = [Example(text, IGNORE_INDEX) for text in data.transfer]  # labelled by the teacher's logits
        examples = {"train": data.train + transfer, "validation": data.validation, "test": data.test}
        texts = {name: [e.text for e in rows] for name, rows in examples.items()}
        labels = {name: torch.tensor([e.label for e in rows], dtype=torch.long) for name, rows in examples.items()}
        max_length = config.data.max_length
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher_inputs = {name: task.encode(teacher_tokenizer, batch, max_length) for name, batch in texts.items()}

    with clock("prepare-teacher"):
        labelled = len(data.train)  # the transfer texts have no labels to fine-tune on
        prepared = prepare_teacher(config, teacher_dir, data.labels, task,
                                   Split(teacher_inputs["train"][:labelled], labels["train"][:labelled]),
                                   Split(teacher_inputs["validation"], labels["validation"]), emit,
                                   resume=resume)
        attention = "eager" if config.loss.attention_kl > 0 else None  # SDPA returns no attention maps
        teacher_model = AutoModelForSequenceClassification.from_pretrained(
            prepared.path, attn_implementation=attention).eval().to(distributed.device())
        teacher = Teacher(teacher_model, AutoTokenizer.from_pretrained(prepared.path))

    with clock("build-student"):
        # Seeded here: the student's new weights then do not depend on whether the teacher came from the cache.
        torch.manual_seed(config.seed)
        student = build_student(config.student, teacher_model, str(prepared.path), attn_implementation=attention,
                                texts=texts["train"])
        if warning := size_warning(student.model, teacher_model):
            emit("log", {"message": warning})
        intermediate = config.loss.intermediate
        student_inputs = encode_for_student(task, student, teacher_tokenizer, teacher_inputs, texts, max_length,
                                            intermediate=intermediate)
        splits = {name: Split(student_inputs[name], labels[name], teacher_inputs=teacher_inputs[name])
                  for name in examples}

    with clock("teacher-logits"):
        cache_train = config.train.cache_teacher_logits and not intermediate
        # Computed once, by rank 0 (which also stores them), and sent to the other ranks.
        logits = distributed.broadcast(
            teacher_outputs(task, teacher, splits, cache_train, out / TEACHER_LOGITS, emit, config.precision,
                            teacher_dir=prepared.path, fingerprint=config.precision, reuse=resume,
                            stage="teacher-logits")
            if distributed.is_main() else None)
        for name, split in splits.items():
            split.teacher_outputs = logits.get(name)

    with clock("distill"):
        result = engine.fit(task, student.model, student.tokenizer, splits["train"], splits["validation"],
                            config.train, run_dir=out, seed=config.seed, teacher=teacher, loss=config.loss,
                            layer_map=student.layer_map, resume=resume, on_event=emit, stage="distill",
                            precision=config.precision, identity=run_identity(config) | data_identity(data))
    if not distributed.is_main():
        return None

    with clock("evaluate"):
        best = AutoModelForSequenceClassification.from_pretrained(out / engine.BEST).to(distributed.device())
        student_logits = predict_distilled(task, best, student.tokenizer, splits["test"].student_inputs,
                                           precision=config.precision)
        student_metrics = task.score(student_logits, splits["test"])
        teacher_metrics = {name: task.score(logits[name], splits[name])["accuracy"]
                           for name in ("validation", "test")}
        interval = retention_interval(student_logits.argmax(dim=-1) == labels["test"],
                                      logits["test"].argmax(dim=-1) == labels["test"])
        publish(out / engine.BEST, out / STUDENT)

    deployment = _deploy(config, out, prepared.path, data, clock, emit) if config.export.onnx else {}
    teacher_params, student_params = count_params(teacher_model), count_params(best)
    report = {
        "config": json.loads(config.model_dump_json()),
        "data": data.summary(),
        "teacher": {"source": config.teacher.name, "prepared_dir": str(prepared.path), "params": teacher_params,
                    "prepared_from_cache": prepared.cached, "preparation": prepared.summary,
                    "validation_accuracy": teacher_metrics["validation"], "test_accuracy": teacher_metrics["test"]},
        "student": {"dir": str(out / STUDENT), "params": student_params, "best_epoch": result.best_epoch,
                    "train_examples": len(splits["train"]), "steps": result.steps,
                    "history": result.history, "test_accuracy": student_metrics["accuracy"],
                    "test_agreement": student_metrics["agreement"],
                    "train_examples_per_second": result.examples_per_second},
        "retention": student_metrics["accuracy"] / teacher_metrics["test"] if teacher_metrics["test"] else None,
        "retention_interval": interval,
        "param_ratio": student_params / teacher_params,
        "teacher_logits_cached": cache_train,
        **deployment,
        "timings_seconds": timings,
    }
    return finish(out, report, render_job_markdown(report), emit,
                  {"student_test_accuracy": student_metrics["accuracy"],
                   "teacher_test_accuracy": teacher_metrics["test"]})


def finish(out: Path, report: dict[str, Any], markdown: str, emit: EventSink,
           headline: dict[str, Any]) -> RunResult:
    """Every task's last step: report.md and report.json (with the device the job computed on and the headline
    numbers) in `out`, then the `done` event with the headline numbers (what `distill run` prints). report.json is
    the last file written: a job directory that has it is complete (the service records such a job succeeded, with
    the report's headline as its test metrics, however its process ended)."""
    report = {**report, "device": str(distributed.device()), "headline": headline}
    atomic.write_text(out / REPORT_MD, markdown)
    atomic.write_text(out / REPORT, json.dumps(report, indent=2))
    emit("done", {"report": str(out / REPORT), **headline})
    return RunResult(out, out / STUDENT, report)


def _deploy(config: JobConfig, out: Path, teacher_dir: Path, data: TaskData,
            clock: Callable[[str], contextlib.AbstractContextManager[None]], emit: EventSink) -> dict[str, Any]:
    """Export → optimize/quantize → accuracy gate → teacher and students side by side on the test split."""
    max_length, tolerance = config.data.max_length, config.export.tolerance
    student_onnx, teacher_onnx = out / STUDENT_ONNX, out / TEACHER_ONNX
    with clock("export"):
        exported = {"student": export_model_dir(out / STUDENT, student_onnx, opset=config.export.opset,
                                                tolerance=tolerance, max_length=max_length)}
        if config.export.teacher:
            exported["teacher"] = export_model_dir(teacher_dir, teacher_onnx, opset=config.export.opset,
                                                   tolerance=tolerance, max_length=max_length)
            optimize(teacher_onnx / ONNX_FILE, teacher_onnx, max_length=max_length, tolerance=tolerance)
    section: dict[str, Any] = {"export": {name: {"path": str(r.path), "opset": r.opset, "size_bytes": r.size_bytes,
                                                 "max_abs_diff": r.max_abs_diff, "checked_shapes": r.checked_shapes}
                                          for name, r in exported.items()}}

    cc = config.compress
    with clock("compress"):
        if cc.quantize == "none":
            fp32_path, int8_path = optimize(student_onnx / ONNX_FILE, student_onnx, max_length=max_length,
                                            tolerance=tolerance).path, None
        else:
            result = compress(student_onnx / ONNX_FILE, student_onnx, mode=cc.quantize, per_channel=cc.per_channel,
                              exclude_ops=cc.exclude_ops, max_length=max_length, tolerance=tolerance,
                              calibration_texts=[e.text for e in data.train[:cc.calibration_size]])
            fp32_path, int8_path = result.optimized_path, result.int8_path
        student_fp32 = OnnxPredictor(fp32_path, student_onnx, max_length)
        student_int8 = OnnxPredictor(int8_path, student_onnx, max_length) if int8_path is not None else None
        if student_int8 is not None:
            texts, labels = [e.text for e in data.validation], [e.label for e in data.validation]
            try:
                int8_accuracy = accuracy(student_int8, texts, labels)
            except EvaluateError as e:  # NaN is never servable, whatever its accuracy
                raise CompressError(f"INT8 on the validation texts: {e}. {INT8_OVERFLOW_ADVICE}") from None
            gate = accuracy_gate(accuracy(student_fp32, texts, labels), int8_accuracy, cc.max_accuracy_drop)
            emit("log", {"message": gate.message})
            section["compress"] = {"mode": cc.quantize, "per_channel": cc.per_channel, "fused_ops": result.fused_ops,
                                   "optimized_bytes": result.optimized_bytes, "int8_bytes": result.int8_bytes,
                                   "int8_max_abs_diff": result.int8_max_abs_diff,
                                   "gate": {"passed": gate.passed, "validation_drop_points": gate.drop_points,
                                            "max_drop_points": cc.max_accuracy_drop, "message": gate.message}}
    served = int8_path if int8_path is not None and section["compress"]["gate"]["passed"] else fp32_path
    section["served"] = {"path": str(served), "format": "onnx-int8" if served == int8_path else "onnx-fp32"}

    with clock("evaluate-deployment"):
        variants: list[tuple[str, Predictor, Path]] = [
            ("teacher-torch", TorchPredictor(teacher_dir, max_length), teacher_dir)]
        if config.export.teacher:
            teacher_fp32 = teacher_onnx / OPTIMIZED_FILE
            variants.append(("teacher-onnx-fp32", OnnxPredictor(teacher_fp32, teacher_onnx, max_length), teacher_fp32))
        variants += [("student-torch", TorchPredictor(out / STUDENT, max_length), out / STUDENT),
                     ("student-onnx-fp32", student_fp32, fp32_path)]
        if student_int8 is not None and int8_path is not None:
            variants.append(("student-onnx-int8", student_int8, int8_path))
        models = {name: predictor for name, predictor, _ in variants}
        sizes = {name: footprint(path) for name, _, path in variants}
        section["evaluation"] = evaluate_models(
            models, [e.text for e in data.test], [e.label for e in data.test], reference="teacher-torch",
            latency_calls=config.evaluate.latency_calls, throughput_batch=config.evaluate.throughput_batch,
            sizes={name: size for name, (size, _) in sizes.items()},
            params={name: params for name, (_, params) in sizes.items() if params is not None},
            on_progress=lambda line: emit("log", {"message": line}),
            on_measured=lambda done, total: emit("progress", {"stage": "evaluate-deployment", "step": done,
                                                              "total_steps": total}))
    return section


def served_line(report: dict[str, Any]) -> str:
    """report.md's line on the file served, named within the output directory (the service's artifact name; no
    server path), and why it is that one."""
    served, gate = Path(report["served"]["path"]), report.get("compress", {}).get("gate")
    return (f"Served: `{served.parent.name}/{served.name}` ({report['served']['format']})."
            + (f" {gate['message']}." if gate else ""))


def render_job_markdown(report: dict[str, Any]) -> str:
    """report.md: what a person reads first."""
    teacher, student = report["teacher"], report["student"]
    lines = ["# Distillation report", "",
             f"Teacher `{teacher['source']}`: {teacher['params']:,} params, test accuracy "
             f"{teacher['test_accuracy']:.4f}.",
             f"Student: {student['params']:,} params ({report['param_ratio']:.1%} of the teacher), test accuracy "
             f"{student['test_accuracy']:.4f}, agreement with the teacher {student['test_agreement']:.4f}, "
             + ("no retention (the teacher got no test text right)." if report["retention"] is None else
                f"retention {report['retention']:.4f}"
                + (f" ({interval['level']:.0%} interval {interval['low']:.3f}–{interval['high']:.3f}, "
                   f"over other test texts like these)." if (interval := report.get("retention_interval")) else "."))]
    if "served" in report:
        lines += ["", served_line(report)]
        worst = max(e["max_abs_diff"] for e in report["export"].values())
        lines += [f"ONNX export checked against PyTorch: max abs logit difference {worst:.2g}."]
    if "evaluation" in report:
        lines += ["", "## Side by side on the test split", "", render_markdown(report["evaluation"])]
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report["timings_seconds"].items()]
    return "\n".join(lines) + "\n"


def start_job(config: JobConfig, on_event: EventSink | None, resume: bool) -> tuple[Path, EventSink]:
    """Every task's first step: the student checked against the models (student.check_student), a built-in
    dataset's ignored keys refused (data.check_builtin_keys), a --resume of another run's checkpoint refused, where
    it computes (distributed.place), the output directory (made by rank 0) and the event sink (rank 0 speaks for
    all), warned when bf16 would run slower than fp32 here."""
    if config.output_dir is None:
        raise ConfigError("output_dir: not set; give the directory the job writes to")
    check_student(config.student, resolve_teacher(config.teacher.name), max_length=config.data.max_length,
                  task=config.task, intermediate_losses=config.loss.intermediate,
                  value_relations=config.loss.value_kl > 0)
    if not resume and config.data.dataset != "files":
        check_builtin_keys(config.data)
    if resume:
        engine.check_resumable(Path(config.output_dir) / engine.CHECKPOINT,
                               engine.config_settings(config.train, config.seed, config.loss)
                               | {"precision": config.precision, **run_identity(config)})
    distributed.place(config.device)
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is a file; give a directory (new, or one of an earlier run)")
    new = not out.is_dir() or not any(out.iterdir())
    if distributed.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output_dir: cannot create {out}: {e.strerror}") from None
    emit = on_event if on_event is not None and distributed.is_main() else (lambda kind, data: None)
    if resume and new:  # a mistyped output directory: the job starts over, so say it
        emit("log", {"message": f"nothing to resume: {out} is new or empty, so the job starts from the beginning"})
    if unused := config.switched_off():
        emit("log", {"message": f"warning: not used by this job: {', '.join(unused)}"})
    if config.precision == "bf16" and bf16_is_slow(distributed.device()):
        emit("log", {"message": "warning: precision 'bf16' on a CPU without bf16 kernels (no AVX512): autocast falls "
                                "back to reference code, measured 60x slower than fp32; use precision: fp32 here"})
    return out, emit


def earlier_run(output_dir: Path) -> list[str]:
    """What an earlier job left in output_dir that a new one would replace: its student, report, checkpoint."""
    return [name for name in (STUDENT, REPORT, engine.CHECKPOINT) if (Path(output_dir) / name).exists()]


def clear_earlier_run(output_dir: Path) -> None:
    """`distill run --overwrite`: the earlier job's outputs removed, so that none the new job does not write again
    (an ONNX export, when it has export.onnx false) passes for its own. Its teacher outputs and preparation scratch
    stay: a job reuses them only when resuming the run they belong to."""
    for name in (STUDENT, engine.BEST, STUDENT_ONNX, TEACHER_ONNX, REPORT, REPORT_MD, engine.CHECKPOINT):
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_identity(config: JobConfig) -> dict[str, Any]:
    """A job's data settings, teacher and student, flat (`data.limit`, `teacher.name`, `student.layers`, ...): with
    another of any, a checkpoint is not this job's to continue (engine.fit's `identity`), and a config says so
    before its first stage (fit's digest of the training data would say it only after the teacher's preparation and
    outputs). The teacher's preparation settings count for classification only, the one task that prepares its
    teacher. So do the teacher's files (`teacher files`): one saved again at its path is another teacher, whose
    outputs would replace the saved ones midway through the run."""
    teacher = (config.teacher.model_dump(mode="json") if config.task == "sequence-classification"
               else {"name": config.teacher.name})
    sections = {"data": config.data.model_dump(mode="json"), "teacher": teacher,
                "student": config.student.model_dump(mode="json")}
    files = hashlib.sha256()
    update_with_files(files, resolve_teacher(config.teacher.name))  # a hub id: the revision in its hub cache
    return ({f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}
            | {"teacher files": files.hexdigest()[:16]})


def read_data(config: JobConfig, resume: bool, emit: EventSink, *, labelled: bool = True) -> TaskData:
    """The job's data (data.load_task_data), saying how many training rows it left out; on --resume, a checkpoint
    written on other data refused now, before the teacher is prepared again and its outputs recomputed over the
    saved ones (fit's digest of the tokenized splits would say it only then)."""
    data = load_task_data(config.data, labelled=labelled)
    if data.repeats_left_out:
        emit("log", {"message": f"{data.repeats_left_out} training rows repeat a validation/test text and are left "
                                f"out of training (a text the job is scored on is never trained on)"})
    if resume:
        assert config.output_dir is not None  # start_job's
        engine.check_resumable(Path(config.output_dir) / engine.CHECKPOINT, data_identity(data))
    return data


def data_identity(data: TaskData) -> dict[str, str]:
    """`source data`: a digest of the texts and labels the job trains and chooses its best epoch on (training,
    transfer and validation rows, the label names), for fit's `identity`."""
    digest = hashlib.sha256(json.dumps([data.labels, data.transfer]).encode())
    for rows in (data.train, data.validation):
        digest.update(json.dumps([[e.text, e.label] for e in rows]).encode())
    return {"source data": digest.hexdigest()[:16]}


@contextlib.contextmanager
def timed_stage(name: str, *, timings: dict[str, float], emit: EventSink) -> Iterator[None]:
    """`with clock(stage):` emits the stage event and records its wall time."""
    emit("stage", {"stage": name})
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 3)


LOW_DISK_BYTES = 64 * 1024**2  # below it, a job's failure message says how much disk is left
TEACHER_OUTPUT_CHUNK = 4096  # examples per saved piece: an interrupted job loses at most this many teacher passes


def encode_for_student(task: Task, student: Student, teacher_tokenizer: PreTrainedTokenizerBase,
                       teacher_inputs: dict[str, list[Encoded]], texts: dict[str, list[str]], max_length: int, *,
                       intermediate: bool) -> dict[str, list[Encoded]]:
    """Each split's token ids for the student: the teacher's when they share a vocabulary, else its own, which
    `intermediate` losses pair with the teacher's position by position (student.check_aligned_tokens)."""
    if student.shares_teacher_tokenizer:
        return teacher_inputs
    inputs = {name: task.encode(student.tokenizer, batch, max_length) for name, batch in texts.items()}
    if intermediate:
        check_aligned_tokens(student.tokenizer, teacher_tokenizer, inputs["train"], teacher_inputs["train"],
                             texts["train"])
    return inputs


def teacher_outputs(task: Task, teacher: Teacher, splits: dict[str, Split], cache_train: bool, path: Path,
                    emit: EventSink, precision: Precision, *, teacher_dir: Path, fingerprint: str,
                    reuse: bool, stage: str) -> dict[str, torch.Tensor]:
    """The teacher runs once per example: validation/test always (agreement), train when the cache is on.
    Stored next to the checkpoint so a resumed job does not pay for it again; reused only when resuming and only
    for the same teacher files (`teacher_dir`, where `teacher` was loaded from: a teacher saved again at its path
    counts as another), `fingerprint` (what else the outputs depend on) and token ids. Computed in pieces of
    TEACHER_OUTPUT_CHUNK examples, each saved under `<path>.parts/` as it is done, so a resumed job also keeps the
    pieces an interrupted one finished. Progress events name the caller's `stage`."""
    names = [n for n in splits if n != "train" or cache_train]
    digest = hashlib.sha256(fingerprint.encode())
    update_with_files(digest, teacher_dir)
    for name in names:
        digest.update(json.dumps([name, [e["input_ids"] for e in splits[name].teacher_inputs]]).encode())
    fingerprint = digest.hexdigest()
    if reuse and (stored := _saved(path)) is not None and stored["fingerprint"] == fingerprint:
        emit("log", {"message": f"reusing the teacher outputs in {path}"})
        return stored["logits"]
    parts = path.with_name(path.name + ".parts")
    if not reuse:
        shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    total, done = sum(len(splits[name]) for name in names), 0
    logits = {}
    for name in names:
        emit("log", {"message": f"teacher outputs for {len(splits[name])} {name} examples"})
        pieces = []
        for start in range(0, len(splits[name]), TEACHER_OUTPUT_CHUNK):
            encoded = splits[name].teacher_inputs[start:start + TEACHER_OUTPUT_CHUNK]
            piece_path = parts / f"{name}-{start}-{start + len(encoded)}.pt"
            piece = _saved(piece_path)
            if piece is None or piece["fingerprint"] != fingerprint:
                piece = {"fingerprint": fingerprint, "logits": predict_distilled(
                    task, teacher.model, teacher.tokenizer, encoded, precision=precision)}
                atomic.save_torch(piece, piece_path)
            pieces.append(piece["logits"])
            done += len(encoded)
            emit("progress", {"stage": stage, "step": done, "total_steps": total})
        logits[name] = torch.cat(pieces) if pieces else torch.empty(0)
    atomic.save_torch({"fingerprint": fingerprint, "logits": logits}, path)
    shutil.rmtree(parts, ignore_errors=True)
    return logits


def _saved(path: Path) -> dict[str, Any] | None:
    """Saved teacher outputs (the file, or a piece), or None when there are none or they cannot be read (a crash
    can leave a file empty that was renamed into place before it reached the disk): they are computed again."""
    if not path.exists():
        return None
    try:
        return torch.load(path)
    except Exception:  # noqa: BLE001 - whatever makes a piece unreadable, it is recomputed, never trusted
        return None


def publish(best: Path, target: Path) -> None:
    """Copy the best checkpoint to its published name (a reader never sees a half directory)."""
    with atomic.building(target) as staged:
        shutil.copytree(best, staged)



def main(argv: list[str] | None = None) -> int:
    """`python -m distill.pipeline JOB_DIR [--resume] [--events FILE]`: the service runs each job this way.

    Reads JOB_DIR/config.json, writes artifacts to JOB_DIR (unless the config names another output_dir) and
    every event as one JSON line `{"kind", "data", "time"}` to stdout (or FILE). A failure ends with an `error`
    event `{"message", "type"}` and exit code 2 (a known problem) or 1 (a bug, traceback on stderr).
    """
    import argparse
    import sys
    import traceback

    import transformers

    from distill.config import parse_config
    from distill.data import DataError
    from distill.engine import TrainingError
    from distill.export import ExportError
    from teachers.registry import TeacherNotFound

    parser = argparse.ArgumentParser(prog="python -m distill.pipeline", description=main.__doc__)
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the job dir")
    parser.add_argument("--events", type=Path, help="append events here instead of writing them to stdout")
    args = parser.parse_args(argv)

    if args.events:
        stream = args.events.open("a", encoding="utf-8")
    else:
        # The event stream gets a private copy of stdout and fd 1 is pointed at stderr, so a stray print from a
        # library (or C code writing to fd 1) can never interleave with an event line.
        sys.stdout.flush()
        stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
        os.dup2(2, 1)

    def emit(kind: str, data: dict[str, Any]) -> None:
        stream.write(json.dumps({"kind": kind, "data": data, "time": time.time()}, default=str) + "\n")
        stream.flush()

    transformers.logging.set_verbosity_error()  # our events say what happens; load reports would bury them
    transformers.logging.disable_progress_bar()
    try:
        config = parse_config(json.loads((args.job_dir / "config.json").read_text(encoding="utf-8")))
        if config.output_dir is None:
            config = config.model_copy(update={"output_dir": args.job_dir})
        # A torchrun worker joins its group here (the runner launches nproc_per_node > 1 that way).
        with distributed.process_group(config.device):
            run(config, emit, resume=args.resume)
        return 0
    except (OSError, json.JSONDecodeError, ConfigError, DataError, TeacherNotFound, TrainingError, ExportError,
            CompressError, EvaluateError) as e:
        emit("error", {"message": str(e), "type": type(e).__name__})
        return 2
    except Exception as e:
        # The event first: on a full disk printing the traceback to stderr.log fails too, and the job ended with
        # no reason at all. A full disk is named: torch.save's C++ writer says only "iostream error".
        free = shutil.disk_usage(args.job_dir).free
        disk = f" (the job directory's disk has {free:,} bytes free)" if free < LOW_DISK_BYTES else ""
        emit("error", {"message": f"{type(e).__name__}: {e}{disk}", "type": type(e).__name__})
        with contextlib.suppress(OSError):
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
