"""Distillation loss from hidden states, chunk by chunk: full-vocabulary logits never exist at once.

The dense path holds the student's and the teacher's (N, V) logits, their softmaxes and their gradients:
at 2,048 tokens and a 128k vocabulary that is over 10 GB. Here the lm_head projections run on chunks of
rows, and each chunk's loss is the dense one (``kd_loss_sums`` / ``topk_kd_loss_sums`` /
``sampled_kd_loss_sums``, so there is one
definition per divergence). The gradient with respect to the chunk's logits is taken at once, turned into
gradients for the hidden states and the lm_head weight, and the chunk's logits are freed: the backward pass
only scales the stored gradients. Peak memory is one chunk of logits per model plus one (V, H) gradient.

Because the gradient is taken in the forward pass, the function returns the *weighted* objective
``kd_weight · D_sum + ce_weight · CE_sum`` as its differentiable output (any later scaling, such as dividing
by the token count, is fine); the two sums come back detached, for logging.

Dtypes: under autocast (or with bf16 inputs) the projections run in that dtype, like ``nn.Linear`` would;
softmaxes and divergences run in fp32 inside the dense per-chunk functions; the weight gradient is
accumulated in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdlm.losses.divergences import upcast
from kdlm.losses.logits import kd_loss_sums, sampled_kd_loss_sums, topk_kd_loss_sums

# Rows per chunk are chosen so that one chunk of logits holds about this many elements (16 MB in fp32), so
# that the ~10 (rows, V) buffers of a divergence stay near 200 MB. Measured at 1,024 x 49,152 on 2 cores:
# chunks of 32, 128 and 512 rows take 4.7, 4.7 and 6.4 s (fwd+bwd JSD): smaller chunks cost no speed.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LogitTransform:
    """What a model family does to its logits after the lm_head: Gemma-2's soft-capping, Cohere's scale."""

    softcap: float | None = None
    scale: float | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.scale:
            logits = logits * self.scale
        return logits


@dataclass
class TeacherHidden:
    """An online teacher, given by its last hidden states at the target rows and its lm_head weight."""

    hidden: Tensor  # (N, H_t)
    weight: Tensor  # (V_t, H_t)
    transform: LogitTransform = LogitTransform()


@dataclass
class TeacherLogits:
    """Dense teacher logits at the target rows."""

    logits: Tensor  # (N, V_t)


@dataclass
class TeacherTopK:
    """A sparse teacher: top-k ids and their log-probs at the target rows (see ``topk_kd_loss_sums``)."""

    ids: Tensor  # (N, k) long
    logprobs: Tensor  # (N, k), or (N, k+1) with the log of the missing mass last (as read_targets gives it)


@dataclass
class TeacherSampled:
    """Teacher tokens drawn with replacement at the target rows: distinct ids, log(count / N), teacher log p."""

    ids: Tensor  # (N, D) long
    log_weights: Tensor  # (N, D), -inf on padding
    logprobs: Tensor  # (N, D)


TeacherTarget = TeacherHidden | TeacherLogits | TeacherTopK | TeacherSampled | None


def sparse_target(*tensors: Tensor) -> TeacherTopK | TeacherSampled:
    """A cached target as ``read_targets`` gives it: (ids, logprobs) is top-k, (ids, log_weights, logprobs) sampled."""
    return TeacherTopK(*tensors) if len(tensors) == 2 else TeacherSampled(*tensors)


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(tensors[0].dtype, tensors[1].dtype)


def _teacher_chunks(teacher: TeacherTarget, dtype: torch.dtype):
    """A function from row indices to the teacher's arguments of the per-chunk loss call."""
    if teacher is None:
        return lambda rows: ()
    if isinstance(teacher, TeacherHidden):
        weight = teacher.weight.detach().to(dtype)  # cast once, not per chunk
        return lambda rows: (teacher.transform(teacher.hidden[rows].to(dtype) @ weight.T),)  # [rows]: see _keep_rows
    if isinstance(teacher, TeacherLogits):
        return lambda rows: (teacher.logits[rows],)
    if isinstance(teacher, TeacherSampled):
        return lambda rows: (teacher.ids[rows], teacher.log_weights[rows], teacher.logprobs[rows])
    return lambda rows: (teacher.ids[rows], teacher.logprobs[rows])


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, labels, teacher, options):
        dtype = options.pop("compute_dtype")
        chunk_rows = options.pop("chunk_rows")
        transform = options.pop("transform")
        kd_weight, ce_weight = options.pop("kd_weight"), options.pop("ce_weight")
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        weight = student_weight.detach().to(dtype)
        hidden_grad = torch.zeros_like(student_hidden) if need_hidden_grad else None
        accumulate = torch.promote_types(student_weight.dtype, torch.float32)
        weight_grad = torch.zeros(student_weight.shape, dtype=accumulate, device=student_weight.device) if need_weight_grad else None
        total = student_hidden.new_zeros((), dtype=accumulate)
        kd_total, ce_total = total.clone(), total.clone()
        teacher_rows = _teacher_chunks(teacher, dtype)
        rows_all = (labels != options["ignore_index"]).nonzero().squeeze(-1)  # masked rows never reach a matmul
        for start in range(0, rows_all.numel(), chunk_rows):
            rows = rows_all[start : start + chunk_rows]
            hidden = student_hidden.detach()[rows].to(dtype)
            with torch.no_grad():
                raw_logits = hidden @ weight.T
                target = teacher_rows(rows)
            with torch.enable_grad():
                raw_logits.requires_grad_(True)
                logits = transform(raw_logits)
                if teacher is None:
                    labels_chunk = labels[rows]
                    ce = torch.nn.functional.cross_entropy(upcast(logits), labels_chunk, reduction="sum")
                    kd = ce.new_zeros(())
                elif isinstance(teacher, TeacherTopK):
                    kd, ce, _ = topk_kd_loss_sums(logits, *target, labels[rows], **options)
                elif isinstance(teacher, TeacherSampled):
                    kd, ce, _ = sampled_kd_loss_sums(logits, *target, labels[rows], **options)
                else:
                    kd, ce, _ = kd_loss_sums(logits, *target, labels[rows], **options)
                objective = kd_weight * kd + ce_weight * ce
                needed = (need_hidden_grad or need_weight_grad) and objective.requires_grad
                (logits_grad,) = torch.autograd.grad(objective, raw_logits) if needed else (None,)
            total += objective.detach()
            kd_total += kd.detach()
            ce_total += ce.detach()
            if logits_grad is None:
                continue
            logits_grad = logits_grad.to(dtype)
            if need_hidden_grad:
                hidden_grad.index_copy_(0, rows, (logits_grad @ weight).to(hidden_grad.dtype))
            if need_weight_grad:
                # Accumulate straight into the fp32 buffer: a (V, H) bf16 product converted and added per
                # chunk cost ~10x this matmul on CPU (measured), for a (rows, V) cast that is cheap.
                weight_grad.addmm_(logits_grad.T.to(accumulate), hidden.to(accumulate))
        # Plain attributes, not save_for_backward: these are new tensors, never inputs or outputs, and the
        # backward scales them in place so that no second (V, H) buffer is allocated.
        ctx.gradients = (hidden_grad, weight_grad)
        ctx.weight_dtype = student_weight.dtype
        ctx.mark_non_differentiable(kd_total, ce_total)
        return total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        hidden_grad, weight_grad = ctx.gradients
        ctx.gradients = None  # a second backward through the same graph is an error, as for any freed graph
        if hidden_grad is not None:
            hidden_grad.mul_(grad_total.to(hidden_grad.dtype))
        if weight_grad is not None:
            weight_grad = weight_grad.mul_(grad_total).to(ctx.weight_dtype)
        return hidden_grad, weight_grad, None, None, None


