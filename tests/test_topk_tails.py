"""The top-k loss's tail buckets at any logit gap: value and gradient against a float64 reference.

The reference takes full-vocabulary float64 softmaxes and collapses them into k+1 buckets by summing the
non-top-k probabilities directly (never 1 − Σ_k), then applies the METHODS.md §2 definitions
(``test_losses.ref_divergence``). kdlm's loss sees what training sees: student logits of the given dtype,
the teacher's k log-probs and, as the cache stores it, the log of its missing mass.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kdlm.losses import DIVERGENCES, topk_kd_loss_sums
from kdlm.losses.fused import TeacherTopK, fused_kd_loss
from kdlm.losses.logits import tail_logmass_from_kept
from kdlm.teachers.cache import _topk_rows, rest_logmass
from test_losses import ref_divergence, ref_softmax

GAPS = [14.0, 15.5, 20.0, 30.0, 50.0, 100.0]
ROWS, V, K = 6, 12, 3
TOLERANCE = {  # (value rtol, value atol, gradient atol)
    torch.float64: (1e-9, 1e-11, 1e-11),
    torch.float32: (2e-5, 2e-5, 2e-5),
}
dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
divergences = pytest.mark.parametrize("name", DIVERGENCES)


def collapse(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(n, V) probabilities -> (n, k+1): the k ids, then the sum of every other entry."""
    rest = torch.ones_like(probs, dtype=torch.bool).scatter(-1, ids, False)
    return torch.cat([probs.gather(-1, ids), (probs * rest).sum(-1, keepdim=True)], dim=-1)


def reference(name, student_logits, teacher_logits, ids, temperature=1.0):
    """float64 (divergence sum, its gradient w.r.t. the student logits) over the k+1 buckets."""
    student = student_logits.detach().double().requires_grad_(True)
    q = collapse(ref_softmax(student / temperature), ids)
    p = collapse(ref_softmax(teacher_logits.double()), ids)
    p = p ** (1 / temperature) / (p ** (1 / temperature)).sum(-1, keepdim=True)  # re-tempered buckets
    value = ref_divergence(name, q, p).sum()
    (grad,) = torch.autograd.grad(value, student)
    return value.detach(), grad


def teacher_targets(teacher_logits: torch.Tensor, ids: torch.Tensor, dtype) -> torch.Tensor:
    """(n, k+1) as ``read_targets`` gives them: k log-probs, then the log of the missing mass."""
    logprobs = F.log_softmax(teacher_logits.double(), -1)
    return torch.cat([logprobs.gather(-1, ids), rest_logmass(logprobs, ids).unsqueeze(-1)], -1).to(dtype)


