"""One definition of each token-level divergence, on normalised log-probabilities.

Every function takes the student's log q and the teacher's log p, both ``(..., V)`` and normalised over the
last dim, and returns the divergence per position, ``(...)``, already summed over the last dim. The last
dim is the full vocabulary or the k+1 buckets of a sparse top-k target: the same code serves both.
Definitions and conventions are those of METHODS.md §1-2: β = 0 is forward KL and β = 1 reverse KL (TRL),
and a skew α is the weight of the divergence's first argument inside the mixture.

Numerics: inputs are upcast to at least fp32. A log-probability of -inf (a padded vocabulary column, an
empty tail bucket) is read as ``LOG_PROB_FLOOR``, the log of the smallest normal fp32 number (about -87.3).
So 0·log 0 contributes 0 instead of NaN, and a KL term that is +inf in exact arithmetic (mass where the
other side has none) becomes large but finite: its gradient stays finite and still pushes that mass away.
Finite log-probabilities are used as they are, even below the floor.
"""

import math

import torch
from torch import Tensor

DIVERGENCES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl", "symkl")

LOG_PROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def upcast(tensor: Tensor) -> Tensor:
    """Return ``tensor`` in fp32, or unchanged when it is already fp32 or wider."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _prepare(logprobs: Tensor) -> Tensor:
    logprobs = upcast(logprobs)
    return logprobs.masked_fill(torch.isneginf(logprobs), LOG_PROB_FLOOR)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a‖b) = Σ a (log a − log b) over the last dim, for floored log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1 − w)·b), computed in log space; the endpoints return one side exactly."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def fkl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Forward KL(p‖q) = Σ p (log p − log q): mass-covering, unbounded, identical inputs give 0.

    This is the true KL, not the cross-entropy form −Σ p log q (which is offset by the entropy H(p)).

    Args:
        student_logprobs: (..., V) log q.
        teacher_logprobs: (..., V) log p.

    Returns:
        (...) the divergence per position.
    """
    return _kl(_prepare(teacher_logprobs), _prepare(student_logprobs))


