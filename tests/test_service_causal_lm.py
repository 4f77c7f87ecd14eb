"""Serving a tiny finished causal-LM job: the runtime's language models (scores, generation), /v1/models listing,
/score and /generate on every variant, /v1/compare on language models, and the errors that name what is allowed."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill import causal_lm
from distill.causal_lm import train_lm_teacher
from distill.config import DataConfig, EvaluateConfig, FromTeacher, JobConfig, TeacherConfig, TrainConfig
from distill.data import load_task_data
from distill.evaluate import next_token_agreement
from distill.pipeline import run
from distill.runtime import InputError, OnnxLanguageModel, TorchLanguageModel, load_model
from service.models import ModelCatalog
from service.settings import Settings
from tests.conftest import (
    compare_in_background,
    merged_concurrently,
    models_client,
    run_tiny_embedding_job,
    synthetic_rows,
    write_csv,
)

IDS = ["lm.teacher", "lm.student", "lm.student-fp32", "lm.student-torch"]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A home holding a finished tiny causal-LM job, jobs/lm: a 2-block GPT-2 (width 32) trained on synthetic
    texts → its block 1 alone (distilled on a .txt file: texts without labels), exported to ONNX fp32 and INT8;
    and the tiny sentence-embedding job, jobs/emb."""
    root = tmp_path_factory.mktemp("service-causal-lm")
    texts = [text for text, _ in synthetic_rows(240, seed=5)]
    teacher = train_lm_teacher(texts, texts[:40], root / "teacher", layers=2, hidden=32, heads=2, vocab_size=300,
                               max_length=MAX_LENGTH, train=TrainConfig(epochs=2, batch_size=16, lr=3e-3))
    corpus = root / "texts.txt"
    corpus.write_text("".join(f"{text}\n" for text, _ in synthetic_rows(200, 9)))
    config = JobConfig(task="causal-lm", teacher=TeacherConfig(name=str(teacher)),
                       data=DataConfig(dataset="files", train=corpus, max_length=MAX_LENGTH),
                       student=FromTeacher(init="teacher", layers=[1]),
                       train=TrainConfig(epochs=2, batch_size=16, lr=3e-3), evaluate=EvaluateConfig(latency_calls=10),
                       output_dir=root / "home" / "jobs" / "lm")
    run(config)
    run_tiny_embedding_job(root / "embedding", root / "home" / "jobs" / "emb")  # a second task beside it
    return Settings(home=root / "home", max_batch_texts=8, max_text_chars=100)


@pytest.fixture(scope="module")
def report(settings: Settings) -> dict:
    return json.loads((settings.jobs_dir / "lm" / "report.json").read_text())


@pytest.fixture(scope="module")
def test_texts(report: dict) -> list[str]:
    return [e.text for e in load_task_data(DataConfig(**report["config"]["data"]), labelled=False).test]


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    yield from models_client(settings)


def _perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)


def test_load_model_runs_both_formats_of_a_language_model_alike(settings: Settings, report: dict,
                                                              test_texts: list[str]) -> None:
    """The PyTorch directory and the exported graph load as language models and score the test split as the job
    did (its report's perplexities, which distill.causal_lm computed on its own path)."""
    job = settings.jobs_dir / "lm"
    torch_lm, onnx_lm = load_model(job / "student", MAX_LENGTH), load_model(job / "student-onnx", MAX_LENGTH)
    assert isinstance(torch_lm, TorchLanguageModel) and isinstance(onnx_lm, OnnxLanguageModel)
    scores = {name: [model.predict(test_texts[i:i + 16]) for i in range(0, len(test_texts), 16)]
              for name, model in (("torch", torch_lm), ("onnx", onnx_lm))}
    perplexity = {name: _perplexity(sum(s.nll.sum() for s in parts), sum(s.tokens.sum() for s in parts))
                  for name, parts in scores.items()}
    assert perplexity["torch"] == pytest.approx(report["student"]["test_perplexity"], rel=1e-5)
    assert perplexity["onnx"] == pytest.approx(report["evaluation"]["models"]["student-onnx-fp32"]["test_perplexity"],
                                               rel=1e-5)
    first = scores["torch"][0]
    assert first.tokens.tolist() == [len(ids) - 1 for ids in torch_lm.encode(test_texts[:16])]
    assert [len(g) for g in first.guesses] == first.tokens.tolist()


