"""Token-level distillation losses from logits: dense teacher logits, a sparse top-k teacher, or sampled ids.

Reduction: all three functions return *sums* over the non-masked positions and the number of those positions.
The caller divides once by the global token count of the optimizer step (METHODS.md §1), so that
gradient accumulation and data parallelism give the same loss as one big batch.

Inputs are already shifted: row i of the logits predicts ``labels[i]``. Rows whose label is
``ignore_index`` are dropped before any softmax, so they cannot leak NaN (a padded position may hold -inf
logits) and receive a zero gradient. Softmaxes run in fp32 (or wider) whatever the input dtype.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlm.losses.divergences import per_token_divergence, upcast

# Teacher tail mass below this is read as exactly 0: cached top-k log-probs carry fp32 (or worse) rounding,
# so a sum of ~1 - 1e-7 says "no tail", not "a tail of 1e-7".
TAIL_MASS_EPS = 1e-6


def _keep_rows(labels: Tensor, ignore_index: int, *tensors: Tensor) -> tuple[Tensor, ...]:
    if labels.dim() != 1 or any(t.shape[0] != labels.shape[0] for t in tensors):
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise ValueError(
            f"expected labels (N,) and inputs with N rows, got {tuple(labels.shape)} and {shapes}"
        )
    keep = labels != ignore_index
    if keep.all():  # the training loop's rows are all targets already: no (N, V) copy
        return (labels, *tensors)
    # Advanced indexing, not index_select: on CPU the latter measured ~10x slower on (N, V) rows.
    rows = keep.nonzero().squeeze(-1)
    return tuple(t[rows] for t in (labels, *tensors))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def kd_loss_sums(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    divergence: str,
    temperature: float = 1.0,
    ignore_index: int = -100,
    scale_by_t2: bool = False,
    **divergence_kwargs: float,
) -> tuple[Tensor, Tensor, int]:
    """Summed divergence to dense teacher logits, summed CE to the labels, and the token count.

    When the vocabulary sizes differ (padded lm_heads), both logits are cut to the shared first
    min(V_s, V_t) columns and normalised there; checking that the tokenizers agree is the caller's job.
    The CE uses the student's full vocabulary at temperature 1.

    Args:
        student_logits: (N, V_s) student logits.
        teacher_logits: (N, V_t) teacher logits; not detached, so compute them under ``torch.no_grad()``.
        labels: (N,) target ids, ``ignore_index`` where the position is outside the loss.
        divergence: a name from ``DIVERGENCES``.
        temperature: T, dividing both sides' logits before the divergence.
        ignore_index: label value of masked positions.
        scale_by_t2: multiply the divergence sum by T² (Hinton et al.); a no-op at T = 1.
        **divergence_kwargs: ``beta``, ``alpha``, ``lam`` or ``akl_alpha``, see ``per_token_divergence``.

    Returns:
        (divergence sum, CE sum, number of non-masked tokens): two differentiable scalars and an int.
        All positions masked gives two zeros and 0.
    """
    _check_temperature(temperature)
    labels, student, teacher = _keep_rows(labels, ignore_index, student_logits, teacher_logits)
    student = upcast(student)
    vocab = min(student.shape[-1], teacher.shape[-1])
    student_logprobs = F.log_softmax(student[:, :vocab] / temperature, dim=-1)
    if temperature == 1.0 and vocab == student.shape[-1]:  # the CE reuses the softmax: one pass over (N, V)
        ce_sum = -student_logprobs.gather(-1, labels.unsqueeze(-1)).sum()
    else:
        ce_sum = F.cross_entropy(student, labels, reduction="sum")
    teacher_logprobs = F.log_softmax(upcast(teacher[:, :vocab]) / temperature, dim=-1)
    divergence_sum = per_token_divergence(divergence, student_logprobs, teacher_logprobs, **divergence_kwargs)
    divergence_sum = divergence_sum.sum()
    if scale_by_t2:
        divergence_sum = divergence_sum * temperature**2
    return divergence_sum, ce_sum, labels.numel()


def _log_one_minus_exp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate both near 0 (via expm1) and far below it (via log1p)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _teacher_buckets(topk_logprobs: Tensor, temperature: float) -> Tensor:
    """(n, k) cached log-probs -> (n, k+1) bucket log-probs at ``temperature``, tail last."""
    kept = torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    tail = _log_one_minus_exp(kept).masked_fill(kept >= math.log1p(-TAIL_MASS_EPS), float("-inf"))
    # Re-temper p_i ∝ p_i^(1/T) over the buckets; this also renormalises a sum that rounding put above 1.
    return F.log_softmax(torch.cat([topk_logprobs, tail], dim=-1) / temperature, dim=-1)


def _student_buckets(student_logits: Tensor, topk_ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(n, V) logits -> (n, k+1) bucket log-probs (the k ids, then the rest) and the (n, 1) log-normaliser.

    One log-sum-exp over the vocabulary is the only (n, V) pass; the tail is log(1 − Σ q_k) from the k
    gathered entries. Its fp32 rounding (about 1e-7 of the mass) is why a kept mass above 1 − ``TAIL_MASS_EPS``
    is read as an empty tail, as on the teacher side; with k = V the tail is then exactly empty.
    """
    scaled = student_logits / temperature if temperature != 1.0 else student_logits
    log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
    kept_logprobs = scaled.gather(-1, topk_ids) - log_normaliser
    kept = torch.logsumexp(kept_logprobs, dim=-1, keepdim=True)
    empty = kept >= math.log1p(-TAIL_MASS_EPS)
    # log(1 − e^0) has an infinite derivative: feed it a harmless value where the tail is empty anyway.
    tail = _log_one_minus_exp(kept.masked_fill(empty, -1.0)).masked_fill(empty, float("-inf"))
    return torch.cat([kept_logprobs, tail], dim=-1), log_normaliser


