"""Predictors: PyTorch and ONNX agree on the same model; threads are set on the session; load_model picks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.compress import optimize
from distill.embedding import export_embedding_onnx, load_sentence_encoder
from distill.evaluate import evaluate_models, footprint, render_markdown
from distill.export import export_model_dir
from distill.runtime import (
    CPU,
    OnnxEmbedder,
    OnnxPredictor,
    Predictor,
    TorchEmbedder,
    TorchLanguageModel,
    TorchPredictor,
    available_cpus,
    load_model,
    load_tokenizer,
    onnx_file,
)
from tests.conftest import write_sentence_teacher, write_tiny_encoder, write_tiny_gpt2
from tests.test_export import LABELS, random_texts, write_tiny_classifier  # the lead may move these to conftest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"))


@pytest.fixture(scope="module")
def onnx_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model_dir(model_dir, tmp_path_factory.mktemp("export") / "onnx").path.parent


def test_torch_and_onnx_agree(model_dir: Path, onnx_dir: Path) -> None:
    texts = random_texts(7, seed=3) + ["", "a" * 2000]  # empty and over-long (truncated to max_length) texts
    predictors: list[Predictor] = [TorchPredictor(model_dir, max_length=64),
                                   OnnxPredictor(onnx_dir / "model.onnx", onnx_dir, max_length=64, threads=1)]
    torch_out, onnx_out = (p.predict(texts) for p in predictors)
    assert torch_out.labels == onnx_out.labels
    np.testing.assert_allclose(torch_out.probabilities, onnx_out.probabilities, atol=1e-4)
    for predictor, out in zip(predictors, (torch_out, onnx_out), strict=True):
        assert out.probabilities.shape == (len(texts), 2) and out.probabilities.dtype == np.float32
        np.testing.assert_allclose(out.probabilities.sum(axis=1), 1.0, rtol=1e-6)
        assert out.seconds > 0
        assert (predictor.num_labels, predictor.label_names) == (2, [LABELS[0], LABELS[1]])


def test_onnx_session_uses_the_threads_asked_for(onnx_dir: Path) -> None:
    options = OnnxPredictor(onnx_dir / "model.onnx", onnx_dir, threads=3).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)


def test_onnx_sessions_default_to_pytorchs_threads(onnx_dir: Path, model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Timed side by side, both runtimes use as many threads (torchrun's workers run PyTorch on one): a count that
    is not the CPUs', which onnxruntime used to take."""
    threads = available_cpus() + 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    models = {"torch": TorchPredictor(model_dir), "onnx": OnnxPredictor(onnx_dir / "model.onnx", onnx_dir)}
    report = evaluate_models(models, ["a fine film", "a dull film"], [LABELS[1], LABELS[0]], reference="torch",
                             latency_calls=2, throughput_batch=2)
    assert {name: row["threads"] for name, row in report["models"].items()} == {"torch": threads, "onnx": threads}


def test_onnx_threads_spin_between_calls_only_when_asked(onnx_dir: Path) -> None:
    def spinning(predictor: OnnxPredictor) -> str:
        return predictor.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert spinning(OnnxPredictor(onnx_dir / "model.onnx", onnx_dir, threads=1)) == "1"  # ORT's default
    assert spinning(OnnxPredictor(onnx_dir / "model.onnx", onnx_dir, threads=1, spinning=False)) == "0"


def test_an_embedders_predict_runs_its_texts_as_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = TorchEmbedder(write_sentence_teacher(tmp_path / "teacher"))
    batches: list[int] = []
    embed_batch = embedder._embed_batch
    monkeypatch.setattr(embedder, "_embed_batch", lambda encoded: batches.append(len(encoded["input_ids"])) or
                        embed_batch(encoded))
    assert embedder.predict(["a fine film"] * 100).vectors.shape[0] == 100 and batches == [100]


def test_load_model_picks_by_what_the_path_holds(model_dir: Path, onnx_dir: Path, tmp_path: Path) -> None:
    assert isinstance(load_model(model_dir), TorchPredictor)
    assert isinstance(load_model(onnx_dir), OnnxPredictor)
    assert isinstance(load_model(onnx_dir / "model.onnx"), OnnxPredictor)
    # Encoders without a classification head embed: a sentence-transformers directory, a plain HF encoder (mean
    # pooling, not a random classifier head) and an exported embedding graph.
    teacher = write_sentence_teacher(tmp_path / "teacher")
    assert isinstance(load_model(teacher), TorchEmbedder)
    assert isinstance(load_model(write_tiny_encoder(tmp_path / "plain")), TorchEmbedder)
    export_embedding_onnx(load_sentence_encoder(teacher), load_tokenizer(teacher), tmp_path / "teacher-onnx")
    exported = load_model(tmp_path / "teacher-onnx")
    assert isinstance(exported, OnnxEmbedder)
    texts = random_texts(5, seed=8)
    np.testing.assert_allclose(exported.embed(texts), load_model(teacher).embed(texts), atol=1e-4)