def test_greedy_generation_is_what_transformers_generates(settings: Settings) -> None:
    """Every loop — PyTorch's and onnxruntime's, each with its KV cache and re-running the whole sequence — picks
    the tokens transformers' generate (KV cache, greedy) picks on the same model."""
    student_dir = settings.jobs_dir / "lm" / "student"
    prompt = "the movie was"
    torch_lm = TorchLanguageModel(student_dir, MAX_LENGTH)
    ids = torch.tensor([torch_lm.encode([prompt])[0][:-1]])  # the start token and the prompt, no end token
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=torch_lm.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    onnx_file = settings.jobs_dir / "lm" / "student-onnx" / "model.onnx"
    for lm in (torch_lm, TorchLanguageModel(student_dir, MAX_LENGTH, kv_cache=False),
               OnnxLanguageModel(onnx_file, MAX_LENGTH), OnnxLanguageModel(onnx_file, MAX_LENGTH, kv_cache=False)):
        generation = lm.generate(prompt, max_new_tokens=6)
        assert generation.tokens == len(expected), lm.name
        assert generation.text == lm.tokenizer.decode(expected, skip_special_tokens=True), lm.name
        assert generation.finish_reason == ("end_of_text" if expected[-1] == lm.tokenizer.eos_token_id
                                            else "max_new_tokens")


@pytest.mark.parametrize("path", ["student", "student-onnx/model.onnx"])
def test_the_kv_cache_gives_the_logits_of_the_whole_sequence(settings: Settings, path: str) -> None:
    """Each step from the cache (a prompt, then one token at a time) gives the logits of the whole sequence run
    at once, in PyTorch and in the exported graph."""
    lm = load_model(settings.jobs_dir / "lm" / path, MAX_LENGTH)
    assert lm.kv_cache
    tokens = lm.encode(["a great movie , truly"])[0]
    state = None
    for end in range(3, len(tokens) + 1):
        cached, state = lm.next_logits(tokens[:end], state)
        whole = lm.logits({"input_ids": np.array([tokens[:end]]), "attention_mask": np.ones((1, end), np.int64)})
        np.testing.assert_allclose(cached, whole[0, -1], atol=1e-5)


def test_the_int8_graph_steps_from_its_cache_as_close_to_fp32_as_it_scores_whole_texts(settings: Settings) -> None:
    """INT8 quantizes activations by each call's range, so a step from the cache is not the whole sequence's
    computation: what must hold is that its logits stay as close to the fp32 graph's as whole texts' do."""
    exported = settings.jobs_dir / "lm" / "student-onnx"
    fp32, int8 = (OnnxLanguageModel(exported / name, MAX_LENGTH) for name in ("model.onnx", "model_int8.onnx"))
    tokens = int8.encode(["a great movie , truly"])[0]
    whole = {"input_ids": np.array([tokens]), "attention_mask": np.ones((1, len(tokens)), np.int64)}
    reference, whole_int8 = fp32.logits(whole)[0, 2:], int8.logits(whole)[0, 2:]  # the steps below: after 3+ tokens
    state, steps = None, []
    for end in range(3, len(tokens) + 1):
        logits, state = int8.next_logits(tokens[:end], state)
        steps.append(logits)
    whole_error = np.abs(whole_int8 - reference).max()
    assert 0 < np.abs(np.stack(steps) - reference).max() < 2 * whole_error


def test_a_causal_lm_job_lists_its_teacher_and_students(client: TestClient, report: dict) -> None:
    listed = {m["id"]: m for m in client.get("/v1/models").json()["items"] if m["job_id"] == "lm"}
    assert list(listed) == IDS
    assert {i: (m["task"], m["format"]) for i, m in listed.items()} == {
        "lm.teacher": ("causal-lm", "torch"), "lm.student": ("causal-lm", report["served"]["format"]),
        "lm.student-fp32": ("causal-lm", "onnx-fp32"), "lm.student-torch": ("causal-lm", "torch")}
    rows = report["evaluation"]["models"]
    assert listed["lm.teacher"]["test_perplexity"] == rows["teacher-torch"]["test_perplexity"]
    assert listed["lm.student-torch"]["test_perplexity"] == rows["student-torch"]["test_perplexity"]
    assert listed["lm.student-torch"]["params"] == report["student"]["params"]
    assert all(m["label_names"] == [] and m["dimension"] is None and m["test_accuracy"] is None
               for m in listed.values())


def test_the_job_serves_int8_only_past_its_perplexity_gate(report: dict) -> None:
    gate = report["compress"]["gate"]
    fp32, int8 = gate["validation_perplexity"]["fp32"], gate["validation_perplexity"]["int8"]
    assert gate["increase_percent"] == pytest.approx((int8 / fp32 - 1) * 100)
    assert gate["passed"] == (gate["increase_percent"] <= report["config"]["compress"]["max_accuracy_drop"])
    assert report["served"]["format"] == ("onnx-int8" if gate["passed"] else "onnx-fp32")
    assert Path(report["served"]["path"]).is_file()