def topk_kd_loss_sums(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    labels: Tensor,
    *,
    divergence: str,
    temperature: float = 1.0,
    ignore_index: int = -100,
    scale_by_t2: bool = False,
    **divergence_kwargs: float,
) -> tuple[Tensor, Tensor, int]:
    """Like ``kd_loss_sums`` but against a sparse teacher: top-k log-probs plus a tail bucket.

    Both sides become k+1 buckets (METHODS.md §2.9 ``symmetric_uniform``): the k teacher ids, then the
    missing mass. The teacher tail is log(1 − Σ p_k), -inf when that mass is below ``TAIL_MASS_EPS``; the
    student is normalised over its full vocabulary, gathered at the ids, and its tail is the mass of all
    other tokens. The divergence is then the same ``per_token_divergence`` as the dense path; with k = V it
    equals ``kd_loss_sums``. RKL-type losses only see the student's tail as one bucket, so they are an
    approximation of the dense ones for k < V.

    Temperature: the cached log-probs are taken to be at T = 1 and are re-tempered as p_i ∝ p_i^(1/T) over
    the k+1 buckets (METHODS.md §1). That is exact for a full distribution and an approximation for a
    truncated one, since the tail bucket is raised as one entry.

    Args:
        student_logits: (N, V) student logits.
        teacher_topk_ids: (N, k) long, distinct vocabulary ids per row.
        teacher_topk_logprobs: (N, k) teacher log-probs of those ids, normalised over the full vocabulary.
        labels: (N,) target ids, ``ignore_index`` where the position is outside the loss.
        divergence: a name from ``DIVERGENCES``.
        temperature: distillation temperature T.
        ignore_index: label value of masked positions.
        scale_by_t2: multiply the divergence sum by T²; a no-op at T = 1.
        **divergence_kwargs: ``beta``, ``alpha``, ``lam`` or ``akl_alpha``, see ``per_token_divergence``.

    Returns:
        (divergence sum, CE sum, number of non-masked tokens), as ``kd_loss_sums``.
    """
    _check_temperature(temperature)
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape (N, k)"
        )
    labels, student, topk_ids, topk_logprobs = _keep_rows(
        labels, ignore_index, student_logits, teacher_topk_ids, teacher_topk_logprobs
    )
    student = upcast(student)
    student_logprobs, log_normaliser = _student_buckets(student, topk_ids, temperature)
    if temperature != 1.0:
        log_normaliser = torch.logsumexp(student, dim=-1, keepdim=True)
    ce_sum = (log_normaliser.squeeze(-1) - student.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()
    teacher_logprobs = _teacher_buckets(upcast(topk_logprobs), temperature)
    divergence_sum = per_token_divergence(divergence, student_logprobs, teacher_logprobs, **divergence_kwargs)
    divergence_sum = divergence_sum.sum()
    if scale_by_t2:
        divergence_sum = divergence_sum * temperature**2
    return divergence_sum, ce_sum, labels.numel()


# Every divergence that is a sum of one term per token, D = Σ_x h(p_x, q_x), has an unbiased estimate from
# tokens drawn from the teacher: Σ_x h = E_{x~p}[h(p_x, q_x) / p_x]. Only FKL and SKL are offered: their term
# over p is a log-ratio (log p − log q; log p − log(αp + (1−α)q) ≤ −log α), with no q/p factor. The others
# (rkl, srkl, jsd, tvd, symkl) weigh the student's q and so carry q/p, unbounded where the teacher gives a token
# little mass: unbiased, but on a 12-token vocabulary the std of one draw is 1.5-5.5x the loss against 0.5x
# for FKL (tests/test_sampled_loss.py), and it grows without bound as the teacher's tail thins. AKL is not a
# sum of per-token terms at all (its head/tail weights sort the whole teacher distribution).
SAMPLED_DIVERGENCES = ("fkl", "skl")


def check_sampled_settings(divergence: str, temperature: float) -> str | None:
    """Why sampled teacher targets cannot train `divergence` at `temperature`, or None when they can."""
    if divergence == "akl":
        return (
            "divergence 'akl' has no unbiased estimate from sampled teacher tokens: it is not a sum of one term per "
            "vocabulary token (its FKL/RKL weights come from a head/tail split of the whole sorted teacher "
            f"distribution); use one of {', '.join(SAMPLED_DIVERGENCES)}, or top-k targets"
        )
    if divergence not in SAMPLED_DIVERGENCES:
        return (
            f"divergence {divergence!r} is not offered with sampled teacher tokens: its per-token terms weigh the "
            "student's probability q, which teacher draws can only reach through q/p; that ratio is unbounded where "
            "the teacher gives a token little mass, so the estimate, though unbiased, has unbounded variance (and "
            "the student mass that such a loss should push away sits on tokens the teacher rarely draws). Use "
            f"{' or '.join(SAMPLED_DIVERGENCES)}, or top-k targets for {divergence}"
        )
    if temperature != 1.0:
        return (
            f"temperature {temperature} with sampled teacher targets: the ids were drawn at T=1, and re-tempering "
            "p^(1/T) needs the teacher's normaliser over the whole vocabulary, which samples estimate only with a "
            "bias; use temperature 1 (or top-k targets)"
        )
    return None


def sampled_kd_loss_sums(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_log_weights: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    *,
    divergence: str,
    temperature: float = 1.0,
    ignore_index: int = -100,
    scale_by_t2: bool = False,
    **divergence_kwargs: float,
) -> tuple[Tensor, Tensor, int]:
    """Like ``kd_loss_sums``, estimated from teacher tokens drawn with replacement (Sparse Logit Sampling).

    Per row, N tokens were drawn from the teacher p; ``teacher_ids`` are the distinct ones and
    ``exp(teacher_log_weights)`` = count / N their frequencies. For a divergence D = Σ_x h(p_x, q_x) the
    estimate is Σ_i (count_i / N) · h(p_i, q_i) / p_i: an importance-sampling mean whose expectation over
    the draws is D exactly, for the value and (the draws not depending on the student) for the gradient;
    its variance shrinks as 1/N. The per-token term h is ``per_token_divergence`` on one-entry
    distributions, so there is still one definition of each divergence. For FKL the estimate reads
    Σ_i w_i (log p_i − log q_i), whose gradient q − w is that of the paper's sparse target. The student is
    normalised over its full vocabulary. Only ``SAMPLED_DIVERGENCES`` are accepted (see there why).

    Args:
        student_logits: (N, V) student logits.
        teacher_ids: (N, D) long, distinct sampled ids per row (padding may repeat an id with weight 0).
        teacher_log_weights: (N, D) log(count / N), -inf on padding; each row's weights sum to 1.
        teacher_logprobs: (N, D) the teacher's log p at those ids (T = 1); any finite value on padding.
        labels: (N,) target ids, ``ignore_index`` where the position is outside the loss.
        divergence: a name from ``SAMPLED_DIVERGENCES``.
        temperature: must be 1 (see ``check_sampled_settings``).
        ignore_index: label value of masked positions.
        scale_by_t2: a no-op at T = 1, accepted for a uniform call.
        **divergence_kwargs: ``alpha`` for SKL (others are ignored), see ``per_token_divergence``.

    Returns:
        (divergence sum, CE sum, number of non-masked tokens), as ``kd_loss_sums``.

    Raises:
        ValueError: an unsupported divergence or temperature, or mismatched shapes.
    """
    _check_temperature(temperature)
    problem = check_sampled_settings(divergence, temperature)
    if problem:
        raise ValueError(problem)
    if not teacher_ids.shape == teacher_log_weights.shape == teacher_logprobs.shape:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)}, teacher_log_weights {tuple(teacher_log_weights.shape)} and "
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} must have the same shape (N, D)"
        )
    labels, student, ids, log_weights, teacher = _keep_rows(
        labels, ignore_index, student_logits, teacher_ids, teacher_log_weights, teacher_logprobs
    )
    student = upcast(student)
    log_normaliser = torch.logsumexp(student, dim=-1, keepdim=True)
    student_logprobs = student.gather(-1, ids) - log_normaliser
    ce_sum = (log_normaliser.squeeze(-1) - student.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()
    teacher, log_weights = upcast(teacher), upcast(log_weights)
    terms = per_token_divergence(divergence, student_logprobs.unsqueeze(-1), teacher.unsqueeze(-1), **divergence_kwargs)
    padding = torch.isneginf(log_weights)
    importance = torch.exp((log_weights - teacher).masked_fill(padding, float("-inf")))  # count / (N · p)
    divergence_sum = (importance * terms).sum()
    return divergence_sum, ce_sum, labels.numel()
