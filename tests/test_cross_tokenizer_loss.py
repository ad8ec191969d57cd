"""Cross-tokenizer losses against float64 references written from the definitions (ULD, exact-mapping hybrid)."""

from __future__ import annotations

import math

import pytest
import torch

from kdlm.losses.cross_tokenizer import cross_kd_per_group, hybrid, sorted_l1, top1_agreement, uld, vocab_map


def reference_uld(student_logits, teacher_logprobs, temperature=1.0):
    """Per row: sort both probability lists in decreasing order, pad the shorter with zeros, sum |q_i - p_i|."""
    out = []
    for student_row, teacher_row in zip(student_logits.tolist(), teacher_logprobs.tolist(), strict=True):
        q = _softmax([x / temperature for x in student_row])
        p = _softmax([x / temperature for x in teacher_row])
        q, p = sorted(q, reverse=True), sorted(p, reverse=True)
        width = max(len(q), len(p))
        q, p = q + [0.0] * (width - len(q)), p + [0.0] * (width - len(p))
        out.append(sum(abs(a - b) for a, b in zip(q, p, strict=True)))
    return out


def reference_hybrid(student_logits, teacher_logprobs, pairs, divergence):
    """Per row: buckets = mapped pairs + one bucket for the rest, FKL or RKL over them, plus sorted L1 of the rest."""
    out = []
    for student_row, teacher_row in zip(student_logits.tolist(), teacher_logprobs.tolist(), strict=True):
        q, p = _softmax(student_row), _softmax(teacher_row)
        mapped_students = {s for s, _ in pairs}
        mapped_teachers = {t for _, t in pairs}
        q_buckets = [q[s] for s, _ in pairs] + [sum(v for i, v in enumerate(q) if i not in mapped_students)]
        p_buckets = [p[t] for _, t in pairs] + [sum(v for i, v in enumerate(p) if i not in mapped_teachers)]
        if divergence == "fkl":
            value = sum(b * math.log(b / a) for a, b in zip(q_buckets, p_buckets, strict=True) if b > 0)
        else:
            value = sum(a * math.log(a / b) for a, b in zip(q_buckets, p_buckets, strict=True) if a > 0)
        q_rest = sorted((v for i, v in enumerate(q) if i not in mapped_students), reverse=True)
        p_rest = sorted((v for i, v in enumerate(p) if i not in mapped_teachers), reverse=True)
        width = max(len(q_rest), len(p_rest))
        q_rest, p_rest = q_rest + [0.0] * (width - len(q_rest)), p_rest + [0.0] * (width - len(p_rest))
        out.append(value + sum(abs(a - b) for a, b in zip(q_rest, p_rest, strict=True)))
    return out


def _softmax(row):
    top = max(row)
    exps = [math.exp(x - top) if x != -math.inf else 0.0 for x in row]
    total = sum(exps)
    return [x / total for x in exps]


def _numeric_grad(function, tensor, eps=1e-6):
    grad = torch.zeros_like(tensor)
    flat = tensor.view(-1)
    for i in range(flat.numel()):
        saved = flat[i].item()
        flat[i] = saved + eps
        up = function(tensor)
        flat[i] = saved - eps
        down = function(tensor)
        flat[i] = saved
        grad.view(-1)[i] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_value_and_gradient_match_the_definition(temperature):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(3, 11, generator=generator, dtype=torch.float64), -1)
    value = uld(student, teacher, temperature)
    assert value.tolist() == pytest.approx(reference_uld(student.detach(), teacher, temperature), abs=1e-12)
    value.sum().backward()
    numeric = _numeric_grad(lambda s: sum(reference_uld(s, teacher, temperature)), student.detach().clone())
    torch.testing.assert_close(student.grad, numeric, atol=1e-6, rtol=1e-5)


def test_uld_is_zero_for_a_permuted_copy_and_bounded_by_two():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]], dtype=torch.float64)
    permuted = torch.log_softmax(logits[:, [2, 0, 3, 1]], -1)
    assert uld(logits, permuted).item() == pytest.approx(0, abs=1e-12)  # ULD sees only the sorted values
    peaked = torch.tensor([[30.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    flat = torch.full((1, 400), -math.log(400), dtype=torch.float64)
    assert 1.9 < uld(peaked, flat).item() <= 2.0
    assert sorted_l1(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0]])).item() == pytest.approx(1.0)


