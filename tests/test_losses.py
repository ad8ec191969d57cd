"""kdlm.losses against an independent float64 reference written here from the METHODS.md §2 formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlm.losses import DIVERGENCES, kd_loss_sums, per_token_divergence, topk_kd_loss_sums

# (name, knobs): the defaults of every divergence plus non-default knobs where a divergence has one.
CASES = [(name, {}) for name in DIVERGENCES] + [
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("skl", {"alpha": 0.3}),
    ("srkl", {"alpha": 0.3}),
    ("akl", {"akl_alpha": 0.2}),
    ("symkl", {"lam": 0.3}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in knobs.items()) for name, knobs in CASES]
cases = pytest.mark.parametrize(("name", "knobs"), CASES, ids=CASE_IDS)
all_divergences = pytest.mark.parametrize("name", DIVERGENCES)


# ---------------------------------------------------------------- float64 reference, from probabilities


def ref_softmax(logits):
    exps = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return exps / exps.sum(-1, keepdim=True)


def ref_kl(a, b):
    """Σ a log(a/b) over the last dim with 0·log 0 = 0."""
    return torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a)).sum(-1)


def ref_akl(q, p, akl_alpha):
    rows = []
    for q_row, p_row in zip(q, p, strict=True):
        p_np, q_np = p_row.detach().numpy(), q_row.detach().numpy()
        order = np.argsort(p_np, kind="stable")
        tail = np.zeros(p_np.shape, dtype=bool)
        tail[order[np.cumsum(p_np[order]) < akl_alpha]] = True
        gap = np.abs(p_np - q_np)
        total = gap.sum()
        weight_head = gap[~tail].sum() / total if total > 0 else 0.0
        weight_tail = gap[tail].sum() / total if total > 0 else 0.0
        rows.append(weight_head * ref_kl(p_row, q_row) + weight_tail * ref_kl(q_row, p_row))
    return torch.stack(rows)


def ref_divergence(name, q, p, beta=0.5, alpha=0.1, lam=0.9, akl_alpha=0.5):
    """Per-row divergence of student probabilities q (n, V) from teacher probabilities p (n, V)."""
    if name == "fkl" or (name == "jsd" and beta == 0):
        return ref_kl(p, q)
    if name == "rkl" or (name == "jsd" and beta == 1):
        return ref_kl(q, p)
    if name == "jsd":
        mixture = beta * p + (1 - beta) * q
        return beta * ref_kl(p, mixture) + (1 - beta) * ref_kl(q, mixture)
    if name == "skl":
        return ref_kl(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        return ref_kl(q, (1 - alpha) * p + alpha * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":
        return ref_akl(q, p, akl_alpha)
    if name == "symkl":
        return (1 - lam) * ref_kl(p, q) + lam * ref_kl(q, p)
    raise AssertionError(name)


def ref_kd_sums(student_logits, teacher_logits, labels, name, temperature=1.0, ignore_index=-100, **knobs):
    """(divergence sum, CE sum, grad of the divergence sum) in float64."""
    student = student_logits.detach().double().requires_grad_(True)
    keep = [i for i, label in enumerate(labels.tolist()) if label != ignore_index]
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    q = ref_softmax(student[keep, :vocab] / temperature)
    p = ref_softmax(teacher_logits[keep, :vocab].double() / temperature)
    divergence_sum = ref_divergence(name, q, p, **knobs).sum()
    full_q = ref_softmax(student[keep])
    ce_sum = -sum(torch.log(full_q[row, labels[i]]) for row, i in enumerate(keep))
    (grad,) = torch.autograd.grad(divergence_sum, student)
    return divergence_sum.detach(), torch.as_tensor(ce_sum, dtype=torch.float64), grad


def ref_topk_sums(student_logits, ids, topk_logprobs, labels, name, temperature=1.0, **knobs):
    """(divergence sum, its grad) over k+1 buckets (the k ids, then the rest) in float64."""
    student = student_logits.detach().double().requires_grad_(True)
    keep = labels != -100
    q_top = ref_softmax(student[keep] / temperature).gather(-1, ids[keep])
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], dim=-1)
    p_top = topk_logprobs[keep].double().exp()
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], dim=-1)
    p = p ** (1 / temperature) / (p ** (1 / temperature)).sum(-1, keepdim=True)  # re-tempered buckets
    divergence_sum = ref_divergence(name, q, p, **knobs).sum()
    (grad,) = torch.autograd.grad(divergence_sum, student)
    return divergence_sum.detach(), grad


# ---------------------------------------------------------------- helpers


def make_batch(n=16, vocab=32, seed=0, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(n, vocab, generator=gen)
    teacher = 3.0 * torch.randn(n, vocab, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.arange(n) % 4 == 1] = ignore_index
    return student, teacher, labels


def run(loss_fn, student_logits, *args, **kwargs):
    """(divergence sum, CE sum, token count, grad of the divergence sum w.r.t. the student logits)."""
    student = student_logits.detach().clone().requires_grad_(True)
    divergence_sum, ce_sum, num_tokens = loss_fn(student, *args, **kwargs)
    (grad,) = torch.autograd.grad(divergence_sum, student)
    return divergence_sum, ce_sum, num_tokens, grad


def assert_value(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def assert_grad(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=atol)


# ---------------------------------------------------------------- dense path against the reference


@cases
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_matches_reference(name, knobs, temperature):
    student, teacher, labels = make_batch()
    divergence_sum, ce_sum, num_tokens, grad = run(
        kd_loss_sums, student, teacher, labels, divergence=name, temperature=temperature, **knobs
    )
    ref_sum, ref_ce, ref_grad = ref_kd_sums(student, teacher, labels, name, temperature, **knobs)
    assert num_tokens == 12
    assert_value(divergence_sum, ref_sum)
    assert_value(ce_sum, ref_ce)
    assert_grad(grad, ref_grad)


def test_scale_by_t2_multiplies_by_t_squared():
    student, teacher, labels = make_batch()
    plain, _, _ = kd_loss_sums(student, teacher, labels, divergence="fkl", temperature=2.0)
    scaled, _, _ = kd_loss_sums(student, teacher, labels, divergence="fkl", temperature=2.0, scale_by_t2=True)
    assert_value(scaled, 4.0 * plain)


@cases
def test_identical_inputs_give_zero(name, knobs):
    student, _, labels = make_batch()
    divergence_sum, _, _, grad = run(kd_loss_sums, student, student.clone(), labels, divergence=name, **knobs)
    assert_value(divergence_sum, torch.tensor(0.0))
    assert_grad(grad, torch.zeros_like(grad), atol=1e-6)
    # Identical log-probs with -inf columns give 0, not NaN (AKL: no 0/0).
    logprobs = F.log_softmax(student, -1)
    logprobs[:, :3] = float("-inf")
    zero = per_token_divergence(name, logprobs, logprobs, **knobs)
    torch.testing.assert_close(zero, torch.zeros(len(student)), rtol=0, atol=1e-6)


def test_jsd_endpoints_are_torch_kl_div():
    student, teacher, _ = make_batch()
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(per_token_divergence("jsd", log_q, log_p, beta=0.0), forward)
    torch.testing.assert_close(per_token_divergence("jsd", log_q, log_p, beta=1.0), reverse)


def test_skew_alpha_zero_is_fkl_and_rkl_and_akl_alpha_zero_is_fkl():
    student, teacher, _ = make_batch()
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    fkl, rkl = per_token_divergence("fkl", log_q, log_p), per_token_divergence("rkl", log_q, log_p)
    torch.testing.assert_close(per_token_divergence("skl", log_q, log_p, alpha=0.0), fkl)
    torch.testing.assert_close(per_token_divergence("srkl", log_q, log_p, alpha=0.0), rkl)
    torch.testing.assert_close(per_token_divergence("akl", log_q, log_p, akl_alpha=0.0), fkl)


@pytest.mark.parametrize("weight", [0.1, 0.5, 0.8])
def test_bounds_reached_on_disjoint_supports(weight):
    """JSD_β ≤ h(β), SKL/SRKL ≤ −log α, TVD ≤ 1, with equality when p and q share no token."""
    student, teacher, _ = make_batch(seed=1)
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    disjoint_q, disjoint_p = log_q.clone(), log_p.clone()
    disjoint_q[:, ::2], disjoint_p[:, 1::2] = float("-inf"), float("-inf")
    disjoint_q, disjoint_p = disjoint_q.log_softmax(-1), disjoint_p.log_softmax(-1)
    entropy = -weight * math.log(weight) - (1 - weight) * math.log(1 - weight)
    bounds = {
        ("jsd", "beta"): entropy,
        ("skl", "alpha"): -math.log(weight),
        ("srkl", "alpha"): -math.log(weight),
    }
    for (name, knob), bound in bounds.items():
        general = per_token_divergence(name, log_q, log_p, **{knob: weight})
        extreme = per_token_divergence(name, disjoint_q, disjoint_p, **{knob: weight})
        assert (general < bound).all(), name
        torch.testing.assert_close(extreme, torch.full_like(extreme, bound), rtol=1e-5, atol=1e-6)
    assert (per_token_divergence("tvd", log_q, log_p) < 1).all()
    torch.testing.assert_close(per_token_divergence("tvd", disjoint_q, disjoint_p), torch.ones(len(log_q)))


def test_leading_dims_are_kept():
    student, teacher, _ = make_batch()
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    for name in DIVERGENCES:
        batched = per_token_divergence(name, log_q.view(4, 4, -1), log_p.view(4, 4, -1))
        torch.testing.assert_close(batched, per_token_divergence(name, log_q, log_p).view(4, 4))


# ---------------------------------------------------------------- masking, dtypes, vocab padding, -inf


@all_divergences
@pytest.mark.parametrize("ignore_index", [-100, 42])
def test_masked_rows_change_nothing(name, ignore_index):
    student, teacher, labels = make_batch(ignore_index=ignore_index)
    masked = labels == ignore_index
    clean = run(kd_loss_sums, student, teacher, labels, divergence=name, ignore_index=ignore_index)
    # Garbage in masked rows, including the all -inf logits of a padded teacher position.
    student, teacher = student.clone(), teacher.clone()
    student[masked], teacher[masked] = 1e4, float("-inf")
    dirty = run(kd_loss_sums, student, teacher, labels, divergence=name, ignore_index=ignore_index)
    for clean_value, dirty_value in zip(clean, dirty, strict=True):
        assert torch.equal(torch.as_tensor(clean_value), torch.as_tensor(dirty_value))
    assert torch.equal(dirty[3][masked], torch.zeros_like(dirty[3][masked]))


@all_divergences
@pytest.mark.parametrize("loss_fn", [kd_loss_sums, topk_kd_loss_sums])
def test_all_masked_gives_zeros(name, loss_fn):
    student, teacher, labels = make_batch()
    labels = torch.full_like(labels, -100)
    ids = teacher.topk(5, dim=-1).indices
    teacher_args = (
        (teacher,) if loss_fn is kd_loss_sums else (ids, F.log_softmax(teacher, -1).gather(-1, ids))
    )
    divergence_sum, ce_sum, num_tokens, grad = run(loss_fn, student, *teacher_args, labels, divergence=name)
    assert num_tokens == 0
    assert divergence_sum.item() == 0.0 and ce_sum.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@cases
def test_bf16_inputs_are_computed_in_fp32(name, knobs):
    student, teacher, labels = make_batch()
    student, teacher = student.bfloat16(), teacher.bfloat16()
    divergence_sum, ce_sum, _, grad = run(kd_loss_sums, student, teacher, labels, divergence=name, **knobs)
    ref_sum, ref_ce, ref_grad = ref_kd_sums(student, teacher, labels, name, **knobs)
    assert divergence_sum.dtype == torch.float32
    # Same bf16 values on both sides: only an fp32-or-better computation passes at this tolerance.
    assert_value(divergence_sum, ref_sum, rtol=1e-5)
    assert_value(ce_sum, ref_ce, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3)


@all_divergences
def test_vocab_padding_uses_shared_columns(name):
    student, teacher, labels = make_batch()
    padding = torch.tensor([1e4, float("-inf")] * 4).expand(len(teacher), 8)
    padded_teacher = torch.cat([teacher, padding], dim=-1)
    reference = run(kd_loss_sums, student, teacher, labels, divergence=name)
    padded = run(kd_loss_sums, student, padded_teacher, labels, divergence=name)
    for expected, actual in zip(reference, padded, strict=True):
        torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected))
    # A padded student: the divergence uses the shared columns, the CE the student's whole vocabulary.
    padded_student = torch.cat([student, torch.randn(len(student), 8)], dim=-1)
    divergence_sum, ce_sum, _, grad = run(kd_loss_sums, padded_student, teacher, labels, divergence=name)
    ref_sum, ref_ce, ref_grad = ref_kd_sums(padded_student, teacher, labels, name)
    assert_value(divergence_sum, ref_sum)
    assert_value(ce_sum, ref_ce)
    assert_grad(grad, ref_grad)
    assert torch.equal(grad[:, -8:], torch.zeros_like(grad[:, -8:]))


@all_divergences
def test_teacher_neg_inf_columns_give_finite_loss(name):
    student, teacher, labels = make_batch()
    teacher = teacher.clone()
    teacher[:, :4] = float("-inf")
    divergence_sum, _, _, grad = run(kd_loss_sums, student, teacher, labels, divergence=name)
    assert divergence_sum.isfinite() and grad.isfinite().all()
    kept = labels != -100
    # Mass on a token the teacher rules out only ever raises the loss.
    assert (grad[kept, :4] > 0).all()
    ref_sum, _, ref_grad = ref_kd_sums(student, teacher, labels, name)
    if ref_sum.isfinite():  # RKL-type losses are +inf in exact arithmetic; they are floored here
        assert_value(divergence_sum, ref_sum)
        assert_grad(grad, ref_grad)
    else:
        assert name in {"rkl", "akl", "symkl"}


# ---------------------------------------------------------------- sparse top-k path


def topk_inputs(teacher, k):
    ids = teacher.topk(k, dim=-1).indices
    return ids, F.log_softmax(teacher, -1).gather(-1, ids)


@cases
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_full_vocab_equals_dense(name, knobs, temperature):
    student, teacher, labels = make_batch()
    kwargs = {"divergence": name, "temperature": temperature, **knobs}
    dense = run(kd_loss_sums, student, teacher, labels, **kwargs)
    sparse = run(topk_kd_loss_sums, student, *topk_inputs(teacher, teacher.shape[-1]), labels, **kwargs)
    assert_value(sparse[0], dense[0])
    assert_value(sparse[1], dense[1])
    assert sparse[2] == dense[2]
    assert_grad(sparse[3], dense[3])


@cases
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_matches_bucket_reference(name, knobs, temperature):
    student, teacher, labels = make_batch()
    ids, topk_logprobs = topk_inputs(teacher, 5)
    kwargs = {"divergence": name, "temperature": temperature, **knobs}
    divergence_sum, _, _, grad = run(topk_kd_loss_sums, student, ids, topk_logprobs, labels, **kwargs)
    ref_sum, ref_grad = ref_topk_sums(student, ids, topk_logprobs, labels, name, temperature, **knobs)
    assert_value(divergence_sum, ref_sum)
    assert_grad(grad, ref_grad)


def test_topk_fkl_is_the_bucket_kl_by_hand():
    student, teacher, labels = make_batch()
    ids, topk_logprobs = topk_inputs(teacher, 3)
    divergence_sum, _, num_tokens, _ = run(
        topk_kd_loss_sums, student, ids, topk_logprobs, labels, divergence="fkl"
    )
    expected = 0.0
    for row in range(len(labels)):
        if labels[row] == -100:
            continue
        q = np.exp(student[row].double().numpy())
        q /= q.sum()
        p_top = np.exp(topk_logprobs[row].double().numpy())
        q_top = q[ids[row].numpy()]
        for p_i, q_i in zip(p_top, q_top, strict=True):
            expected += p_i * math.log(p_i / q_i)
        p_miss, q_miss = 1 - p_top.sum(), 1 - q_top.sum()
        expected += p_miss * math.log(p_miss / q_miss)
    assert num_tokens == 12
    assert_value(divergence_sum, torch.tensor(expected))


@all_divergences
def test_topk_zero_tail_mass(name):
    student, teacher, labels = make_batch()
    teacher = teacher.clone()
    teacher[:, 0] = 60.0  # the top-3 hold all the mass up to fp32 rounding
    ids, topk_logprobs = topk_inputs(teacher, 3)
    kept = (labels != -100).nonzero().squeeze(-1)
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, ids, False)
    for logprobs in (topk_logprobs, topk_logprobs + 1e-6):  # the second sums to more than 1
        divergence_sum, _, _, grad = run(topk_kd_loss_sums, student, ids, logprobs, labels, divergence=name)
        assert divergence_sum.isfinite() and grad.isfinite().all()
        # The student's own tail is pushed down, as the teacher has none.
        assert (grad[kept][outside[kept]] > 0).all()
        # Continuous at zero tail mass; the RKL types would be +inf and are floored instead.
        if name in {"fkl", "jsd", "skl", "srkl", "tvd"}:
            ref_sum, ref_grad = ref_topk_sums(student, ids, topk_logprobs, labels, name)
            assert_value(divergence_sum, ref_sum)
            assert_grad(grad, ref_grad)


# ---------------------------------------------------------------- errors


def test_bad_arguments_raise():
    student, teacher, labels = make_batch()
    log_q = F.log_softmax(student, -1)
    with pytest.raises(ValueError, match="choose one of: fkl"):
        per_token_divergence("kl", log_q, log_q)
    with pytest.raises(ValueError, match="beta"):
        per_token_divergence("jsd", log_q, log_q, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss_sums(student, teacher, labels, divergence="fkl", temperature=0.0)
    with pytest.raises(ValueError, match="N rows"):
        kd_loss_sums(student, teacher[:-1], labels, divergence="fkl")
    with pytest.raises(TypeError):
        kd_loss_sums(student, teacher, labels, divergence="fkl", bta=0.5)
