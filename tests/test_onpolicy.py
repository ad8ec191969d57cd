"""On-policy methods: hand-computed losses, GKD at lambda 0 = off-policy, DistiLLM's threshold rule,
MiniLLM's returns and clipped ratio, and short runs of each method on tiny models that lower held-out KL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdlm.config import LossConfig, MethodConfig, TrainConfig, load_config
from kdlm.data import encode_records, load_records
from kdlm.errors import KdlmError
from kdlm.evaluate.metrics import fidelity, target_logits
from kdlm.losses import kd_loss_sums
from kdlm.train.distillm import AdaptiveThreshold, ReplayBuffer, choose_source, fresh_probability
from kdlm.train.loop import train
from kdlm.train.methods import build_method
from kdlm.train.minillm import future_returns, minillm_token_losses, rollout_rewards, whiten
from kdlm.train.onpolicy import GKD, data_probability, prompt_ids, sample_examples
from tiny import tiny_llama, trained_tiny_teacher, write_chat_jsonl

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher, tokenizer = trained_tiny_teacher(num_layers=2, steps=30)
    data = write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", count=24)
    examples = encode_records(tokenizer, load_records(str(data)), max_length=96)
    return teacher, tokenizer, examples[:18], examples[18:]


# --- each method's loss on crafted inputs, against a hand computation --------------------------------------

Q, P = (0.25, 0.75), (0.5, 0.5)  # student q and teacher p over a 2-token vocabulary


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))


def _config_loss(name: str) -> float:
    """The loss a config trains with, on logits whose softmaxes are Q (student) and P (teacher)."""
    loss = load_config(CONFIGS / f"{name}.yaml").loss
    student = torch.log(torch.tensor([Q], dtype=torch.float64))
    teacher = torch.log(torch.tensor([P], dtype=torch.float64))
    value, _, _ = kd_loss_sums(student, teacher, torch.tensor([0]), divergence=loss.divergence,
                               temperature=loss.temperature, beta=loss.beta, alpha=loss.alpha)
    return value.item()


def test_gkd_config_trains_with_jsd_half():
    m = tuple(0.5 * p + 0.5 * q for p, q in zip(P, Q, strict=True))
    assert _config_loss("gkd") == pytest.approx(0.5 * _kl(P, m) + 0.5 * _kl(Q, m), rel=1e-12)


def test_distillm_config_trains_with_skew_reverse_kl():
    mixture = tuple(0.9 * p + 0.1 * q for p, q in zip(P, Q, strict=True))  # α = 0.1 on the student's side
    assert _config_loss("distillm") == pytest.approx(_kl(Q, mixture), rel=1e-12)


def test_imitkd_config_trains_with_forward_kl():
    assert _config_loss("imitkd") == pytest.approx(_kl(P, Q), rel=1e-12)


def test_every_config_is_an_online_run_of_its_method():
    for name in ("gkd", "distillm", "minillm", "imitkd"):
        config = load_config(CONFIGS / f"{name}.yaml")
        assert config.method.name == name and config.teacher.signal == "online"


# --- MiniLLM: returns, rewards, whitening, importance weights and the clipped ratio by hand -----------------------

def test_future_returns_by_hand():
    rewards = torch.tensor([[1.0, -2.0, 3.0, 7.0], [9.0, 2.0, 4.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    f64 = torch.float64
    # LMOps: R_t = Σ_{t'≥t} γ^{t'-t} r_t' / (number of terms); row 0: t0 = (1 - 1 + 0.75) / 3, t1 = (-2 + 1.5) / 2, t2 = 3.
    lmops = future_returns(rewards, mask, gamma=0.5, length_norm="count", include_current=True)
    torch.testing.assert_close(lmops, torch.tensor([[0.25, -0.25, 3.0, 0], [0, 2.0, 4.0, 0]], dtype=f64))
    # TRL divides by Σ γ^k instead: t0 = 0.75 / 1.75, t1 = -0.5 / 1.5.
    trl = future_returns(rewards, mask, gamma=0.5, length_norm="discounted", include_current=True)
    torch.testing.assert_close(trl[0], torch.tensor([0.75 / 1.75, -0.5 / 1.5, 3.0, 0], dtype=f64))
    # The paper's single-step decomposition: R_{t+1}; t0 = (-2 + 0.5 * 3) / 2, t1 = 3 / 1, the last has no future.
    paper = future_returns(rewards, mask, gamma=0.5, length_norm="count", include_current=False)
    torch.testing.assert_close(paper, torch.tensor([[-0.25, 3.0, 0, 0], [0, 4.0, 0, 0]], dtype=f64))
    raw = future_returns(rewards, mask, gamma=0.5, length_norm="none", include_current=False)
    torch.testing.assert_close(raw[0], torch.tensor([-0.5, 3.0, 0, 0], dtype=f64))


def test_rollout_rewards_scale_clip_and_weigh_by_hand():
    q_old, p = [0.9, 0.3, 0.01], [0.1, 0.8, 0.5]
    fixed = rollout_rewards(torch.log(torch.tensor(q_old, dtype=torch.float64)), torch.log(torch.tensor(p, dtype=torch.float64)),
                            teacher_mix=0.2, reward_scaling=0.5, reward_clip=5.0)
    raw = [math.log(pi / qi) for pi, qi in zip(p, q_old, strict=True)]  # -2.197, 0.981, 3.912
    reward = [min(max(r / 0.5, -5.0), 5.0) for r in raw]  # the last one is clipped from 7.82 to 5
    weight = [qi / (0.2 * pi + 0.8 * qi) for pi, qi in zip(p, q_old, strict=True)]
    assert reward[2] == 5.0 and raw[2] / 0.5 > 5.0
    for key, expected in (("raw_reward", raw), ("reward", reward), ("weight", weight)):
        torch.testing.assert_close(fixed[key], torch.tensor(expected, dtype=torch.float64), msg=key)
    plain = rollout_rewards(torch.zeros(3), torch.zeros(3), teacher_mix=0.0)
    assert torch.equal(plain["weight"], torch.ones(3))


def test_whiten_uses_the_unbiased_variance_like_lmops():
    values = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    mean, var = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2  # 7
    torch.testing.assert_close(whiten(values), (values - mean) / math.sqrt(var + 1e-8))


def test_minillm_token_losses_by_hand():
    # One sequence of 3 sampled tokens over a 2-token vocabulary, at a second PPO epoch: the student moved
    # since the rollouts were collected (q ≠ q_old). γ = 0.5, count normalisation, returns from r_t, whitened.
    q_rows = [(0.8, 0.2), (0.6, 0.4), (0.5, 0.5)]
    p_rows = [(0.1, 0.9), (0.2, 0.8), (0.5, 0.5)]
    tokens, q_old, weight, reward = [0, 1, 0], [0.9, 0.3, 0.4], [1.8, 1.2, 0.9], [-2.0, 1.0, 0.5]
    student_logprobs = torch.log(torch.tensor(q_rows, dtype=torch.float64)).requires_grad_(True)
    teacher_logprobs = torch.log(torch.tensor(p_rows, dtype=torch.float64))
    f64 = {"dtype": torch.float64}
    terms = minillm_token_losses(
        student_logprobs, teacher_logprobs, torch.tensor(tokens), torch.ones(1, 3, dtype=torch.bool),
        old_logprobs=torch.log(torch.tensor(q_old, **f64)), reward=torch.tensor(reward, **f64),
        weight=torch.tensor(weight, **f64), gamma=0.5, length_norm="count", current_reward=True, clip=0.2,
        single_step=True, whiten_advantages=True,
    )
    returns = [(-2.0 + 0.5 * 1.0 + 0.25 * 0.5) / 3, (1.0 + 0.5 * 0.5) / 2, 0.5]
    mean = sum(returns) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 2 + 1e-8)
    advantage = [(r - mean) / std for r in returns]
    q = [q_rows[t][y] for t, y in enumerate(tokens)]
    ratio = [qi / qo * w for qi, qo, w in zip(q, q_old, weight, strict=True)]
    pg = [max(-a * r, -a * min(max(r, 0.8), 1.2)) for a, r in zip(advantage, ratio, strict=True)]
    reg = [_kl(qr, pr) for qr, pr in zip(q_rows, p_rows, strict=True)]
    for key, expected in (("advantage", advantage), ("ratio", ratio), ("pg", pg), ("reg", reg)):
        torch.testing.assert_close(terms[key], torch.tensor(expected, **f64), msg=key)
    # d pg_t / d log q_t = -A_t·ratio_t where the unclipped term is the max, 0 where the clip holds the ratio.
    active = [-a * r >= -a * min(max(r, 0.8), 1.2) or 0.8 < r < 1.2 for a, r in zip(advantage, ratio, strict=True)]
    assert active.count(False) >= 1 and active.count(True) >= 1  # both cases on this example
    (grad,) = torch.autograd.grad(terms["pg"].sum(), student_logprobs)
    expected_grad = torch.zeros(3, 2, **f64)
    for t, (a, r, on) in enumerate(zip(advantage, ratio, active, strict=True)):
        expected_grad[t, tokens[t]] = -a * r if on else 0.0
    torch.testing.assert_close(grad, expected_grad)


def test_minillm_paper_variant_by_hand():
    # current_reward false (R_{t+1}), γ = 1, count normalisation, no whitening, first PPO epoch (q = q_old).
    q_rows = [(0.9, 0.1), (0.7, 0.3), (0.4, 0.6)]
    tokens, reward = [0, 1, 0], [0.3, -0.6, 1.2]
    logprobs = torch.log(torch.tensor(q_rows, dtype=torch.float64))
    old = logprobs.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
    terms = minillm_token_losses(logprobs, logprobs, torch.tensor(tokens), torch.ones(1, 3, dtype=torch.bool),
                                 old_logprobs=old, reward=torch.tensor(reward, dtype=torch.float64),
                                 weight=torch.ones(3, dtype=torch.float64), gamma=1.0, length_norm="count",
                                 current_reward=False, single_step=True, whiten_advantages=False)
    torch.testing.assert_close(terms["advantage"], torch.tensor([(-0.6 + 1.2) / 2, 1.2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(terms["reg"], torch.zeros(3, dtype=torch.float64))  # q = p: no token-level KL


# --- DistiLLM: the threshold rule, the source choice and the buffer -------------------------------------------

def test_threshold_rises_when_validation_loss_reaches_reference_plus_eps():
    rule = AdaptiveThreshold(initial=0.0, eps=0.25, step=0.1)
    seen = []
    for loss in [2.0, 2.125, 2.25, 2.375, 2.75, 1.0, 2.875, 3.0]:
        rule.update(loss)
        seen.append((round(rule.value, 10), rule.reference))
    # 2.0 is the reference; 2.25 reaches it + 0.25 exactly (finetune.py's >=: rise, new reference); 2.375 (no);
    # 2.75 (rise); 1.0 improves (the reference stays 2.75); 2.875 (no); 3.0 = 2.75 + 0.25 (rise).
    assert seen == [(0.0, 2.0), (0.0, 2.0), (0.1, 2.25), (0.1, 2.25), (0.2, 2.75), (0.2, 2.75), (0.2, 2.75), (0.3, 3.0)]
    capped = AdaptiveThreshold(initial=0.95, eps=0.0, step=0.1)
    capped.update(1.0)
    capped.update(2.0)
    assert capped.value == 1.0


def test_source_choice_and_schedule():
    assert fresh_probability(0.6, 25, 100, "decreasing") == pytest.approx(0.45)
    assert fresh_probability(0.6, 25, 100, "increasing") == pytest.approx(0.15)
    assert fresh_probability(0.6, 25, 100, "constant") == pytest.approx(0.3)
    # s = 0.2, φ = 0.5
    assert choose_source(0.1, 0.2, 0.5, buffer_full=True) == "fresh"
    assert choose_source(0.3, 0.2, 0.5, buffer_full=True) == "replay"
    assert choose_source(0.3, 0.2, 0.5, buffer_full=False) == "fresh"  # the buffer still fills
    assert choose_source(0.7, 0.2, 0.5, buffer_full=False) == "data"


def test_replay_buffer_is_fifo_and_draws_without_replacement():
    import random

    buffer = ReplayBuffer(3)
    buffer.push([{"input_ids": [i], "labels": [i]} for i in range(5)])
    assert [item["input_ids"][0] for item in buffer.items] == [2, 3, 4] and buffer.full
    rng = random.Random(0)
    for _ in range(20):  # a draw of the whole buffer is a permutation of it: no example twice
        assert sorted(item["input_ids"][0] for item in buffer.sample(3, rng)) == [2, 3, 4]
    with pytest.raises(KdlmError, match="method.capacity"):
        buffer.sample(4, rng)


def test_imitkd_schedules():
    assert data_probability(0, 11, 1.0, 0.0) == 1.0
    assert data_probability(5, 11, 1.0, 0.0) == pytest.approx(0.5)
    assert data_probability(10, 11, 1.0, 0.0) == 0.0
    # The reference's exponential schedule: 200^(-t/T).
    assert data_probability(0, 100, 1.0, 0.0, "exponential") == 1.0
    assert data_probability(50, 100, 1.0, 0.0, "exponential") == pytest.approx(200 ** -0.5)
    assert data_probability(100, 100, 1.0, 0.0, "exponential") == pytest.approx(0.005)


# --- sampling from the trained student -----------------------------------------------------------------------

def test_samples_keep_the_prompt_mask_the_prompt_and_restore_train_mode(setup):
    teacher, tokenizer, examples, _ = setup
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2).train()
    batch = examples[:3]
    first = sample_examples(student, tokenizer, batch, max_new_tokens=8, temperature=1.0, top_p=1.0, seeds=[1, 2, 3], bf16=False)
    again = sample_examples(student, tokenizer, batch, max_new_tokens=8, temperature=1.0, top_p=1.0, seeds=[1, 2, 3], bf16=False)
    assert first == again and student.training
    for original, sampled in zip(batch, first, strict=True):
        prompt = prompt_ids(original)
        assert sampled["input_ids"][: len(prompt)] == prompt
        assert sampled["labels"][: len(prompt)] == [-100] * len(prompt)
        response = sampled["labels"][len(prompt) :]
        assert 1 <= len(response) <= 9 and response == sampled["input_ids"][len(prompt) :]
        assert sampled["input_ids"] != original["input_ids"]


def test_distillm_refuses_a_divergence_it_does_not_use(setup):
    teacher, tokenizer, examples, _ = setup
    with pytest.raises(KdlmError, match="loss.divergence=skl"):
        build_method(MethodConfig(name="distillm"), student=teacher, teacher=teacher, tokenizer=tokenizer,
                     loss_config=LossConfig(divergence="fkl"), max_steps=1, seed=0, bf16=False, vocab_size=10,
                     batch_size=2, val_examples=examples[:2])


def test_onpolicy_method_without_the_teacher_term_is_refused(setup):
    teacher, tokenizer, _, _ = setup
    with pytest.raises(KdlmError, match="loss.kd_weight > 0"):
        build_method(MethodConfig(name="gkd"), student=teacher, teacher=teacher, tokenizer=tokenizer,
                     loss_config=LossConfig(kd_weight=0.0), max_steps=1, seed=0, bf16=False, vocab_size=10, batch_size=2)


@pytest.mark.parametrize("method_config", [MethodConfig(name="gkd"), MethodConfig(name="distillm"),
                                           MethodConfig(name="imitkd", data_end=0.5)], ids=["gkd", "distillm", "imitkd"])
def test_cross_entropy_on_student_samples_needs_an_opt_in(setup, method_config):
    teacher, tokenizer, examples, _ = setup

    def build(**loss):
        return build_method(method_config, student=teacher, teacher=teacher, tokenizer=tokenizer,
                            loss_config=LossConfig(divergence="srkl", **loss), max_steps=1, seed=0, bf16=False,
                            vocab_size=10, batch_size=2, val_examples=examples[:2])

    with pytest.raises(KdlmError, match=r"loss.kd_weight=0.7 puts 0.3 x cross-entropy on the student's own samples.*"
                                        r"loss.allow_onpolicy_ce=true"):
        build(kd_weight=0.7)
    assert build(kd_weight=0.7, allow_onpolicy_ce=True) is not None
    assert build(kd_weight=1.0) is not None


def test_cross_entropy_is_allowed_where_no_student_sample_is_trained(setup):
    teacher, tokenizer, _, _ = setup
    for method_config in (MethodConfig(name="gkd", lmbda=0.0, seq_kd=True), MethodConfig(name="imitkd", data_end=1.0)):
        assert build_method(method_config, student=teacher, teacher=teacher, tokenizer=tokenizer,
                            loss_config=LossConfig(kd_weight=0.5), max_steps=1, seed=0, bf16=False, vocab_size=10,
                            batch_size=2) is not None


def test_minillm_refuses_plain_text_records(setup):
    teacher, tokenizer, examples, _ = setup
    method = build_method(MethodConfig(name="minillm"), student=teacher, teacher=teacher, tokenizer=tokenizer,
                          loss_config=LossConfig(), max_steps=1, seed=0, bf16=False, vocab_size=len(tokenizer), batch_size=2)
    text = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    with pytest.raises(KdlmError, match="plain-text records"):
        method.prepare_step(0, [[examples[0], text]])


# --- training ------------------------------------------------------------------------------------------------

def _run(setup, tmp_path, method_config: MethodConfig | None, *, divergence: str, steps: int, lr: float = 3e-3,
         resume: bool = False, on_step=None, pt_examples=None, kd_weight: float = 1.0):
    teacher, tokenizer, examples, heldout = setup
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
    train_examples, val = examples, []
    if method_config is not None and method_config.name == "distillm":
        train_examples, val = examples[:-4], examples[-4:]
    config = TrainConfig(output_dir=str(tmp_path), max_steps=steps, batch_size=4, lr=lr, warmup_steps=0, bf16=False,
                         resume=resume)
    loss = LossConfig(divergence=divergence, kd_weight=kd_weight)
    method = None
    if method_config is not None:
        method = build_method(method_config, student=student, teacher=teacher, tokenizer=tokenizer, loss_config=loss,
                              max_steps=steps, seed=0, bf16=False, vocab_size=len(tokenizer), batch_size=4, val_examples=val,
                              pt_examples=pt_examples, steps_per_epoch=len(train_examples) // 4)
    result = train(student, train_examples, train_config=config, loss_config=loss, pad_token_id=tokenizer.pad_token_id,
                   vocab_size=len(tokenizer), teacher=teacher, method=method, on_step=on_step)
    return student, result


def _heldout_kl(setup, model) -> float:
    teacher, tokenizer, _, heldout = setup
    options = {"batch_size": 6, "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    return fidelity(model, heldout, target_logits(teacher, heldout, **options), **options)["kl_to_teacher"]


def test_gkd_with_lambda_zero_is_the_offpolicy_loop(setup, tmp_path):
    plain, plain_result = _run(setup, tmp_path / "plain", None, divergence="jsd", steps=3)
    gkd, gkd_result = _run(setup, tmp_path / "gkd", MethodConfig(name="gkd", lmbda=0.0), divergence="jsd", steps=3)
    assert [r["loss"] for r in plain_result.history] == [r["loss"] for r in gkd_result.history]
    for (name, a), (_, b) in zip(plain.state_dict().items(), gkd.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert gkd_result.history[-1]["generated"] == 0
    # ... and with lambda 1 it trains on other sequences, so the weights move elsewhere.
    onpolicy, result = _run(setup, tmp_path / "gkd1", MethodConfig(name="gkd", lmbda=1.0, max_new_tokens=8), divergence="jsd", steps=1)
    assert result.history[-1]["generated"] == 4
    assert not torch.equal(onpolicy.lm_head.weight, _run(setup, tmp_path / "plain1", None, divergence="jsd", steps=1)[0].lm_head.weight)


def test_gkd_samples_from_the_trained_student_module_itself(setup):
    teacher, tokenizer, examples, _ = setup
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
    calls = {"student": 0, "teacher": 0}
    student.register_forward_hook(lambda *_: calls.__setitem__("student", calls["student"] + 1))
    teacher.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
    method = GKD(MethodConfig(name="gkd", lmbda=1.0, max_new_tokens=4), student=student, teacher=teacher,
                 tokenizer=tokenizer, max_steps=1)
    [[sampled]] = method.prepare_step(0, [[examples[0]]])
    assert calls["teacher"] == 0 and 1 <= calls["student"] <= 4  # one forward per decoded token, no copy
    # The cost counters (kdlm bench's FLOP estimate) charge the sampled sequence to the model that ran it.
    assert method.counters() == {"generated": 1, "decode_tokens_student": len(sampled["input_ids"]),
                                 "decode_tokens_teacher": 0}
    seq_kd = GKD(MethodConfig(name="gkd", lmbda=0.0, seq_kd=True, max_new_tokens=4), student=student, teacher=teacher,
                 tokenizer=tokenizer, max_steps=1)
    [[by_teacher]] = seq_kd.prepare_step(0, [[examples[0]]])
    assert 1 <= calls["teacher"] <= 4
    assert seq_kd.counters()["decode_tokens_teacher"] == len(by_teacher["input_ids"])
    assert seq_kd.counters()["decode_tokens_student"] == 0


def test_minillm_mixture_sampling_is_charged_to_both_models(setup):
    teacher, tokenizer, examples, _ = setup
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
    method = build_method(MethodConfig(name="minillm", teacher_mix=0.2, max_new_tokens=4), student=student,
                          teacher=teacher, tokenizer=tokenizer, loss_config=LossConfig(divergence="rkl"), max_steps=1,
                          seed=0, bf16=False, vocab_size=len(tokenizer), batch_size=2)
    [batch] = method.prepare_step(0, [examples[:2]])
    total = sum(len(example["input_ids"]) for example in batch)
    assert method.counters() == {"generated": 2, "decode_tokens_student": total, "decode_tokens_teacher": total}


@pytest.mark.parametrize(
    ("method_config", "divergence"),
    [
        (MethodConfig(name="gkd", lmbda=0.5, max_new_tokens=24, temperature=1.0), "jsd"),
        (MethodConfig(name="distillm", init_threshold=0.5, capacity=8, eval_every=3, max_new_tokens=24, temperature=1.0),
         "srkl"),
        (MethodConfig(name="minillm", teacher_mix=0.2, max_new_tokens=24, temperature=1.0), "rkl"),
        (MethodConfig(name="imitkd", max_new_tokens=24, temperature=1.0), "fkl"),
    ],
    ids=["gkd", "distillm", "minillm", "imitkd"],
)
def test_each_method_lowers_heldout_kl(setup, tmp_path, method_config, divergence):
    teacher, tokenizer, _, _ = setup
    before = _heldout_kl(setup, tiny_llama(len(tokenizer), num_layers=2, seed=2))
    student, result = _run(setup, tmp_path, method_config, divergence=divergence, steps=10, lr=1e-2)
    after = _heldout_kl(setup, student)
    assert result.history[-1]["generated"] > 0
    if method_config.name == "distillm":  # the buffer filled, then served draws; the threshold rule ran
        assert result.history[-1]["batches_replay"] > 0
        assert sum(math.isfinite(r["val_loss"]) for r in result.history) == 4  # before step 1, after 3, 6 and 9
    if method_config.name == "minillm":  # its own objective ran (the loop's default loss logs no pg/reward)
        assert all(r["pg"] != 0 and r["reward"] < 0 for r in result.history)
    assert after < 0.6 * before, (before, after)


# --- the adaptive parts acting, the logs, and exact resumes -------------------------------------------------------

def test_distillm_threshold_rises_and_replayed_batches_train(setup, tmp_path):
    # loss_eps 0: any held-out cross-entropy that does not improve raises the threshold. At lr 0.2 the tiny
    # student overshoots, so its cross-entropy on the held-out answers rises between evaluations.
    config = MethodConfig(name="distillm", init_threshold=0.3, loss_eps=0.0, capacity=4, eval_every=2,
                          max_new_tokens=8, temperature=1.0)
    _, result = _run(setup, tmp_path, config, divergence="srkl", steps=10, lr=0.2)
    history = result.history
    thresholds = [r["threshold"] for r in history]
    assert thresholds[-1] > 0.3 and thresholds == sorted(thresholds)
    assert history[-1]["batches_replay"] > 0 and history[-1]["buffer"] == 4
    # The threshold only moves at an evaluation, i.e. where val_loss is logged.
    for before, after in zip(history, history[1:], strict=False):
        if after["threshold"] != before["threshold"]:
            assert math.isfinite(after["val_loss"])


def test_distillm_validation_loss_is_the_students_answer_cross_entropy(setup):
    teacher, tokenizer, examples, _ = setup
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
    method = build_method(MethodConfig(name="distillm"), student=student, teacher=teacher, tokenizer=tokenizer,
                          loss_config=LossConfig(divergence="srkl"), max_steps=4, seed=0, bf16=False,
                          vocab_size=len(tokenizer), batch_size=3, val_examples=examples[:5])
    total = count = 0.0
    for example in examples[:5]:  # one unpadded sequence at a time, in float64
        ids = torch.tensor([example["input_ids"]])
        labels = torch.tensor(example["labels"][1:])
        logits = student(input_ids=ids).logits[0, :-1].double()
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    method.prepare_step(0, [])  # the reference is measured before the first step
    assert method.threshold.reference == pytest.approx(total / count, rel=1e-5)


def test_distillm_with_pretraining_corpus_logs_and_adds_it(setup, tmp_path):
    teacher, tokenizer, _, _ = setup
    corpus = encode_records(tokenizer, [{"text": "plants make food from light. water boils at one hundred degrees."}] * 3,
                            max_length=48)
    config = MethodConfig(name="distillm", init_threshold=0.0, pt_data="corpus.txt", pt_weight=0.5, max_new_tokens=8)
    plain, plain_result = _run(setup, tmp_path / "plain", config.model_copy(update={"pt_data": None}), divergence="srkl",
                               steps=2)
    _, result = _run(setup, tmp_path / "pt", config, divergence="srkl", steps=2, pt_examples=corpus)
    first, reference = result.history[0], plain_result.history[0]
    assert first["pt"] > 0 and first["kd"] == pytest.approx(reference["kd"], rel=1e-5)  # same first batch
    assert first["loss"] == pytest.approx(reference["loss"] + 0.5 * first["pt"], rel=1e-5)


def test_minillm_logs_its_own_terms_and_trains_ppo_epochs(setup, tmp_path):
    teacher, tokenizer, _, _ = setup
    corpus = encode_records(tokenizer, [{"text": "two plus two is four. three times three is nine."}] * 3, max_length=48)
    config = MethodConfig(name="minillm", ppo_epochs=2, max_new_tokens=8, temperature=1.0, pt_data="corpus.txt",
                          pt_weight=0.7, pt_kd_ratio=0.5)
    _, result = _run(setup, tmp_path, config, divergence="rkl", steps=4, pt_examples=corpus)
    history = result.history
    assert [r["ppo_epoch"] for r in history] == [1, 2, 1, 2]
    assert [r["generated"] for r in history] == [4, 4, 8, 8]  # new rollouts only every second step
    for r in history:
        assert math.isnan(r["kd"]) and math.isnan(r["ce"]) and r["pt"] > 0 and r["reg"] > 0
        assert r["loss"] == pytest.approx(r["pg"] + r["reg"] + 0.7 * r["pt"], rel=1e-9)


def test_imitkd_argmax_labels_are_the_teachers_most_likely_tokens(setup):
    teacher, tokenizer, examples, _ = setup
    method = build_method(MethodConfig(name="imitkd", target="argmax", max_new_tokens=6), student=teacher, teacher=teacher,
                          tokenizer=tokenizer, loss_config=LossConfig(kd_weight=0.0), max_steps=1, seed=0, bf16=False,
                          vocab_size=len(tokenizer), batch_size=2)
    relabelled = method.teacher_argmax_labels(examples[:3])
    for original, example in zip(examples[:3], relabelled, strict=True):
        assert example["input_ids"] == original["input_ids"]
        logits = teacher(input_ids=torch.tensor([original["input_ids"]])).logits[0]
        for i, label in enumerate(original["labels"]):
            expected = -100 if label == -100 else int(logits[i - 1].argmax())
            assert example["labels"][i] == expected
    with pytest.raises(KdlmError, match="loss.kd_weight=0"):
        build_method(MethodConfig(name="imitkd", target="argmax"), student=teacher, teacher=teacher, tokenizer=tokenizer,
                     loss_config=LossConfig(kd_weight=1.0), max_steps=1, seed=0, bf16=False, vocab_size=10, batch_size=2)


def test_top_k_one_roll_ins_are_greedy(setup):
    teacher, tokenizer, examples, _ = setup
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
    method = build_method(MethodConfig(name="imitkd", top_k=1, temperature=1.0, max_new_tokens=6), student=student,
                          teacher=teacher, tokenizer=tokenizer, loss_config=LossConfig(), max_steps=1, seed=0, bf16=False,
                          vocab_size=len(tokenizer), batch_size=2)
    sampled = method.sample(student, examples[:3])
    greedy = sample_examples(student, tokenizer, examples[:3], max_new_tokens=6, temperature=0.0, top_p=1.0,
                             seeds=[0, 0, 0], bf16=False)
    assert sampled == greedy


@pytest.mark.parametrize(
    "method_config",
    [MethodConfig(name="distillm", init_threshold=0.6, capacity=4, eval_every=2, loss_eps=0.0, max_new_tokens=8),
     MethodConfig(name="minillm", ppo_epochs=2, max_new_tokens=8)],
    ids=["distillm", "minillm"],
)
def test_resumed_onpolicy_run_equals_the_uninterrupted_one(setup, tmp_path, method_config):
    divergence = "srkl" if method_config.name == "distillm" else "rkl"
    straight, straight_result = _run(setup, tmp_path / "straight", method_config, divergence=divergence, steps=5, lr=0.02)

    def interrupt(step):
        if step == 3:  # mid-collection for MiniLLM (its second one started at step 3)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "resumed", method_config, divergence=divergence, steps=5, lr=0.02, on_step=interrupt)
    resumed, resumed_result = _run(setup, tmp_path / "resumed", method_config, divergence=divergence, steps=5, lr=0.02,
                                   resume=True)
    assert [r["step"] for r in resumed_result.history] == [4, 5]
    for key in ("loss", "generated"):
        assert [r[key] for r in resumed_result.history] == pytest.approx([r[key] for r in straight_result.history[3:]])
    if method_config.name == "distillm":
        assert straight_result.history[-1]["batches_replay"] > 0  # the restored buffer was drawn from
        assert resumed_result.history[-1]["threshold"] == straight_result.history[-1]["threshold"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


# --- the real CLI on the shipped configs, with a tiny teacher ------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny import save_tiny_teacher

    root = tmp_path_factory.mktemp("cli")
    save_tiny_teacher(root / "teacher")  # 4 layers: the 2-layer student is a real cut
    write_chat_jsonl(root / "chat.jsonl", count=32)
    return root


@pytest.mark.parametrize("name", ["gkd", "distillm", "minillm", "imitkd"])
def test_shipped_config_runs_end_to_end(workspace, name):
    import json

    from test_cli import base_args, run_cli

    args = [*base_args(workspace, name), "train.max_steps=4", "method.max_new_tokens=8", "method.val_examples=4",
            "method.eval_every=2", "train.bf16=false"]
    run_cli("distill", str(CONFIGS / f"{name}.yaml"), *args, cwd=workspace)
    report = json.loads((workspace / name / "report.json").read_text())
    assert report["config"]["method"]["name"] == name and report["steps"] == 4
    rows = {row["model"]: row for row in report["rows"]}
    header = (workspace / name / "train_log.csv").read_text().splitlines()[0]
    assert "generated" in header
    if name == "minillm":
        # This pruned student starts at KL 0.004 from its teacher: LMOps's whitened advantages are then unit-scale
        # noise, and 4 steps at lr 1e-3 do not lower KL (they did not in our runs); the tiny run above does.
        assert {"pg", "reg", "ppo_epoch"} <= set(header.split(","))
        assert math.isfinite(rows["student after"]["kl_to_teacher"])
    else:
        assert rows["student after"]["kl_to_teacher"] < rows["student before"]["kl_to_teacher"]


def test_onpolicy_cross_entropy_is_refused_before_any_model_loads(workspace):
    from test_cli import base_args, run_cli

    proc = run_cli("distill", str(CONFIGS / "gkd.yaml"), *base_args(workspace, "refused-ce"), "loss.kd_weight=0.5",
                   cwd=workspace, check_ok=False)
    assert proc.returncode == 2 and "loss.allow_onpolicy_ce=true" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr and not (workspace / "refused-ce" / "report.json").exists()


def test_onpolicy_method_with_cached_teacher_is_a_clear_error(workspace):
    from test_cli import base_args, run_cli

    proc = run_cli("distill", str(CONFIGS / "gkd.yaml"), *base_args(workspace, "refused"), "teacher.signal=topk",
                   cwd=workspace, check_ok=False)
    assert proc.returncode == 2 and "teacher.signal=online" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