def rkl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Reverse KL(q‖p) = Σ q (log q − log p): mode-seeking, unbounded, identical inputs give 0.

    Args:
        student_logprobs: (..., V) log q.
        teacher_logprobs: (..., V) log p.

    Returns:
        (...) the divergence per position.
    """
    return _kl(_prepare(student_logprobs), _prepare(teacher_logprobs))


def jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized JSD_β = β·KL(p‖m) + (1 − β)·KL(q‖m), m = β·p + (1 − β)·q (TRL/Liger convention).

    The formula tends to 0 at both ends, so β = 0 returns exactly FKL and β = 1 exactly RKL; the value
    therefore jumps by 1/β (or 1/(1 − β)) at the endpoints. For 0 < β < 1 it is bounded by
    h(β) = −β log β − (1 − β) log(1 − β) ≤ log 2. distillm's λ is β = 1 − λ.

    Args:
        student_logprobs: (..., V) log q.
        teacher_logprobs: (..., V) log p.
        beta: weight of the teacher in the mixture, in [0, 1].

    Returns:
        (...) the divergence per position.
    """
    _check_unit_interval("beta", beta)
    log_q, log_p = _prepare(student_logprobs), _prepare(teacher_logprobs)
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def skl(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL: KL(p ‖ α·p + (1 − α)·q), the full form (identical inputs give 0), bounded by −log α.

    α = 0 gives FKL, α = 1 gives 0. distillm computes the cross-entropy form instead (offset by H(p)).

    Args:
        student_logprobs: (..., V) log q.
        teacher_logprobs: (..., V) log p.
        alpha: weight of the teacher (the first argument) in the mixture, in [0, 1].

    Returns:
        (...) the divergence per position.
    """
    _check_unit_interval("alpha", alpha)
    log_q, log_p = _prepare(student_logprobs), _prepare(teacher_logprobs)
    return _kl(log_p, _log_mixture(log_p, log_q, alpha))


def srkl(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL: KL(q ‖ (1 − α)·p + α·q); identical inputs give 0, bounded by −log α.

    α = 0 gives RKL, α = 1 gives 0.

    Args:
        student_logprobs: (..., V) log q.
        teacher_logprobs: (..., V) log p.
        alpha: weight of the student (the first argument) in the mixture, in [0, 1].

    Returns:
        (...) the divergence per position.
    """
    _check_unit_interval("alpha", alpha)
    log_q, log_p = _prepare(student_logprobs), _prepare(teacher_logprobs)
    return _kl(log_q, _log_mixture(log_q, log_p, alpha))


def tvd(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Total variation distance ½·Σ |p − q|, in [0, 1]; the gradient at p = q is the subgradient 0.

    Args:
        student_logprobs: (..., V) log q.
        teacher_logprobs: (..., V) log p.

    Returns:
        (...) the divergence per position.
    """
    log_q, log_p = _prepare(student_logprobs), _prepare(teacher_logprobs)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def akl(student_logprobs: Tensor, teacher_logprobs: Tensor, akl_alpha: float = 0.5) -> Tensor:
    """Adaptive KL (arXiv 2404.02657): FKL and RKL weighted by the student's error on head and tail.

    Sort p ascending; the tail is the entries whose cumulative sorted mass (inclusive) is below
    ``akl_alpha``, the head the rest. With g_H, g_T = Σ |p − q| over head and tail (detached),
    AKL = g_H/(g_H + g_T)·FKL + g_T/(g_H + g_T)·RKL. When g_H + g_T = 0 (identical inputs) both weights
    are 0 and so is the result, instead of 0/0. ``akl_alpha = 0`` gives FKL.

    Args:
        student_logprobs: (..., V) log q.
        teacher_logprobs: (..., V) log p.
        akl_alpha: teacher mass that defines the tail, in [0, 1].

    Returns:
        (...) the divergence per position.
    """
    _check_unit_interval("akl_alpha", akl_alpha)
    log_q, log_p = _prepare(student_logprobs), _prepare(teacher_logprobs)
    with torch.no_grad():
        p_sorted, order = log_p.exp().sort(dim=-1)
        gap = (p_sorted - log_q.exp().gather(-1, order)).abs()
        in_tail = p_sorted.cumsum(-1) < akl_alpha
        gap_head, gap_tail = (gap * ~in_tail).sum(-1), (gap * in_tail).sum(-1)
        gap_total = (gap_head + gap_tail).clamp_min(torch.finfo(gap.dtype).tiny)
        weight_head, weight_tail = gap_head / gap_total, gap_tail / gap_total
    return weight_head * _kl(log_p, log_q) + weight_tail * _kl(log_q, log_p)


def symkl(student_logprobs: Tensor, teacher_logprobs: Tensor, lam: float = 0.9) -> Tensor:
    """Symmetric KL (1 − λ)·FKL + λ·RKL, with the true KLs: identical inputs give 0.

    distillm's ``symmetric_kl`` uses the cross-entropy form of FKL, so its value is ours plus (1 − λ)·H(p);
    the gradients agree.

    Args:
        student_logprobs: (..., V) log q.
        teacher_logprobs: (..., V) log p.
        lam: weight of RKL, in [0, 1].

    Returns:
        (...) the divergence per position.
    """
    _check_unit_interval("lam", lam)
    log_q, log_p = _prepare(student_logprobs), _prepare(teacher_logprobs)
    return (1.0 - lam) * _kl(log_p, log_q) + lam * _kl(log_q, log_p)


def per_token_divergence(
    name: str,
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    lam: float = 0.9,
    akl_alpha: float = 0.5,
) -> Tensor:
    """The divergence ``name`` (one of ``DIVERGENCES``) per position; each knob reaches only its own loss.

    Args:
        name: "fkl", "rkl", "jsd" (uses ``beta``), "skl" / "srkl" (``alpha``), "tvd", "akl"
            (``akl_alpha``) or "symkl" (``lam``).
        student_logprobs: (..., V) log q, normalised over the last dim.
        teacher_logprobs: (..., V) log p, normalised over the last dim.
        beta: JSD mixture weight of the teacher; 0 is FKL, 1 is RKL.
        alpha: skew weight of the first argument in the SKL/SRKL mixture.
        lam: RKL weight of the symmetric KL.
        akl_alpha: tail mass of the adaptive KL.

    Returns:
        (...) the divergence per position.

    Raises:
        ValueError: on an unknown name or a knob outside [0, 1].
    """
    student, teacher = student_logprobs, teacher_logprobs
    match name:
        case "fkl":
            return fkl(student, teacher)
        case "rkl":
            return rkl(student, teacher)
        case "jsd":
            return jsd(student, teacher, beta=beta)
        case "skl":
            return skl(student, teacher, alpha=alpha)
        case "srkl":
            return srkl(student, teacher, alpha=alpha)
        case "tvd":
            return tvd(student, teacher)
        case "akl":
            return akl(student, teacher, akl_alpha=akl_alpha)
        case "symkl":
            return symkl(student, teacher, lam=lam)
    raise ValueError(f"unknown divergence {name!r}; choose one of: {', '.join(DIVERGENCES)}")
