"""Distillation losses: pure functions of tensors, chosen by registry key.

Softmax is always taken in float32 (bf16/fp16 logits lose the tail the student learns from), and every
temperature-softened term is scaled by τ² so its gradient magnitude does not shrink as τ grows (Hinton et al. 2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of transfer-set examples: the teacher's soft labels only, no hard-label CE


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """Forward KL, the classic KD: τ²·KL(p_t ‖ p_s) on softened distributions. Shapes: (B, C), or (B, L, V) with
    mask (B, L) marking the real tokens; the mean is over rows (examples, or real tokens)."""
    log_p_s, log_p_t = _log_softmax_pair(student_logits, teacher_logits, temperature)
    kl_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return _row_mean(kl_rows, mask) * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
               mask: Tensor | None = None) -> Tensor:
    """τ²·KL(p_s ‖ p_t): mode-seeking, the student does not spread mass where the teacher has little (MiniLLM,
    Gu et al. 2023). Shapes as kd_kl."""
    log_p_s, log_p_t = _log_softmax_pair(student_logits, teacher_logits, temperature)
    kl_rows = (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1)
    return _row_mean(kl_rows, mask) * temperature**2


def jsd(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None,
        beta: float = 0.5) -> Tensor:
    """τ²·generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024): β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m) with
    m = β·p_t + (1 − β)·p_s; bounded, and it tends to forward KL as β → 0 (scaled by β) and reverse KL as β → 1.
    Shapes as kd_kl."""
    log_p_s, log_p_t = _log_softmax_pair(student_logits, teacher_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_p_t + math.log(beta), log_p_s + math.log(1 - beta)]), dim=0)
    kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(dim=-1)
    kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(dim=-1)
    return _row_mean(beta * kl_t + (1 - beta) * kl_s, mask) * temperature**2


def _log_softmax_pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """fp32 log-softmaxes at τ; the teacher's is a target, detached: no gradient ever reaches the teacher."""
    return (F.log_softmax(student_logits.float() / temperature, dim=-1),
            F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1))


def _row_mean(rows: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-row values (B,) or (B, L) over the rows mask (B, L) keeps (all rows without a mask)."""
    if mask is None:
        return rows.mean()
    mask = mask.float()
    return (rows * mask).sum() / mask.sum().clamp_min(1.0)


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


def value_relation_kl(student_values: Tensor, teacher_values: Tensor, attention_mask: Tensor) -> Tensor:
    """KL between value-relation distributions softmax(V·Vᵀ/√d) per head (MiniLM, Wang et al. 2020), over real
    tokens. Values (B, heads, L, d); the head dimension d may differ between the two. Head counts may differ: both
    sides' relations are averaged over heads first then, as attention_kl does."""
    key_mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, L): padded keys get no probability
    relations = []
    for values in (student_values, teacher_values):
        scores = values.float() @ values.float().transpose(-1, -2) / math.sqrt(values.shape[-1])  # (B, h, L, L)
        relations.append(torch.softmax(scores.masked_fill(~key_mask, float("-inf")), dim=-1))
    return attention_kl(relations[0], relations[1], attention_mask)


def embedding_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between sentence embeddings (B, D) in the teacher's space."""
    return F.mse_loss(student.float(), teacher.float())


def embedding_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """1 − cosine similarity between sentence embeddings (B, D), averaged over the batch."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def similarity_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL between in-batch similarity distributions: row i is softmax_j(cos(e_i, e_j)/τ) over the other examples
    (the diagonal is left out: it is 1 on both sides). Embeddings (B, D), B ≥ 2; teacher and student widths may
    differ since only their similarity matrices meet."""
    cosine_s, cosine_t = (_cosines(rows, rows) for rows in (student, teacher))  # (B, B) each
    eye = torch.eye(len(cosine_s), dtype=torch.bool, device=cosine_s.device)
    return _relation_kl(cosine_s, cosine_t, eye, temperature)


def anchor_similarity_kl(student: Tensor, teacher: Tensor, anchors: Tensor, temperature: float) -> Tensor:
    """KL between similarity distributions over fixed anchors, the teacher's embeddings of other texts (CompRess,
    Abbasi Koohpayegani et al. 2020): row i is softmax_j(cos(e_i, a_j)/τ) for the student's and for the teacher's
    embedding of text i. A bank of thousands of anchors holds each text's near neighbours, which a batch of 32 does
    not, so this teaches the ranking that nearest-neighbour search reads. Student (B, D) and anchors (K, D) share
    the teacher's space (the student's projection puts it there); an anchor that is text i itself (the teacher's
    cosine to it rounds to 1) is left out of row i on both sides."""
    cosine_s, cosine_t = (_cosines(rows, anchors) for rows in (student, teacher))  # (B, K) each
    return _relation_kl(cosine_s, cosine_t, cosine_t > 1 - 1e-6, temperature)


def _cosines(rows: Tensor, others: Tensor) -> Tensor:
    """(B, D) × (K, D) → (B, K) cosine similarities, in float32."""
    return F.normalize(rows.float(), dim=-1) @ F.normalize(others.float(), dim=-1).T


def _relation_kl(cosine_s: Tensor, cosine_t: Tensor, left_out: Tensor, temperature: float) -> Tensor:
    """KL(p_t ‖ p_s) between the rows of softmax(cosine / τ), (B, K) each, the `left_out` entries in neither;
    averaged over rows."""
    log_s, log_t = (F.log_softmax(cosine.masked_fill(left_out, float("-inf")) / temperature, dim=-1).masked_fill(
        left_out, 0.0) for cosine in (cosine_s, cosine_t))
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean()


LOSSES: dict[str, Callable[..., Tensor]] = {
    "kd_kl": kd_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "hard_ce": hard_ce,
    "hidden_mse": hidden_mse,
    "attention_kl": attention_kl,
    "value_relation_kl": value_relation_kl,
    "embedding_mse": embedding_mse,
    "embedding_cosine": embedding_cosine,
    "similarity_kl": similarity_kl,
    "anchor_similarity_kl": anchor_similarity_kl,
}
