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

# A tail derived from k log-probs (no stored tail column) is known only down to their rounding: a kept mass
# within this many ulps of 1 (fp32: 9.5e-7, fp64: 1.8e-15) says "no tail", not "a tail of that size".
TAIL_RESOLUTION_ULPS = 8


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


def log_one_minus_exp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate both near 0 (via expm1) and far below it (via log1p)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_logmass_from_kept(kept_logmass: Tensor, resolution_dtype: torch.dtype) -> Tensor:
    """log(1 − Σ_k p) from log Σ_k p; -inf where the tail is below what ``resolution_dtype`` resolves.

    Args:
        kept_logmass: (...) log of the top-k mass, computed from values of ``resolution_dtype``.
        resolution_dtype: the dtype the k log-probs were rounded to; fixes the smallest tail told from 0.

    Returns:
        (...) the log of the missing mass, -inf for an empty (or unresolvable) tail.
    """
    unresolved = kept_logmass > -TAIL_RESOLUTION_ULPS * torch.finfo(resolution_dtype).eps
    return log_one_minus_exp(kept_logmass).masked_fill(unresolved, float("-inf"))


def _teacher_buckets(teacher_logprobs: Tensor, top_k: int, input_dtype: torch.dtype, temperature: float) -> Tensor:
    """(n, k) or (n, k+1) teacher log-probs -> (n, k+1) bucket log-probs at ``temperature``, tail last.

    With k+1 columns the last is the log of the missing mass as the cache stores it (exact however small);
    with k it is derived from the k values, exact down to the rounding of ``input_dtype``.
    """
    if teacher_logprobs.shape[-1] == top_k:
        kept = torch.logsumexp(teacher_logprobs, dim=-1, keepdim=True)
        teacher_logprobs = torch.cat([teacher_logprobs, tail_logmass_from_kept(kept, input_dtype)], dim=-1)
    # Re-temper p_i ∝ p_i^(1/T) over the buckets; this also renormalises a sum that rounding put above 1.
    return F.log_softmax(teacher_logprobs / temperature, dim=-1)


def _logsumexp_rest(logits: Tensor, excluded_ids: Tensor) -> Tensor:
    """(n, V) logits -> (n, 1) log-sum-exp over the columns not in ``excluded_ids`` (n, k); -inf if none."""
    rest = logits.scatter(-1, excluded_ids, float("-inf"))
    lse = torch.logsumexp(rest, dim=-1, keepdim=True)
    empty = torch.isneginf(lse)
    if empty.any():  # k = V, or -inf logits: the backward of an all -inf log-sum-exp is NaN, so feed it zeros
        lse = torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1, keepdim=True).masked_fill(empty, float("-inf"))
    return lse


def _student_buckets(student_logits: Tensor, topk_ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(n, V) logits -> (n, k+1) bucket log-probs (the k ids, then the rest) and the (n, 1) log-normaliser.

    The tail is a log-sum-exp over the other V − k logits, not log(1 − Σ q_k): that difference cancels once
    the tail falls below the rounding of the kept mass (fp32: ~1e-7), and its value and gradient with it.
    The normaliser is assembled from the two parts, so the (n, V) work is that one log-sum-exp.
    """
    scaled = student_logits / temperature if temperature != 1.0 else student_logits
    kept_logits = scaled.gather(-1, topk_ids)
    rest = _logsumexp_rest(scaled, topk_ids)
    log_normaliser = torch.logaddexp(torch.logsumexp(kept_logits, dim=-1, keepdim=True), rest)
    return torch.cat([kept_logits, rest], dim=-1) - log_normaliser, log_normaliser


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
    missing mass. The teacher's tail is the (k+1)-th column when given (``read_targets`` stores it, exact
    however small), else log(1 − Σ p_k), read as empty below the rounding of the k values
    (``TAIL_RESOLUTION_ULPS``). The student is normalised over its full vocabulary, gathered at the ids,
    and its tail is the log-sum-exp of all other logits (exact at any gap). The divergence is then the
    same ``per_token_divergence`` as the dense path; with k = V it equals ``kd_loss_sums``. RKL-type losses
    only see the student's tail as one bucket, so they are an approximation of the dense ones for k < V.

    Temperature: the cached log-probs are taken to be at T = 1 and are re-tempered as p_i ∝ p_i^(1/T) over
    the k+1 buckets (METHODS.md §1). That is exact for a full distribution and an approximation for a
    truncated one, since the tail bucket is raised as one entry.

    Args:
        student_logits: (N, V) student logits.
        teacher_topk_ids: (N, k) long, distinct vocabulary ids per row.
        teacher_topk_logprobs: (N, k) teacher log-probs of those ids, normalised over the full vocabulary;
            or (N, k+1) with the log of the missing mass appended (-inf for none), as ``read_targets`` gives.
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
    ids_shape, logprobs_shape = tuple(teacher_topk_ids.shape), tuple(teacher_topk_logprobs.shape)
    if len(ids_shape) != 2 or logprobs_shape not in (ids_shape, (ids_shape[0], ids_shape[1] + 1)):
        raise ValueError(
            f"teacher_topk_ids {ids_shape} and teacher_topk_logprobs {logprobs_shape} must be (N, k) and "
            "(N, k) or (N, k+1) (the last column the log of the missing mass)"
        )
    labels, student, topk_ids, topk_logprobs = _keep_rows(
        labels, ignore_index, student_logits, teacher_topk_ids, teacher_topk_logprobs
    )
    student = upcast(student)
    student_logprobs, log_normaliser = _student_buckets(student, topk_ids, temperature)
    if temperature != 1.0:
        log_normaliser = torch.logsumexp(student, dim=-1, keepdim=True)
    ce_sum = (log_normaliser.squeeze(-1) - student.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()
    teacher_logprobs = _teacher_buckets(upcast(topk_logprobs), topk_ids.shape[-1], topk_logprobs.dtype, temperature)
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
