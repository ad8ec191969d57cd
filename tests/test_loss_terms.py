"""Each training method logs its own named terms, and its logged `loss` is their weighted sum (issue 17).

MiniLLM once put its objective into the kd/ce slots and patched the record afterwards; these tests hold every
method (off-policy, GKD, ImitKD, DistiLLM with its L_PT corpus, MiniLLM) to the formula of its own objective,
written out here from shared/METHODS.md rather than read from the loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from kdlm.config import LossConfig, MethodConfig, TrainConfig
from kdlm.data import encode_records, load_records
from kdlm.losses.fused import TeacherHidden, TeacherTopK
from kdlm.train.loop import LossTerms, StepSums, step_record, train
from kdlm.train.methods import build_method
from kdlm.train.objective import as_teacher_target, rows_of
from tiny import tiny_llama, trained_tiny_teacher, write_chat_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher, tokenizer = trained_tiny_teacher(num_layers=2, steps=10)
    data = write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", count=16)
    examples = encode_records(tokenizer, load_records(str(data)), max_length=96)
    corpus = encode_records(tokenizer, [{"text": "water boils at one hundred degrees."}] * 3, max_length=48)
    return teacher, tokenizer, examples, corpus


def _history(setup, tmp_path, method_config: MethodConfig | None, *, kd_weight: float, divergence: str = "fkl"):
    teacher, tokenizer, examples, corpus = setup
    student = tiny_llama(len(tokenizer), num_layers=1, seed=3)
    train_examples, val = (examples[:-4], examples[-4:]) if method_config and method_config.name == "distillm" else (examples, [])
    loss = LossConfig(divergence=divergence, kd_weight=kd_weight)
    method = None
    if method_config is not None:
        method = build_method(method_config, student=student, teacher=teacher, tokenizer=tokenizer, loss_config=loss,
                              max_steps=2, seed=0, bf16=False, vocab_size=len(tokenizer), batch_size=4, val_examples=val,
                              pt_examples=corpus if method_config.pt_data else None, steps_per_epoch=2)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, warmup_steps=0, bf16=False)
    return train(student, train_examples, train_config=config, loss_config=loss, pad_token_id=tokenizer.pad_token_id,
                 vocab_size=len(tokenizer), teacher=teacher, method=method).history


@pytest.mark.parametrize(("name", "kd_weight", "divergence"), [
    ("offpolicy", 0.4, "fkl"), ("gkd", 1.0, "jsd"), ("imitkd", 1.0, "fkl"), ("distillm", 1.0, "srkl"),
    ("minillm", 1.0, "rkl"),
])
def test_logged_loss_is_the_weighted_sum_of_the_logged_terms(setup, tmp_path, name, kd_weight, divergence):
    pt = name in ("distillm", "minillm")  # the methods with a pretraining corpus: its term is weighted pt_weight
    config = None if name == "offpolicy" else MethodConfig(
        name=name, max_new_tokens=4, lmbda=0.5, data_end=0.5, init_threshold=0.0, pt_data="corpus" if pt else None,
        pt_weight=0.3)
    for record in _history(setup, tmp_path, config, kd_weight=kd_weight, divergence=divergence):
        if name == "minillm":  # its own objective: policy gradient + regularisation + pt_weight * L_PT; no kd/ce
            assert math.isnan(record["kd"]) and math.isnan(record["ce"])
            expected = record["pg"] + record["reg"] + 0.3 * record["pt"]
        else:
            expected = (1 - kd_weight) * record["ce"] + kd_weight * record["kd"] + (0.3 * record["pt"] if pt else 0.0)
        assert all(math.isfinite(record[key]) for key in ("loss", "ce", "kd") if name != "minillm")
        assert record["loss"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert math.isnan(record["hint"])  # no hint terms in these runs


def test_step_sums_weight_the_method_terms_and_log_the_rest():
    """Two micro-batches of 3 and 5 tokens: the means are per token of the step, `reward` (no weight) is logged
    but left out of `loss`, and kd/ce/hint of an objective without them are NaN."""
    sums = StepSums()
    for count, pg, reward in ((3, 1.5, -6.0), (5, 2.5, -2.0)):
        sums.add(LossTerms(torch.tensor(pg), None, None, None, torch.tensor(count), {"pg": pg, "reward": reward},
                           {"pg": 2.0}))
    means, weights = sums.means(Accelerator(cpu=True), kd_weight=1.0)
    record = step_record(1, means, weights, use_kd=True, hints=False, lr=0.1, grad_norm=None, counters={})
    assert record["pg"] == pytest.approx(4.0 / 8) and record["reward"] == pytest.approx(-8.0 / 8)
    assert record["loss"] == pytest.approx(2.0 * 4.0 / 8)
    assert all(math.isnan(record[key]) for key in ("kd", "ce", "hint"))


def test_teacher_targets_are_typed_and_sliced_by_rows():
    ids, logprobs = torch.arange(12).view(4, 3), torch.randn(4, 4)
    target = as_teacher_target((ids, logprobs))
    assert isinstance(target, TeacherTopK)
    rows = torch.tensor([0, 2])
    sliced = rows_of(target, rows)
    assert torch.equal(sliced.ids, ids[rows]) and torch.equal(sliced.logprobs, logprobs[rows])
    hidden = TeacherHidden(torch.randn(4, 2), torch.randn(5, 2))
    assert rows_of(hidden, rows).weight is hidden.weight and torch.equal(rows_of(hidden, rows).hidden, hidden.hidden[rows])
