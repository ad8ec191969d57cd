"""Final answers out of free text: numbers, labels (yes/no/maybe, option names), and majority votes.

A chain-of-thought is only useful for distillation when its final answer can be read and compared
with the gold one (shared/METHODS.md §8.6, §8.10). Every parser returns a normalised string, or None
when the text states no answer; None never counts as agreement with anything.

Where the answer is looked for, in order:
1. after the last answer marker (`Answer:`, `The answer is`, `####`, `-->`), the form our prompts ask for;
2. otherwise in the whole text: the last number, or the last label word.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# Markers the teacher (or a student) uses to introduce the final answer; the last one in the text wins.
ANSWER_MARKERS = re.compile(r"(?:\banswer\s*(?:is|:)|####|-->)", re.IGNORECASE)
NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")
END_MARKER = "END"  # what Fine-tune-CoT students write after the answer, to stop
END_SPLIT = re.compile(r"\bEND\b")


def normalise_number(text: str) -> str | None:
    """A number in canonical form: no thousands separators, currency or trailing zeros ("1,200.50" -> "1200.5").

    Returns None when `text` is not a number.
    """
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))  # "5.0" -> "5", "-0" -> "0" below
    return format(value.normalize(), "f")


def answer_span(text: str) -> tuple[str, bool]:
    """(the part of `text` after its last answer marker, True), or (the whole text, False) when there is
    no marker; either way cut at the END marker."""
    text = END_SPLIT.split(text, maxsplit=1)[0]
    markers = list(ANSWER_MARKERS.finditer(text))
    return (text[markers[-1].end() :], True) if markers else (text, False)


def extract_number(text: str) -> str | None:
    """The final numeric answer: the first number after the last marker, else the last number in the text."""
    span, marked = answer_span(text)
    found = NUMBER.findall(span)
    if not found:
        return None
    chosen = found[0] if marked else found[-1]
    normal = normalise_number(chosen)
    return None if normal is None else ("0" if normal == "-0" else normal)


def extract_label(text: str, labels: list[str]) -> str | None:
    """The final label among `labels` (case-insensitive, whole words): the first one after the last marker,
    else the last one mentioned. Returns the label as spelled in `labels`."""
    if not labels:
        raise ValueError("extract_label needs at least one label")
    pattern = re.compile(r"\b(" + "|".join(re.escape(label) for label in labels) + r")\b", re.IGNORECASE)
    span, marked = answer_span(text)
    found = pattern.findall(span)
    if not found:
        return None
    chosen = (found[0] if marked else found[-1]).lower()
    return next(label for label in labels if label.lower() == chosen)


def extract_answer(text: str, answer_type: str, labels: list[str] | None = None) -> str | None:
    """`extract_number` for answer_type "number", `extract_label` for "label"; None when no answer is stated."""
    if answer_type == "number":
        return extract_number(text)
    if answer_type == "label":
        return extract_label(text, labels or [])
    raise ValueError(f"unknown answer_type {answer_type!r}; use number or label")


def normalise_gold(value: object, answer_type: str, labels: list[str] | None = None) -> str:
    """A gold answer in the same form as the parsers' output, so that equality means agreement."""
    text = str(value).strip()
    if answer_type == "number":
        normal = normalise_number(text)
        if normal is None:
            raise ValueError(f"gold answer {value!r} is not a number")
        return "0" if normal == "-0" else normal
    for label in labels or []:
        if label.lower() == text.lower():
            return label
    raise ValueError(f"gold answer {value!r} is not one of the labels {labels}")


@dataclass(frozen=True)
class Vote:
    """The outcome of a majority vote over the parsed answers of k samples."""

    answer: str | None  # None: no answer parsed, or a tie for the top count
    count: int  # samples that gave `answer` (the top count, also on a tie)
    total: int  # samples voted on, unparseable ones included

    @property
    def agreement(self) -> float:
        """count / total: self-consistency's confidence in the pseudo-label (0 with no answer)."""
        return self.count / self.total if self.total and self.answer is not None else 0.0


def majority_vote(answers: list[str | None]) -> Vote:
    """Self-consistency (arXiv 2203.11171): the answer most samples agree on.

    Unparseable answers (None) count in the total but never win. A tie for the top count gives no
    pseudo-label (answer None): with two equally supported answers, either could be wrong, and a
    distillation set is better without the question than with a coin flip.
    """
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return Vote(None, 0, len(answers))
    ranked = counts.most_common()
    top = ranked[0][1]
    if len(ranked) > 1 and ranked[1][1] == top:
        return Vote(None, top, len(answers))
    return Vote(ranked[0][0], top, len(answers))
