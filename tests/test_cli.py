"""The command line: a tiny job end to end, and errors as one line with exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import transformers
import yaml
from tqdm import tqdm

from distill import atomic
from distill.cli import main
from distill.data import BUILTIN_DATASETS
from tests.conftest import write_tiny_encoder


def _write_config(path: Path, teacher_dir: Path, csv: Path, **extra: dict) -> Path:
    config = {"teacher": {"name": str(teacher_dir), "head_epochs": 1, "finetune_epochs": 4, "finetune_lr": 3e-3,
                          "batch_size": 16},
              "data": {"dataset": "files", "train": str(csv), "max_length": 16},
              "student": {"init": "teacher", "layers": [1]},
              "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3}, "export": {"onnx": False}, **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_prints_the_result_and_resume_finishes_a_completed_job(
        tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _write_config(tmp_path / "job.yaml", tiny_teacher_dir, synthetic_csv)
    one_epoch = ["--set", "train.epochs=1"]  # the file says 2
    # --resume on a directory with nothing in it (a mistyped one, say) starts over and says so.
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out"), "--resume", *one_epoch]) == 0
    printed = capsys.readouterr().out
    assert f"nothing to resume: {tmp_path / 'out'} is new or empty, so the job starts from the beginning" in printed
    summary = json.loads(printed[printed.rindex("{\n"):])
    assert summary["student_dir"] == str(tmp_path / "out" / "student")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (summary["student_test_accuracy"], summary["param_ratio"]) == (report["student"]["test_accuracy"],
                                                                          report["param_ratio"])
    assert "==> distill" in printed and report["config"]["train"]["epochs"] == 1
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out"), "--resume", *one_epoch]) == 0
    resumed = capsys.readouterr().out
    assert "resumed: stage=distill, step=20, total_steps=20" in resumed
    assert "reusing the teacher outputs" in resumed  # the resumed job does not run the teacher again
    assert "nothing to resume" not in resumed
    # Run again without either: refused, since it would replace the student and report.
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out"), *one_epoch]) == 2
    assert capsys.readouterr().err == (f"distill: error: {tmp_path / 'out'} holds an earlier run (student, "
                                       f"report.json, checkpoint.pt): --resume continues it, --overwrite starts over "
                                       f"in it, or give another --output-dir\n")
    earlier_export = tmp_path / "out" / "student-onnx" / "model.onnx"  # this run exports nothing to replace it
    earlier_export.parent.mkdir()
    earlier_export.write_bytes(b"the earlier student's graph")
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out"), "--overwrite", *one_epoch,
                 "--set", "compress.per_channel=false"]) == 0
    printed = capsys.readouterr().out
    assert "resumed:" not in printed  # trained from the start
    assert not earlier_export.parent.exists()  # left, it passed for the new student's export
    # A setting the job's export: false leaves unused is kept (switching export back needs no edit), and said.
    assert "warning: not used by this job: compress.per_channel (as export.onnx is false)" in printed


@pytest.mark.parametrize("extra, message", [
    ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
    ({"teacher": {"name": "no-such-teacher"}}, "unknown teacher 'no-such-teacher'; use a registered name (minilm-l6"),
    ({"data": {"dataset": "files", "train": "/nonexistent.csv", "max_length": 16}}, "/nonexistent.csv"),
    ({"student": {"init": "teacher", "layers": [0, 5]}}, "student.layers must be distinct increasing indices in 0..1"),
    ({"student": {"init": "model", "model": "/nonexistent-model", "num_layers": 1}},
     "student.model: teacher '/nonexistent-model': no such directory"),
])
def test_errors_are_one_line_with_exit_code_2(extra: dict, message: str, tiny_teacher_dir: Path,
                                              synthetic_csv: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    config = _write_config(tmp_path / "bad.yaml", tiny_teacher_dir, synthetic_csv, **extra)
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error: ") and message in err and "Traceback" not in err


def test_the_output_directory_given_twice_or_empty_is_refused(tiny_teacher_dir: Path, synthetic_csv: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where an empty output directory would put the run
    config = _write_config(tmp_path / "job.yaml", tiny_teacher_dir, synthetic_csv)
    assert main(["run", str(config), "--output-dir", str(tmp_path / "a"), "--set", f"output_dir={tmp_path / 'b'}"]) == 2
    assert capsys.readouterr().err == ("distill: error: the output directory is given twice, by --output-dir and by "
                                       "--set output_dir=...; give one\n")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["run", str(config), "--output-dir", str(tmp_path / "a"), "--set", "output_dir"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err  # a malformed --set says so first
    # Empty (an unset shell variable): the run landed in the current directory.
    with pytest.raises(SystemExit):
        main(["run", str(config), "--output-dir", ""])
    assert "argument --output-dir: empty; give a directory ('.' for the current one)" in capsys.readouterr().err
    assert main(["run", str(config), "--set", "output_dir=''"]) == 2
    assert capsys.readouterr().err.startswith("distill: error: output_dir: empty; give a directory ('.' for the "
                                              "current one), or leave the key out for the default")
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "student").exists()


def test_an_output_directory_that_cannot_be_made_is_one_line(tiny_teacher_dir: Path, synthetic_csv: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = _write_config(tmp_path / "job.yaml", tiny_teacher_dir, synthetic_csv)
    assert main(["run", str(config), "--output-dir", str(blocker / "out")]) == 2
    assert capsys.readouterr().err == f"distill: error: output_dir: cannot create {blocker / 'out'}: Not a directory\n"
    assert main(["run", str(config), "--output-dir", str(blocker)]) == 2  # was "[Errno 17] File exists: '...'"
    assert capsys.readouterr().err == (f"distill: error: output_dir: {blocker} is a file; give a directory (new, or "
                                       f"one of an earlier run)\n")


def test_model_commands_refuse_what_they_cannot_do_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    encoder = write_tiny_encoder(tmp_path / "encoder")  # no classification head
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")  # the op types and config.json are checked before the graph is read
    (onnx_dir / "config.json").write_text((encoder / "config.json").read_text())
    texts = tmp_path / "texts.txt"
    texts.write_text("a good movie\na bad one\n")
    cases = [(["export", str(encoder), str(tmp_path / "out")], "is not a sequence classifier (architectures: "
                                                                "['BertModel'])"),
             (["compress", str(onnx_dir), "--mode", "static", "--calibration-texts", str(texts), "--exclude-ops",
               "Attention"], "--exclude-ops: ['Attention'] are not op types static quantization handles"),
             (["compress", str(onnx_dir), "--exclude-ops", "Gemm"], "--exclude-ops: ['Gemm'] are not op types "
                                                                     "dynamic quantization handles"),
             (["compress", str(onnx_dir)], "config.json names ['BertModel'], not a sequence classifier"),
             (["compress", str(onnx_dir / "model.onnx")], f"{onnx_dir / 'model.onnx'} is a file; give the directory "
                                                           f"holding it ({onnx_dir})"),
             (["bench", str(encoder), "--texts", str(texts), "--seq-len", "2"],
              "--seq-len: 2 tokens leave no room for a word beside the special tokens")]
    # A classifier whose weights were cut short (a copy stopped midway): safetensors' traceback, exit code 1.
    truncated = tmp_path / "truncated"
    shutil.copytree(encoder, truncated)
    config = json.loads((truncated / "config.json").read_text())
    (truncated / "config.json").write_text(json.dumps(config | {"architectures": ["BertForSequenceClassification"]}))
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    unreadable = f"{truncated / 'model.safetensors'} is not a readable safetensors file ("
    cases += [(["export", str(truncated), str(tmp_path / "out")], unreadable),
              (["bench", str(truncated), "--texts", str(texts)], unreadable)]
    capsys.readouterr()  # transformers' progress bar of writing the encoder
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("distill: error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    for argv, message in ((["bench", str(encoder), "--texts", str(texts), "--seq-len", "0"],
                           "--seq-len: '0' is not a whole number of at least 1"),
                          (["bench", str(encoder), "--texts", str(texts), "--threads", "-1"],
                           "--threads: '-1' is not a whole number of at least 1"),
                          (["compress", str(tmp_path), "--max-length", "0"],
                           "--max-length: '0' is not a whole number of at least 1"),
                          (["export", str(encoder), str(tmp_path / "out"), "--opset", "5"],
                           "--opset: invalid choice: 5 (choose from 14, "),
                          (["export", str(encoder), str(tmp_path / "out"), "--tolerance", "nan"],
                           "--tolerance: 'nan' is not a number above 0")):
        with pytest.raises(SystemExit) as exit_:  # argparse: usage and the message, exit code 2
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv


def test_export_replaces_only_an_earlier_export_never_other_files_or_its_input(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    classifier = write_tiny_encoder(tmp_path / "models" / "classifier")
    config = json.loads((classifier / "config.json").read_text())
    (classifier / "config.json").write_text(json.dumps(config | {"architectures": ["BertForSequenceClassification"]}))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("months of work")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    capsys.readouterr()
    for out, message in ((notes, "is not empty and holds no earlier output (model.onnx)"),
                         (a_file, "is a file"), (classifier, "holds the input"),
                         (tmp_path / "models", "holds the input")):
        assert main(["export", str(classifier), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("distill: error: ") and message in err, err
    assert (notes / "thesis.tex").read_text() == "months of work" and a_file.is_file()
    assert (classifier / "model.safetensors").exists()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "model.onnx").write_bytes(b"")
    for out in (earlier, tmp_path / "empty", tmp_path / "absent"):  # replaceable: no error
        (tmp_path / "empty").mkdir(exist_ok=True)
        atomic.check_replaceable(out, "model.onnx", source=classifier)


def test_export_says_one_line_and_a_damaged_graph_is_one_error(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Without transformers' weight-loading bar and load report (here: the head it initializes) around it; a graph
    cut short made `compress` and `bench` print onnxruntime's traceback."""
    classifier = write_tiny_encoder(tmp_path / "classifier")
    config = json.loads((classifier / "config.json").read_text())
    (classifier / "config.json").write_text(json.dumps(config | {"architectures": ["BertForSequenceClassification"]}))
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_warning()  # its defaults, whichever command ran before in this process
    transformers.logging.enable_progress_bar()
    capfd.readouterr()
    try:
        assert main(["export", str(classifier), str(tmp_path / "onnx")]) == 0
        out, err = capfd.readouterr()
    finally:
        transformers.logging.set_verbosity(verbosity)
        (transformers.logging.enable_progress_bar if bars else transformers.logging.disable_progress_bar)()
    assert out.startswith(f"wrote {tmp_path / 'onnx' / 'model.onnx'} (") and out.count("\n") == 1 and err == ""
    # A parity check failed named the staged file (strict/model.onnx.tmp/model.onnx), which is gone.
    assert main(["export", str(classifier), str(tmp_path / "strict"), "--tolerance", "1e-30"]) == 2
    err = capfd.readouterr().err
    assert "(tolerance 1e-30) on batches [" in err and err.endswith("; nothing was written\n") and ".tmp" not in err
    assert not (tmp_path / "strict").exists()
    # compress says its three lines, without onnxruntime's optimizer's note on the fusion it skips for this tiny
    # vocabulary (in a process of its own: pytest's handler on the root logger would take the note here).
    shutil.copytree(tmp_path / "onnx", tmp_path / "compressed")
    compressed = subprocess.run([sys.executable, "-m", "distill.cli", "compress", str(tmp_path / "compressed")],
                                capture_output=True, text=True, check=True)
    assert compressed.stdout.count("\n") == 3 and compressed.stderr == "", compressed.stderr
    graph = tmp_path / "onnx" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    texts = tmp_path / "texts.txt"
    texts.write_text("a fine film\n")
    for command in (["compress", str(tmp_path / "onnx")], ["bench", str(tmp_path / "onnx"), "--texts", str(texts)]):
        assert main(command) == 2
        err = capfd.readouterr().err
        assert err.startswith("distill: error: ") and f"{graph} is not a readable ONNX graph (" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "latin1.yaml"
    config.write_bytes("# r\xe9sum\xe9\nseed: 1\n".encode("latin-1"))
    assert main(["run", str(config)]) == 2
    assert capsys.readouterr().err == f"distill: error: {config}: not valid UTF-8 (byte 3); save the config as UTF-8\n"


