"""The fused chunked loss against the dense one (same math, float64) and the independent float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from kdlm.losses import kd_loss_sums, topk_kd_loss_sums
from kdlm.losses.fused import (
    LogitTransform,
    TeacherHidden,
    TeacherLogits,
    TeacherTopK,
    default_chunk_rows,
    fused_kd_loss,
)
from test_losses import CASE_IDS, CASES, ref_divergence, ref_softmax

cases = pytest.mark.parametrize(("name", "knobs"), CASES, ids=CASE_IDS)
N, H_S, H_T, V = 23, 12, 20, 40
KD_WEIGHT, CE_WEIGHT = 0.7, 0.3


def make_inputs(dtype=torch.float64, seed=0, masked_rows=(1, 5, 9, 10, 11, 12, 13, 14)):
    """Hidden states and lm_heads; rows 9-14 are masked, so chunks of 3 or 6 have an all-masked chunk."""
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(N, H_S, generator=gen, dtype=torch.float64).to(dtype)
    student_weight = (0.5 * torch.randn(V, H_S, generator=gen, dtype=torch.float64)).to(dtype)
    teacher_hidden = torch.randn(N, H_T, generator=gen, dtype=torch.float64).to(dtype)
    teacher_weight = (0.5 * torch.randn(V, H_T, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[list(masked_rows)] = -100
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def fused_run(student_hidden, student_weight, labels, teacher, **kwargs):
    """(weighted sum, divergence sum, CE sum, count, grad hidden, grad weight)."""
    hidden = student_hidden.detach().clone().requires_grad_(True)
    weight = student_weight.detach().clone().requires_grad_(True)
    total, kd, ce, count = fused_kd_loss(hidden, weight, labels, teacher, **kwargs)
    total.backward()
    return total.detach(), kd, ce, count, hidden.grad, weight.grad


def dense_run(student_hidden, student_weight, labels, teacher_logits=None, topk=None, transform=None, **kwargs):
    """The same objective through the dense per-token functions on full logits."""
    hidden = student_hidden.detach().clone().requires_grad_(True)
    weight = student_weight.detach().clone().requires_grad_(True)
    logits = hidden @ weight.T
    if transform is not None:
        logits = transform(logits)
    if topk is not None:
        kd, ce, count = topk_kd_loss_sums(logits, *topk, labels, **kwargs)
    else:
        kd, ce, count = kd_loss_sums(logits, teacher_logits, labels, **kwargs)
    total = KD_WEIGHT * kd + CE_WEIGHT * ce
    total.backward()
    return total.detach(), kd.detach(), ce.detach(), count, hidden.grad, weight.grad


def assert_runs_close(fused, dense, rtol=1e-9, atol=1e-10):
    for actual, expected in zip(fused[:3], dense[:3], strict=True):
        torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)
    assert fused[3] == dense[3]
    for actual, expected in zip(fused[4:], dense[4:], strict=True):
        torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@cases
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_rows", [1, 4, 6, 23, 64])
def test_fused_equals_dense_online_teacher(name, knobs, temperature, chunk_rows):
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    kwargs = {"divergence": name, "temperature": temperature, **knobs}
    fused = fused_run(
        student_hidden, student_weight, labels, TeacherHidden(teacher_hidden, teacher_weight),
        kd_weight=KD_WEIGHT, ce_weight=CE_WEIGHT, chunk_rows=chunk_rows, **kwargs,
    )
    dense = dense_run(student_hidden, student_weight, labels, teacher_hidden @ teacher_weight.T, **kwargs)
    assert_runs_close(fused, dense)


@cases
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_matches_float64_reference(name, knobs, temperature):
    """fp32 inputs through the fused path against the reference computed from probabilities in float64."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs(torch.float32)
    fused = fused_run(
        student_hidden, student_weight, labels, TeacherHidden(teacher_hidden, teacher_weight),
        divergence=name, temperature=temperature, kd_weight=1.0, ce_weight=0.0, chunk_rows=5, **knobs,
    )
    hidden = student_hidden.double().requires_grad_(True)
    weight = student_weight.double().requires_grad_(True)
    keep = labels != -100
    q = ref_softmax((hidden @ weight.T)[keep] / temperature)
    p = ref_softmax((teacher_hidden.double() @ teacher_weight.double().T)[keep] / temperature)
    reference = ref_divergence(name, q, p, **knobs).sum()
    reference.backward()
    torch.testing.assert_close(fused[1].double(), reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[4].double(), hidden.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused[5].double(), weight.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("chunk_rows", [3, 7])
def test_fused_equals_dense_given_teacher_logits_and_topk(name, chunk_rows):
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    teacher_logits = teacher_hidden @ teacher_weight.T
    kwargs = {"divergence": name, "temperature": 1.5}
    common = {"kd_weight": KD_WEIGHT, "ce_weight": CE_WEIGHT, "chunk_rows": chunk_rows, **kwargs}
    fused = fused_run(student_hidden, student_weight, labels, TeacherLogits(teacher_logits), **common)
    assert_runs_close(fused, dense_run(student_hidden, student_weight, labels, teacher_logits, **kwargs))
    ids = teacher_logits.topk(6, dim=-1).indices
    logprobs = F.log_softmax(teacher_logits, -1).gather(-1, ids)
    fused = fused_run(student_hidden, student_weight, labels, TeacherTopK(ids, logprobs), **common)
    assert_runs_close(fused, dense_run(student_hidden, student_weight, labels, topk=(ids, logprobs), **kwargs))


def test_cross_entropy_only_equals_torch():
    student_hidden, student_weight, _, _, labels = make_inputs()
    fused = fused_run(student_hidden, student_weight, labels, None, kd_weight=1.0, ce_weight=1.0, chunk_rows=4)
    hidden = student_hidden.clone().requires_grad_(True)
    weight = student_weight.clone().requires_grad_(True)
    ce = F.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    ce.backward()
    assert fused[1] == 0
    torch.testing.assert_close(fused[0], ce.detach())
    torch.testing.assert_close(fused[2], ce.detach())
    torch.testing.assert_close(fused[4], hidden.grad)
    torch.testing.assert_close(fused[5], weight.grad)


def test_all_masked_gives_zeros_and_zero_gradients():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    labels = torch.full_like(labels, -100)
    fused = fused_run(student_hidden, student_weight, labels, TeacherHidden(teacher_hidden, teacher_weight))
    assert fused[0] == 0 and fused[1] == 0 and fused[2] == 0 and fused[3] == 0
    assert not fused[4].any() and not fused[5].any()


def test_masked_rows_get_zero_gradient_and_do_not_change_the_loss():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    teacher = TeacherHidden(teacher_hidden, teacher_weight)
    fused = fused_run(student_hidden, student_weight, labels, teacher, chunk_rows=4)
    garbage = student_hidden.clone()
    garbage[labels == -100] = float("nan")  # a masked row may hold anything: it never reaches a matmul
    again = fused_run(garbage, student_weight, labels, teacher, chunk_rows=4)
    torch.testing.assert_close(again[0], fused[0])
    assert not fused[4][labels == -100].any()


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "akl"])
def test_softcap_and_logit_scale(name):
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    student_transform, teacher_transform = LogitTransform(softcap=3.0), LogitTransform(softcap=5.0, scale=0.8)
    teacher = TeacherHidden(teacher_hidden, teacher_weight, teacher_transform)
    fused = fused_run(
        student_hidden, student_weight, labels, teacher, divergence=name, kd_weight=KD_WEIGHT,
        ce_weight=CE_WEIGHT, chunk_rows=5, student_transform=student_transform,
    )
    teacher_logits = teacher_transform(teacher_hidden @ teacher_weight.T)
    dense = dense_run(student_hidden, student_weight, labels, teacher_logits, transform=student_transform, divergence=name)
    assert_runs_close(fused, dense)


