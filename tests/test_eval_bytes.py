"""Bits per byte of held-out answers: against a float64 computation by hand, and in `kdlm eval` for a
student whose tokenizer is not the teacher's (token-level metrics skipped with the reason)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdlm.evaluate.bytes import answer_bits_per_byte
from kdlm.evaluate.suite import EvalSuiteConfig, evaluate_suite
from kdlm.models.student_tokenizer import train_bpe_tokenizer
from tiny import CORPUS, save_tiny_teacher, tiny_llama, tiny_tokenizer

RECORDS = [
    {"messages": [{"role": "user", "content": "say something"}, {"role": "assistant", "content": answer}]}
    for answer in ["water boils at one hundred degrees.", "naïve café, 日本語 🙂", "ok"]
]


def bits_per_byte_by_hand(model, tokenizer, records) -> float:
    """One record at a time (no padding), float64 log-softmax over full logits; the ChatML layout is
    written out here: the targets are the answer's tokens and <|im_end|>."""
    model = model.double()
    nll, num_bytes = 0.0, 0
    for record in records:
        user, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for position in range(len(prompt_ids), len(ids)):
            nll -= logprobs[position - 1, ids[position]].item()
        num_bytes += len(answer.encode("utf-8"))
    return nll / math.log(2) / num_bytes


@pytest.mark.parametrize("own_tokenizer", [False, True])
def test_bits_per_byte_matches_a_float64_computation(own_tokenizer):
    tokenizer = tiny_tokenizer()
    if own_tokenizer:  # merges: fewer tokens than bytes, so a per-token and a per-byte figure differ
        tokenizer = train_bpe_tokenizer(tokenizer, [*CORPUS, *(r["messages"][1]["content"] for r in RECORDS)] * 3, 320)
    model = tiny_llama(len(tokenizer), num_layers=2, seed=5)
    result = answer_bits_per_byte(model, tokenizer, RECORDS, batch_size=2)  # padded batches
    assert result["answer_bytes"] == sum(len(r["messages"][1]["content"].encode()) for r in RECORDS)
    assert result["bits_per_byte"] == pytest.approx(bits_per_byte_by_hand(model, tokenizer, RECORDS), rel=1e-5)
    if own_tokenizer:
        assert result["answer_tokens"] < result["answer_bytes"]


def test_eval_scores_a_student_with_another_tokenizer_by_bits_per_byte_only(tmp_path):
    save_tiny_teacher(tmp_path / "teacher")
    teacher_tokenizer = tiny_tokenizer()
    same = tiny_llama(len(teacher_tokenizer), num_layers=1, seed=3)
    same.save_pretrained(tmp_path / "same")
    teacher_tokenizer.save_pretrained(tmp_path / "same")
    other_tokenizer = train_bpe_tokenizer(teacher_tokenizer, CORPUS * 3, 300)
    tiny_llama(len(other_tokenizer), num_layers=1, seed=4).save_pretrained(tmp_path / "other")
    other_tokenizer.save_pretrained(tmp_path / "other")
    config = EvalSuiteConfig(
        tasks=["fidelity"], teacher=str(tmp_path / "teacher"), fidelity_prompts=2, fidelity_max_new_tokens=24,
        batch_size=2, bf16=False, output_dir=str(tmp_path / "out"),
    )
    report = evaluate_suite([str(tmp_path / "same"), str(tmp_path / "other")], config)
    teacher, same_row, other = (report["models"][name]["fidelity"] for name in ("teacher", "same", "other"))
    for result in (teacher, same_row, other):
        assert result["bits_per_byte"] > 0 and result["answer_bytes"] == teacher["answer_bytes"]
    assert "kl_to_teacher" in same_row and "token_metrics_skipped" not in same_row
    assert "kl_to_teacher" not in other and "another tokenizer" in other["token_metrics_skipped"]
    # the teacher scores its own answers best; an untrained model is near log2(vocabulary) bits per token.
    # 24 new tokens, not fewer: a cut answer is scored with the end-of-turn token the teacher never wrote,
    # and over a 6-token answer that one token decided the order on some CPUs (sampling differs by CPU)
    assert teacher["bits_per_byte"] < same_row["bits_per_byte"]
    markdown = (tmp_path / "out" / "eval.md").read_text()
    other_line = next(line for line in markdown.splitlines() if line.startswith("| other |"))
    assert "n/a (tokenizer)" in other_line
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["rows"][2]["bits/byte"] == other["bits_per_byte"]
