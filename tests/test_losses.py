"""Known-answer tests for the distillation losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.config import LossConfig
from distill.losses import (
    IGNORE_INDEX,
    LOSSES,
    anchor_similarity_kl,
    attention_kl,
    embedding_cosine,
    embedding_mse,
    hard_ce,
    hidden_mse,
    jsd,
    kd_kl,
    reverse_kl,
    similarity_kl,
    value_relation_kl,
)
from distill.tasks import SequenceClassification


@pytest.fixture(autouse=True)
def seeded() -> None:
    """The random tensors below are the same on every run."""
    torch.manual_seed(0)


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


@pytest.mark.parametrize("divergence", [kd_kl, reverse_kl, jsd])
def test_gradient_flows_only_to_the_student(divergence) -> None:
    """Even from teacher logits that require grad (a teacher run with autograd on): the teacher is a target."""
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    divergence(student, teacher, 2.0).backward()
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
    projection = torch.nn.Linear(2, 4, bias=False)  # (x, y) → (x, y, x + y, 0)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    narrow = torch.tensor([[[1.0, 2.0], [0.0, 1.0], [50.0, 50.0]]])  # the last position is padding
    # Projected: (1, 2, 3, 0) and (0, 1, 1, 0) against zeros: (1 + 4 + 9 + 1 + 1) / (2 tokens × 4 dims).
    assert hidden_mse(narrow, teacher, mask, projection).item() == pytest.approx(16 / 8)


def test_attention_kl_zero_for_equal_maps_positive_otherwise_and_averages_heads() -> None:
    mask = torch.ones(2, 5)
    attention = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    assert attention_kl(attention, attention, mask).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    assert attention_kl(other, attention, mask).item() > 0
    # Head counts differ: both sides averaged over heads. Two student heads whose mean is the teacher's mean: 0.
    mean = attention.mean(dim=1, keepdim=True)
    two_heads = torch.cat([mean, mean], dim=1)
    assert attention_kl(two_heads, attention, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl(other[:, :2], attention, mask).item() == pytest.approx(
        attention_kl(other[:, :2].mean(1, keepdim=True), mean, mask).item())


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_reverse_kl_and_jsd_known_values() -> None:
    student = torch.tensor([[0.0, 0.0]])  # p_s = (0.5, 0.5)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (0.75, 0.25)
    p_s, p_t = [0.5, 0.5], [0.75, 0.25]
    assert reverse_kl(student, teacher, 1.0).item() == pytest.approx(_kl(p_s, p_t), rel=1e-6)
    m = [0.3 * t + 0.7 * s for t, s in zip(p_t, p_s, strict=True)]
    expected = 0.3 * _kl(p_t, m) + 0.7 * _kl(p_s, m)
    assert jsd(student, teacher, 1.0, beta=0.3).item() == pytest.approx(expected, rel=1e-6)
    assert jsd(student, teacher, 2.0, beta=0.3).item() > 0
    assert jsd(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_divergences_mean_over_real_tokens_only() -> None:
    teacher = torch.randn(2, 4, 7)
    student = teacher.clone()
    student[0, 3, 0] += 5.0  # a padded position: must not count
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    for divergence in (kd_kl, reverse_kl, jsd):
        assert divergence(student, teacher, 1.0, mask).item() == pytest.approx(0.0, abs=1e-6)
        assert divergence(student, teacher, 1.0).item() > 0
    student[1, 0, 0] += 5.0  # one real token of seven differs: the mean divides by 7
    one_token = kd_kl(student[1:, :1], teacher[1:, :1], 1.0).item()
    assert kd_kl(student, teacher, 1.0, mask).item() == pytest.approx(one_token / 7, rel=1e-5)


def test_value_relation_kl_zero_for_equal_values_ignores_padding_and_head_dims_may_differ() -> None:
    mask = torch.tensor([[1, 1, 1, 0]])
    values = torch.randn(1, 2, 4, 8)
    assert value_relation_kl(values, values.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    padded = values.clone()
    padded[:, :, 3] = 50.0  # padding only: as a key it is masked, as a query row it is not counted
    assert value_relation_kl(padded, values, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert value_relation_kl(torch.randn(1, 2, 4, 3), values, mask).item() > 0
    # Head counts differ: each side's relations averaged over its heads, so four copies of the two heads give the
    # two heads' own mean: the same loss as two against two would be after averaging.
    assert value_relation_kl(values.repeat(1, 2, 1, 1), values, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_embedding_losses_known_values() -> None:
    teacher = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert embedding_mse(teacher.clone(), teacher).item() == 0.0
    assert embedding_mse(torch.zeros(2, 2), teacher).item() == pytest.approx(5 / 4)
    assert embedding_cosine(teacher * 3, teacher).item() == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert embedding_cosine(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), teacher).item() == pytest.approx(1.0)


def test_similarity_kl_compares_relations_not_coordinates() -> None:
    teacher = torch.randn(6, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    assert similarity_kl(teacher @ rotation, teacher, 0.05).item() == pytest.approx(0.0, abs=1e-5)
    wide = torch.cat([teacher, torch.zeros(6, 4)], dim=1)  # other width, same cosines
    assert similarity_kl(teacher, wide, 0.05).item() == pytest.approx(0.0, abs=1e-5)
    assert similarity_kl(torch.randn(6, 8), teacher, 0.05).item() > 0
    # Known value, 3 examples at τ = 1: row i is softmax over the cosines to the two others.
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows: (1, 0), (1, 0), (0, 0)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # rows: (0, 1), (0, 0), (1, 0)
    p, uniform = [math.e / (math.e + 1), 1 / (math.e + 1)], [0.5, 0.5]
    rows = [_kl(p, p[::-1]), _kl(p, uniform), _kl(uniform, p)]
    assert similarity_kl(s, t, 1.0).item() == pytest.approx(sum(rows) / 3, rel=1e-5)


def test_anchor_similarity_kl_known_value_and_leaves_the_text_itself_out() -> None:
    # τ = 1, one text, anchors at 45° and 135°: the teacher (0°) sees cosines (c, −c), c = cos 45°; the student
    # (90°) sees (c, c), a uniform row.
    anchors = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    teacher, student = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])  # scale-free: only cosines meet
    c = math.cos(math.pi / 4)
    p = [math.exp(c) / (math.exp(c) + math.exp(-c)), math.exp(-c) / (math.exp(c) + math.exp(-c))]
    assert anchor_similarity_kl(student, teacher, anchors, 1.0).item() == pytest.approx(_kl(p, [0.5, 0.5]),
                                                                                        rel=1e-5)
    assert anchor_similarity_kl(teacher, teacher, anchors, 0.05).item() == pytest.approx(0.0, abs=1e-6)
    # The same space, not only the same relations: a rotated student is far from the teacher's anchors.
    rows, bank = torch.randn(6, 8), torch.randn(50, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    assert anchor_similarity_kl(rows @ rotation, rows, bank, 0.05).item() > 0.1
    # An anchor that is the text itself adds nothing to its row, on either side.
    text, its_student = rows[:1], rows[:1] @ rotation
    with_itself = torch.cat([bank, text * 2])
    assert anchor_similarity_kl(its_student, text, with_itself, 0.05).item() == pytest.approx(
        anchor_similarity_kl(its_student, text, bank, 0.05).item(), rel=1e-5)


def test_registry_names_every_loss() -> None:
    assert set(LOSSES) == {"kd_kl", "reverse_kl", "jsd", "hard_ce", "hidden_mse", "attention_kl", "value_relation_kl",
                           "embedding_mse", "embedding_cosine", "similarity_kl", "anchor_similarity_kl"}


@pytest.mark.parametrize("divergence", ["kd_kl", "reverse_kl", "jsd"])
def test_the_classification_loss_is_alpha_ce_plus_the_rest_divergence(divergence: str) -> None:
    """The task's training loss by its known value: without the teacher's term every end-to-end test still passed
    (the labelled rows alone reach their bars)."""
    student, teacher, labels = torch.randn(6, 3), torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    cfg = LossConfig(alpha=0.3, temperature=2.0, divergence=divergence)
    expected = 0.3 * hard_ce(student, labels) + 0.7 * LOSSES[divergence](student, teacher, 2.0)
    assert SequenceClassification().loss(student, teacher, {}, labels, cfg).item() == pytest.approx(expected.item())
    assert SequenceClassification().loss(student, None, {}, labels, cfg).item() == pytest.approx(
        hard_ce(student, labels).item())  # no teacher: fine-tuning on the labels
