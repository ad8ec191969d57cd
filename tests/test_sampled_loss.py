"""The sampled-targets loss (Sparse Logit Sampling) against the dense float64 divergence.

The estimate of a row is a mean of N i.i.d. terms f(x) = h(p_x, q_x) / p_x, x ~ p, so its exact variance
is computable on a small vocabulary: Var = (Σ_x p_x f(x)² − D²) / N, and the same for each gradient
component. The tolerances below are 5 of those standard deviations, not hand-picked constants.
"""

import pytest
import torch

from kdlm.losses import SAMPLED_DIVERGENCES, sampled_kd_loss_sums, topk_kd_loss_sums
from kdlm.losses.fused import TeacherSampled, fused_kd_loss
from kdlm.teachers.cache import _sampled_rows, sample_counts
from test_fused import make_inputs
from test_losses import ref_divergence, ref_softmax

SAMPLED_CASES = [(name, {}) for name in SAMPLED_DIVERGENCES] + [("skl", {"alpha": 0.3})]
SAMPLED_IDS = [name + "".join(f"-{k}={v}" for k, v in knobs.items()) for name, knobs in SAMPLED_CASES]
sampled_cases = pytest.mark.parametrize(("name", "knobs"), SAMPLED_CASES, ids=SAMPLED_IDS)
V = 12


def tiny_problem(rows: int = 5, seed: int = 0):
    """float64 student and (peaked) teacher logits on a 12-token vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, V, generator=gen, dtype=torch.float64)
    teacher = 2.0 * torch.randn(rows, V, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (rows,), generator=gen)
    return student, teacher, labels


def draw(teacher_logprobs: torch.Tensor, samples: int, seed: int):
    """(ids, log_weights, logprobs) as the cache reader returns them, drawn by the cache's own sampler."""
    num_distinct, ids, counts = sample_counts(teacher_logprobs, samples, torch.Generator().manual_seed(seed))
    row_of = torch.repeat_interleave(torch.arange(len(teacher_logprobs)), num_distinct)
    tensors = {"num_distinct": num_distinct, "ids": ids, "counts": counts, "logprobs": teacher_logprobs[row_of, ids]}
    return _sampled_rows(tensors, samples, int(num_distinct.max()))


def per_token_terms(name, q, p, **knobs):
    """(n, V) float64 terms h(p_x, q_x) of a separable divergence."""
    return ref_divergence(name, q.unsqueeze(-1), p.unsqueeze(-1), **knobs)


def exact_moments(name, student_logits, teacher_logits, **knobs):
    """Dense value and gradient, and the one-draw variances of the estimate's value and gradient (float64)."""
    p = ref_softmax(teacher_logits)
    values, grads, value_vars, grad_vars = [], [], [], []
    for z, p_row in zip(student_logits, p, strict=True):
        def f(logits, p_row=p_row):  # f(x) for every x: the estimate when x is the one draw
            return per_token_terms(name, ref_softmax(logits), p_row, **knobs) / p_row

        f_values = f(z)
        jacobian = torch.autograd.functional.jacobian(f, z)  # (x, logit)
        values.append((p_row * f_values).sum())
        value_vars.append((p_row * f_values**2).sum() - values[-1] ** 2)
        grads.append(p_row @ jacobian)
        grad_vars.append(p_row @ jacobian**2 - grads[-1] ** 2)
    dense = ref_divergence(name, ref_softmax(student_logits), p, **knobs)
    torch.testing.assert_close(torch.stack(values), dense)  # the divergence is separable: Σ_x h = D
    z = student_logits.clone().requires_grad_(True)
    (dense_grad,) = torch.autograd.grad(ref_divergence(name, ref_softmax(z), p, **knobs).sum(), z)
    torch.testing.assert_close(torch.stack(grads), dense_grad)
    return dense.sum(), dense_grad, sum(value_vars), torch.stack(grad_vars)


def estimate(name, student_logits, targets, labels, **knobs):
    z = student_logits.clone().requires_grad_(True)
    kd, _, _ = sampled_kd_loss_sums(z, *targets, labels, divergence=name, **knobs)
    (grad,) = torch.autograd.grad(kd, z)
    return kd.detach(), grad


@sampled_cases
def test_many_samples_converge_to_the_dense_loss_and_gradient(name, knobs):
    student, teacher, labels = tiny_problem()
    samples = 20_000
    targets = draw(torch.log_softmax(teacher, -1), samples, seed=1)
    value, grad = estimate(name, student, targets, labels, **knobs)
    dense, dense_grad, value_var, grad_var = exact_moments(name, student, teacher, **knobs)
    value_tol = 5 * (value_var / samples).sqrt() + 1e-6  # fp32 targets: 1e-6 of rounding on top
    assert abs(value - dense) < value_tol
    assert value_tol < 0.1 * dense  # the check has teeth: the tolerance is a small part of the loss
    assert torch.all((grad - dense_grad).abs() < 5 * (grad_var / samples).sqrt() + 1e-6)


