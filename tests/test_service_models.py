"""/v1/models and /v1/compare on a tiny finished job: listing, predictions, limits, micro-batching, the LRU cache."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

import service.models
from distill.config import DataConfig, EvaluateConfig, ExportConfig, Fresh, JobConfig, TeacherConfig
from distill.config import TrainConfig as Train
from distill.data import DataError
from distill.pipeline import run
from distill.runtime import InputError, OnnxPredictor, Prediction, TorchPredictor
from service import models as service_models
from service.models import CompareError, MicroBatcher, ModelCatalog, ModelLoadError, UnknownModelError
from service.routing import json_body_limit
from service.settings import Settings
from tests.conftest import (
    compare_in_background,
    merged_concurrently,
    models_client,
    synthetic_rows,
    write_csv,
    write_tiny_encoder,
)

TEXTS = ["the movie was great", "a very dull plot", "this film is lovely and the actor superb", "boring"]
IDS = ["job1.teacher", "job1.student", "job1.student-fp32", "job1.student-torch"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A home holding one finished tiny job, jobs/job1 (teacher, student, ONNX fp32 + INT8, report.json)."""
    root = tmp_path_factory.mktemp("service-models")
    home = root / "home"
    config = JobConfig(
        teacher=TeacherConfig(name=str(write_tiny_encoder(root / "teacher")), head_epochs=3, head_lr=1e-2,
                              finetune_epochs=4, finetune_lr=3e-3, batch_size=16),
        data=DataConfig(dataset="files", train=write_csv(root / "data.csv", synthetic_rows(400, seed=1)),
                        max_length=16),
        student=Fresh(init="fresh", num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32),
        train=Train(epochs=5, batch_size=16, lr=5e-3), export=ExportConfig(onnx=True, teacher=False),
        evaluate=EvaluateConfig(latency_calls=10), output_dir=home / "jobs" / "job1")
    with pytest.MonkeyPatch.context() as mp:  # the prepared teacher is cached under $DISTILL_HOME/prepared
        mp.setenv("DISTILL_HOME", str(home))
        run(config)
    return Settings(home=home, max_batch_texts=8, max_text_chars=100)


@pytest.fixture(scope="module")
def report(settings: Settings) -> dict:
    return json.loads((settings.jobs_dir / "job1" / "report.json").read_text())


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    yield from models_client(settings)


