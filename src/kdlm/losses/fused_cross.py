"""The cross-tokenizer loss from hidden states, chunk by chunk (``loss.fused`` with ``loss.cross_tokenizer``).

The dense path (``kdlm.xtok.target.cross_tokenizer_forward`` with ``loss.fused=false``) projects the student's
(N, V_s) logits for all its target tokens and holds the teacher's (G, V_t) log-probs for all the aligned
groups. Here the student's target rows are cut into chunks; per chunk the student's logits are projected from
its hidden states, the teacher's log-probs are made for the groups whose first token lies in the chunk (by
``teacher_at``: a live teacher's hidden states times its lm_head, or a top-k cache scattered into rows), and
the chunk's loss is the dense one (``cross_kd_per_group`` and cross-entropy), so there is one definition.

As in ``kdlm.losses.fused``, the gradient with respect to the chunk's logits is taken at once and turned into
gradients for the hidden states and the lm_head weight; the chunk's logits are then freed. Peak memory is one
chunk of logits per model plus one (V_s, H) gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kdlm.losses.cross_tokenizer import cross_kd_per_group
from kdlm.losses.divergences import upcast
from kdlm.losses.fused import LogitTransform, _compute_dtype, default_chunk_rows

# (group indices) -> (teacher log-probs (g, V_t) at T = 1, log of the missing mass (g,) or None)
TeacherAt = Callable[[Tensor], tuple[Tensor, Tensor | None]]


@dataclass
class CrossChunkOptions:
    """What one chunk's loss needs besides its rows (the arguments of ``cross_kd_per_group``)."""

    mode: str
    divergence: str
    temperature: float
    scale_by_t2: bool
    student_ids: Tensor
    teacher_ids: Tensor
    top_k: int
    divergence_kwargs: dict
    kd_weight: float
    ce_weight: float


def _chunk_loss(logits: Tensor, rows: Tensor, target_ids: Tensor, weights: Tensor, group_rows: Tensor,
                teacher_at: TeacherAt, options: CrossChunkOptions) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(objective, KD sum, CE sum, teacher's mapped mass sum) of the target rows ``rows`` (a contiguous range)."""
    start, end = int(rows[0]), int(rows[-1]) + 1
    logits = upcast(logits)
    ce = torch.nn.functional.cross_entropy(logits, target_ids[rows], reduction="none")
    ce_sum = (weights[rows] * ce).sum()
    groups = ((group_rows >= start) & (group_rows < end)).nonzero().squeeze(-1)
    if groups.numel() == 0:
        zero = ce_sum.new_zeros(())
        return options.ce_weight * ce_sum, zero, ce_sum, zero
    teacher_logprobs, missing = teacher_at(groups)
    local = group_rows[groups] - start
    kd, mass = cross_kd_per_group(
        logits[local], teacher_logprobs, mode=options.mode, divergence=options.divergence,
        temperature=options.temperature, scale_by_t2=options.scale_by_t2, student_ids=options.student_ids,
        teacher_ids=options.teacher_ids, teacher_missing=missing, top_k=options.top_k, **options.divergence_kwargs,
    )
    kd_sum = (weights[group_rows[groups]] * kd).sum()
    return options.ce_weight * ce_sum + options.kd_weight * kd_sum, kd_sum, ce_sum, mass.detach().sum()


class _FusedCross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, target_ids, weights, group_rows, teacher_at, options, setup):
        dtype, chunk_rows, transform = setup
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight = student_weight.detach().to(dtype)
        accumulate = torch.promote_types(student_weight.dtype, torch.float32)
        hidden_grad = torch.zeros_like(student_hidden) if need_hidden_grad else None
        weight_grad = torch.zeros(student_weight.shape, dtype=accumulate, device=student_weight.device) if need_weight_grad else None
        sums = [student_hidden.new_zeros((), dtype=accumulate) for _ in range(4)]  # objective, kd, ce, mass
        for start in range(0, student_hidden.shape[0], chunk_rows):
            rows = torch.arange(start, min(start + chunk_rows, student_hidden.shape[0]), device=student_hidden.device)
            hidden = student_hidden.detach()[rows].to(dtype)
            with torch.no_grad():
                raw_logits = hidden @ weight.T
            with torch.enable_grad():
                raw_logits.requires_grad_(True)
                parts = _chunk_loss(transform(raw_logits), rows, target_ids, weights, group_rows, teacher_at, options)
                needed = (need_hidden_grad or need_weight_grad) and parts[0].requires_grad
                (logits_grad,) = torch.autograd.grad(parts[0], raw_logits) if needed else (None,)
            for total, part in zip(sums, parts, strict=True):
                total += part.detach()
            if logits_grad is None:
                continue
            logits_grad = logits_grad.to(dtype)
            if need_hidden_grad:
                hidden_grad[start : start + rows.numel()] = (logits_grad @ weight).to(hidden_grad.dtype)
            if need_weight_grad:
                weight_grad.addmm_(logits_grad.T.to(accumulate), hidden.to(accumulate))
        ctx.gradients = (hidden_grad, weight_grad)  # scaled in place by the backward, as in kdlm.losses.fused
        ctx.weight_dtype = student_weight.dtype
        ctx.mark_non_differentiable(*sums[1:])
        return tuple(sums)

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        hidden_grad, weight_grad = ctx.gradients
        ctx.gradients = None
        if hidden_grad is not None:
            hidden_grad.mul_(grad_total.to(hidden_grad.dtype))
        if weight_grad is not None:
            weight_grad = weight_grad.mul_(grad_total).to(ctx.weight_dtype)
        return hidden_grad, weight_grad, None, None, None, None, None, None