def test_an_error_is_said_where_rank_is_set_outside_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Only torchrun's workers other than rank 0 keep quiet; some launchers set RANK for other reasons."""
    monkeypatch.setenv("RANK", "1")
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.startswith("distill: error: ")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a torchrun worker: rank 0 says it
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == ""


def test_ctrl_c_says_how_to_resume_without_a_traceback(tiny_teacher_dir: Path, synthetic_csv: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("distill.pipeline.run", interrupted)
    config = _write_config(tmp_path / "job.yaml", tiny_teacher_dir, synthetic_csv)
    assert main(["run", str(config)]) == 130
    assert capsys.readouterr().err == (f"distill: interrupted; `distill run {config} --resume` continues from the "
                                       f"last checkpoint\n")
    # The hint keeps the output directory given: without it --resume would start another run in the config's.
    assert main(["run", str(config), "--output-dir", str(tmp_path / "my run")]) == 130
    assert capsys.readouterr().err == (f"distill: interrupted; `distill run {config} --output-dir '{tmp_path}/my run' "
                                       f"--resume` continues from the last checkpoint\n")
    # And the overrides: without them the resumed job would be another config's.
    assert main(["run", str(config), "--set", "train.epochs=1", "--set", "train.lr=1e-3"]) == 130
    assert capsys.readouterr().err == (f"distill: interrupted; `distill run {config} --set=train.epochs=1 "
                                       f"--set=train.lr=1e-3 --resume` continues from the last checkpoint\n")
    # torchrun's workers get the same Ctrl-C: the `distill run` above them says it, once.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr("distill.distributed.process_group", lambda device: contextlib.nullcontext())
    assert main(["run", str(config)]) == 130
    assert capsys.readouterr().err == ""


def test_datasets_list_says_which_are_present(distill_home: Path, capsys: pytest.CaptureFixture) -> None:
    """Like `teachers list`: whether a built-in dataset is pulled under $DISTILL_HOME (it printed descriptions)."""
    assert main(["datasets", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["reviews", "MIT", "no"]
    cache = BUILTIN_DATASETS["reviews"].cache_path(distill_home)
    cache.parent.mkdir(parents=True)
    cache.write_text("")
    assert main(["datasets", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "licence", "present", "description"] and lines[1].split()[:3] == [
        "reviews", "MIT", "yes"]
    for what, name in (("datasets", "reviews"), ("teachers", "mpnet-base")):  # the name was ignored
        assert main([what, "list", name]) == 2
        assert capsys.readouterr().err == (f"distill: error: {what} list takes no name (it lists them all); to "
                                           f"fetch {name}: distill {what} pull {name}\n")


def test_a_write_that_fails_leaves_neither_a_staged_file_nor_a_changed_one(tmp_path: Path) -> None:
    """A checkpoint cut short (a full disk, an object that cannot be pickled) stayed beside the old one as .tmp."""

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("cannot pickle")

    checkpoint = tmp_path / "checkpoint.pt"
    atomic.save_torch({"step": 1}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic.save_torch({"big": bytes(10**6), "bad": Unpicklable()}, checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"] and checkpoint.read_bytes() == before


def test_a_crash_between_the_renames_of_a_directory_swap_loses_nothing(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """replace_dir moves the old directory aside, then the new one in: a process killed between the two left only
    `best.old`, which the next swap deleted, so a job lost its best checkpoint to a crash."""
    target = tmp_path / "best"
    with atomic.building(target) as staged:
        staged.mkdir()
        (staged / "weights").write_text("first")
    rename, renames = os.replace, []

    def killed_at_the_second_rename(source: Path, destination: Path) -> None:
        renames.append(source)
        if len(renames) == 2:
            raise KeyboardInterrupt
        rename(source, destination)

    monkeypatch.setattr(atomic.os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt), atomic.building(target) as staged:
        staged.mkdir()
        (staged / "weights").write_text("second")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.old"]
    with pytest.raises(RuntimeError, match="a build that fails"), atomic.building(target):
        raise RuntimeError("a build that fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (target / "weights").read_text() == "first"


def test_the_progress_bar_of_a_stage_runs_on_across_its_epochs(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """Closed at every epoch's metrics line, the bar restarted (its elapsed time and rate from zero) each epoch; a
    stage's next pass over another split or model still gets a bar of its own."""
    from distill import cli

    bars: list[str] = []
    starts: list[int] = []

    class CountedBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            bars.append(kwargs["desc"])
            starts.append(kwargs["initial"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cli, "tqdm", CountedBar)
    printer = cli.ProgressPrinter()
    printer("stage", {"stage": "distill"})
    for step in range(1, 9):
        printer("progress", {"stage": "distill", "step": step, "total_steps": 8, "epoch": 1 + (step > 4),
                             "loss": 0.5})
        if step == 4:
            printer("metrics", {"stage": "distill", "validation_accuracy": 0.75, "epoch": 1})
    printer("stage", {"stage": "teacher-logits"})
    for split, total in (("train", 3), ("validation", 2)):
        for step in range(1, total + 1):
            printer("progress", {"stage": "teacher-logits", "step": step, "total_steps": total})
        printer("log", {"message": f"{split} done"})
    # A pass counting examples starts at 0, not at its first batch's end (the bar said 31/270 first); a stage
    # resumed from a checkpoint starts at its step.
    printer("progress", {"stage": "teacher-head", "step": 32, "total_steps": 270})
    printer("resumed", {"stage": "finetune", "step": 5, "total_steps": 8})
    printer("progress", {"stage": "finetune", "step": 6, "total_steps": 8, "epoch": 2, "loss": 0.5})
    printer.close()
    assert bars == ["distill", "teacher-logits", "teacher-logits", "teacher-head", "finetune"]
    assert starts == [0, 0, 0, 0, 5]
    out = capsys.readouterr().out
    assert "validation_accuracy=0.7500" in out and "    train done" in out
