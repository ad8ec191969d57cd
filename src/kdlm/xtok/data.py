"""Tokenise each chat record for both models and align their response tokens (docs/cross-tokenizer.md)."""

from __future__ import annotations

import warnings

from kdlm.data.records import is_prompt_only
from kdlm.data.tokenize import IGNORE_INDEX, encode_chat
from kdlm.errors import KdlmError
from kdlm.xtok.align import align_response, response_tokens, token_bytes_cached

_UNBOUNDED = 1 << 30


def check_chat_template(tokenizer, side: str, spec: str) -> None:
    """Refuse a tokenizer without a chat template: each model must see the chat in its own markup."""
    if not getattr(tokenizer, "chat_template", None):
        raise KdlmError(
            f"the {side} tokenizer ({spec}) has no chat template, and cross-tokenizer distillation renders each "
            f"chat in each model's own template: give the {side} folder a tokenizer_config.json with a "
            "\"chat_template\" (e.g. the teacher's, if its markup tokens exist in the student's vocabulary)"
        )


def encode_pair(student_tokenizer, teacher_tokenizer, messages: list[dict], *, max_length: int) -> dict:
    """One chat record as a student example that carries the teacher's tokens and the alignment.

    Returns:
        ``input_ids`` / ``labels`` (the student's, as ``encode_chat``), ``teacher_input_ids`` /
        ``teacher_labels``, ``groups``: ``[[student target positions], [teacher target positions]]`` per
        aligned group (positions count each side's targets), and ``aligned_bytes`` / ``total_bytes``
        (the alignment share's parts). Groups reaching past either side's ``max_length`` are left out.
    """
    sides = {}
    for side, tokenizer in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        full = encode_chat(tokenizer, messages, max_length=_UNBOUNDED)
        targets = [label for label in full["labels"] if label != IGNORE_INDEX]
        cut = {"input_ids": full["input_ids"][:max_length], "labels": full["labels"][:max_length]}
        kept = sum(1 for label in cut["labels"][1:] if label != IGNORE_INDEX)
        sides[side] = (cut, response_tokens(tokenizer, messages, targets), kept)
    (student, student_tokens, student_kept), (teacher, teacher_tokens, teacher_kept) = sides["student"], sides["teacher"]
    alignment = align_response(student_tokens, teacher_tokens, token_bytes_cached(student_tokenizer),
                               token_bytes_cached(teacher_tokenizer), messages[-1]["content"])
    groups = [[s, t] for s, t in alignment.groups if s[-1] < student_kept and t[-1] < teacher_kept]
    return {**student, "teacher_input_ids": teacher["input_ids"], "teacher_labels": teacher["labels"], "groups": groups,
            "aligned_bytes": alignment.aligned_bytes, "total_bytes": alignment.total_bytes}


def encode_pairs(student_tokenizer, teacher_tokenizer, records: list[dict], *, max_length: int,
                 min_aligned: float) -> list[dict]:
    """``encode_pair`` over chat records, then the alignment probe.

    Args:
        min_aligned: the least share of response bytes whose tokens spell the same text on both sides
            (``loss.cross_tokenizer_min_aligned``); below it the run is refused.

    Raises:
        KdlmError: a text record or a record without a response, no target left, or too little aligned text.
    """
    examples, dropped = [], 0
    for index, record in enumerate(records):
        if "messages" not in record:
            raise KdlmError(f"record {index + 1} is a text record; cross-tokenizer distillation (loss.cross_tokenizer) "
                            "trains on chat records (prompt and response), whose response both models read")
        if is_prompt_only(record):
            raise KdlmError(f"record {index + 1} has no response: generate teacher answers first (data.teacher_answers: true)")
        example = encode_pair(student_tokenizer, teacher_tokenizer, record["messages"], max_length=max_length)
        example.update({key: record[key] for key in ("weight", "task") if key in record})
        example["prompt_messages"] = record["messages"][:-1]  # on-policy samples are paired again from it
        if any(label != IGNORE_INDEX for label in example["labels"][1:]):
            examples.append(example)
        else:
            dropped += 1
    if not examples:
        raise KdlmError(f"none of the {len(records)} records has a token to train on within max_length={max_length}: "
                        "raise data.max_length or shorten the prompts")
    if dropped:
        warnings.warn(f"dropped {dropped} of {len(records)} records with no target token within max_length={max_length}",
                      stacklevel=2)
    check_alignment_share(examples, min_aligned)
    return examples


def alignment_share(examples: list[dict]) -> float:
    """The share of response bytes whose tokens spell the same text for both models (1.0 for no text)."""
    total = sum(example["total_bytes"] for example in examples)
    return sum(example["aligned_bytes"] for example in examples) / total if total else 1.0


def check_alignment_share(examples: list[dict], min_aligned: float) -> None:
    share = alignment_share(examples)
    if share < min_aligned:
        raise KdlmError(
            f"the teacher's and the student's tokens spell the same response text for only {share:.1%} of its bytes "
            f"(loss.cross_tokenizer_min_aligned={min_aligned:g}): the tokenizers normalise text differently (e.g. one "
            "lowercases or strips accents), and the unaligned groups would get no distillation signal. Pair other "
            "models, or set loss.cross_tokenizer_min_aligned=0 to proceed anyway (unaligned groups train on "
            "cross-entropy only)"
        )
