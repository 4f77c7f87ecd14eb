"""The real packaged teacher (MiniLM-L6) on a slice of the real `reviews` dataset. Minutes, so marked slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import DataConfig, EvaluateConfig, FromTeacher, JobConfig, TeacherConfig, TrainConfig
from distill.data import pull_dataset
from distill.pipeline import run

pytestmark = pytest.mark.slow


def test_minilm_teacher_on_a_reviews_slice(tmp_path: Path) -> None:
    pull_dataset("reviews")
    config = JobConfig(
        teacher=TeacherConfig(name="minilm-l6", head_epochs=2, finetune_epochs=1, finetune_lr=5e-5),
        data=DataConfig(dataset="reviews", max_length=48, limit=600),
        student=FromTeacher(init="teacher", layers=[0, 5]),
        train=TrainConfig(epochs=2, batch_size=32, lr=1e-4),
        evaluate=EvaluateConfig(latency_calls=50),
        output_dir=tmp_path / "job")
    report = run(config).report

    assert report["teacher"]["params"] == pytest.approx(22.7e6, rel=0.01)
    assert report["data"]["splits"]["train"]["rows"] == 600
    assert report["data"]["splits"]["test"]["rows"] == 1056
    assert report["teacher"]["test_accuracy"] > 0.6  # sentiment is learnable from 600 snippets; chance is 0.5
    assert report["student"]["test_agreement"] > 0.7
    assert 0.5 < report["param_ratio"] < 0.9  # 2 of 6 layers; the 11.7M-param embedding table is shared
    assert max(e["max_abs_diff"] for e in report["export"].values()) <= 1e-4
    rows = report["evaluation"]["models"]
    assert rows["student-onnx-int8"]["size_bytes"] < 0.5 * rows["student-onnx-fp32"]["size_bytes"]
    # INT8 answers like the fp32 student it came from (within 3 points of its agreement with the teacher).
    assert rows["student-onnx-int8"]["agreement"] > rows["student-onnx-fp32"]["agreement"] - 0.03