@sampled_cases
def test_gradient_and_value_are_unbiased_with_few_samples(name, knobs):
    """4 draws per row, 4,000 independent repeats: the mean estimate is the dense one (5 standard errors)."""
    student, teacher, labels = tiny_problem(rows=3)
    samples, repeats = 4, 4000
    rows = student.shape[0]
    teacher_logprobs = torch.log_softmax(teacher, -1).repeat(repeats, 1)
    targets = draw(teacher_logprobs, samples, seed=2)
    value, grad = estimate(name, student.repeat(repeats, 1), targets, labels.repeat(repeats), **knobs)
    mean_grad = grad.view(repeats, rows, V).mean(0)
    dense, dense_grad, value_var, grad_var = exact_moments(name, student, teacher, **knobs)
    assert torch.all((mean_grad - dense_grad).abs() < 5 * (grad_var / (samples * repeats)).sqrt() + 1e-7)
    assert abs(value / repeats - dense) < 5 * (value_var / (samples * repeats)).sqrt() + 1e-6


def test_the_unbiasedness_check_catches_a_biased_estimate():
    """The same check on the plug-in FKL of the empirical distribution (counts only, no teacher log-probs):
    its gradient is unbiased but its value is off by the entropy of 4 draws, and the check sees it."""
    student, teacher, labels = tiny_problem(rows=3)
    samples, repeats = 4, 4000
    ids, log_weights, _ = draw(torch.log_softmax(teacher, -1).repeat(repeats, 1), samples, seed=2)
    plug_in, _, _ = topk_kd_loss_sums(student.repeat(repeats, 1), ids, log_weights, labels.repeat(repeats), divergence="fkl")
    dense, _, value_var, _ = exact_moments("fkl", student, teacher)
    assert abs(plug_in / repeats - dense) > 10 * (value_var / (samples * repeats)).sqrt()


@sampled_cases
@pytest.mark.parametrize("chunk_rows", [1, 4, 23])
def test_fused_equals_unfused(name, knobs, chunk_rows):
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    teacher_logprobs = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1)
    targets = draw(teacher_logprobs, 16, seed=3)
    targets = (targets[0], targets[1].double(), targets[2].double())
    hidden = student_hidden.clone().requires_grad_(True)
    weight = student_weight.clone().requires_grad_(True)
    total, kd, ce, count = fused_kd_loss(hidden, weight, labels, TeacherSampled(*targets), divergence=name, kd_weight=0.7,
                                         ce_weight=0.3, chunk_rows=chunk_rows, **knobs)
    total.backward()
    dense_hidden = student_hidden.clone().requires_grad_(True)
    dense_weight = student_weight.clone().requires_grad_(True)
    dense_kd, dense_ce, dense_count = sampled_kd_loss_sums(dense_hidden @ dense_weight.T, *targets, labels, divergence=name, **knobs)
    (0.7 * dense_kd + 0.3 * dense_ce).backward()
    assert count == dense_count == int((labels != -100).sum())
    torch.testing.assert_close(kd, dense_kd.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, dense_ce.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, dense_hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, dense_weight.grad, rtol=1e-10, atol=1e-12)


def test_masked_rows_and_padding_change_nothing():
    student, teacher, labels = tiny_problem(rows=4)
    ids, log_weights, logprobs = draw(torch.log_softmax(teacher, -1), 8, seed=4)
    value, grad = estimate("fkl", student, (ids, log_weights, logprobs), labels)
    # two more padded columns (weight 0, any id, any log-prob) and a masked row with garbage targets
    pad = (torch.zeros(4, 2, dtype=torch.long), torch.full((4, 2), float("-inf")), torch.full((4, 2), -3.0))
    wider = tuple(torch.cat([a, b], dim=1) for a, b in zip((ids, log_weights, logprobs), pad, strict=True))
    extra = (torch.zeros(1, ids.shape[1] + 2, dtype=torch.long), torch.full((1, ids.shape[1] + 2), float("nan")),
             torch.full((1, ids.shape[1] + 2), float("nan")))
    targets = tuple(torch.cat([a, b]) for a, b in zip(wider, extra, strict=True))
    padded_value, padded_grad = estimate("fkl", torch.cat([student, torch.zeros(1, V)]), targets,
                                         torch.cat([labels, torch.tensor([-100])]))
    torch.testing.assert_close(padded_value, value)
    torch.testing.assert_close(padded_grad[:4], grad)
    assert not padded_grad[4].any()


def test_why_the_q_weighted_divergences_are_refused():
    """Their estimate is unbiased too, but one draw's std is many times the loss: the reason in the error."""
    student, teacher, labels = tiny_problem()
    for name in ("rkl", "srkl", "jsd", "tvd", "symkl"):
        dense, _, value_var, _ = exact_moments(name, student, teacher)
        assert value_var.sqrt() > 1.4 * dense
    dense, _, value_var, _ = exact_moments("fkl", student, teacher)
    assert value_var.sqrt() < 0.6 * dense


def test_unsupported_divergence_and_temperature_are_refused_with_the_reason():
    student, teacher, labels = tiny_problem(rows=2)
    targets = draw(torch.log_softmax(teacher, -1), 8, seed=5)
    with pytest.raises(ValueError, match="'akl' has no unbiased estimate.*not a sum of one term per vocabulary token"):
        sampled_kd_loss_sums(student, *targets, labels, divergence="akl")
    for name in ("rkl", "srkl", "jsd", "tvd", "symkl"):
        with pytest.raises(ValueError, match=f"{name}' is not offered .* q/p.* unbounded variance"):
            sampled_kd_loss_sums(student, *targets, labels, divergence=name)
    with pytest.raises(ValueError, match="temperature 2.0 .* drawn at T=1"):
        sampled_kd_loss_sums(student, *targets, labels, divergence="fkl", temperature=2.0)