def test_the_perplexity_gate_serves_int8_only_within_its_limit(settings: Settings, report: dict) -> None:
    """The gate on the job's own graphs and validation texts, with limits just under and just over INT8's measured
    increase: it refuses INT8 (fp32 served, said so) and then lets it through."""
    student = settings.jobs_dir / "lm" / "student"
    tokenizer = AutoTokenizer.from_pretrained(student)
    texts = [e.text for e in load_task_data(DataConfig(**report["config"]["data"]), labelled=False).validation]
    validation = causal_lm._split(tokenizer, texts, MAX_LENGTH).student_inputs
    increase = report["compress"]["gate"]["increase_percent"]
    refused = causal_lm._perplexity_gate(student.parent / "student-onnx", tokenizer, validation, increase - 0.01)
    assert not refused["passed"] and refused["message"].startswith("serving fp32")
    assert refused["increase_percent"] == pytest.approx(increase)
    allowed = causal_lm._perplexity_gate(student.parent / "student-onnx", tokenizer, validation, increase + 0.01)
    assert allowed["passed"] and allowed["message"].startswith("serving INT8")


def test_score_answers_each_texts_perplexity(client: TestClient, settings: Settings, report: dict,
                                            test_texts: list[str]) -> None:
    """Per-text answers, 8 texts a request, add up to the job's own test perplexity of each model."""
    expected = {"lm.teacher": report["teacher"]["test_perplexity"],
                "lm.student-torch": report["student"]["test_perplexity"],
                "lm.student-fp32": report["evaluation"]["models"]["student-onnx-fp32"]["test_perplexity"]}
    for model_id, perplexity in expected.items():
        nll, tokens = 0.0, 0
        for start in range(0, len(test_texts), 8):
            response = client.post(f"/v1/models/{model_id}/score", json={"texts": test_texts[start:start + 8]})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"] == model_id and body["server_ms"] > 0
            nll += sum(math.log(p) * n for p, n in zip(body["perplexities"], body["tokens"], strict=True))
            tokens += sum(body["tokens"])
        assert _perplexity(nll, tokens) == pytest.approx(perplexity, rel=1e-4), model_id


def test_concurrent_score_callers_get_their_own_rows(settings: Settings, test_texts: list[str]) -> None:
    """Merged into one model call by the micro-batcher, each caller's perplexities, token counts and guesses are
    its own texts' (TextScores.rows slices the merged answer)."""
    model = TorchLanguageModel(settings.jobs_dir / "lm" / "student", MAX_LENGTH)
    assert len(test_texts) >= 12
    requests = [[text] for text in test_texts[:9]]
    requests[3] = test_texts[9:12]  # a caller with several texts gets all its rows
    alone = [model.predict(texts) for texts in requests]
    answers, calls = merged_concurrently(model, requests)
    for got, want in zip(answers, alone, strict=True):
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.nll, want.nll, rtol=1e-4)  # padding differs per batch
        assert [g.tolist() for g in got.guesses] == [g.tolist() for g in want.guesses]
    assert len(calls) < len(requests)
    assert sorted(t for call in calls for t in call) == sorted(t for texts in requests for t in texts)


def test_generate_greedy_and_seeded_sampling(client: TestClient, settings: Settings) -> None:
    lm = TorchLanguageModel(settings.jobs_dir / "lm" / "student", MAX_LENGTH)
    response = client.post("/v1/models/lm.student-torch/generate", json={"prompt": "a great", "max_new_tokens": 5})
    assert response.status_code == 200, response.text
    expected = lm.generate("a great", max_new_tokens=5)
    assert {k: response.json()[k] for k in ("text", "tokens", "finish_reason")} == \
        {"text": expected.text, "tokens": expected.tokens, "finish_reason": expected.finish_reason}
    sampled = [client.post("/v1/models/lm.student/generate",
                           json={"prompt": "", "max_new_tokens": 40, "temperature": 1.5, "seed": seed}).json()
               for seed in (1, 1, 2, 3)]
    assert all("text" in s for s in sampled), sampled
    assert sampled[0] == {**sampled[1], "server_ms": sampled[0]["server_ms"]}  # the same seed, the same text
    assert len({s["text"] for s in sampled}) > 1  # other seeds, other texts
    # The start token and 15 generated ones fill the model's 16 positions unless the end-of-text token came first.
    assert all(s["finish_reason"] == "max_length" and s["tokens"] == MAX_LENGTH - 1
               or s["finish_reason"] == "end_of_text" for s in sampled)


