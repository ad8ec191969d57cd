"""The fused chunked cross-tokenizer loss against the dense one: float64, real tiny models, several chunk sizes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdlm.config import load_config
from kdlm.data.tokenize import collate
from kdlm.losses.fused_cross import fused_cross_kd_loss
from kdlm.xtok.data import encode_pair
from kdlm.xtok.target import CrossTokenizer, cross_tokenizer_forward
from test_cross_tokenizer_loss import reference_uld
from tiny import tiny_llama, tiny_sp_tokenizer, tiny_tokenizer

TEXTS = ("water is on the table.", "the cat sat, and it is fine!", "two plus two is four.")


@pytest.fixture(scope="module")
def setup():
    student_tokenizer, teacher_tokenizer = tiny_sp_tokenizer(), tiny_tokenizer()
    examples = [encode_pair(student_tokenizer, teacher_tokenizer,
                            [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}], max_length=96)
                for text in TEXTS]
    teacher = tiny_llama(len(teacher_tokenizer), seed=1).double()
    student = tiny_llama(len(student_tokenizer), seed=2).double()
    return student_tokenizer, teacher_tokenizer, examples, teacher, student


def cache_of(teacher, examples, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A top-k cache in the teacher's tokens, as ``kdlm cache-teacher`` writes it: ids, log-probs + log tail."""
    cached = []
    for example in examples:
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([example["teacher_input_ids"]])).logits[0, :-1]
        logprobs = torch.log_softmax(logits[torch.tensor(example["teacher_labels"][1:]) != -100], -1)
        top = logprobs.topk(k, dim=-1)
        tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-12))
        cached.append((top.indices, torch.cat([top.values, tail[:, None]], dim=-1)))
    return cached


def run(setup, mode: str, fused: bool, *, source: str = "live", chunk_rows=None, weighted=False, **loss_overrides):
    """(total, kd, ce, gradients of every student parameter, mapped mass) of one micro-batch."""
    student_tokenizer, teacher_tokenizer, examples, teacher, student = setup
    overrides = [f"loss.cross_tokenizer={mode}", f"loss.fused={str(fused).lower()}"]
    overrides += [f"loss.chunk_rows={chunk_rows}"] if chunk_rows else []
    overrides += [f"loss.{key}={value}" for key, value in loss_overrides.items()]
    cross = CrossTokenizer(mode, student_tokenizer, teacher_tokenizer, len(student_tokenizer), len(teacher_tokenizer))
    if source == "live":
        target = cross.teacher_target(teacher, examples, torch.device("cpu"), bf16=False)
    else:
        target = cross.cached_target(cache_of(teacher, examples, k=8), examples, torch.device("cpu"))
    objective = SimpleNamespace(student=student, vocab_size=len(student_tokenizer), fused=fused,
                                loss=load_config(None, overrides).loss, cross=cross, cross_stats={})
    records = [{**e, "weight": w} for e, w in zip(examples, (3.0, 0.5, 1.0), strict=True)] if weighted else examples
    batch = collate(records, student_tokenizer.pad_token_id)
    student.zero_grad()
    total, kd, ce, _, _ = cross_tokenizer_forward(objective, batch, target, 0.6)
    total.backward()
    grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    return total.detach(), kd.detach(), ce.detach(), grads, objective.cross_stats["mapped_mass"]


def assert_same(fused, dense):
    for a, b in zip(fused[:3], dense[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(fused[3]) == len(dense[3]) > 0
    for a, b in zip(fused[3], dense[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert fused[4] == pytest.approx(dense[4], rel=1e-6)  # the teacher side is float32: summed per chunk here


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, None])
@pytest.mark.parametrize("mode", ["uld", "hybrid"])
def test_fused_equals_dense_with_the_live_teacher(setup, mode, chunk_rows):
    assert_same(run(setup, mode, True, chunk_rows=chunk_rows), run(setup, mode, False))


@pytest.mark.parametrize("chunk_rows", [2, 5])
@pytest.mark.parametrize("mode", ["uld", "hybrid"])
def test_fused_equals_dense_from_a_top_k_cache(setup, mode, chunk_rows):
    assert_same(run(setup, mode, True, source="cache", chunk_rows=chunk_rows), run(setup, mode, False, source="cache"))


@pytest.mark.parametrize("knobs", [
    {"divergence": "jsd", "temperature": 2.0, "scale_by_t2": "true"},
    {"divergence": "rkl", "cross_tokenizer_top_k": 4},
    {"divergence": "akl", "temperature": 0.5},
], ids=["jsd-T2", "rkl-topk", "akl"])
def test_fused_equals_dense_under_other_settings_and_record_weights(setup, knobs):
    fused = run(setup, "hybrid", True, chunk_rows=4, weighted=True, **knobs)
    assert_same(fused, run(setup, "hybrid", False, weighted=True, **knobs))
    assert_same(run(setup, "uld", True, chunk_rows=4, weighted=True, **knobs), run(setup, "uld", False, weighted=True, **knobs))


def test_fused_uld_matches_the_definition_on_random_inputs():
    """Independent of the dense path: per-row CE and ULD from the float64 reference, gradients by autograd on
    the plain formula."""
    gen = torch.Generator().manual_seed(0)
    n, hidden_size, student_vocab, teacher_vocab = 9, 5, 7, 11
    hidden = torch.randn(n, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(student_vocab, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    target_ids = torch.randint(0, student_vocab, (n,), generator=gen)
    group_rows = torch.tensor([0, 2, 3, 7])
    teacher = torch.log_softmax(torch.randn(4, teacher_vocab, generator=gen, dtype=torch.float64), -1)
    options = SimpleNamespace(mode="uld", divergence="fkl", temperature=1.0, scale_by_t2=False, top_k=0,
                              student_ids=torch.tensor([0]), teacher_ids=torch.tensor([0]), divergence_kwargs={},
                              kd_weight=0.25, ce_weight=0.75)
    total, kd, ce, _ = fused_cross_kd_loss(hidden, weight, target_ids, group_rows, lambda g: (teacher[g], None),
                                           options, chunk_rows=2)
    logits = (hidden @ weight.T).detach()
    expected_kd = sum(reference_uld(logits[group_rows], teacher))
    expected_ce = -torch.log_softmax(logits, -1)[torch.arange(n), target_ids].sum().item()
    assert kd.item() == pytest.approx(expected_kd, rel=1e-10)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-10)
    total.backward()
    plain_hidden, plain_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    plain_logits = plain_hidden @ plain_weight.T
    q = torch.softmax(plain_logits[group_rows], -1)
    width = teacher_vocab
    sorted_q = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, width - student_vocab))
    uld_sum = (sorted_q - teacher.exp().sort(-1, descending=True).values).abs().sum()
    ce_sum = torch.nn.functional.cross_entropy(plain_logits, target_ids, reduction="sum")
    (0.25 * uld_sum + 0.75 * ce_sum).backward()
    torch.testing.assert_close(hidden.grad, plain_hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, plain_weight.grad, rtol=1e-10, atol=1e-12)


def test_bad_chunk_rows_is_refused():
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_cross_kd_loss(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), torch.tensor([0]),
                            lambda g: (torch.zeros(1, 5), None), SimpleNamespace(), chunk_rows=0)