def test_a_model_reads_no_more_tokens_than_it_has_positions(tmp_path: Path) -> None:
    """`distill bench` asks for 128 tokens by default; a 64-position GPT-2 given a longer text would index past its
    position table, as would an encoder asked for more than it has."""
    lm = load_model(write_tiny_gpt2(tmp_path / "lm"))
    assert isinstance(lm, TorchLanguageModel) and lm.max_length == 64
    scores = lm.predict([" ".join(["good"] * 200)])
    assert scores.tokens.tolist() == [63]
    # The same for an encoder; an MPNet's 66-row table holds 64 tokens (its position ids start after padding).
    encoder = load_model(write_sentence_teacher(tmp_path / "mpnet"), max_length=1000)
    assert isinstance(encoder, TorchEmbedder) and encoder.max_length == 64
    assert encoder.embed([" ".join(["good"] * 200)]).shape == (1, 32)


def test_a_matrix_stored_again_transposed_counts_once(tmp_path: Path) -> None:
    """A tied output projection: the exporter keeps the embedding (for Gather) and its transpose (for MatMul)."""
    from onnx import helper, numpy_helper, save

    rng = np.random.default_rng(0)
    embedding, other = rng.standard_normal((10, 4), dtype=np.float32), rng.standard_normal((4, 10), dtype=np.float32)
    tensors = {"wte": embedding, "lm_head": embedding.T.copy(), "projection": other}
    save(helper.make_model(helper.make_graph([], "tied", [], [], initializer=[
        numpy_helper.from_array(array, name) for name, array in tensors.items()])), tmp_path / "model.onnx")
    assert footprint(tmp_path / "model.onnx")[1] == 40 + 40


def test_a_sentence_encoders_dense_projection_is_counted(tmp_path: Path) -> None:
    from torch import nn
    from transformers import AutoModel, AutoTokenizer

    from distill.embedding import SentenceEncoder, save_sentence_encoder

    source = write_tiny_encoder(tmp_path / "encoder")
    model = SentenceEncoder(AutoModel.from_pretrained(source), "mean", nn.Linear(32, 48), True)
    save_sentence_encoder(model, AutoTokenizer.from_pretrained(source), tmp_path / "st", max_length=16)
    assert footprint(tmp_path / "st")[1] == sum(p.numel() for p in model.parameters())


def test_a_directory_is_measured_by_the_graph_it_runs(onnx_dir: Path, tmp_path: Path) -> None:
    """An export directory after `optimize` holds model.onnx and the fused model_optimized.onnx; load_model runs the
    fused one, so its size and parameters are the ones `distill bench` reports."""
    directory = shutil.copytree(onnx_dir, tmp_path / "onnx")
    optimize(directory / "model.onnx", directory)
    assert onnx_file(directory) == directory / "model_optimized.onnx"
    assert footprint(directory) == footprint(directory / "model_optimized.onnx") != footprint(directory / "model.onnx")


def test_missing_tokenizer_is_an_error_not_unknown_tokens(model_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        TorchPredictor(tmp_path)


def test_empty_batch_is_rejected(onnx_dir: Path) -> None:
    with pytest.raises(ValueError, match="texts is empty"):
        load_model(onnx_dir).predict([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the PyTorch models on the GPU")
def test_pytorch_models_answer_on_the_gpu_as_on_the_cpu(model_dir: Path, tmp_path: Path) -> None:
    gpu, texts = torch.device("cuda", 0), random_texts(7, seed=5)
    on_cpu, on_gpu = TorchPredictor(model_dir, 64), TorchPredictor(model_dir, 64, device=gpu)
    cpu_out, gpu_out = on_cpu.predict(texts), on_gpu.predict(texts)
    assert cpu_out.labels == gpu_out.labels
    np.testing.assert_allclose(gpu_out.probabilities, cpu_out.probabilities, atol=1e-4)
    teacher = write_sentence_teacher(tmp_path / "teacher")
    np.testing.assert_allclose(TorchEmbedder(teacher, 16, device=gpu).embed(texts),
                               TorchEmbedder(teacher, 16).embed(texts), atol=1e-4)
    lm = write_tiny_gpt2(tmp_path / "lm")
    np.testing.assert_allclose(TorchLanguageModel(lm, 32, device=gpu).predict(texts).nll,
                               TorchLanguageModel(lm, 32, device=CPU).predict(texts).nll, rtol=1e-4)

    report = evaluate_models({"cpu": on_cpu, "gpu": on_gpu}, texts, None, latency_calls=3, warmup_calls=1,
                             throughput_batch=4, throughput_batches=1)
    assert [row["device"] for row in report["models"].values()] == ["cpu", "cuda:0"]
    assert "| gpu | pytorch (cuda:0) |" in render_markdown(report)
