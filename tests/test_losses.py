"""Known-answer tests for the distillation losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import IGNORE_INDEX, LOSSES, attention_kl, hard_ce, hidden_mse, kd_kl


def test_kd_kl_is_zero_for_equal_logits() -> None:
    logits = torch.randn(4, 3)
    assert kd_kl(logits, logits.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_kl_known_value_and_tau_squared_scaling() -> None:
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (0.75, 0.25) at τ = 1
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_kl(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # At τ = 2 the teacher's logits halve (p_t from softmax([ln3/2, 0])); the result is τ² times that KL.
    p = torch.softmax(teacher / 2, dim=-1)[0]
    kl_tau2 = sum(p[i] * math.log(p[i] / 0.5) for i in range(2)).item()
    assert kd_kl(student, teacher, 2.0).item() == pytest.approx(4 * kl_tau2, rel=1e-6)


def test_kd_kl_softmax_runs_in_float32() -> None:
    student = torch.randn(2, 5).half()
    teacher = torch.randn(2, 5).half()
    loss = kd_kl(student, teacher, 2.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(kd_kl(student.float(), teacher.float(), 2.0).item(), rel=1e-5)


def test_kd_kl_gradient_flows_only_to_the_student() -> None:
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        target = teacher * 1.0
    kd_kl(student, target, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_kd_kl_handles_token_level_shapes() -> None:
    logits = torch.randn(2, 5, 11)
    assert kd_kl(logits, logits, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(logits, torch.randn(2, 5, 11), 1.0).item() > 0


def test_hard_ce_ignores_unlabelled_rows() -> None:
    logits = torch.randn(4, 2)
    labels = torch.tensor([0, IGNORE_INDEX, 1, IGNORE_INDEX])
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([0, 1]))
    assert hard_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    all_unlabelled = hard_ce(logits.requires_grad_(), torch.full((4,), IGNORE_INDEX))
    assert all_unlabelled.item() == 0.0 and all_unlabelled.requires_grad


def test_hidden_mse_masks_padding_and_projects() -> None:
    mask = torch.tensor([[1, 1, 0]])
    teacher = torch.zeros(1, 3, 4)
    student = torch.zeros(1, 3, 4)
    student[0, 2] = 100.0  # padding position: must not count
    assert hidden_mse(student, teacher, mask).item() == 0.0
    student[0, 0] = 1.0
    assert hidden_mse(student, teacher, mask).item() == pytest.approx(4 / (2 * 4))
    projection = torch.nn.Linear(2, 4)
    assert hidden_mse(torch.randn(1, 3, 2), teacher, mask, projection).item() > 0


def test_attention_kl_zero_for_equal_maps_positive_otherwise_and_averages_heads() -> None:
    mask = torch.ones(2, 5)
    attention = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    assert attention_kl(attention, attention, mask).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    assert attention_kl(other, attention, mask).item() > 0
    two_heads = torch.softmax(torch.randn(2, 2, 5, 5), dim=-1)
    assert attention_kl(two_heads, attention, mask).item() >= 0


def test_registry_names_every_loss() -> None:
    assert set(LOSSES) == {"kd_kl", "hard_ce", "hidden_mse", "attention_kl"}
