"""Training loop: loss decreases, resume is exact, 2 processes match 1, bad values stop cleanly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlm.config import LossConfig, TrainConfig
from kdlm.data import encode_records, load_records
from kdlm.errors import KdlmError
from kdlm.train.loop import train
from kdlm.train.order import run_schedule
from tiny import tiny_llama, tiny_tokenizer, write_chat_jsonl

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    data = write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl")
    examples = encode_records(tokenizer, load_records(str(data)), max_length=128)
    teacher = tiny_llama(len(tokenizer), num_layers=4, seed=1)
    return tokenizer, examples, teacher


def _train(setup, output_dir, *, steps=6, resume=False, on_step=None, divergence="fkl", kd_weight=1.0, lr=3e-3, student=None):
    tokenizer, examples, teacher = setup
    student = student or tiny_llama(len(tokenizer), num_layers=2, seed=2)
    config = TrainConfig(output_dir=str(output_dir), max_steps=steps, batch_size=4, grad_accum=2, lr=lr,
                         warmup_steps=1, bf16=False, resume=resume)
    result = train(student, examples, train_config=config, loss_config=LossConfig(divergence=divergence, kd_weight=kd_weight),
                   pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), teacher=teacher, on_step=on_step)
    return student, result


def test_schedule_is_a_pure_function_of_seed():
    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4, 10]
    a = run_schedule(lengths, global_batch=3, num_batches=7, seed=1, length_grouped=True)
    b = run_schedule(lengths, global_batch=3, num_batches=7, seed=1, length_grouped=True)
    c = run_schedule(lengths, global_batch=3, num_batches=7, seed=2, length_grouped=True)
    assert a == b and a != c
    first_epoch = [i for batch in a[:3] for i in batch]
    assert len(set(first_epoch)) == 9  # an epoch visits distinct examples


def test_kd_lowers_the_divergence_to_the_teacher(setup, tmp_path):
    _, result = _train(setup, tmp_path, steps=12)
    kd = [r["kd"] for r in result.history]
    assert kd[-1] < 0.7 * kd[0]


def test_resume_after_interrupt_gives_the_same_weights(setup, tmp_path):
    straight, _ = _train(setup, tmp_path / "straight", steps=6)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(setup, tmp_path / "resumed", steps=6, on_step=interrupt)
    assert (tmp_path / "resumed" / "checkpoints" / "step-000003" / "state.json").exists()
    resumed, result = _train(setup, tmp_path / "resumed", steps=6, resume=True)
    assert [r["step"] for r in result.history] == [4, 5, 6]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_gradient_accumulation_matches_one_big_batch(setup, tmp_path, monkeypatch):
    """Token-weighted normalisation: 2 micro-batches of 4 equal 1 batch of 8 (same examples)."""
    tokenizer, examples, teacher = setup
    # Plain SGD makes the update proportional to the gradient (Adam's first step is ~lr * sign(g),
    # which hides a wrong weighting of micro-batches).
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    results = []
    for batch_size, accum in ((4, 2), (8, 1)):
        student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
        config = TrainConfig(output_dir=str(tmp_path / f"b{batch_size}"), max_steps=1, batch_size=batch_size,
                             grad_accum=accum, lr=1.0, warmup_steps=0, bf16=False, length_grouped=False, max_grad_norm=None)
        # Same examples in the step: the schedule of (4, accum 2) covers the same 8 indices as (8, 1) in epoch 0.
        train(student, examples, train_config=config, loss_config=LossConfig(divergence="fkl", kd_weight=0.5),
              pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), teacher=teacher)
        results.append(student.state_dict())
    # One Adam step moves each weight by about lr * sign(gradient); where a gradient is ~1e-8 its sign
    # can flip on summation order, so compare at 0.1% of lr. Weighting micro-batches by their own
    # token counts (the bug this guards against) changes updates by a large fraction of lr.
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("signal", "kd_weight"), [("online", 0.7), ("topk", 1.0), ("none", 0.0)])
def test_fused_training_follows_the_dense_one(setup, tmp_path, monkeypatch, signal, kd_weight):
    """Same losses and weights after 3 steps with the fused loss (chunks of 7 tokens) and the dense one."""
    tokenizer, examples, teacher = setup
    # SGD: Adam's update lr * g / (|g| + eps) turns fp32 summation-order noise on tiny gradients into 1% of lr.
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    topk = None
    if signal == "topk":
        from kdlm.teachers.cache import cache_identity, read_targets, write_cache

        identity = cache_identity(kind="topk", teacher="tiny", tokenizer=tokenizer, vocab_size=len(tokenizer),
                                  examples=examples, top_k=8, bf16=False)
        manifest = write_cache(teacher, examples, tmp_path / "cache", identity=identity,
                               pad_token_id=tokenizer.pad_token_id, show_progress=False)
        topk = read_targets(tmp_path / "cache", manifest)
    runs = []
    for fused in (True, False):
        student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
        config = TrainConfig(output_dir=str(tmp_path / str(fused)), max_steps=3, batch_size=4, lr=0.5,
                             warmup_steps=0, bf16=False)
        loss = LossConfig(divergence="jsd", kd_weight=kd_weight, temperature=1.5, fused=fused, chunk_rows=7)
        result = train(student, examples, train_config=config, loss_config=loss, pad_token_id=tokenizer.pad_token_id,
                       vocab_size=len(tokenizer), teacher=teacher if signal == "online" else None, topk_targets=topk)
        runs.append((student.state_dict(), [(r["kd"], r["ce"]) for r in result.history]))
    (fused_weights, fused_losses), (dense_weights, dense_losses) = runs
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(dense_losses), rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    for name in fused_weights:
        torch.testing.assert_close(fused_weights[name], dense_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_non_finite_loss_stops_with_a_clear_error(setup, tmp_path):
    tokenizer, _, _ = setup
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
    with torch.no_grad():
        student.model.norm.weight.fill_(float("nan"))
    with pytest.raises(KdlmError, match="non-finite loss at step 1"):
        _train(setup, tmp_path, steps=2, student=student)
    assert (tmp_path / "checkpoints" / "step-000000" / "state.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """accelerate launch, 2 CPU processes (gloo), same global batch: same losses and weights."""
    # the checkout's src first: the script runs this kdlm, not whichever the environment installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    script = str(HERE / "train_script.py")
    single = tmp_path / "single"
    subprocess.run([sys.executable, script, str(single), "4", "2", "5"], check=True, env=env, timeout=300)
    double = tmp_path / "double"
    # `--cpu` alone would start ONE process (accelerate's simple launcher); `--multi_gpu` starts torchrun,
    # and the script's Accelerator(cpu=True) then runs DDP over gloo on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    subprocess.run([*launch, script, str(double), "2", "2", "5"], check=True, env=env, timeout=300)
    losses_1 = json.loads((single / "losses.json").read_text())
    losses_2 = json.loads((double / "losses.json").read_text())
    assert len(losses_1) == len(losses_2) == 5
    assert losses_1 == pytest.approx(losses_2, rel=1e-4)
    assert (double / "world_size").read_text() == "2"
    weights_1 = torch.load(single / "final.pt")
    weights_2 = torch.load(double / "final.pt")
    for name in weights_1:
        torch.testing.assert_close(weights_1[name], weights_2[name], rtol=1e-4, atol=1e-5, msg=name)
