"""Device correctness without a GPU: every tensor kdlm makes must land on its inputs' device.

The inputs stay on the CPU while torch's default device is ``meta``: a tensor made without naming its device
then lands on meta, and the first op that mixes it with a CPU tensor raises, as a CPU-made tensor would on
CUDA. Each test also checks that the call under meta gives the same numbers as the plain call, so that a
test cannot pass by skipping work. (The optimizer step is left out on purpose: torch's AdamW keeps its step
counter on the CPU by design, which meta would flag.)
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from kdlm.config import HintConfig, LossConfig
from kdlm.data import encode_records
from kdlm.data.tokenize import collate
from kdlm.losses import (
    DIVERGENCES,
    SAMPLED_DIVERGENCES,
    kd_loss_sums,
    sampled_kd_loss_sums,
    topk_kd_loss_sums,
)
from kdlm.losses.fused import TeacherHidden, TeacherLogits, TeacherSampled, TeacherTopK, fused_kd_loss
from kdlm.models.decode import Row, decode_batch
from kdlm.serve.scoring import score_prompts
from kdlm.teachers.signals import teacher_logits
from kdlm.train.hints import HintObjective, use_eager_attention
from kdlm.train.loop import StudentObjective, run_teacher
from tiny import tiny_llama, tiny_tokenizer


@contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_the_meta_trick_catches_a_tensor_made_on_the_default_device():
    """The harness itself: a CPU-only mistake (a buffer made without a device) must raise under it."""
    inputs = torch.ones(3)
    with default_device_meta(), pytest.raises((RuntimeError, NotImplementedError)):
        buffer = torch.zeros(3)
        (buffer + inputs).sum().item()


def _problem(rows=12, vocab=40, width=16, k=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64).float()
    teacher = torch.randn(rows, vocab, generator=generator) * 2
    labels = torch.randint(vocab, (rows,), generator=generator)
    labels[3] = -100
    logprobs = teacher.log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    draws = torch.multinomial(logprobs.exp(), 8, replacement=True, generator=generator)
    hidden = torch.randn(rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.3
    teacher_hidden = torch.randn(rows, width, generator=generator)
    return student, teacher, labels, top, draws, hidden, weight, teacher_hidden


def _sampled(draws: torch.Tensor, teacher: torch.Tensor):
    """(ids, log_weights, teacher logprobs) with each row's draws as distinct ids and log(count / draws)."""
    rows, samples = draws.shape
    ids = torch.zeros(rows, samples, dtype=torch.long)
    log_weights = torch.full((rows, samples), float("-inf"))
    for row in range(rows):
        distinct, counts = draws[row].unique(return_counts=True)
        ids[row, : len(distinct)] = distinct
        log_weights[row, : len(distinct)] = (counts.float() / samples).log()
    return ids, log_weights, teacher.log_softmax(-1).gather(-1, ids)


def _value_and_grad(function, logits):
    logits = logits.clone().requires_grad_(True)
    kd, ce, _ = function(logits)
    (kd + ce).backward()
    return torch.stack([kd.detach(), ce.detach()]), logits.grad


@pytest.mark.parametrize("name", DIVERGENCES)
def test_dense_topk_and_sampled_losses_make_nothing_on_the_default_device(name):
    student, teacher, labels, top, draws, *_ = _problem()
    calls = {
        "dense": lambda s: kd_loss_sums(s, teacher, labels, divergence=name, temperature=1.5),
        "topk": lambda s: topk_kd_loss_sums(s, top.indices, top.values, labels, divergence=name, temperature=1.5),
    }
    if name in SAMPLED_DIVERGENCES:
        sampled = _sampled(draws, teacher)
        calls["sampled"] = lambda s: sampled_kd_loss_sums(s, *sampled, labels, divergence=name)
    for label, call in calls.items():
        expected = _value_and_grad(call, student)
        with default_device_meta():
            actual = _value_and_grad(call, student)
        for got, want in zip(actual, expected, strict=True):
            assert got.device.type == "cpu", label
            torch.testing.assert_close(got, want, msg=label)


