"""Causal-LM distillation on tiny seeded GPT-2s: the shift and mask, perplexity and each objective against
hand-computed values, students from teacher blocks, a teacher trained from scratch, and a whole job."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.causal_lm import TASK, check_causal, score, torch_logits, train_lm_teacher, train_tokenizer
from distill.config import (
    ConfigError,
    DataConfig,
    EvaluateConfig,
    Fresh,
    FromModel,
    FromTeacher,
    JobConfig,
    LossConfig,
    TeacherConfig,
    TrainConfig,
)
from distill.engine import _capture_values, _value_loss
from distill.pipeline import run
from distill.runtime import next_tokens
from distill.student import build_student
from tests.conftest import synthetic_rows, write_csv, write_tiny_encoder, write_tiny_gpt2, write_tiny_llama

TEXTS = [text for text, _ in synthetic_rows(240, seed=5)]
# One batch: a 3-token text and a 2-token one padded to 3.
INPUTS = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}


def test_logits_at_t_predict_token_t_plus_one_where_both_are_real() -> None:
    targets, mask = next_tokens(INPUTS)
    assert targets.tolist() == [[6, 7], [9, 0]]
    assert mask.tolist() == [[1, 1], [1, 0]]  # the second text's last real token predicts padding: not counted


def test_perplexity_of_known_distributions() -> None:
    encoded = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in ([1, 2, 3, 1], [2, 1], [3])]
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    vocab = 4

    def uniform(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.zeros(*inputs["input_ids"].shape, vocab)

    def half_on_next(inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # weight 3 on the next token, 1 on the rest
        targets, _ = next_tokens(inputs)
        logits = uniform(inputs)
        logits[:, :-1].scatter_(-1, targets.unsqueeze(-1), math.log(3.0))
        return logits

    assert score(uniform, tokenizer, encoded)["perplexity"] == pytest.approx(vocab)
    assert score(half_on_next, tokenizer, encoded)["perplexity"] == pytest.approx(2.0)
    both = score(half_on_next, tokenizer, encoded, reference=uniform)  # KL(uniform ‖ (1/2, 1/6, 1/6, 1/6))
    assert both["kl_from_teacher"] == pytest.approx(0.25 * (math.log(0.5) + 3 * math.log(1.5)))
    assert score(uniform, tokenizer, encoded, reference=uniform)["kl_from_teacher"] == pytest.approx(0.0)


# Teacher (1/2, 1/2), student (3/4, 1/4) at the one counted position of the second text; mixture m = (5/8, 3/8).
KL_TS = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
KL_ST = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
JSD = 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)) + \
      0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375))


@pytest.mark.parametrize(("divergence", "expected"), [("kd_kl", KL_TS), ("reverse_kl", KL_ST), ("jsd", JSD)])
def test_each_objective_counts_only_predicted_positions(divergence: str, expected: float) -> None:
    inputs = {"input_ids": torch.tensor([[0, 1]]), "attention_mask": torch.tensor([[1, 1]])}
    teacher = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # (B, L, V); the last position predicts nothing
    student = torch.tensor([[[math.log(3.0), 0.0], [-9.0, 9.0]]])
    cfg = LossConfig(temperature=1.0, alpha=0.0, divergence=divergence)
    # rel 1e-5: float32 log-softmax (torch versions differ in the last bits: 1.1e-6 apart seen)
    assert TASK.loss(student, teacher, inputs, torch.zeros(1), cfg).item() == pytest.approx(expected, rel=1e-5)
    # alpha = 1: next-token CE alone, −log p_s(token 1) = −log 1/4.
    ce = TASK.loss(student, teacher, inputs, torch.zeros(1), cfg.model_copy(update={"alpha": 1.0}))
    assert ce.item() == pytest.approx(math.log(4.0))
    assert TASK.loss(student, None, inputs, torch.zeros(1), cfg).item() == pytest.approx(math.log(4.0))


def test_student_from_teacher_blocks_copies_gpt2_blocks(tmp_path: Path) -> None:
    teacher_dir = write_tiny_gpt2(tmp_path / "t", layers=4)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = build_student(FromTeacher(init="teacher", layers=[0, 2]), teacher, str(teacher_dir),
                            auto_class=AutoModelForCausalLM)
    assert student.model.config.n_layer == 2 and student.shares_teacher_tokenizer
    assert torch.equal(student.model.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[2].attn.c_attn.weight)
    assert torch.equal(student.model.lm_head.weight, teacher.lm_head.weight)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_students_of_llama_style_decoders_keep_their_blocks_and_shapes(tmp_path: Path, model_type: str) -> None:
    """`model.layers.N.` was not taken for a block (every block was copied and loading the student failed); Qwen2's
    per-block attention kinds failed its config's check for any student with other than the teacher's depth; a fresh
    student kept the teacher's head width and key-value heads."""
    qwen2 = model_type == "qwen2"
    settings = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2} if qwen2 else {}
    teacher_dir = write_tiny_llama(tmp_path / "t", layers=4, model_type=model_type, **settings)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = build_student(FromTeacher(init="teacher", layers=[0, 2]), teacher, str(teacher_dir),
                            auto_class=AutoModelForCausalLM).model
    assert torch.equal(student.model.layers[1].self_attn.v_proj.weight, teacher.model.layers[2].self_attn.v_proj.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    first = build_student(FromModel(init="model", model=str(teacher_dir), num_layers=3), teacher, str(teacher_dir),
                          auto_class=AutoModelForCausalLM).model
    fresh = build_student(Fresh(init="fresh", num_layers=1, hidden_size=16, num_heads=4, intermediate_size=32),
                          teacher, str(teacher_dir), auto_class=AutoModelForCausalLM).model
    attention = fresh.model.layers[0].self_attn  # 4 heads of 4 for Q, K and V alike
    assert (attention.q_proj.out_features, attention.v_proj.out_features) == (16, 16)
    assert fresh.config.num_key_value_heads == 4
    if qwen2:  # full attention in blocks 0 and 1, sliding windows above
        assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
        assert student.config.layer_types == ["full_attention", "sliding_attention"]
        assert first.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"]
        assert fresh.config.layer_types == ["full_attention"]
    ids = torch.tensor([[1, 2, 3]])
    assert all(model(input_ids=ids).logits.shape == (1, 3, len(AutoTokenizer.from_pretrained(teacher_dir)))
               for model in (student, first, fresh))


@pytest.mark.parametrize("write", [write_tiny_gpt2, write_tiny_llama])
def test_decoder_values_are_the_kv_caches_and_a_copying_student_has_no_value_loss(tmp_path: Path, write: Any) -> None:
    """value_kl on decoders: GPT-2's c_attn computes Q, K and V in one matmul (V its last third), a Llama's v_proj
    gives V for its key-value heads (2 here, under 4 query heads); either way the captured V is its KV cache's."""
    teacher_dir = write(tmp_path / "t", layers=4)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = build_student(FromTeacher(init="teacher", layers=[0, 1]), teacher, str(teacher_dir),
                            auto_class=AutoModelForCausalLM)
    inputs = TASK.collate(student.tokenizer, [TASK.encode(student.tokenizer, ["a fine film", "dull"], 16)[i]
                                              for i in range(2)])
    hooks: list = []
    values = _capture_values(student.model.eval(), hooks), _capture_values(teacher, hooks)
    with torch.no_grad():
        student.model(**inputs)
        cache = teacher(**inputs, use_cache=True).past_key_values
        gap = _value_loss(*values, inputs, student.layer_map)
    assert sorted(values[1]) == [0, 1, 2, 3]
    for layer in range(4):
        torch.testing.assert_close(values[1][layer], cache.layers[layer].values)  # (B, heads, L, d)
    assert gap.item() == pytest.approx(0.0, abs=1e-6)


def test_fresh_gpt2_student_has_the_asked_sizes(tmp_path: Path) -> None:
    teacher_dir = write_tiny_gpt2(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    spec = Fresh(init="fresh", num_layers=1, hidden_size=16, num_heads=2, intermediate_size=40)
    student = build_student(spec, teacher, str(teacher_dir), auto_class=AutoModelForCausalLM).model
    assert (student.config.n_layer, student.config.n_embd, student.config.n_head) == (1, 16, 2)
    assert student.transformer.h[0].mlp.c_fc.weight.shape == (16, 40)  # Conv1D: (in, out); 4 x 16 before


def test_teacher_trained_from_scratch_beats_the_uniform_guess(tmp_path: Path) -> None:
    out = train_lm_teacher(TEXTS[:200], TEXTS[200:], tmp_path / "teacher", layers=1, hidden=32, heads=2,
                           vocab_size=300, max_length=16, train=TrainConfig(epochs=2, batch_size=16, lr=3e-3))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    encoded = TASK.encode(tokenizer, TEXTS[200:], 16)
    assert encoded[0]["input_ids"][0] == encoded[0]["input_ids"][-1] == tokenizer.eos_token_id  # BOS is EOS
    assert score(torch_logits(model, "fp32"), tokenizer, encoded)["perplexity"] < len(tokenizer) / 3
    assert not any(p.name.startswith("tmp") for p in tmp_path.iterdir())  # the work directory is gone


def test_tiny_causal_lm_job_writes_a_report_and_a_checked_onnx_student(tmp_path: Path) -> None:
    teacher_dir = train_lm_teacher(TEXTS, TEXTS[:40], tmp_path / "teacher", layers=2, hidden=32, heads=2,
                                   vocab_size=300, max_length=16, train=TrainConfig(epochs=2, batch_size=16, lr=3e-3))
    csv = write_csv(tmp_path / "texts.csv", synthetic_rows(200, seed=9))
    events: list[tuple[str, dict]] = []
    config = JobConfig(task="causal-lm", teacher=TeacherConfig(name=str(teacher_dir)),
                       data=DataConfig(dataset="files", train=csv, max_length=16),
                       student=FromTeacher(init="teacher", layers=[1]), loss=LossConfig(divergence="jsd"),
                       train=TrainConfig(epochs=2, batch_size=16, lr=3e-3), evaluate=EvaluateConfig(latency_calls=10),
                       output_dir=tmp_path / "job")
    result = run(config, lambda kind, data: events.append((kind, data)))

    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert report["task"] == "causal-lm"
    assert [d["stage"] for k, d in events if k == "stage"] == [
        "data", "build-student", "distill", "evaluate", "export", "compress", "evaluate-deployment"]
    measured = [(d["step"], d["total_steps"]) for k, d in events
                if k == "progress" and d["stage"] == "evaluate-deployment"]
    assert measured == [(i, 4) for i in range(1, 5)]  # teacher, student in PyTorch, fp32 and INT8 ONNX
    assert report["student"]["test_perplexity"] == pytest.approx(
        report["perplexity_ratio"] * report["teacher"]["test_perplexity"])
    assert report["student"]["test_kl_from_teacher"] > 0
    assert report["param_ratio"] < 1
    assert report["export"]["student"]["max_abs_diff"] <= 1e-4
    rows = report["evaluation"]["models"]
    assert rows["student-onnx-fp32"]["test_perplexity"] == pytest.approx(report["student"]["test_perplexity"],
                                                                         rel=1e-4)
    assert rows["student-onnx-int8"]["test_perplexity"] < 2 * report["student"]["test_perplexity"]
    assert report["evaluation"]["latency_ratio"] > 0
    assert "| student-onnx-int8 |" in (tmp_path / "job" / "report.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(result.student_dir).config.n_layer == 1


def test_a_llama_distills_into_its_own_blocks_with_every_layer_loss_and_exports_checked(tmp_path: Path) -> None:
    """A hub Llama (Mistral, Qwen2) takes the GPT-2 path: blocks copied, hidden states, attention maps and value
    relations matched, the ONNX graph with its KV cache checked against PyTorch."""
    teacher_dir = write_tiny_llama(tmp_path / "teacher", layers=4)
    config = JobConfig(task="causal-lm", teacher=TeacherConfig(name=str(teacher_dir)),
                       data=DataConfig(dataset="files", train=write_csv(tmp_path / "texts.csv",
                                                                        synthetic_rows(120, seed=9)), max_length=16),
                       student=FromTeacher(init="teacher", layers=[1, 3]),
                       loss=LossConfig(hidden_mse=1.0, attention_kl=1.0, value_kl=1.0),
                       train=TrainConfig(epochs=1, batch_size=16, lr=3e-3), evaluate=EvaluateConfig(latency_calls=10),
                       output_dir=tmp_path / "job")
    run(config)
    report = json.loads((tmp_path / "job" / "report.json").read_text())
    assert math.isfinite(report["student"]["test_perplexity"]) and report["param_ratio"] < 1
    assert report["export"]["student"]["max_abs_diff"] <= 1e-4
    assert report["evaluation"]["models"]["student-onnx-fp32"]["test_perplexity"] == pytest.approx(
        report["student"]["test_perplexity"], rel=1e-4)


def test_an_encoder_teacher_is_refused_before_training(tmp_path: Path) -> None:
    """The default teacher (an encoder) loads as AutoModelForCausalLM too, but sees later tokens: its config says so
    (check_student), and so does the loaded model (check_causal, for configs that do not)."""
    csv = write_csv(tmp_path / "texts.csv", synthetic_rows(60, seed=9))
    config = JobConfig(task="causal-lm", teacher=TeacherConfig(name=str(write_tiny_encoder(tmp_path / "bert"))),
                       data=DataConfig(dataset="files", train=csv, max_length=16),
                       student=FromTeacher(init="teacher", layers=[1]), output_dir=tmp_path / "job")
    with pytest.raises(ConfigError, match=r"is not a causal language model .* needs a decoder such as GPT-2"):
        run(config, lambda kind, data: None)
    assert not (tmp_path / "job" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match=r"is not a causal language model .* an encoder, BertLMHeadModel"):
        check_causal(AutoModelForCausalLM.from_pretrained(tmp_path / "bert"), "bert")
    check_causal(AutoModelForCausalLM.from_pretrained(write_tiny_gpt2(tmp_path / "gpt2")), "gpt2")  # passes


def test_distill_run_prints_the_causal_lm_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import yaml

    from distill.cli import main

    teacher_dir = train_lm_teacher(TEXTS, TEXTS[:40], tmp_path / "teacher", layers=2, hidden=32, heads=2,
                                   vocab_size=300, max_length=16, train=TrainConfig(epochs=1, batch_size=16, lr=3e-3))
    corpus = tmp_path / "corpus.txt"  # texts alone: a causal LM needs no labels
    corpus.write_text("".join(text + "\n" for text, _ in synthetic_rows(100, seed=9)), encoding="utf-8")
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "task": "causal-lm", "teacher": {"name": str(teacher_dir)},
        "data": {"dataset": "files", "train": str(corpus), "max_length": 16},
        "student": {"init": "teacher", "layers": [1]}, "train": {"epochs": 1, "batch_size": 16},
        "export": {"onnx": False}}))
    assert main(["run", str(config), "--output-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("{\n"):])
    assert summary["student_dir"] == str(tmp_path / "out" / "student")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (summary["student_test_perplexity"], summary["param_ratio"]) == (report["student"]["test_perplexity"],
                                                                            report["param_ratio"])


@pytest.mark.slow  # starts several processes: tens of seconds
def test_two_processes_distill_a_causal_lm_like_one(tmp_path: Path) -> None:
    """`distill run` with nproc_per_node 2 → torchrun → DDP, the teacher on each rank's slice → rank 0 reports. The
    loss is a mean over each slice's tokens while ranks weigh by examples, so the two runs come close, not equal."""
    import yaml

    from distill.cli import main

    teacher_dir = train_lm_teacher(TEXTS, TEXTS[:40], tmp_path / "teacher", layers=2, hidden=32, heads=2,
                                   vocab_size=300, max_length=16, train=TrainConfig(epochs=1, batch_size=16, lr=3e-3))
    csv = write_csv(tmp_path / "texts.csv", synthetic_rows(200, seed=9))
    reports = {}
    for nproc in (2, 1):
        config = tmp_path / f"job{nproc}.yaml"
        config.write_text(yaml.safe_dump({
            "task": "causal-lm", "teacher": {"name": str(teacher_dir)},
            "data": {"dataset": "files", "train": str(csv), "max_length": 16},
            "student": {"init": "teacher", "layers": [1]}, "train": {"epochs": 2, "batch_size": 16, "dropout": 0},
            "export": {"onnx": False}, "distributed": {"nproc_per_node": nproc}}))
        assert main(["run", str(config), "--output-dir", str(tmp_path / f"out{nproc}")]) == 0
        reports[nproc] = json.loads((tmp_path / f"out{nproc}" / "report.json").read_text())["student"]
    one, two = reports[1], reports[2]
    assert two["steps"] == one["steps"] == 2 * 10  # 160 training texts in global batches of 16
    assert two["test_perplexity"] == pytest.approx(one["test_perplexity"], rel=1e-3)  # measured: 7e-6


def test_the_teacher_command_refuses_what_it_cannot_train_in_one_line(distill_home: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """`python -m distill.causal_lm OUT_DIR` (the README's way to a causal-LM teacher): the dataset not pulled yet and
    a width the heads do not divide were tracebacks."""
    from distill.causal_lm import main

    assert main([str(distill_home / "lm")]) == 2
    assert capsys.readouterr().err.startswith("python -m distill.causal_lm: error: dataset 'reviews' is not "
                                              "downloaded yet")
    with pytest.raises(SystemExit) as exit_:
        main([str(distill_home / "lm"), "--hidden", "30", "--heads", "4"])
    assert exit_.value.code == 2 and "--hidden (30) must be divisible by --heads (4)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(distill_home / "lm"), "--layers", "0"])
    assert "'0' is not a whole number of at least 1" in capsys.readouterr().err


def test_an_int8_lm_whose_perplexity_is_nan_fails_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN fails `<=`, so the gate quietly served fp32 with a 'nan%' message; the other tasks fail the job."""
    from distill import causal_lm
    from distill.compress import INT8_FILE, CompressError

    monkeypatch.setattr(causal_lm, "onnx_logits", lambda path: path.name)
    monkeypatch.setattr(causal_lm, "score", lambda logits, tokenizer, texts: {
        "perplexity": math.nan if logits == INT8_FILE else 12.0})
    with pytest.raises(CompressError, match=r"INT8 validation perplexity is nan: .* \(compress.exclude_ops\)"):
        causal_lm._perplexity_gate(tmp_path, None, [], 5.0)
