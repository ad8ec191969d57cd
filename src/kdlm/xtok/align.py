"""Align two tokenizations of the same text by byte spans (cross-tokenizer distillation, docs/cross-tokenizer.md).

Each token gets the byte span of the text it covers, read from the fast tokenizer's character offsets. Where
several tokens share one character (byte-level or byte-fallback pieces of an accented letter or an emoji),
the character's bytes are handed out in order when the pieces' byte lengths add up to it; otherwise they
all keep the whole character. Two tokenizations are then cut where both have a token ending at the same
byte: each piece between two such cuts is a group of 1:1, 1:n, n:1 or n:m tokens, and both models have
read exactly the same text before a group's first token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from kdlm.errors import KdlmError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: printable bytes stand for themselves, the
    others (control bytes, space, some of Latin-1) are moved to code points 256 and up, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in kept}
    moved = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + moved)] = b
            moved += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each vocabulary id stands for (None for the unknown token and ids with no token).

    Byte-level BPE pieces (GPT-2, Llama 3, Qwen) are mapped back through the byte table; SentencePiece-style
    pieces turn "▁" into a space and byte-fallback pieces ``<0xNN>`` into their byte; added and special
    tokens are their text.
    """
    byte_level = _is_byte_level(tokenizer)
    table = _byte_level_decoder()
    added = {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    vocab = tokenizer.get_vocab()
    result: list[bytes | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, index in vocab.items():
        if token == tokenizer.unk_token:
            continue
        if (match := _BYTE_FALLBACK.fullmatch(token)) is not None:  # also when registered as an added token
            result[index] = bytes([int(match.group(1), 16)])
        elif token in added:
            result[index] = token.encode()
        elif byte_level and all(char in table for char in token):
            result[index] = bytes(table[char] for char in token)
        else:
            result[index] = token.replace("▁", " ").encode()
    return result


def byte_spans(text: str, offsets: list[tuple[int, int]], pieces: list[bytes | None]) -> list[tuple[int, int]]:
    """Byte spans of tokens from their character ``offsets`` in ``text``; ends never decrease.

    Tokens that share one character span split its bytes in order when their ``pieces`` (each token's bytes)
    add up to exactly those bytes; otherwise each keeps the whole span.
    """
    starts = [0]
    for char in text:
        starts.append(starts[-1] + len(char.encode()))
    spans = [(starts[start], starts[end]) for start, end in offsets]
    index = 0
    while index < len(spans):
        run = index
        while run + 1 < len(spans) and spans[run + 1] == spans[index]:
            run += 1
        lengths = [len(p) if p is not None else -1 for p in pieces[index : run + 1]]
        start, end = spans[index]
        if run > index and sum(lengths) == end - start and min(lengths) > 0:
            for position, length in zip(range(index, run + 1), lengths, strict=True):
                spans[position] = (start, start + length)
                start += length
        index = run + 1
    running = 0
    for position, (start, end) in enumerate(spans):  # trimmed offsets may step back: keep the cuts in order
        running = max(running, end)
        spans[position] = (min(start, running), running)
    return spans


def align_spans(student_ends: list[int], teacher_ends: list[int]) -> list[tuple[list[int], list[int]]]:
    """Cut two token sequences where both have a token ending at the same byte.

    Args:
        student_ends: end byte of each student token, non-decreasing.
        teacher_ends: end byte of each teacher token, non-decreasing.

    Returns:
        Groups ``(student positions, teacher positions)``, each side non-empty and in order. Tokens after
        the last common end (text that only one side covers) are in no group.
    """
    groups = []
    student, teacher = 0, 0
    while student < len(student_ends) and teacher < len(teacher_ends):
        student_group, teacher_group = [student], [teacher]
        student_end, teacher_end = student_ends[student], teacher_ends[teacher]
        student, teacher = student + 1, teacher + 1
        while student_end != teacher_end:
            if student_end < teacher_end:
                if student == len(student_ends):
                    return groups
                student_group.append(student)
                student_end, student = student_ends[student], student + 1
            else:
                if teacher == len(teacher_ends):
                    return groups
                teacher_group.append(teacher)
                teacher_end, teacher = teacher_ends[teacher], teacher + 1
        # Zero-width tokens at the cut (pieces of one character that could not be split) join the group.
        while student < len(student_ends) and student_ends[student] <= student_end:
            student_group.append(student)
            student += 1
        while teacher < len(teacher_ends) and teacher_ends[teacher] <= teacher_end:
            teacher_group.append(teacher)
            teacher += 1
        groups.append((student_group, teacher_group))
    return groups


@dataclass
class ResponseTokens:
    """One model's response tokens, placed on the response content (the assistant message's text)."""

    ids: list[int]  # the response targets, as encode_chat gives them (content, then the template's end of turn)
    spans: list[tuple[int, int] | None]  # byte span in the content; None: template markup before the content
    content_end: int  # bytes of the content; tokens starting at or after it are the end-of-turn markup


def response_tokens(tokenizer, messages: list[dict], response_ids: list[int]) -> ResponseTokens:
    """Place ``response_ids`` (the targets of ``encode_chat``) on the bytes of the last message's content.

    The template renders the response as some markup, the content and an end-of-turn marker; the ids are
    found again by tokenising the rendered chat with offsets (or the response alone, as ``encode_chat``
    falls back to), and each token's offsets are moved to the content.

    Raises:
        KdlmError: the tokenizer gives no offsets (a slow tokenizer), or its tokens cannot be found again.
    """
    content = messages[-1]["content"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    region = full[len(prompt) :].rstrip() if full.startswith(prompt) else content
    for text, skip in ((prompt + region, len(prompt)), (region, 0), (content, 0)):
        encoded = _encode_with_offsets(tokenizer, text)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        first = next((i for i, (start, end) in enumerate(offsets) if end > skip or start >= skip), len(ids))
        if ids[first:] == response_ids[: len(ids) - first] and len(ids) - first >= len(response_ids) - 1:
            break
    else:
        raise KdlmError(f"cannot place the response tokens of {getattr(tokenizer, 'name_or_path', 'a tokenizer')!r} on "
                        "their text (the chat template renders the response in an unexpected way)")
    text = text[skip:]
    offsets = [(max(start - skip, 0), max(end - skip, 0)) for start, end in offsets[first:]]
    pieces = token_bytes_cached(tokenizer)
    spans = byte_spans(text, offsets, [pieces[i] if i < len(pieces) else None for i in ids[first:]])
    content_start = len(text[: max(text.find(content), 0)].encode())
    content_end = len(content.encode())
    placed: list[tuple[int, int] | None] = []
    for start, end in spans[: len(response_ids)]:
        start, end = start - content_start, end - content_start
        placed.append(None if end <= 0 and content_end > 0 else (max(start, 0), min(end, max(start, content_end))))
    placed += [(content_end, content_end)] * (len(response_ids) - len(placed))  # encode_chat's appended eos
    return ResponseTokens(list(response_ids), placed, content_end)


def _encode_with_offsets(tokenizer, text: str) -> dict:
    if not getattr(tokenizer, "is_fast", False):
        raise KdlmError(f"cross-tokenizer alignment needs a fast tokenizer (offsets); "
                        f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} is a slow one")
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)


_PIECES: dict[int, list[bytes | None]] = {}


def token_bytes_cached(tokenizer) -> list[bytes | None]:
    """``token_bytes`` once per tokenizer object (it walks the whole vocabulary)."""
    key = id(tokenizer)
    if key not in _PIECES:
        _PIECES[key] = token_bytes(tokenizer)
    return _PIECES[key]


@dataclass
class Alignment:
    """Aligned groups of one record's response targets (positions count the targets, 0 = the first)."""

    groups: list[tuple[list[int], list[int]]]  # (student positions, teacher positions), text that both read alike
    aligned_bytes: int  # content bytes inside groups whose tokens spell the same text on both sides
    total_bytes: int  # content bytes inside all groups


def align_response(student: ResponseTokens, teacher: ResponseTokens, student_pieces, teacher_pieces,
                   content: str) -> Alignment:
    """Group the content tokens of both sides, then pair the end-of-turn tokens as one more group.

    A content group counts as aligned when each side's tokens spell the group's text (ignoring whitespace,
    which templates and SentencePiece's leading "▁" move about); groups that do not (a tokenizer that
    lowercases or normalises) are left out of ``groups`` and of ``aligned_bytes``.
    """
    text = content.encode()
    student_content = [i for i, span in enumerate(student.spans) if span is not None and span[0] < student.content_end]
    teacher_content = [i for i, span in enumerate(teacher.spans) if span is not None and span[0] < teacher.content_end]
    raw = align_spans([student.spans[i][1] for i in student_content], [teacher.spans[i][1] for i in teacher_content])
    groups, aligned, total = [], 0, 0
    for student_group, teacher_group in raw:
        student_group = [student_content[i] for i in student_group]
        teacher_group = [teacher_content[i] for i in teacher_group]
        start = min(student.spans[student_group[0]][0], teacher.spans[teacher_group[0]][0])
        end = student.spans[student_group[-1]][1]
        total += end - start
        wanted = _squeeze(text[start:end])
        if all(_squeeze(b"".join(pieces[ids[i]] or b"\0" for i in group)) == wanted
               for group, ids, pieces in ((student_group, student.ids, student_pieces),
                                          (teacher_group, teacher.ids, teacher_pieces))):
            groups.append((student_group, teacher_group))
            aligned += end - start
    student_tail = [i for i, span in enumerate(student.spans) if span is not None and span[0] >= student.content_end]
    teacher_tail = [i for i, span in enumerate(teacher.spans) if span is not None and span[0] >= teacher.content_end]
    if student_tail and teacher_tail:  # both say "the turn ends here", each in its own markup
        groups.append((student_tail, teacher_tail))
    return Alignment(groups, aligned, total)


def _squeeze(data: bytes) -> bytes:
    return b"".join(data.split())


def one_to_one(groups: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
    """The student and teacher positions of the 1:1 groups (where top-1 agreement is defined), in order."""
    pairs = [(student[0], teacher[0]) for student, teacher in groups if len(student) == 1 and len(teacher) == 1]
    return [s for s, _ in pairs], [t for _, t in pairs]