@pytest.mark.parametrize("target", ["none", "hidden", "logits", "topk", "sampled"])
def test_fused_loss_makes_nothing_on_the_default_device(target):
    """The fused loss's lm_head gradient buffer was made on the CPU whatever its inputs' device (issue 18)."""
    _, teacher, labels, top, draws, hidden, weight, teacher_hidden = _problem()
    teacher_weight = torch.randn_like(weight)
    teachers = {
        "none": None,
        "hidden": TeacherHidden(teacher_hidden, teacher_weight),
        "logits": TeacherLogits(teacher),
        "topk": TeacherTopK(top.indices, top.values),
        "sampled": TeacherSampled(*_sampled(draws, teacher)),
    }

    def run():
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        total, kd, ce, _ = fused_kd_loss(h, w, labels, teachers[target], kd_weight=0.7, ce_weight=0.3, chunk_rows=5)
        total.backward()
        return total.detach(), kd, ce, h.grad, w.grad

    expected = run()
    with default_device_meta():
        actual = run()
    for got, want in zip(actual, expected, strict=True):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    teacher = tiny_llama(len(tokenizer), num_layers=3, seed=1)
    records = [{"messages": [{"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": "an answer " * (1 + i % 3)}]} for i in range(4)]
    batch = collate(encode_records(tokenizer, records, max_length=64), tokenizer.pad_token_id)
    return tokenizer, teacher, batch


def _objective_step(student, teacher, tokenizer, batch, loss: LossConfig, target_kind: str, hints_config=None):
    """One micro-batch of the training objective (teacher forward, student forward and backward)."""
    vocab = len(tokenizer)
    hints = HintObjective(hints_config, student.config, teacher.config) if hints_config else None
    objective = StudentObjective(student, loss, vocab, hints)
    online = target_kind == "online"
    target, states = run_teacher(teacher, batch, vocab, bf16=False, online=online, hints=hints)
    if target_kind == "topk":
        logits = teacher_logits(teacher, batch, bf16=False).log_softmax(-1)
        top = logits.topk(8, dim=-1)
        target = (top.indices, top.values)
    student.zero_grad(set_to_none=True)
    total, kd, ce, hint, count = objective(batch, target, loss.kd_weight, states)
    total.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return torch.stack([total.detach(), kd.detach(), ce.detach(), hint.detach(), count.float()]), grads


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("target_kind", ["online", "topk", "hints"])
def test_a_training_step_makes_nothing_on_the_default_device(tiny, fused, target_kind):
    tokenizer, teacher, batch = tiny
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2).train()
    hints_config = None
    if target_kind == "hints":
        hints_config = HintConfig(hidden_weight=0.5, attention_weight=1.0)
        use_eager_attention(student)
        use_eager_attention(teacher)
    loss = LossConfig(divergence="jsd", kd_weight=0.8, fused=fused)
    kind = "online" if target_kind == "hints" else target_kind
    expected = _objective_step(student, teacher, tokenizer, batch, loss, kind, hints_config)
    with default_device_meta():
        actual = _objective_step(student, teacher, tokenizer, batch, loss, kind, hints_config)
    for got, want in zip(actual, expected, strict=True):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want)


def test_batched_decoder_and_scorer_make_nothing_on_the_default_device(tiny):
    tokenizer, teacher, _ = tiny
    rows = lambda: [Row(prompt_ids=[5, 6, 7], max_tokens=6, temperature=0.8, top_p=0.9, seed=3),  # noqa: E731
                    Row(prompt_ids=[9, 10], max_tokens=4, temperature=0.0, top_p=1.0, seed=4)]
    expected = [r.token_ids for r in decode_batch(teacher, tokenizer, rows())]
    with default_device_meta():
        actual = [r.token_ids for r in decode_batch(teacher, tokenizer, rows())]
    assert actual == expected and all(len(ids) > 0 for ids in expected)

    prompts = [[5, 6, 7, 8], [9, 10]]
    expected_scores = score_prompts(teacher, prompts, top_logprobs=3)
    with default_device_meta():
        actual_scores = score_prompts(teacher, prompts, top_logprobs=3)
    assert [[t.logprob for t in row] for row in actual_scores] == [[t.logprob for t in row] for row in expected_scores]


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_teacher_cache_writing_makes_nothing_on_the_default_device(tiny, tmp_path, kind):
    """The cache's batches go to the teacher's device and its targets come back to the CPU; same bytes as a plain run."""
    import hashlib

    from kdlm.teachers.cache import cache_identity, write_cache

    tokenizer, teacher, _ = tiny
    records = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "yes " * (i + 1)}]}
               for i in range(5)]
    examples = encode_records(tokenizer, records, max_length=64)
    identity = cache_identity(kind=kind, teacher="tiny", tokenizer=tokenizer, vocab_size=teacher.config.vocab_size,
                              examples=examples, top_k=4, samples=16, seed=0, bf16=False, examples_per_shard=3)

    def write(folder):
        write_cache(teacher, examples, folder, identity=identity, pad_token_id=tokenizer.pad_token_id, batch_size=2,
                    show_progress=False)
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.suffix != ".json"}

    expected = write(tmp_path / "plain")
    with default_device_meta():
        actual = write(tmp_path / "meta")
    assert actual == expected and len(expected) == 2