def test_generate_refuses_what_it_cannot_do_naming_the_field(client: TestClient) -> None:
    long_prompt = " ".join(["the"] * 20)  # under 100 characters, over 15 tokens
    response = client.post("/v1/models/lm.student/generate", json={"prompt": long_prompt})
    assert response.status_code == 422
    assert "prompt" in response.json()["detail"] and "at most 15" in response.json()["detail"]
    response = client.post("/v1/models/lm.student/generate", json={"prompt": "a", "max_new_tokens": 0})
    assert response.status_code == 422 and "max_new_tokens" in response.text
    response = client.post("/v1/models/lm.student/generate", json={"prompt": "x" * 101})
    assert response.status_code == 422 and "at most 100" in response.json()["detail"]
    response = client.post("/v1/models/lm.student/generate", json={"prompt": "a", "seed": -1})
    assert response.status_code == 422 and "seed" in response.text and "greater than or equal to 0" in response.text
    for number in ("NaN", "Infinity"):  # Python's JSON reader takes them
        response = client.post("/v1/models/lm.student/generate", content=f'{{"prompt": "a", "temperature": {number}}}',
                               headers={"content-type": "application/json"})
        assert (response.status_code, response.json()) == (422, {"detail": "temperature: Input should be a finite "
                                                                            "number"}), response.text
    # JSON's \ud800 escape decodes to a lone surrogate, which no tokenizer takes (it was a 500).
    for path, body in [("generate", '{"prompt": "good \\ud800"}'), ("score", '{"texts": ["fine", "good \\ud800"]}')]:
        response = client.post(f"/v1/models/lm.student/{path}", content=body,
                               headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert "lone surrogate (\\ud800) at character 5" in response.json()["detail"]


def test_a_tiny_temperature_samples_the_top_token(client: TestClient, settings: Settings) -> None:
    """logits / 1e-320 overflowed to inf before the max was subtracted: inf - inf, NaN probabilities, a 500."""
    body = {"prompt": "a great", "max_new_tokens": 5}
    greedy = client.post("/v1/models/lm.student/generate", json={**body, "temperature": 0}).json()
    tiny = client.post("/v1/models/lm.student/generate", json={**body, "temperature": 1e-320, "seed": 3})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["text"] == greedy["text"]


def test_generations_run_in_their_own_threads(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not asyncio's default executor, which micro-batches and model loads share: long generations cannot hold
    up /predict, /embed or /score."""
    threads: list[str] = []

    def record(self: Any, *args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(self, *args)

    original = TorchLanguageModel.generate
    monkeypatch.setattr(TorchLanguageModel, "generate", record)

    async def generate_twice() -> None:
        catalog = ModelCatalog(settings)
        try:
            await asyncio.gather(*(catalog.generate("lm.student-torch", "a great", 3, 0.0, None) for _ in range(2)))
        finally:
            await catalog.close()

    asyncio.run(generate_twice())
    assert len(threads) == 2 and all(name.startswith("generate") for name in threads), threads


def test_an_empty_prompt_needs_a_start_token(settings: Settings, tmp_path: Path) -> None:
    """A tokenizer without a start token (Qwen2's, for one) leaves nothing to generate after on an empty prompt:
    an InputError (the service's 422), not an empty tensor the model cannot read."""
    copy = shutil.copytree(settings.jobs_dir / "lm" / "student", tmp_path / "no-start-token")
    tokenizer = AutoTokenizer.from_pretrained(copy)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(copy)
    lm = TorchLanguageModel(copy, MAX_LENGTH)
    assert lm.tokenizer.bos_token_id is None
    with pytest.raises(InputError, match="prompt: empty, and this model's tokenizer has no start token"):
        lm.generate("")
    assert lm.generate("a great", max_new_tokens=2).tokens >= 1


def test_other_tasks_routes_send_callers_to_score_and_generate(client: TestClient) -> None:
    for route in ("predict", "embed"):
        response = client.post(f"/v1/models/lm.student/{route}", json={"texts": ["a film"]})
        assert response.status_code == 409
        assert "/v1/models/lm.student/score" in response.json()["detail"]
        assert "/v1/models/lm.student/generate" in response.json()["detail"]


def test_compare_language_models_on_texts(client: TestClient, settings: Settings, report: dict,
                                          test_texts: list[str]) -> None:
    """The fp32 export guesses the PyTorch student's next tokens; the teacher is another model, measured as
    evaluate.next_token_agreement measures it."""
    body = {"models": ["lm.student-torch", "lm.student-fp32", "lm.teacher"], "texts": test_texts[:8], "repeats": 3}
    response = client.post("/v1/compare", json=body)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["task"] == "causal-lm"
    rows = result["models"]
    assert rows["lm.student-torch"]["next_token_agreement"] == 1.0
    assert rows["lm.student-fp32"]["next_token_agreement"] > 0.95
    assert rows["lm.student-fp32"]["perplexity"] == pytest.approx(rows["lm.student-torch"]["perplexity"], rel=1e-4)
    student = TorchLanguageModel(settings.jobs_dir / "lm" / "student", MAX_LENGTH)
    teacher = TorchLanguageModel(Path(report["teacher"]["dir"]), MAX_LENGTH)
    ids = student.encode(test_texts[:8])
    expected = next_token_agreement(ids, teacher.predict(test_texts[:8]).guesses, ids,
                                    student.predict(test_texts[:8]).guesses)
    assert rows["lm.teacher"]["next_token_agreement"] == pytest.approx(expected)
    assert 0 < expected < 1
    assert "| perplexity | next-token agreement |" in result["markdown"]
    refused = client.post("/v1/compare", json={**body, "labels": ["a"] * 8})
    assert refused.status_code == 422 and "causal-lm models have no classes" in refused.json()["detail"]


def test_compare_language_models_on_the_jobs_own_texts(client: TestClient, report: dict,
                                                        test_texts: list[str]) -> None:
    """`dataset: job:lm` reads the job's test split as the job did: from its .txt file, texts alone."""
    body = {"models": ["lm.student-torch", "lm.student-fp32"], "dataset": "job:lm", "repeats": 2}
    comparison = compare_in_background(client, body)
    assert comparison["status"] == "succeeded", comparison["error"]
    result = comparison["result"]
    assert (result["task"], result["texts"], result["labelled"]) == ("causal-lm", len(test_texts), False)
    assert result["models"]["lm.student-torch"]["perplexity"] == pytest.approx(report["student"]["test_perplexity"],
                                                                              rel=1e-5)


def test_next_token_agreement_needs_one_tokenization() -> None:
    guesses = [np.array([1, 2, 3]), np.array([4])]
    assert next_token_agreement([[0, 1, 2, 3], [0, 4]], guesses, [[0, 1, 2, 3], [0, 4]],
                                [np.array([1, 9, 3]), np.array([4])]) == 0.75
    assert next_token_agreement([[0, 1, 2, 3], [0, 4]], guesses, [[0, 1, 2], [0, 4, 5]], guesses) is None


def test_bench_command_on_language_models(settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`distill bench` on a job's PyTorch and ONNX students, timed on a text of exactly 8 tokens."""
    from distill.cli import main

    job = settings.jobs_dir / "lm"
    texts = write_csv(tmp_path / "texts.csv", synthetic_rows(12, seed=4))
    out = tmp_path / "bench.json"
    models = [str(job / "student"), str(job / "student-onnx")]
    assert main(["bench", *models, "--texts", str(texts), "--max-length", str(MAX_LENGTH), "--seq-len", "8",
                 "--latency-calls", "3", "--warmup-calls", "1", "--batch-size", "4", "--throughput-batches", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "causal-lm"
    models[1] = str(job / "student-onnx" / "model.onnx")  # named by the graph that ran
    rows = report["models"]
    assert [rows[m]["format"] for m in models] == ["pytorch", "onnxruntime"]
    assert all(row["latency_sequence_length"] == 8 for row in rows.values())
    assert rows[models[1]]["perplexity"] == pytest.approx(rows[models[0]]["perplexity"], rel=1e-4)
    assert "| perplexity | next-token agreement |" in capsys.readouterr().out
    assert main(["bench", *models, "--texts", str(texts), "--labels-column", "label"]) == 2
    assert "causal-lm model, which has no classes" in capsys.readouterr().err


def test_compare_refuses_models_of_two_tasks(client: TestClient) -> None:
    response = client.post("/v1/compare", json={"models": ["lm.student", "emb.student"], "texts": ["a fine film"]})
    assert response.status_code == 422
    assert "models of one task" in response.json()["detail"]
    assert "'lm.student': 'causal-lm'" in response.json()["detail"]
    assert "'emb.student': 'sentence-embedding'" in response.json()["detail"]
    loaded = {m["id"]: m["loaded"] for m in client.get("/v1/models").json()["items"]}
    assert loaded["emb.student"] is False  # refused before anything loads (no test here loads the encoders)