def test_top_k_sorted_l1_is_the_definition_and_a_close_lower_bound():
    generator = torch.Generator().manual_seed(4)
    student = torch.softmax(3 * torch.randn(3, 50, generator=generator, dtype=torch.float64), -1)
    teacher = torch.softmax(3 * torch.randn(3, 80, generator=generator, dtype=torch.float64), -1)
    exact = sorted_l1(student, teacher)
    assert sorted_l1(student, teacher, top_k=80).tolist() == pytest.approx(exact.tolist(), abs=1e-12)
    k = 5
    approx = sorted_l1(student, teacher, top_k=k)
    for row in range(3):
        q, p = sorted(student[row].tolist(), reverse=True), sorted(teacher[row].tolist(), reverse=True)
        expected = sum(abs(a - b) for a, b in zip(q[:k], p[:k], strict=True)) + abs(sum(q[k:]) - sum(p[k:]))
        assert approx[row].item() == pytest.approx(expected, abs=1e-12)
        assert exact[row].item() - 2 * min(sum(q[k:]), sum(p[k:])) - 1e-12 <= approx[row].item() <= exact[row].item() + 1e-12
    # a side with fewer than k entries is padded with zeros
    assert sorted_l1(torch.tensor([[0.7, 0.3]]), torch.tensor([[0.5, 0.25, 0.25]]), top_k=3).item() == pytest.approx(0.5)


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_hybrid_value_and_gradient_match_the_definition(divergence):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(2 * torch.randn(4, 9, generator=generator, dtype=torch.float64), -1)
    pairs = [(0, 3), (2, 0), (5, 8)]  # (student id, teacher id) spelling the same bytes
    student_ids, teacher_ids = (torch.tensor(ids) for ids in zip(*pairs, strict=True))
    mapped, rest, mass = hybrid(student, teacher, student_ids, teacher_ids, divergence=divergence)
    total = mapped + rest
    assert total.tolist() == pytest.approx(reference_hybrid(student.detach(), teacher, pairs, divergence), abs=1e-10)
    assert mass.tolist() == pytest.approx(teacher.exp()[:, [3, 0, 8]].sum(-1).tolist(), abs=1e-12)
    total.sum().backward()
    numeric = _numeric_grad(lambda s: sum(reference_hybrid(s, teacher, pairs, divergence)), student.detach().clone())
    torch.testing.assert_close(student.grad, numeric, atol=1e-6, rtol=1e-5)


def test_hybrid_with_every_token_mapped_is_the_plain_divergence():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(2, 5, generator=generator, dtype=torch.float64), -1)
    ids = torch.arange(5)
    mapped, rest, mass = hybrid(student, teacher, ids, ids, divergence="fkl")
    plain = (teacher.exp() * (teacher - torch.log_softmax(student, -1))).sum(-1)
    torch.testing.assert_close(mapped, plain)
    assert rest.abs().max().item() < 1e-12 and mass.tolist() == pytest.approx([1.0, 1.0])


def test_hybrid_from_a_top_k_teacher_puts_its_tail_in_the_other_bucket():
    """A top-k teacher (-inf outside its k ids, the tail's log mass given apart) against the dense reference whose
    unmapped ids carry that tail: the mapped divergence is the same, the sorted L1 sees the k listed ids only."""
    full = torch.log_softmax(torch.tensor([[3.0, 2.0, 0.5, -1.0, -2.0]], dtype=torch.float64), -1)
    top = torch.full_like(full, -math.inf)
    top[:, :3] = full[:, :3]
    tail = torch.logsumexp(full[:, 3:], -1)
    student = torch.tensor([[1.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    student_ids, teacher_ids = torch.tensor([0, 1]), torch.tensor([0, 1])
    sparse_mapped, sparse_rest, _ = hybrid(student, top, student_ids, teacher_ids, divergence="fkl", teacher_missing=tail)
    dense_mapped, _, _ = hybrid(student, full, student_ids, teacher_ids, divergence="fkl")
    torch.testing.assert_close(sparse_mapped, dense_mapped)
    q = sorted(torch.softmax(student, -1)[0, 2:].tolist(), reverse=True)  # the student's unmapped ids 2 and 3
    p = full[0, 2].exp().item()  # the teacher's one listed unmapped id; ids 3 and 4 are in its tail
    assert sparse_rest.item() == pytest.approx(abs(q[0] - p) + abs(q[1] - 0.0), abs=1e-12)


def test_scale_by_t2_scales_the_divergence_part_only():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(2, 8, generator=generator, dtype=torch.float64), -1)
    ids = (torch.tensor([0, 1]), torch.tensor([4, 5]))
    options = {"mode": "hybrid", "divergence": "fkl", "temperature": 2.0, "student_ids": ids[0], "teacher_ids": ids[1]}
    plain, _ = cross_kd_per_group(student, teacher, scale_by_t2=False, **options)
    scaled, _ = cross_kd_per_group(student, teacher, scale_by_t2=True, **options)
    mapped, rest, _ = hybrid(student, teacher, *ids, divergence="fkl", temperature=2.0)
    torch.testing.assert_close(plain, mapped + rest)
    torch.testing.assert_close(scaled, 4 * mapped + rest)


def test_vocab_map_pairs_equal_bytes_once():
    student = [None, b"a", b" the", b"a", b"\xc3"]
    teacher = [b"<s>", b"\xc3", b" the", b"b", b" the", b"a"]
    student_ids, teacher_ids = vocab_map(student, teacher, student_rows=5, teacher_rows=6)
    assert list(zip(student_ids.tolist(), teacher_ids.tolist(), strict=True)) == [(4, 1), (2, 2), (1, 5)]
    student_ids, _ = vocab_map(student, teacher, student_rows=3, teacher_rows=6)  # only ids below the logit rows
    assert student_ids.tolist() == [2, 1]


def test_top1_agreement_compares_the_argmax_tokens_through_the_map():
    student_ids, teacher_ids = torch.tensor([0, 1, 2]), torch.tensor([5, 3, 0])
    teacher = torch.tensor([[0.0, 0, 0, 0, 0, 9.0], [0, 0, 0, 9.0, 0, 0], [0, 9.0, 0, 0, 0, 0], [9.0, 0, 0, 0, 0, 0]])
    student = torch.tensor([[9.0, 0, 0], [9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0]])
    # row 0: teacher 5 -> student 0, agrees; row 1: teacher 3 -> student 1, student says 0; row 2: teacher 1 has no
    # counterpart; row 3: teacher 0 -> student 2, agrees
    assert top1_agreement(student, teacher, student_ids, teacher_ids).tolist() == [True, False, False, True]