def problem(student_gap: float, teacher_gap: float, seed: int = 0):
    """float64 logits: the teacher's top-k ids lie `teacher_gap` above noise, the student's `student_gap`."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(ROWS, V, generator=gen, dtype=torch.float64)
    student = 2.0 * torch.randn(ROWS, V, generator=gen, dtype=torch.float64)
    ids = teacher.topk(K, dim=-1).indices
    teacher = teacher.scatter_add(-1, ids, torch.full((ROWS, K), teacher_gap, dtype=torch.float64))
    student = student.scatter_add(-1, ids, torch.full((ROWS, K), student_gap, dtype=torch.float64))
    labels = torch.randint(0, V, (ROWS,), generator=gen)
    return student, teacher, ids, labels


def kdlm_run(name, student, teacher_logprobs, ids, labels, dtype, temperature=1.0):
    logits = student.to(dtype).requires_grad_(True)
    value, _, _ = topk_kd_loss_sums(logits, ids, teacher_logprobs, labels, divergence=name, temperature=temperature)
    (grad,) = torch.autograd.grad(value, logits)
    return value, grad


def check_gaps(name, dtype, student_gap, teacher_gap, temperature=1.0):
    rtol, atol, grad_atol = TOLERANCE[dtype]
    for gap in GAPS:
        student, teacher, ids, labels = problem(gap * student_gap, gap * teacher_gap)
        student = student.to(dtype).double()  # the reference sees the same rounded logits
        value, grad = kdlm_run(name, student, teacher_targets(teacher, ids, dtype), ids, labels, dtype, temperature)
        ref_value, ref_grad = reference(name, student, teacher, ids, temperature)
        assert value.dtype == dtype and grad.isfinite().all()
        torch.testing.assert_close(value.double(), ref_value, rtol=rtol, atol=atol, msg=lambda m, g=gap: f"gap {g}: {m}")
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=grad_atol, msg=lambda m, g=gap: f"gap {g}: {m}")


@dtypes
@divergences
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tiny_student_tail(name, dtype, temperature):
    check_gaps(name, dtype, student_gap=1.0, teacher_gap=0.0, temperature=temperature)


@dtypes
@divergences
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tiny_teacher_tail(name, dtype, temperature):
    check_gaps(name, dtype, student_gap=0.0, teacher_gap=1.0, temperature=temperature)


@dtypes
@divergences
def test_both_tails_tiny(name, dtype):
    check_gaps(name, dtype, student_gap=1.0, teacher_gap=1.0)
    check_gaps(name, dtype, student_gap=0.5, teacher_gap=1.0)  # tails of different sizes


@dtypes
@pytest.mark.parametrize("gap", [15.0, 15.5, 30.0])
def test_issue_reproduction_fkl(dtype, gap):
    """V = 10, k = 2, teacher uniform, student logits 0 but the two top-k ids at `gap` (issue 15, item 1)."""
    student = torch.zeros(1, 10, dtype=torch.float64)
    student[0, :2] = gap
    ids = torch.tensor([[0, 1]])
    teacher = torch.full((1, 2), math.log(0.1), dtype=dtype)  # the k log-probs; the tail 0.8 is derived
    value, grad = kdlm_run("fkl", student, teacher, ids, torch.tensor([5]), dtype)
    q_kept = math.exp(gap) / (2 * math.exp(gap) + 8)
    q_tail = 8 / (2 * math.exp(gap) + 8)
    exact = 2 * 0.1 * math.log(0.1 / q_kept) + 0.8 * math.log(0.8 / q_tail)
    if gap == 15.5:
        assert round(exact, 2) == 10.79
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert math.isclose(value.item(), exact, rel_tol=rtol)
    # d FKL / d s_j = q_j − p_tail · q_j / q_tail for a non-top-k logit j: q_j − 0.1, summed over the 8: −0.8 + q_tail
    assert math.isclose(grad[0, 2:].sum().item(), -0.8 + q_tail, rel_tol=0, abs_tol=1e-12 if dtype == torch.float64 else 1e-6)


@dtypes
def test_rkl_probe_against_a_closed_form(dtype):
    """RKL reads the teacher's tail in log space: a tail of e^-25 is not the -87.3 floor (issue 15, item 2)."""
    ids = torch.tensor([[0]])
    tail = -25.0  # log of the teacher's missing mass
    teacher = torch.tensor([[math.log(-math.expm1(tail)), tail]], dtype=dtype)  # (1, k+1): top-1, then the tail
    student = torch.zeros(1, 10, dtype=torch.float64)  # q uniform: 0.1 on the id, 0.9 in the tail
    value, _ = kdlm_run("rkl", student, teacher, ids, torch.tensor([0]), dtype)
    exact = 0.1 * math.log(0.1 / -math.expm1(tail)) + 0.9 * (math.log(0.9) - tail)
    assert math.isclose(value.item(), exact, rel_tol=1e-6)  # 22.3, where the floor would give 78.4


@dtypes
@divergences
def test_tail_given_equals_tail_derived_where_resolvable(name, dtype):
    """A k-column target derives the tail itself; above the dtype's resolution it is the stored one."""
    student, teacher, ids, labels = problem(0.0, 5.0)  # teacher tails ~1e-3
    both = teacher_targets(teacher, ids, dtype)
    with_tail = kdlm_run(name, student, both, ids, labels, dtype)
    derived = kdlm_run(name, student, both[:, :K], ids, labels, dtype)
    rtol, atol, grad_atol = TOLERANCE[dtype]
    scale = 1e2 if dtype == torch.float32 else 1e3  # rounding of k values against one stored log
    torch.testing.assert_close(derived[0], with_tail[0], rtol=scale * rtol, atol=scale * atol)
    torch.testing.assert_close(derived[1], with_tail[1], rtol=0, atol=scale * grad_atol)


