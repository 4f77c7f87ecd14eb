"""Distillation losses: pure functions of tensors, chosen by registry key.

Softmax is always taken in float32 (bf16/fp16 logits lose the tail the student learns from), and every
temperature-softened term is scaled by τ² so its gradient magnitude does not shrink as τ grows (Hinton et al. 2015).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of transfer-set examples: the teacher's soft labels only, no hard-label CE


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """τ²·KL(p_t ‖ p_s) on softened distributions. Shapes: (B, C) or (B, L, V); mean over the leading dim."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


def hard_ce(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy on gold labels (B, C) × (B,); rows labelled IGNORE_INDEX don't count. 0 when none are labelled."""
    if (labels == IGNORE_INDEX).all():
        return student_logits.sum() * 0.0  # keeps the graph; F.cross_entropy would return NaN
    return F.cross_entropy(student_logits.float(), labels, ignore_index=IGNORE_INDEX)


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor,
               projection: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """MSE between hidden states (B, L, H_s) and (B, L, H_t) over real tokens only.

    `projection` maps H_s → H_t when the widths differ (a learned nn.Linear owned by the student side, as in TinyBERT).
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    mask = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
    squared = (student_hidden.float() - teacher_hidden.float()).pow(2) * mask
    return squared.sum() / (mask.sum() * teacher_hidden.shape[-1])


def attention_kl(student_attention: Tensor, teacher_attention: Tensor, attention_mask: Tensor) -> Tensor:
    """KL(A_t ‖ A_s) between self-attention distributions (B, heads, L, L), MiniLM-style, over real query rows.

    Head counts may differ: both sides are averaged over heads first then.
    """
    if student_attention.shape[1] != teacher_attention.shape[1]:
        student_attention = student_attention.mean(dim=1, keepdim=True)
        teacher_attention = teacher_attention.mean(dim=1, keepdim=True)
    eps = 1e-12  # attention probabilities are exactly 0 on padded keys
    s, t = student_attention.float().clamp_min(eps), teacher_attention.float().clamp_min(eps)
    kl_rows = (t * (t.log() - s.log())).sum(dim=-1)  # (B, heads, L)
    query_mask = attention_mask[:, None, :].float()  # (B, 1, L)
    return (kl_rows * query_mask).sum() / (query_mask.sum() * kl_rows.shape[1])


LOSSES: dict[str, Callable[..., Tensor]] = {
    "kd_kl": kd_kl,
    "hard_ce": hard_ce,
    "hidden_mse": hidden_mse,
    "attention_kl": attention_kl,
}