@pytest.mark.parametrize("name", ["fkl", "jsd", "srkl"])
def test_bf16_inputs_and_autocast_match_the_dense_path(name):
    """bf16 weights, or fp32 weights under bf16 autocast: projections in bf16, losses in fp32, like nn.Linear."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs(torch.float32)
    teacher = TeacherHidden(teacher_hidden, teacher_weight)
    for cast, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        inputs = [t.to(cast) for t in (student_hidden, student_weight)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            fused = fused_run(*inputs, labels, TeacherHidden(*(t.to(cast) for t in (teacher_hidden, teacher_weight))),
                              divergence=name, kd_weight=1.0, chunk_rows=5)
        hidden, weight = (t.detach().clone().requires_grad_(True) for t in inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = F.linear(hidden, weight)
            teacher_logits = F.linear(teacher.hidden.to(cast), teacher.weight.to(cast))
        kd, _, _ = kd_loss_sums(logits, teacher_logits, labels, divergence=name)
        kd.backward()
        assert fused[1].dtype == torch.float32 and fused[4].dtype == cast and fused[5].dtype == cast
        torch.testing.assert_close(fused[1], kd.detach(), rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(fused[4].float(), hidden.grad.float(), rtol=0.05, atol=0.02)
        torch.testing.assert_close(fused[5].float(), weight.grad.float(), rtol=0.05, atol=0.02)


def test_frozen_lm_head_gets_no_gradient_and_hidden_gradient_is_unchanged():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    teacher = TeacherHidden(teacher_hidden, teacher_weight)
    full = fused_run(student_hidden, student_weight, labels, teacher, chunk_rows=4)
    hidden = student_hidden.clone().requires_grad_(True)
    total, _, _, _ = fused_kd_loss(hidden, student_weight, labels, teacher, chunk_rows=4)
    total.backward()
    torch.testing.assert_close(hidden.grad, full[4])


def test_outer_scaling_reaches_the_gradients():
    """The loop divides by the global token count: backward must scale the stored gradients."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    teacher = TeacherHidden(teacher_hidden, teacher_weight)
    full = fused_run(student_hidden, student_weight, labels, teacher)
    hidden = student_hidden.clone().requires_grad_(True)
    total, _, _, _ = fused_kd_loss(hidden, student_weight, labels, teacher)
    (total / 7.0).backward()
    torch.testing.assert_close(hidden.grad, full[4] / 7.0)


def test_default_chunk_rows_and_bad_arguments():
    assert default_chunk_rows(128_256) == 32 and default_chunk_rows(1) == 1 << 22
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = make_inputs()
    teacher = TeacherHidden(teacher_hidden, teacher_weight)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_kd_loss(student_hidden, student_weight, labels, teacher, chunk_rows=0)
    with pytest.raises(ValueError, match="does not match"):
        fused_kd_loss(student_hidden, student_weight[:, :-1], labels, teacher)
    with pytest.raises(ValueError, match="labels"):
        fused_kd_loss(student_hidden, student_weight, labels[:-1], teacher)