def fused_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher: TeacherTarget,
    *,
    divergence: str = "fkl",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    scale_by_t2: bool = False,
    chunk_rows: int | None = None,
    student_transform: LogitTransform = LogitTransform(),
    **divergence_kwargs: float,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``kd_weight · Σ D(teacher ‖ student) + ce_weight · Σ CE`` over the target rows, chunk by chunk.

    Args:
        student_hidden: (N, H_s) the student's last hidden states, row i predicting ``labels[i]``.
        student_weight: (V, H_s) the student's lm_head weight (no bias); slice it to the shared vocabulary.
        labels: (N,) target ids, ``ignore_index`` where the row is outside the loss (dropped before any matmul).
        teacher: ``TeacherHidden`` (online teacher, projected chunk by chunk), ``TeacherLogits``, ``TeacherTopK``,
            ``TeacherSampled``, or None for cross-entropy only (the divergence sum is then 0 and ``kd_weight`` is ignored).
        divergence: a name from ``DIVERGENCES``.
        kd_weight: weight of the divergence sum in the differentiable output.
        ce_weight: weight of the cross-entropy sum.
        temperature, ignore_index, scale_by_t2, **divergence_kwargs: as in ``kd_loss_sums``.
        chunk_rows: rows per chunk; default ``default_chunk_rows(V)``. Any value gives the same result.
        student_transform: soft-capping or scaling applied to the student's logits.

    Returns:
        (weighted sum: differentiable w.r.t. ``student_hidden`` and ``student_weight``, divergence sum and
        CE sum: detached, number of target rows).
    """
    if labels.dim() != 1 or student_hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"expected hidden (N, H) and labels (N,), got {tuple(student_hidden.shape)}, {tuple(labels.shape)}")
    if student_weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"lm_head weight {tuple(student_weight.shape)} does not match hidden {tuple(student_hidden.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    options = {
        "divergence": divergence,
        "temperature": temperature,
        "ignore_index": ignore_index,
        "scale_by_t2": scale_by_t2,
        **divergence_kwargs,
        "compute_dtype": _compute_dtype(student_hidden, student_weight),
        "chunk_rows": chunk_rows or default_chunk_rows(student_weight.shape[0]),
        "transform": student_transform,
        "kd_weight": kd_weight if teacher is not None else 0.0,
        "ce_weight": ce_weight,
    }
    with torch.autocast(student_hidden.device.type, enabled=False):
        total, kd_sum, ce_sum = _FusedKD.apply(student_hidden, student_weight, labels, teacher, options)
    return total, kd_sum, ce_sum, int((labels != ignore_index).sum())
