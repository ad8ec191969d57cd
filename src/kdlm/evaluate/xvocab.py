"""Top-1 agreement with a teacher whose tokenizer is not the model's (docs/cross-tokenizer.md, docs/eval-bench.md).

Token positions of two tokenizers do not correspond, so the teacher's answers are aligned with the
model's tokens by byte spans (`kdlm.xtok`): where one teacher token and one model token cover the same
bytes (a 1:1 group), both models have read the same text and predict the same next piece, and their most
likely tokens are compared by the bytes they spell (`kdlm.xtok.align.token_bytes`). The other positions (1:n, n:1, n:m groups and
text that does not align) are left out, and the share of the teacher's answer tokens that count is
reported with the agreement. The end-of-turn tokens of the two chat templates stand for each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlm.data.tokenize import IGNORE_INDEX
from kdlm.errors import KdlmError
from kdlm.evaluate.metrics import target_logits
from kdlm.xtok.align import one_to_one, token_bytes_cached
from kdlm.xtok.data import encode_pair

_ALL_ROWS = 1 << 30  # target_logits keeps this many vocabulary rows: all of them


def targets_of(example: dict) -> int:
    """Target tokens of an example, counted as `target_hidden_states` picks them (labels after the first)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


def per_example(batch_logits: list[Tensor], examples: list[dict], batch_size: int) -> list[Tensor]:
    """Per-batch target logits of `target_logits` cut into one (targets, V) tensor per example."""
    out = []
    for index, logits in enumerate(batch_logits):
        counts = [targets_of(example) for example in examples[index * batch_size : (index + 1) * batch_size]]
        out += list(torch.split(logits, counts))
    return out


def same_piece(student_id: int, teacher_id: int, student_pieces, teacher_pieces, student_eos, teacher_eos) -> bool:
    """Whether two tokens spell the same bytes (any of several ids with one spelling will do), or are both
    their template's end of turn, which spells other bytes on each side but means the same."""
    if student_id == student_eos and teacher_id == teacher_eos:
        return True
    student = student_pieces[student_id] if student_id < len(student_pieces) else None
    teacher = teacher_pieces[teacher_id] if teacher_id < len(teacher_pieces) else None
    return bool(student) and student == teacher


@torch.no_grad()
def aligned_top1(model, tokenizer, teacher_tokenizer, records: list[dict], teacher_logits: list[Tensor], *,
                 max_length: int, batch_size: int) -> dict:
    """Top-1 agreement of `model` with the teacher on the 1:1-aligned positions of the teacher's answers.

    Args:
        records: chat records whose last message is the teacher's answer.
        teacher_logits: per record, the teacher's logits at its target positions, (targets, V_t), for the
            record encoded by `encode_chat` with `max_length` (as `encode_records` does).

    Returns:
        ``top1_agreement_aligned`` (share of aligned positions where both argmaxes spell the same bytes),
        ``aligned_positions``, and ``aligned_share`` (aligned positions / the teacher's answer tokens).
    """
    pairs = [encode_pair(tokenizer, teacher_tokenizer, record["messages"], max_length=max_length) for record in records]
    examples = [{"input_ids": pair["input_ids"], "labels": pair["labels"]} for pair in pairs]
    student_logits = per_example(target_logits(model, examples, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id,
                                               vocab_size=_ALL_ROWS), examples, batch_size)
    pieces = token_bytes_cached(tokenizer), token_bytes_cached(teacher_tokenizer)
    eos = tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    agree = positions = teacher_tokens = 0
    for index, (pair, student, teacher) in enumerate(zip(pairs, student_logits, teacher_logits, strict=True)):
        expected = targets_of({"labels": pair["teacher_labels"]})
        if teacher.shape[0] != expected:
            raise KdlmError(f"held-out answer {index + 1}: the teacher's logits cover {teacher.shape[0]} tokens, its "
                            f"tokenizer gives {expected} (encoded with another max_length?)")
        student_positions, teacher_positions = one_to_one(pair["groups"])
        teacher_tokens += expected
        student_top = student[student_positions].argmax(-1).tolist() if student_positions else []
        teacher_top = teacher[teacher_positions].argmax(-1).tolist() if teacher_positions else []
        agree += sum(same_piece(s, t, *pieces, *eos) for s, t in zip(student_top, teacher_top, strict=True))
        positions += len(student_positions)
    return {"top1_agreement_aligned": agree / positions if positions else float("nan"), "aligned_positions": positions,
            "aligned_share": positions / teacher_tokens if teacher_tokens else 0.0}