def test_derived_tail_below_resolution_is_empty():
    eps32, eps64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
    kept = torch.tensor([-1e-3, -1e-5, -4 * eps32, 0.0, 1e-7], dtype=torch.float64)
    tail = tail_logmass_from_kept(kept, torch.float32)
    torch.testing.assert_close(tail[:2], torch.log(-torch.expm1(kept[:2])))
    assert torch.isneginf(tail[2:]).all()
    tail64 = tail_logmass_from_kept(torch.tensor([-1e-12, -4 * eps64], dtype=torch.float64), torch.float64)
    assert math.isclose(tail64[0].item(), math.log(1e-12), rel_tol=1e-6) and torch.isneginf(tail64[1])


@pytest.mark.parametrize("gap", GAPS)
def test_cache_tail_from_fp32_logprobs(gap):
    """The cache sums the tail from fp32 log-probs: exact in log space at any gap, where 1 − Σ_k is 0."""
    _, teacher, ids, _ = problem(0.0, gap)
    fp32 = rest_logmass(F.log_softmax(teacher.float(), -1), ids)
    exact = rest_logmass(F.log_softmax(teacher, -1), ids)
    torch.testing.assert_close(fp32.double(), exact, rtol=0, atol=2e-5)
    assert exact.max() < math.log(1e-4)
    if gap >= 30:
        assert (1 - F.log_softmax(teacher.float(), -1).gather(-1, ids).exp().sum(-1) <= 0).any()


def test_old_and_new_shards_read_the_same_within_fp32_resolution():
    _, teacher, ids, _ = problem(0.0, 10.0)  # tails ~1e-5: above fp32 resolution
    logprobs = F.log_softmax(teacher.float(), -1)
    values = logprobs.gather(-1, ids)
    new = {"ids": ids.to(torch.uint16), "logprobs": values.half(), "tail_logmass": rest_logmass(logprobs, ids)}
    old = {"ids": ids.to(torch.uint16), "logprobs": values.half(), "kept_logmass": torch.logsumexp(values, -1)}
    (new_ids, new_values), (old_ids, old_values) = _topk_rows(new), _topk_rows(old)
    assert torch.equal(new_ids, ids) and torch.equal(old_ids, ids) and new_values.shape == (ROWS, K + 1)
    assert torch.equal(new_values[:, K], new["tail_logmass"])  # the stored tail, verbatim
    # Old shards recover the tail as 1 − Σ_k in fp32: off by a few fp32 ulps of 1, which is a relative error
    # of ~ulps/tail in the mass and so the same absolute error in its log (tails ~1e-6..1e-5 here: 0.01-0.15).
    # How many ulps depends on the CPU's logsumexp/exp kernels, so the bound is the resolution, not one run.
    resolution = 4 * torch.finfo(torch.float32).eps / new_values[:, K].double().exp()
    assert ((old_values[:, K].double() - new_values[:, K].double()).abs() <= resolution).all()
    assert resolution.max() < 0.5  # the tails sit above fp32 resolution, so the comparison still means something
    # The k values are shifted so that, with the tail, the row's mass is 1.
    torch.testing.assert_close(torch.logsumexp(new_values, -1), torch.zeros(ROWS), rtol=0, atol=1e-6)


@divergences
def test_fused_path_uses_the_same_tails(name):
    """fused_kd_loss on hidden states = logits (lm_head = identity) gives the reference at every gap."""
    for gap in GAPS:
        student, teacher, ids, labels = problem(gap, gap)
        hidden = student.clone().requires_grad_(True)
        weight = torch.eye(V, dtype=torch.float64)
        target = TeacherTopK(ids, teacher_targets(teacher, ids, torch.float64))
        total, kd, _, _ = fused_kd_loss(hidden, weight, labels, target, divergence=name, kd_weight=1.0, chunk_rows=4)
        total.backward()
        ref_value, ref_grad = reference(name, student, teacher, ids)
        torch.testing.assert_close(kd, ref_value, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(hidden.grad, ref_grad, rtol=0, atol=1e-11)
