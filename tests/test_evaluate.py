"""Side-by-side evaluation (classifiers: accuracy, agreement; sentence encoders: cosine, recall@10; both: latency,
throughput, the Markdown table), texts of N tokens, and the `distill export|compress|bench` commands on a tiny
model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.compress import INT8_FILE
from distill.evaluate import (
    EvaluateError,
    evaluate_models,
    neighbour_recall,
    render_markdown,
    retention_interval,
    text_of_length,
)
from distill.export import export_model_dir
from distill.runtime import ONNX_FILE, HFPredictor, OnnxPredictor, TorchEmbedder, TorchPredictor
from tests.conftest import (
    synthetic_rows,
    write_csv,
    write_sentence_teacher,
    write_tiny_encoder,
    write_tiny_tokenizer,
)
from tests.test_export import LABELS, random_texts, write_tiny_classifier

FAST = {"latency_calls": 20, "warmup_calls": 2, "throughput_batch": 8, "throughput_batches": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"))


@pytest.fixture(scope="module")
def predictors(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, HFPredictor]:
    onnx_dir = export_model_dir(model_dir, tmp_path_factory.mktemp("export") / "onnx").path.parent
    return {"torch": TorchPredictor(model_dir), "onnx": OnnxPredictor(onnx_dir / ONNX_FILE, onnx_dir, threads=1)}


def test_two_runtimes_of_one_model_side_by_side(predictors: dict[str, HFPredictor]) -> None:
    texts = random_texts(20, seed=4)
    own = predictors["torch"].predict(texts).labels
    labels = [1 - label if i < 5 else label for i, label in enumerate(own)]  # 5 of 20 wrong: accuracy 0.75
    lines: list[str] = []
    report = evaluate_models(predictors, texts, labels, sizes={"onnx": 123}, params={"torch": 456},
                             on_progress=lines.append, **FAST)

    assert (report["task"], report["reference"], report["texts"]) == ("sequence-classification", "torch", 20)
    assert list(report["models"]) == ["torch", "onnx"]
    for name, row in report["models"].items():
        assert row["accuracy"] == pytest.approx(0.75)
        assert row["agreement"] == 1.0
        latency = row["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
        assert row["throughput_texts_per_second"] > 0
        assert row["latency_sequence_length"] is None  # timed on the texts, not on one fixed text
        assert len([line for line in lines if line.startswith(f"[{1 + list(predictors).index(name)}/2] {name}")]) == 2
    torch_row, onnx_row = report["models"]["torch"], report["models"]["onnx"]
    assert (torch_row["speedup_b1"], torch_row["throughput_ratio"]) == (1.0, 1.0)
    assert onnx_row["speedup_b1"] == pytest.approx(torch_row["latency_ms"]["p50"] / onnx_row["latency_ms"]["p50"])
    assert (torch_row["format"], onnx_row["format"], onnx_row["threads"]) == ("pytorch", "onnxruntime", 1)
    assert (torch_row["device"], onnx_row["device"]) == ("cpu", "cpu")
    assert (onnx_row["size_bytes"], torch_row["params"], torch_row["size_bytes"]) == (123, 456, None)
    assert set(report["machine"]) >= {"cpu", "int8_flags", "cpus_available", "torch_threads"}
    json.dumps(report)  # JSON-ready as it is

    table = render_markdown(report)
    assert "| torch | pytorch | 456 |" in table and "| onnx | onnxruntime |" in table
    assert "20 texts; agreement and speed-ups vs torch" in table and "Machine: " in table


def test_fixed_timing_text_and_no_labels(predictors: dict[str, HFPredictor]) -> None:
    text = text_of_length(predictors["torch"], 16)
    report = evaluate_models(predictors, random_texts(5, seed=5), None, reference="onnx", latency_text=text, **FAST)
    assert report["reference"] == "onnx" and report["models"]["onnx"]["speedup_b1"] == 1.0
    assert {row["latency_sequence_length"] for row in report["models"].values()} == {16}
    assert all(row["accuracy"] is None and row["agreement"] == 1.0 for row in report["models"].values())
    assert "a fixed text of 16 tokens" in render_markdown(report)
    header = render_markdown({**report, "settings": {**report["settings"], "throughput_batch": 1}}).splitlines()[0]
    columns = [column.strip() for column in header.strip("|").split("|")]
    assert len(set(columns)) == len(columns), header  # "speed-up b1" was there twice when throughput ran one by one


def test_models_that_cannot_be_compared_are_refused(predictors: dict[str, HFPredictor]) -> None:
    with pytest.raises(EvaluateError, match="reference 'nope' is not one of the models: torch, onnx"):
        evaluate_models(predictors, ["good"], None, reference="nope")
    with pytest.raises(EvaluateError, match="2 labels for 1 texts"):
        evaluate_models(predictors, ["good"], [0, 1])

    class Renamed:
        name, num_labels, label_names = "renamed", 2, ["neg", "pos"]
        predict = predictors["torch"].predict

    with pytest.raises(EvaluateError, match="name their classes differently"):
        evaluate_models({"torch": predictors["torch"], "renamed": Renamed()}, ["good"], None)


def test_sentence_encoders_side_by_side(predictors: dict[str, HFPredictor], tmp_path: Path) -> None:
    """The same encoder twice agrees fully; a narrower one has no cosine to the reference, only neighbours."""
    teacher = write_sentence_teacher(tmp_path / "teacher")  # 32 wide, normalized
    narrow = write_tiny_encoder(tmp_path / "narrow", seed=3, hidden=16)  # a plain HF encoder: mean pooling
    encoders = {"teacher": TorchEmbedder(teacher, 16), "again": TorchEmbedder(teacher, 16),
                "narrow": TorchEmbedder(narrow, 16)}
    texts = random_texts(12, seed=7)
    report = evaluate_models(encoders, texts, None, params={"narrow": 789}, **FAST)

    assert (report["task"], report["reference"], report["labelled"]) == ("sentence-embedding", "teacher", False)
    rows = report["models"]
    assert rows["again"]["cosine"] == pytest.approx(1.0) and rows["again"]["recall_at_10"] == 1.0
    expected = neighbour_recall(encoders["narrow"].embed(texts), encoders["teacher"].embed(texts))
    assert (rows["narrow"]["dimension"], rows["narrow"]["cosine"]) == (16, None)
    assert rows["narrow"]["recall_at_10"] == pytest.approx(expected) and expected < 1.0
    assert all(row["format"] == "pytorch" and row["latency_ms"]["p50"] > 0 and "accuracy" not in row
               for row in rows.values())
    table = render_markdown(report)
    assert "| dim | cosine | recall@10 |" in table and "| narrow | pytorch | 789 | — | 16 | — |" in table

    with pytest.raises(EvaluateError, match="labels: sentence-embedding models have no classes"):
        evaluate_models(encoders, texts, [0] * len(texts), **FAST)
    with pytest.raises(EvaluateError, match="models of different tasks cannot be compared.*'torch': "
                                            "'sequence-classification'"):
        evaluate_models({"teacher": encoders["teacher"], "torch": predictors["torch"]}, texts, None, **FAST)


@pytest.mark.parametrize("n", [3, 16, 128])
def test_text_of_length_gives_exactly_n_tokens(predictors: dict[str, HFPredictor], tmp_path: Path, n: int) -> None:
    text = text_of_length(predictors["torch"], n)
    assert len(predictors["torch"].tokenizer(text)["input_ids"]) == n
    tiny = write_tiny_tokenizer(tmp_path / "tokenizer")  # a 31-word vocabulary; from a directory this time
    assert len(tiny(text_of_length(tmp_path / "tokenizer", n))["input_ids"]) == n


def test_text_of_length_needs_room_for_a_word(predictors: dict[str, HFPredictor]) -> None:
    with pytest.raises(ValueError, match="^2 tokens leave no room"):
        text_of_length(predictors["torch"], 2)


def test_export_compress_bench_commands(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    onnx_dir = tmp_path / "onnx"
    assert main(["export", str(model_dir), str(onnx_dir)]) == 0
    assert (onnx_dir / ONNX_FILE).is_file()
    assert "max |logit difference| from PyTorch" in capsys.readouterr().out

    assert main(["compress", str(onnx_dir), "--max-length", "32"]) == 0
    assert (onnx_dir / INT8_FILE).is_file()
    assert f"{onnx_dir / INT8_FILE}: " in capsys.readouterr().out

    rows = [(text, LABELS[i % 2]) for i, (text, _) in enumerate(synthetic_rows(12, seed=6))]
    data, out = write_csv(tmp_path / "texts.csv", rows), tmp_path / "bench.json"
    models = [str(model_dir), str(onnx_dir), str(onnx_dir / INT8_FILE)]
    assert main(["bench", *models, "--texts", str(data), "--labels-column", "label", "--latency-calls", "5",
                 "--warmup-calls", "1", "--batch-size", "4", "--throughput-batches", "1", "--seq-len", "24",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    # The directory's row is named by the graph that ran: the fused fp32 one, not the INT8 beside it.
    models[1] = str(onnx_dir / "model_optimized.onnx")
    assert list(report["models"]) == models and report["reference"] == models[0]
    assert all(row["accuracy"] is not None and row["size_bytes"] > 0 and row["params"] > 0
               for row in report["models"].values())
    assert all(f"| {m} |" in printed for m in models) and "[3/3]" in printed


def test_bench_command_on_sentence_encoders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    teacher, narrow = write_sentence_teacher(tmp_path / "teacher"), write_tiny_encoder(tmp_path / "narrow", hidden=16)
    texts = tmp_path / "texts.csv"
    write_csv(texts, [(text, LABELS[i % 2]) for i, text in enumerate(random_texts(12, seed=9))])
    out = tmp_path / "bench.json"
    assert main(["bench", str(teacher), str(narrow), "--texts", str(texts), "--latency-calls", "3",
                 "--warmup-calls", "1", "--batch-size", "4", "--throughput-batches", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "sentence-embedding" and report["models"][str(narrow)]["dimension"] == 16
    assert "| dim | cosine | recall@10 |" in capsys.readouterr().out

    assert main(["bench", str(teacher), "--texts", str(texts), "--labels-column", "label"]) == 2
    assert "--label-column: " in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["export", "/no/such/model", "{tmp}/out"],
    ["compress", "/no/such/model"],
    ["bench", "{model}", "/no/such/model", "--texts", "{texts}"],
    ["bench", "{model}", "--texts", "/no/such/model.txt"],
])
def test_bad_paths_are_one_line_errors(command: list[str], model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("good movie\nbad plot\n")
    argv = [arg.format(tmp=tmp_path, model=model_dir, texts=texts) for arg in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error: ") and "/no/such/model" in err and "Traceback" not in err


def test_bench_refuses_a_seq_len_past_a_models_positions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """load_model caps a model's max_length at its positions, so --seq-len 100 on a 64-position encoder timed a
    64-token text and said so only in a footnote."""
    encoder = write_tiny_encoder(tmp_path / "encoder")  # 64 positions
    texts = tmp_path / "texts.txt"
    texts.write_text("good movie\nbad plot\n")
    capsys.readouterr()  # the model's save
    assert main(["bench", str(encoder), "--texts", str(texts), "--seq-len", "100"]) == 2
    assert capsys.readouterr().err == (f"distill: error: --seq-len 100: {encoder} reads at most 64 tokens (its "
                                       f"positions); give at most 64\n")


def test_retention_interval_of_equal_answers_is_a_point() -> None:
    correct = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.8
    interval = retention_interval(correct, correct, resamples=200)
    assert (interval["low"], interval["high"]) == (1.0, 1.0)


def test_retention_interval_covers_the_true_retention_about_as_often_as_it_says() -> None:
    """Texts drawn from a known population (teacher right 90% of the time, the student right on 95% of those and 20%
    of the rest, so its retention is (0.9·0.95 + 0.1·0.2)/0.9 = 0.9722): the 90% intervals of 200 samples of 400
    texts contain 0.9722 in about 90% of them, and a sample 16 times larger gives an interval about 4 times
    narrower."""
    generator = torch.Generator().manual_seed(1)
    truth = (0.9 * 0.95 + 0.1 * 0.2) / 0.9

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        teacher = torch.rand(n, generator=generator) < 0.9
        student = torch.rand(n, generator=generator) < torch.where(teacher, 0.95, 0.2)
        return student, teacher

    intervals = [retention_interval(*sample(400), level=0.9, resamples=400, seed=i) for i in range(200)]
    covered = sum(i["low"] <= truth <= i["high"] for i in intervals) / len(intervals)
    assert 0.83 <= covered <= 0.96
    width = sum(i["high"] - i["low"] for i in intervals) / len(intervals)
    wide = retention_interval(*sample(6400), level=0.9, resamples=400)
    assert 2.5 < width / (wide["high"] - wide["low"]) < 6
