"""/v1/models serving a tiny finished sentence-embedding job: listing, /embed on every variant, micro-batched
embeddings, /v1/compare on encoders, and the 409 that sends a model's callers to its task's route."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from distill.config import DataConfig
from distill.data import load_task_data
from distill.evaluate import embedding_agreement, neighbour_recall
from distill.runtime import OnnxEmbedder, TorchEmbedder
from service.app import create_app
from service.models import ModelCatalog
from service.settings import Settings
from service.store import Store
from tests.conftest import compare_in_background, models_client, run_tiny_embedding_job

TEXTS = ["the movie was great", "a very dull plot", "this film is lovely and the actor superb", "boring"]
IDS = ["emb.teacher", "emb.student", "emb.student-fp32", "emb.student-torch"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """A home holding one finished tiny sentence-embedding job, jobs/emb: MPNet teacher (32 wide, normalized) →
    one layer of a 16-wide BERT + projection, exported to ONNX fp32 and INT8."""
    root = tmp_path_factory.mktemp("service-embeddings")
    run_tiny_embedding_job(root, root / "home" / "jobs" / "emb")
    return Settings(home=root / "home", max_batch_texts=8, max_text_chars=100)


@pytest.fixture(scope="module")
def report(settings: Settings) -> dict:
    return json.loads((settings.jobs_dir / "emb" / "report.json").read_text())


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    yield from models_client(settings)


def test_an_embedding_job_lists_its_teacher_and_students(client: TestClient, report: dict) -> None:
    listed = {m["id"]: m for m in client.get("/v1/models").json()["items"]}
    assert list(listed) == IDS
    assert {i: (m["task"], m["format"], m["dimension"]) for i, m in listed.items()} == {
        "emb.teacher": ("sentence-embedding", "torch", 32),
        "emb.student": ("sentence-embedding", report["served"]["format"], 32),  # INT8 past the job's gate
        "emb.student-fp32": ("sentence-embedding", "onnx-fp32", 32),
        "emb.student-torch": ("sentence-embedding", "torch", 32)}
    assert listed["emb.teacher"]["params"] == report["teacher"]["params"]
    assert listed["emb.student-torch"]["params"] == report["student"]["params"]
    assert all(m["label_names"] == [] and m["test_accuracy"] is None for m in listed.values())


def test_embed_answers_what_each_model_computes(client: TestClient, settings: Settings, report: dict) -> None:
    job = settings.jobs_dir / "emb"
    served = job / "student-onnx" / Path(report["served"]["path"]).name
    expected = {"emb.teacher": TorchEmbedder(Path(report["teacher"]["dir"]), 16).embed(TEXTS),
                "emb.student": OnnxEmbedder(served, 16).embed(TEXTS),
                "emb.student-torch": TorchEmbedder(job / "student", 16).embed(TEXTS)}
    answers = {}
    for model_id in IDS:
        response = client.post(f"/v1/models/{model_id}/embed", json={"texts": TEXTS})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["dimension"]) == (model_id, 32)
        answers[model_id] = np.array(body["embeddings"])
        assert answers[model_id].shape == (len(TEXTS), 32)
        np.testing.assert_allclose(np.linalg.norm(answers[model_id], axis=1), 1.0, atol=1e-5)
    for model_id, vectors in expected.items():
        np.testing.assert_allclose(answers[model_id], vectors.numpy(), atol=1e-5)
    # The fp32 export is the PyTorch student within the export tolerance; the teacher is another model.
    np.testing.assert_allclose(answers["emb.student-fp32"], answers["emb.student-torch"], atol=1e-4)
    assert not np.allclose(answers["emb.teacher"], answers["emb.student-torch"], atol=1e-2)


def test_concurrent_embed_calls_get_their_own_rows(settings: Settings) -> None:
    requests = [TEXTS[:1], TEXTS[1:3], TEXTS[3:], TEXTS]

    async def main() -> list[np.ndarray]:
        catalog = ModelCatalog(settings.model_copy(update={"batch_max_size": 8, "batch_max_wait_ms": 20}))
        answers = await asyncio.gather(*(catalog.embed("emb.student-torch", texts) for texts in requests))
        await catalog.close()
        return [embeddings.vectors for _, embeddings in answers]

    alone = TorchEmbedder(settings.jobs_dir / "emb" / "student", 16)
    for texts, vectors in zip(requests, asyncio.run(main()), strict=True):
        np.testing.assert_allclose(vectors, alone.embed(texts).numpy(), atol=1e-5)


def test_compare_sentence_encoders_on_a_jobs_test_split(client: TestClient, settings: Settings, report: dict) -> None:
    """Agreement with the first model: the fp32 export is the PyTorch student (cosine 1, the same neighbours); the
    teacher is another model, measured as evaluate.embedding_agreement measures it."""
    body = {"models": ["emb.student-torch", "emb.student-fp32", "emb.teacher"], "dataset": "job:emb", "repeats": 2}
    comparison = compare_in_background(client, body)
    assert comparison["status"] == "succeeded", comparison["error"]
    result = comparison["result"]
    assert (result["task"], result["texts"], result["labelled"]) == \
        ("sentence-embedding", report["data"]["splits"]["test"]["rows"], False)
    rows = result["models"]
    assert rows["emb.student-fp32"]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert rows["emb.student-fp32"]["recall_at_10"] == 1.0
    texts = [e.text for e in load_task_data(DataConfig(**report["config"]["data"])).test]
    student = TorchEmbedder(settings.jobs_dir / "emb" / "student", 16).embed(texts)
    teacher = TorchEmbedder(Path(report["teacher"]["dir"]), 16).embed(texts)
    assert rows["emb.teacher"]["cosine"] == pytest.approx(embedding_agreement(teacher, student)["cosine"], abs=1e-4)
    assert rows["emb.teacher"]["recall_at_10"] == pytest.approx(neighbour_recall(teacher, student))
    assert all(row["dimension"] == 32 and row["latency_ms"]["p50"] > 0 for row in rows.values())
    assert "| dim | cosine | recall@10 |" in result["markdown"]


def test_compare_refuses_labels_for_encoders(client: TestClient) -> None:
    body = {"models": ["emb.teacher"], "texts": TEXTS, "labels": ["positive"] * len(TEXTS)}
    response = client.post("/v1/compare", json=body)
    assert response.status_code == 422 and "labels: sentence-embedding models have no" in response.json()["detail"]


def test_each_task_route_refuses_the_other_tasks_models(client: TestClient) -> None:
    response = client.post("/v1/models/emb.student/predict", json={"texts": TEXTS})
    assert response.status_code == 409
    assert "sentence-embedding" in response.json()["detail"] and "/v1/models/emb.student/embed" in \
        response.json()["detail"]
    for limit_case, code in (([], 422), (["x"] * 9, 413), (["x" * 101], 422)):  # the /predict limits apply
        assert client.post("/v1/models/emb.student/embed", json={"texts": limit_case}).status_code == code


def test_a_job_whose_student_another_job_serves_as_its_teacher_is_deleted_only_after_that_job(
        settings: Settings, tmp_path: Path) -> None:
    """An embedding job's teacher is the directory it was given: another job's student. Deleting that job took the
    teacher of the one distilled from it away without a word (its `.teacher` vanished from GET /v1/models)."""
    home = tmp_path / "home"
    for job in ("first", "second"):
        shutil.copytree(settings.jobs_dir / "emb", home / "jobs" / job)
    report_file = home / "jobs" / "second" / "report.json"
    report = json.loads(report_file.read_text())
    report_file.write_text(json.dumps(report | {"teacher": report["teacher"] | {
        "dir": str(home / "jobs" / "first" / "student")}}))
    store = Store(home / "service.sqlite3")  # both as succeeded jobs of the server's record
    for job in ("first", "second"):
        store.create_job(job, report["config"], None, capacity=10)
        store.claim_next()
        store.finish(job, "succeeded")
    store.close()
    with TestClient(create_app(Settings(home=home))) as client:
        assert "second.teacher" in {m["id"] for m in client.get("/v1/models").json()["items"]}
        refused = client.delete("/v1/jobs/first")
        assert (refused.status_code, refused.json()["detail"]) == (
            409, "job first's files are the model second.teacher serves (its teacher); delete that job first")
        assert client.delete("/v1/jobs/second").status_code == 204
        assert client.delete("/v1/jobs/first").status_code == 204