def fused_cross_kd_loss(student_hidden: Tensor, student_weight: Tensor, target_ids: Tensor, group_rows: Tensor,
                        teacher_at: TeacherAt, options: CrossChunkOptions, *, weights: Tensor | None = None,
                        teacher_vocab: int = 0, chunk_rows: int | None = None,
                        student_transform: LogitTransform = LogitTransform()) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``ce_weight · Σ_N w·CE + kd_weight · Σ_G w·D_group`` over the student's target rows, chunk by chunk.

    Args:
        student_hidden: (N, H) the student's last hidden states at its target rows (already masked).
        student_weight: (V_s, H) the student's lm_head weight, sliced to its logit rows.
        target_ids: (N,) the student's targets.
        group_rows: (G,) each aligned group's first student target row, distinct.
        teacher_at: group indices -> the teacher's log-probs there (and a top-k tail, or None).
        options: the loss settings (``CrossChunkOptions``).
        weights: (N,) per-row weights (records with ``weight``); None: all 1.
        teacher_vocab: V_t, used with V_s for the default chunk size.
        chunk_rows: student rows per chunk; default ``default_chunk_rows(max(V_s, V_t))``. Any value gives the
            same result.
        student_transform: soft-capping or scaling of the student's logits.

    Returns:
        (weighted sum: differentiable w.r.t. ``student_hidden`` and ``student_weight``; KD sum, CE sum and the
        teacher's mapped mass summed over groups: detached).
    """
    if target_ids.dim() != 1 or student_hidden.shape[0] != target_ids.shape[0]:
        raise ValueError(f"expected hidden (N, H) and target ids (N,), got {tuple(student_hidden.shape)}, {tuple(target_ids.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if weights is None:
        weights = torch.ones(target_ids.shape, dtype=torch.float32, device=target_ids.device)
    setup = (_compute_dtype(student_hidden, student_weight),
             chunk_rows or default_chunk_rows(max(student_weight.shape[0], teacher_vocab)), student_transform)
    with torch.autocast(student_hidden.device.type, enabled=False):
        return _FusedCross.apply(student_hidden, student_weight, target_ids, weights, group_rows, teacher_at, options, setup)