@pytest.mark.parametrize("when", ["before the load", "during the load"])
def test_a_model_whose_job_is_deleted_as_it_loads_is_unknown_and_not_cached(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """Looked up, then its job deleted before the load (a 500 naming a missing ONNX file) or during it (a deleted
    job's model cached, unreachable until the LRU dropped it)."""
    shutil.copytree(settings.jobs_dir / "job1", settings.jobs_dir / "gone")
    catalog = ModelCatalog(settings)
    info = catalog.get("gone.student")

    def delete() -> None:  # as DELETE /v1/jobs/gone does: the directory moved away, the catalog told
        shutil.move(settings.jobs_dir / "gone", tmp_path / "gone")
        catalog.forget_job("gone")

    if when == "before the load":
        delete()
    else:
        load = service_models.open_model
        monkeypatch.setattr(service_models, "open_model", lambda *args: (delete(), load(*args))[1])
    with pytest.raises(UnknownModelError, match="no model 'gone.student'"):
        asyncio.run(catalog._loaded(info))
    assert not catalog._cache


def test_a_model_that_no_longer_loads_is_a_500_naming_no_server_path(settings: Settings) -> None:
    shutil.copytree(settings.jobs_dir / "job1", settings.jobs_dir / "broken")
    try:
        catalog = ModelCatalog(settings)
        info = catalog.get("broken.student")
        (info.path if info.path.is_file() else info.path / "config.json").write_text("not a model")
        with pytest.raises(ModelLoadError, match="^could not load broken.student from jobs/broken/") as raised:
            asyncio.run(catalog._loaded(info))
        assert str(settings.home) not in str(raised.value)
    finally:
        shutil.rmtree(settings.jobs_dir / "broken")


def test_a_deleted_jobs_teacher_is_unloaded_unless_a_listed_job_serves_it(settings: Settings, tmp_path: Path) -> None:
    """The teacher lies in the shared prepared/ directory, not the job's: it stayed loaded after the delete."""
    shutil.copytree(settings.jobs_dir / "job1", settings.jobs_dir / "gone")
    try:
        for listed, stays_loaded in ((["gone"], False), (["gone", "job1"], True)):  # job1 serves the same teacher
            catalog = ModelCatalog(settings)
            infos = [catalog.get(f"{job}.teacher") for job in listed]
            asyncio.run(catalog._loaded(infos[0]))
            catalog.forget_job("gone")
            assert catalog.is_loaded(infos[0]) == stays_loaded
    finally:
        shutil.rmtree(settings.jobs_dir / "gone")


def test_a_job_trains_only_from_the_pytorch_models_it_names_by_id(settings: Settings, report: dict) -> None:
    catalog = ModelCatalog(settings)
    assert catalog.trainable_dir("job1.student-torch") == settings.jobs_dir / "job1" / "student"
    assert catalog.trainable_dir("job1.teacher") == Path(report["teacher"]["prepared_dir"])
    for onnx in ("job1.student", "job1.student-fp32"):
        with pytest.raises(ValueError, match=rf"^'{onnx}' is an onnx-(int8|fp32) graph, which a job cannot train "
                                             rf"from; use 'job1.student-torch'"):
            catalog.trainable_dir(onnx)
    with pytest.raises(UnknownModelError):
        catalog.trainable_dir("job2.teacher")
    for other in ("mpnet-base", "org/job1.teacher", "/models/bert", "job1.other"):  # not shaped as an id
        assert catalog.trainable_dir(other) is None


def test_models_lists_the_teacher_and_the_students_of_a_job(client: TestClient, report: dict) -> None:
    listed = {m["id"]: m for m in client.get("/v1/models").json()["items"]}
    assert list(listed) == IDS
    assert {i: m["format"] for i, m in listed.items()} == {
        "job1.teacher": "torch", "job1.student": report["served"]["format"], "job1.student-fp32": "onnx-fp32",
        "job1.student-torch": "torch"}
    rows = report["evaluation"]["models"]
    served_row = "student-onnx-int8" if report["served"]["format"] == "onnx-int8" else "student-onnx-fp32"
    assert listed["job1.student"]["test_accuracy"] == rows[served_row]["accuracy"]
    assert listed["job1.teacher"]["params"] == report["teacher"]["params"]
    assert listed["job1.student"]["size_bytes"] == Path(report["served"]["path"]).stat().st_size
    assert all(m["label_names"] == ["negative", "positive"] and m["job_id"] == "job1" for m in listed.values())
    assert {m["kind"] for m in listed.values()} == {"teacher", "student"}

    one = client.get("/v1/models/job1.student-fp32")
    assert one.status_code == 200 and one.json()["id"] == "job1.student-fp32"
    missing = client.get("/v1/models/job1.nothing")
    assert missing.status_code == 404 and "GET /v1/models lists the ids" in missing.json()["detail"]


def test_predict_matches_the_same_model_in_process(client: TestClient, report: dict) -> None:
    max_length = report["config"]["data"]["max_length"]
    served = Path(report["served"]["path"])
    expected = OnnxPredictor(served, served.parent, max_length).predict(TEXTS)
    response = client.post("/v1/models/job1.student/predict", json={"texts": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "job1.student" and body["server_ms"] > 0
    assert body["label_ids"] == expected.labels
    assert body["labels"] == [["negative", "positive"][i] for i in expected.labels]
    np.testing.assert_allclose(body["probabilities"], expected.probabilities, atol=1e-6)

    teacher = TorchPredictor(Path(report["teacher"]["prepared_dir"]), max_length).predict(TEXTS)
    body = client.post("/v1/models/job1.teacher/predict", json={"texts": TEXTS}).json()
    np.testing.assert_allclose(body["probabilities"], teacher.probabilities, atol=1e-5)
    assert client.get("/v1/models/job1.teacher").json()["loaded"] is True


@pytest.mark.parametrize(("texts", "code", "message"), [
    (["a"] * 9, 413, "9 texts; at most 8 per request"),
    (["fine", "x" * 101], 422, "texts[1] has 101 characters; at most 100"),
    ([], 422, "texts is empty"),
])
def test_predict_limits(client: TestClient, texts: list[str], code: int, message: str) -> None:
    response = client.post("/v1/models/job1.student/predict", json={"texts": texts})
    assert response.status_code == code and message in response.json()["detail"]


def test_a_json_body_past_what_the_limits_need_is_refused_as_it_arrives(client: TestClient,
                                                                        settings: Settings) -> None:
    """8 texts of 100 characters bound a body; a larger one was read into memory whole and parsed."""
    limit = json_body_limit(settings)
    body = json.dumps({"texts": ["fine"], "pad": "x" * limit}).encode()
    message = "the request body is over 1,058,176 bytes, the most 8 texts (max_batch_texts) of 100 characters"
    for content in (body, iter([body[:limit // 2], body[limit // 2:]])):  # with a Content-Length, and chunked
        response = client.post("/v1/models/job1.student/predict", content=content,
                               headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["detail"].startswith(message), response.text
    # The largest body the limits allow, each character escaped as a surrogate pair: 12 bytes.
    largest = json.dumps({"texts": ["\U0001f600" * settings.max_text_chars] * settings.max_batch_texts})
    response = client.post("/v1/models/job1.student/predict", content=largest,
                           headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("route", "body", "message"), [
    # Python's JSON reader takes NaN and Infinity, which JSON cannot carry back: echoing them was a 500.
    ("/v1/models/job1.student/predict", '{"texts": [NaN]}', "texts[0]: Input should be a valid string"),
    ("/v1/compare", '{"models": ["job1.student"], "texts": ["fine"], "repeats": -Infinity}',
     "repeats: Input should be a finite number"),
    # Nested past the recursion limit: echoing it was a 500.
    ("/v1/models/job1.student/predict", '{"a":' * 600 + '1' + '}' * 600, "texts: Field required"),
    ("/v1/models/job1.student/generate", '{"prompt": ' + '[' * 600 + ']' * 600 + '}', "prompt: Input should be"),
    ("/v1/models/job1.student/predict", '{"texts": ["fine"', "body: not valid JSON at character 17: Expecting"),
    ("/v1/models/job1.student/predict", '{"texts": "fine"}', "texts: Input should be a valid list"),
])
def test_a_malformed_body_is_a_422_naming_the_field(client: TestClient, route: str, body: str, message: str) -> None:
    response = client.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"].startswith(message), response.text


@pytest.mark.parametrize(("route", "body", "message"), [
    ("/v1/models/job1.student/predict", '{"texts": ["fine", "good \\ud800"]}', "texts[1] holds a lone surrogate "
                                                                              "(\\ud800) at character 5"),
    ("/v1/compare", '{"models": "\\ud800", "texts": ["fine"]}', "models holds a lone surrogate (\\ud800)"),
    ("/v1/compare", '{"models": ["\\udc00.student"], "texts": ["fine"]}', "models[0] holds a lone surrogate (\\udc00)"),
])
def test_a_lone_surrogate_in_a_body_is_a_422_naming_the_field(client: TestClient, route: str, body: str,
                                                               message: str) -> None:
    # JSON's \ud800 escape decodes to a string no UTF-8 encoder takes: each of these was a 500 (a model id's file
    # path, the 422 echoing it).
    response = client.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and message in response.json()["detail"], response.text


def test_predict_on_an_unknown_model_says_where_the_ids_are(client: TestClient) -> None:
    for model_id in ("nojob.student", "student", "...student", "no%00job.student"):
        response = client.post(f"/v1/models/{model_id}/predict", json={"texts": ["fine"]})
        assert response.status_code == 404 and "GET /v1/models" in response.json()["detail"], model_id


def test_micro_batcher_gives_each_concurrent_caller_its_own_rows(report: dict) -> None:
    # The fp32 graph: dynamic INT8 quantizes activations with one scale per batch, so an INT8 row moves a little
    # (about 1e-3 here) with its batch-mates, which would blur whose rows a caller got.
    fp32 = Path(report["served"]["path"]).with_name("model_optimized.onnx")
    predictor = OnnxPredictor(fp32, fp32.parent, report["config"]["data"]["max_length"])
    requests = [[f"{w} film number {i}"] for i, w in enumerate(["good", "awful", "dull", "superb"] * 8)]
    requests[5] = ["great plot", "poor acting", "the story"]  # a caller with several texts gets all its rows
    alone = [predictor.predict(texts) for texts in requests]
    answers, calls = merged_concurrently(predictor, requests)
    for got, want in zip(answers, alone, strict=True):
        assert got.labels == want.labels
        np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-5)  # padding differs per batch
    assert len(calls) < len(requests)
    assert all(len(call) <= 8 for call in calls)
    assert sorted(t for call in calls for t in call) == sorted(t for texts in requests for t in texts)


def test_micro_batcher_hands_a_failure_only_to_the_caller_whose_texts_fail() -> None:
    class RefusesBad:
        name, calls = "refuses-bad", []

        def predict(self, texts: list[str]) -> Prediction:
            self.calls.append(list(texts))
            bad = [i for i, text in enumerate(texts) if text == "bad"]
            if bad:
                raise InputError(f"texts{bad} are bad")
            return Prediction([len(t) for t in texts], np.zeros((len(texts), 2), np.float32), 0.001)

    model = RefusesBad()

    async def concurrently() -> list[object]:
        batcher = MicroBatcher(model, max_size=8, max_wait_s=0.05)
        answers = await asyncio.gather(*(batcher.predict(texts) for texts in (["a"], ["bb", "bad"], ["ccc"])),
                                       return_exceptions=True)
        await batcher.aclose()
        return answers

    first, second, third = asyncio.run(concurrently())
    assert isinstance(first, Prediction) and first.labels == [1]
    assert isinstance(second, InputError) and str(second) == "texts[1] are bad"  # indexed in its own request
    assert isinstance(third, Prediction) and third.labels == [3]
    assert model.calls[0] == ["a", "bb", "bad", "ccc"]  # one merged call first, then each request alone
    assert model.calls[1:] == [["a"], ["bb", "bad"], ["ccc"]]


def test_micro_batcher_of_size_one_calls_the_model_one_text_at_a_time() -> None:
    # bench/serve.py's server without batching: concurrent callers queue for the model instead of running it
    # side by side in several threads, so the baseline neither thrashes the cores nor gains from parallel calls.
    class Slow:
        def __init__(self) -> None:
            self.name, self.running, self.most, self.calls = "slow", 0, 0, []

        def predict(self, texts: list[str]) -> Prediction:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(list(texts))
            time.sleep(0.002)
            self.running -= 1
            return Prediction([0] * len(texts), np.zeros((len(texts), 2), np.float32), 0.002)

    slow = Slow()

    async def concurrently() -> None:
        batcher = MicroBatcher(slow, max_size=1, max_wait_s=0.005)
        await asyncio.gather(*(batcher.predict([f"text {i}"]) for i in range(16)))
        await batcher.aclose()

    asyncio.run(concurrently())
    assert slow.most == 1 and len(slow.calls) == 16 and all(len(call) == 1 for call in slow.calls)


def test_lru_cache_unloads_the_least_recently_used_model_past_the_cap(settings: Settings) -> None:
    catalog = ModelCatalog(settings)
    sizes = {i: catalog.get(i).size_bytes for i in ("job1.student", "job1.student-fp32", "job1.student-torch")}
    cap = sum(sorted(sizes.values())[:2]) - 1  # each fits alone, no two together
    catalog = ModelCatalog(settings.model_copy(update={"model_cache_bytes": cap}))

    def loaded() -> set[str]:
        return {i for i in sizes if catalog.is_loaded(catalog.get(i))}

    async def use(*model_ids: str) -> list[set[str]]:
        seen = []
        for model_id in model_ids:
            await catalog.predict(model_id, ["fine"])
            seen.append(loaded())
        await catalog.close()
        return seen

    assert asyncio.run(use("job1.student", "job1.student-fp32", "job1.student-fp32", "job1.student-torch")) == [
        {"job1.student"}, {"job1.student-fp32"}, {"job1.student-fp32"}, {"job1.student-torch"}]


def test_one_directory_served_for_two_tasks_is_two_cache_entries(settings: Settings) -> None:
    """A classifier directory that is also an embedding job's teacher: one cache entry would hand /embed the
    classifier's predictor (or /predict the embedder)."""
    teacher = ModelCatalog(settings).get("job1.teacher")
    as_encoder = dataclasses.replace(teacher, id="job2.teacher", job_id="job2", task="sentence-embedding")
    assert as_encoder.cache_key != teacher.cache_key and as_encoder.path == teacher.path


def test_a_model_a_comparison_holds_is_not_unloaded_for_another(settings: Settings,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A comparison runs its models outside the cache: one unloaded under it stayed in memory, and a request for it
    meanwhile loaded a second copy, past the cap."""
    catalog = ModelCatalog(settings)
    sizes = {i: catalog.get(i).size_bytes for i in ("job1.student", "job1.student-fp32", "job1.student-torch")}
    catalog = ModelCatalog(settings.model_copy(update={"model_cache_bytes": sum(sorted(sizes.values())[:2]) - 1}))
    opened: list[str] = []
    open_model = service.models.open_model
    monkeypatch.setattr(service.models, "open_model", lambda info, *args: opened.append(info.id) or open_model(
        info, *args))

    def loaded() -> set[str]:
        return {i for i in sizes if catalog.is_loaded(catalog.get(i))}

    async def use() -> list[set[str]]:
        seen = []
        async with catalog.holding([catalog.get("job1.student")]):
            for model_id in ("job1.student-fp32", "job1.student"):
                await catalog.predict(model_id, ["fine"])
                seen.append(loaded())
        await catalog.predict("job1.student-torch", ["fine"])  # held no more: it may go now
        seen.append(loaded())
        await catalog.close()
        return seen

    assert asyncio.run(use()) == [{"job1.student", "job1.student-fp32"}] * 2 + [{"job1.student-torch"}]
    assert opened == ["job1.student", "job1.student-fp32", "job1.student-torch"]  # each loaded once


def test_compare_texts_answers_in_the_request(client: TestClient) -> None:
    body = {"models": ["job1.student-fp32", "job1.student-torch", "job1.student"], "texts": TEXTS,
            "labels": ["positive", "negative", "positive", "negative"], "repeats": 5}
    response = client.post("/v1/compare", json=body)
    assert response.status_code == 200, response.text
    comparison = response.json()
    assert comparison["status"] == "succeeded"
    result = comparison["result"]
    rows = result["models"]
    assert list(rows) == body["models"] and result["reference"] == "job1.student-fp32"
    assert rows["job1.student-fp32"]["agreement"] == 1.0
    assert rows["job1.student-torch"]["agreement"] == 1.0  # the same weights in PyTorch
    # PyTorch on the GPU when the server has one (inference_device auto); onnxruntime on the CPU.
    assert rows["job1.student-torch"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert rows["job1.student"]["device"] == "cpu"
    assert all(row["accuracy"] is not None and row["latency_ms"]["p99"] > 0 for row in rows.values())
    assert result["speedups"]["job1.student-fp32"] == {"latency_p50": 1.0, "throughput": 1.0}
    assert "| job1.student-torch |" in result["markdown"]
    assert client.get(f"/v1/compare/{comparison['id']}").json()["status"] == "succeeded"


def test_inference_device_places_the_pytorch_models(tmp_path: Path) -> None:
    assert Settings(home=tmp_path, inference_device="cpu").torch_device == torch.device("cpu")
    if torch.cuda.is_available():
        assert Settings(home=tmp_path).torch_device.type == "cuda"
        return
    assert Settings(home=tmp_path).torch_device == torch.device("cpu")  # auto, and no GPU here
    with pytest.raises(ValidationError, match=r"inference_device\n.*'cuda', but torch sees no GPU on this machine.*"
                                              r"allowed: 'auto' \(the GPU when there is one\) or 'cpu'"):
        Settings(home=tmp_path, inference_device="cuda")


def test_compare_a_jobs_test_split_runs_in_the_background(client: TestClient, report: dict) -> None:
    body = {"models": ["job1.teacher", "job1.student"], "dataset": "job:job1", "repeats": 3}
    comparison = compare_in_background(client, body, timeout=30)
    assert comparison["status"] == "succeeded", comparison["error"]
    result = comparison["result"]
    assert result["texts"] == report["data"]["splits"]["test"]["rows"] and result["labelled"]
    assert result["models"]["job1.teacher"]["accuracy"] == pytest.approx(report["teacher"]["test_accuracy"])
    assert result["models"]["job1.teacher"]["agreement"] == 1.0  # the reference
    # The served student measured against the teacher as the job measured it, on the same texts.
    served_row = "student-onnx-int8" if report["served"]["format"] == "onnx-int8" else "student-onnx-fp32"
    job_row = report["evaluation"]["models"][served_row]
    assert result["models"]["job1.student"]["accuracy"] == pytest.approx(job_row["accuracy"])
    assert result["models"]["job1.student"]["agreement"] == pytest.approx(job_row["agreement"])
    assert result["models"]["job1.student"]["params"] == job_row["params"] < report["teacher"]["params"]


@pytest.mark.parametrize(("body", "code", "message"), [
    ({"models": ["job1.student"], "texts": ["fine"], "dataset": "job:job1"}, 422, "either texts or dataset"),
    ({"models": [], "texts": ["fine"]}, 422, "at least 1 item"),
    ({"models": ["job1.student", "nojob.student"], "texts": ["fine"]}, 404, "no model 'nojob.student'"),
    ({"models": ["job1.student", "no\0job.student"], "texts": ["fine"]}, 404, "no model 'no"),
    ({"models": ["job1.student", "job1.student"], "texts": ["fine"]}, 422, "lists a model twice"),
    ({"models": ["job1.student"], "texts": ["fine"], "labels": ["neutral"]}, 422, "['neutral'] are not label"),
    ({"models": ["job1.student"], "dataset": "imdb"}, 422, "'job:<job_id>'"),
    ({"models": ["job1.student"], "dataset": "job:nojob"}, 422, "no succeeded job 'nojob'"),
    ({"models": ["job1.student"], "dataset": "job:" + "a" * 300}, 422, "no succeeded job 'aaa"),  # was a 500
    ({"models": ["job1.student"], "texts": ["a"] * 9}, 413, "at most 8 per request"),
])
def test_compare_refuses_what_it_cannot_run(client: TestClient, body: dict, code: int, message: str) -> None:
    response = client.post("/v1/compare", json=body)
    assert response.status_code == code and message in json.dumps(response.json()), response.text


def test_a_comparison_on_data_it_cannot_read_is_refused_before_it_starts(client: TestClient, settings: Settings,
                                                                         report: dict, tmp_path: Path) -> None:
    """Not accepted (202) to fail in the background with a message naming the server's files."""
    texts = tmp_path / "texts.txt"
    texts.write_text("a review\n" * 30)
    lm_job = settings.jobs_dir / "lmtexts"  # a causal-LM job's report: its data are texts alone
    lm_job.mkdir()
    (lm_job / "report.json").write_text(json.dumps({"config": {"task": "causal-lm", "data": {
        "dataset": "files", "train": str(texts)}}}))
    train = Path(report["config"]["data"]["train"])
    hidden = train.rename(train.with_name("hidden.csv"))  # as if job1's upload had been deleted
    try:
        for dataset, message in (("reviews", "the built-in dataset is not downloaded on the server yet"),
                                 ("job:lmtexts", "holds texts without labels (a causal-LM job's data)"),
                                 ("job:job1", "the data job 'job1' read are gone")):
            response = client.post("/v1/compare", json={"models": ["job1.student"], "dataset": dataset})
            assert response.status_code == 422 and message in response.json()["detail"], response.text
    finally:
        hidden.rename(train)
        shutil.rmtree(lm_job)


def test_a_comparison_failing_on_its_inputs_is_422_and_on_the_server_500(client: TestClient, settings: Settings,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A text a model cannot take (distill.runtime.InputError, e.g. a causal LM's text with no token to predict
    under a tokenizer without start/end tokens) is the caller's to fix; anything else is the server's."""
    body = {"models": ["job1.student", "job1.teacher"], "texts": ["fine", "x"], "repeats": 1}
    for error, code in ((InputError("texts[1] give no token to predict"), 422), (RuntimeError("boom"), 500)):
        def fail(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(service.models, "evaluate_models", fail)
        response = client.post("/v1/compare", json=body)
        assert response.status_code == code and str(error) in response.json()["detail"], response.text
    # A data file's error (one changed since its job read it) names the file as the client knows it.
    def changed_file(*args: object, **kwargs: object) -> None:
        raise DataError(f"{settings.datasets_dir}/ab12/data.csv, line 162: 3 fields, but the header names 2")

    monkeypatch.setattr(service.models, "evaluate_models", changed_file)
    response = client.post("/v1/compare", json=body)
    assert (response.status_code, response.json()["detail"]) == (
        422, "upload:ab12, line 162: 3 fields, but the header names 2")


def test_comparisons_past_the_pending_limit_answer_429(settings: Settings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs answer 429 when their queue is full; comparisons queued without bound before."""
    release, evaluate_models = threading.Event(), service.models.evaluate_models

    def held(*args: object, **kwargs: object) -> object:
        release.wait(30)
        return evaluate_models(*args, **kwargs)

    monkeypatch.setattr(service.models, "evaluate_models", held)
    body = {"models": ["job1.teacher", "job1.student"], "dataset": "job:job1", "repeats": 1}
    for client in models_client(settings.model_copy(update={"max_pending_comparisons": 1})):
        first = client.post("/v1/compare", json=body)
        assert first.status_code == 202, first.text
        busy = client.post("/v1/compare", json=body)
        assert busy.status_code == 429 and busy.headers["retry-after"].isdigit()
        assert "1 comparisons are queued or running (DISTILL_MAX_PENDING_COMPARISONS)" in busy.json()["detail"]
        release.set()
        deadline = time.monotonic() + 30
        while client.get(first.headers["location"]).json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/v1/compare", json=body).status_code == 202  # a slot is free again


def test_compare_refuses_models_whose_labels_differ(settings: Settings, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(settings.jobs_dir / "job1", home / "jobs" / "job1")
    shutil.copytree(settings.jobs_dir / "job1", home / "jobs" / "job2")
    report = home / "jobs" / "job2" / "report.json"
    report.write_text(report.read_text().replace('"positive"', '"good"'))
    catalog = ModelCatalog(Settings(home=home))
    with pytest.raises(CompareError, match="name their classes differently"):
        catalog.comparisons.start(["job1.student", "job2.student"], texts=["fine"])


def test_unknown_comparison_is_404(client: TestClient) -> None:
    response = client.get("/v1/compare/nothing")
    assert response.status_code == 404 and "POST /v1/compare starts one" in response.json()["detail"]


def test_deleting_a_job_removes_its_record_files_and_loaded_models(settings: Settings, tmp_path: Path) -> None:
    """DELETE /v1/jobs/{id} of an ended job: 204; then the job, its events, its directory and its models are gone,
    and a model of it that was loaded is unloaded; a second delete is a 404."""
    from service.app import create_app
    from service.store import Store

    home = tmp_path / "home"
    shutil.copytree(settings.jobs_dir / "job1", home / "jobs" / "job2")
    served = Settings(home=home, model_dirs=[home])
    store = Store(served.database)  # the record a server would have kept of the job
    assert store.create_job("job2", {}, None, capacity=1) is not None and store.claim_next() is not None
    store.finish("job2", "succeeded")
    store.close()
    with TestClient(create_app(served)) as client:
        assert client.post("/v1/models/job2.student/predict", json={"texts": TEXTS}).status_code == 200
        catalog = client.app.state.models
        assert any(key.path.is_relative_to(served.jobs_dir / "job2") for key in catalog._cache)
        assert client.delete("/v1/jobs/job2").status_code == 204
        assert not any(key.path.is_relative_to(served.jobs_dir / "job2") for key in catalog._cache)
        assert client.get("/v1/jobs/job2").status_code == 404
        assert client.get("/v1/jobs/job2/events").status_code == 404
        assert [m["id"] for m in client.get("/v1/models").json()["items"]] == []
        assert client.post("/v1/models/job2.student/predict", json={"texts": TEXTS}).status_code == 404
        assert client.delete("/v1/jobs/job2").status_code == 404
    assert sorted(p.name for p in served.jobs_dir.iterdir()) == [".deleting"] and not any(
        (served.jobs_dir / ".deleting").iterdir())
