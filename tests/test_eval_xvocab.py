"""Top-1 agreement across vocabularies on 1:1-aligned positions: against an alignment and a byte comparison
written out by hand, and in `kdlm eval` (both paths) through the real CLI with a student whose tokenizer is
not the teacher's."""

from __future__ import annotations

import json

import pytest
import torch

from kdlm.evaluate.xvocab import aligned_top1
from test_cli import base_args, run_cli, workspace  # noqa: F401  (the module-scoped tiny teacher and data)
from tiny import tiny_llama, tiny_sp_tokenizer, tiny_tokenizer

ANSWER = "the water is hot."
RECORD = {"messages": [{"role": "user", "content": "say"}, {"role": "assistant", "content": ANSWER}]}
# The teacher (byte-level, no merges) has one token per byte of the answer, then <|im_end|>: 18 targets. The
# student (SentencePiece-like) reads t|he|▁water|▁|is|▁|h|o|t|.|</s>; its one-byte tokens cover exactly one
# teacher token each, and the two ends of turn pair up.
STUDENT_1TO1 = [0, 3, 5, 6, 7, 8, 9, 10]
TEACHER_1TO1 = [0, 9, 12, 13, 14, 15, 16, 17]


def student_argmax_by_hand(model, tokenizer) -> list[int]:
    """The student's most likely token at each answer target, one record, float64, Zephyr layout written out."""
    prompt = tokenizer("<|user|>\nsay</s>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    ids = tokenizer(f"<|user|>\nsay</s>\n<|assistant|>\n{ANSWER}</s>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model.double()(torch.tensor([ids])).logits[0]
    return logits[len(prompt) - 1 : len(ids) - 1].argmax(-1).tolist()


def teacher_id_spelling(student_token: str, teacher) -> int | None:
    """The teacher's token that spells what a student token spells, by the two vocabularies' conventions."""
    if student_token == "</s>":
        return teacher.convert_tokens_to_ids("<|im_end|>")
    if student_token.startswith("<0x") and student_token.endswith(">"):
        data = bytes([int(student_token[3:5], 16)])
    else:
        data = student_token.replace("▁", " ").encode()
    if len(data) != 1 or data[0] >= 128:  # ASCII only: the teacher's one token for it is its encoding
        return None
    ids = teacher(data.decode(), add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


def test_aligned_top1_matches_a_hand_alignment():
    teacher_tokenizer, student_tokenizer = tiny_tokenizer(), tiny_sp_tokenizer()
    student = tiny_llama(len(student_tokenizer), num_layers=1, seed=6)
    tops = student_argmax_by_hand(student, student_tokenizer)
    assert len(tops) == 11
    spelled = [teacher_id_spelling(token, teacher_tokenizer) for token in student_tokenizer.convert_ids_to_tokens(tops)]
    # The teacher's logits: its argmax spells the student's at chosen positions (aligned or not), another byte elsewhere.
    teacher = torch.randn(18, len(teacher_tokenizer))
    other = teacher_tokenizer.convert_tokens_to_ids("z")
    agreeing = 0
    for position in range(18):
        aligned = TEACHER_1TO1.index(position) if position in TEACHER_1TO1 else None
        student_position = STUDENT_1TO1[aligned] if aligned is not None else min(position, 10)
        wanted = spelled[student_position]
        chosen = wanted if wanted is not None and (aligned is None or aligned % 2 == 0) else other
        teacher[position, chosen] += 100.0
        agreeing += aligned is not None and chosen == wanted
    result = aligned_top1(student.float(), student_tokenizer, teacher_tokenizer, [RECORD], [teacher],
                          max_length=512, batch_size=1)
    assert result["aligned_positions"] == 8
    assert result["aligned_share"] == pytest.approx(8 / 18)
    assert agreeing >= 2  # the test can tell a right count from a wrong one
    assert result["top1_agreement_aligned"] == pytest.approx(agreeing / 8)


def test_with_one_tokenizer_every_position_aligns_and_agreement_is_plain_top1():
    """Both sides with the teacher's tokenizer: every answer token is a 1:1 group, and the aligned figure is the
    usual top-1 agreement over all targets (argmax ids equal), computed here record by record."""
    tokenizer = tiny_tokenizer()
    teacher, student = tiny_llama(len(tokenizer), num_layers=1, seed=1), tiny_llama(len(tokenizer), num_layers=1, seed=2)
    answers = ["the water is hot.", "naïve café 🙂", "two plus two is four"]
    records = [{"messages": [{"role": "user", "content": "say"}, {"role": "assistant", "content": a}]} for a in answers]
    teacher_logits, agree, total = [], 0, 0
    for answer in answers:
        prompt = tokenizer("<|im_start|>user\nsay<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([tokenizer(f"<|im_start|>user\nsay<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>",
                                      add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            t, s = (model(ids).logits[0, len(prompt) - 1 : -1] for model in (teacher, student))
        teacher_logits.append(t)
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        total += t.shape[0]
    result = aligned_top1(student, tokenizer, tokenizer, records, teacher_logits, max_length=512, batch_size=2)
    assert result["aligned_share"] == 1.0 and result["aligned_positions"] == total
    assert result["top1_agreement_aligned"] == pytest.approx(agree / total)


def test_aligned_top1_refuses_teacher_logits_of_another_length():
    teacher_tokenizer, student_tokenizer = tiny_tokenizer(), tiny_sp_tokenizer()
    student = tiny_llama(len(student_tokenizer), num_layers=1, seed=6)
    with pytest.raises(Exception, match="answer 1: the teacher's logits cover 17 tokens, its tokenizer gives 18"):
        aligned_top1(student, student_tokenizer, teacher_tokenizer, [RECORD], [torch.zeros(17, len(teacher_tokenizer))],
                     max_length=512, batch_size=1)


def _sp_student(folder, seed: int = 4):
    tokenizer = tiny_sp_tokenizer()
    tiny_llama(len(tokenizer), num_layers=1, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_eval_cli_reports_aligned_top1_for_a_student_with_another_tokenizer(workspace, tmp_path):  # noqa: F811
    same = tmp_path / "same"
    tiny_llama(len(tiny_tokenizer()), num_layers=1, seed=3).save_pretrained(same)
    tiny_tokenizer().save_pretrained(same)
    other = _sp_student(tmp_path / "other")
    run_cli("eval", str(same), str(other), "--tasks", "fidelity", "--teacher", str(workspace / "teacher"),
            "--out", str(tmp_path / "out"), "--set", "fidelity_prompts=2", "--set", "fidelity_max_new_tokens=6",
            "--set", "batch_size=2", "--set", "bf16=false", cwd=tmp_path)
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    same_row, other_row = (report["models"][name]["fidelity"] for name in ("same", "other"))
    assert "top1_agreement" in same_row and "top1_agreement_aligned" not in same_row
    assert 0 <= other_row["top1_agreement_aligned"] <= 1 and 0 < other_row["aligned_share"] <= 1
    assert other_row["aligned_positions"] > 0 and "kl_to_teacher" not in other_row
    lines = (tmp_path / "out" / "eval.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:5]}
    on = header.index("top-1 on")
    assert cells["other"][on] == f"1:1-aligned ({other_row['aligned_share']:.0%} of tokens)"
    assert cells["same"][on] == cells["teacher"][on] == "all tokens"
    assert cells["other"][header.index("KL to teacher")] == "n/a (tokenizer)"
    assert cells["other"][header.index("top-1 agreement")] == f"{other_row['top1_agreement_aligned']:.1%}"
    assert any("align 1:1" in line for line in lines)


def test_config_eval_scores_a_student_with_another_tokenizer(workspace):  # noqa: F811
    other = _sp_student(workspace / "sp-student")
    args = base_args(workspace, "xeval")
    proc = run_cli("eval", *args, f"eval.models=[{other}]", cwd=workspace)
    rows = json.loads((workspace / "xeval" / "eval" / "report.json").read_text())["rows"]
    teacher, student = rows
    assert teacher["bits_per_byte"] > 0 and "kl_to_teacher" in teacher and "top1_agreement_aligned" not in teacher
    assert student["bits_per_byte"] > teacher["bits_per_byte"]  # the trained teacher scores its own data best
    assert 0 <= student["top1_agreement_aligned"] <= 1 and 0 < student["aligned_share"] < 1
    assert "kl_to_teacher" not in student and "another tokenizer" in proc.stdout + proc.stderr
