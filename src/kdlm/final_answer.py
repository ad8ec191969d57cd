"""Final answers out of free text: numbers and labels (yes/no/maybe, option names), compared and voted on.

One module for every place that reads a model's final answer: evaluation scores it against a benchmark's
reference (kdlm.evaluate), the black-box recipes read it from teacher rationales to filter and vote
(kdlm.recipes). Numbers come back in one normal form, a string without thousands separators, currency or
trailing zeros ("1,200.50" -> "1200.5"), so that equality means agreement; None means the text states no
answer, and None never agrees with anything.

The two callers read the answer under two rules, chosen by `reading`, which differ on purpose:

- `"scoring"` (evaluation): the number directly after the last `####` or else the last `answer is` /
  `Answer:` / `answer =`, otherwise the last number; the label after the last `answer is` / `Answer:`,
  otherwise the *first* label word. Short benchmark answers state their label first ("Yes, because ...",
  PubMedQA, LegalBench); the rule is the one every accuracy in docs/ was measured with, so changing it would
  change published numbers.
- `"rationale"` (recipes): a chain of thought in the recipes' own format. Text after the `END` marker
  (what Fine-tune-CoT students write to stop) is ignored; the last marker among `answer is`, `Answer:`,
  `####` and `-->` (the ICL prompts' arrow) counts, and the first number or label anywhere after it is the
  answer ("The answer is: she earns $5 an hour"); without a marker the *last* one, because a rationale
  states its conclusion at its end.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

Reading = Literal["scoring", "rationale"]

# ---- the rationale reading's markers (also used to cut the answer off a rationale) -------------------
ANSWER_MARKERS = re.compile(r"(?:\banswer\s*(?:is|:)|####|-->)", re.IGNORECASE)
END_MARKER = "END"  # what Fine-tune-CoT students write after the answer, to stop
END_SPLIT = re.compile(r"\bEND\b")
_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_RATIONALE_NUMBER = re.compile(_NUMBER + r"|-?\.\d+")  # ".5" too: teachers write it

# ---- the scoring reading's markers: the number or label must follow the marker directly -------------
_SCORING_NUMBER_MARKERS = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE),
)
_SCORING_NUMBER = re.compile(_NUMBER)
_SCORING_LABEL_MARKER = re.compile(r"answer\s*(?:is|:)\s*:?\s*\**\s*([A-Za-z]+)", re.IGNORECASE)


def normalise_number(text: str) -> str | None:
    """A number in normal form: no thousands separators, currency or trailing zeros ("1,200.50" -> "1200.5").

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
        normal = str(value.quantize(Decimal(1)))  # "5.0" -> "5"
    else:
        normal = format(value.normalize(), "f")
    return "0" if normal == "-0" else normal


def answer_span(text: str) -> tuple[str, bool]:
    """Rationale reading: (the part of `text` after its last answer marker, True), or (the whole text, False)
    when there is no marker; either way cut at the END marker."""
    text = END_SPLIT.split(text, maxsplit=1)[0]
    markers = list(ANSWER_MARKERS.finditer(text))
    return (text[markers[-1].end() :], True) if markers else (text, False)


def extract_number(text: str, *, reading: Reading) -> str | None:
    """The final numeric answer of `text` in normal form, read under `reading` (see the module docstring)."""
    if reading == "scoring":
        for marker in _SCORING_NUMBER_MARKERS:
            found = marker.findall(text)
            if found:
                return normalise_number(found[-1])
        numbers = _SCORING_NUMBER.findall(text)
        return normalise_number(numbers[-1]) if numbers else None
    if reading == "rationale":
        span, marked = answer_span(text)
        found = _RATIONALE_NUMBER.findall(span)
        return normalise_number(found[0] if marked else found[-1]) if found else None
    raise ValueError(f"unknown reading {reading!r}; use scoring or rationale")


def label_span(text: str, labels: list[str]) -> tuple[str, int, int] | None:
    """Scoring reading: (label as spelled in `labels`, start, end of the word in `text`) of the stated label."""
    by_lower = {label.lower(): label for label in labels}
    for match in reversed(list(_SCORING_LABEL_MARKER.finditer(text))):
        if match.group(1).lower() in by_lower:
            return by_lower[match.group(1).lower()], match.start(1), match.end(1)
    best = None
    for lower, label in by_lower.items():
        match = re.search(r"\b" + re.escape(lower) + r"\b", text.lower())
        if match and (best is None or match.start() < best[1]):
            best = (label, match.start(), match.end())
    return best


def extract_label(text: str, labels: list[str], *, reading: Reading) -> str | None:
    """The final label among `labels` (case-insensitive, whole words), as spelled in `labels`, read under
    `reading` (see the module docstring)."""
    if reading == "scoring":
        span = label_span(text, labels)
        return span[0] if span else None
    if reading != "rationale":
        raise ValueError(f"unknown reading {reading!r}; use scoring or rationale")
    if not labels:
        raise ValueError("extract_label needs at least one label")
    pattern = re.compile(r"\b(" + "|".join(re.escape(label) for label in labels) + r")\b", re.IGNORECASE)
    span, marked = answer_span(text)
    found = pattern.findall(span)
    if not found:
        return None
    chosen = (found[0] if marked else found[-1]).lower()
    return next(label for label in labels if label.lower() == chosen)


def extract_answer(text: str, answer_type: str, labels: list[str] | None = None, *, reading: Reading) -> str | None:
    """`extract_number` for answer_type "number", `extract_label` for "label"; None when no answer is stated."""
    if answer_type == "number":
        return extract_number(text, reading=reading)
    if answer_type == "label":
        return extract_label(text, labels or [], reading=reading)
    raise ValueError(f"unknown answer_type {answer_type!r}; use number or label")


def normalise_gold(value: object, answer_type: str, labels: list[str] | None = None) -> str:
    """A gold answer in the same form as the parsers' output, so that equality means agreement."""
    text = str(value).strip()
    if answer_type == "number":
        normal = normalise_number(text)
        if normal is None:
            raise ValueError(f"gold answer {value!r} is not a number")
        return normal
    for label in labels or []:
        if label.lower() == text.lower():
            return label
    raise ValueError(f"gold answer {value!r} is not one of the labels {labels}")


def numbers_equal(predicted: str | float | None, reference: float, tolerance: float = 1e-6) -> bool:
    """Exact match of numbers, forgiving float noise (72 == 72.0); `predicted` may be a normal-form string."""
    return predicted is not None and math.isclose(float(predicted), reference, rel_tol=tolerance, abs_tol=tolerance)


def is_correct(text: str, reference: str | float, *, kind: str, labels: list[str] | None = None) -> bool:
    """Exact match of the answer read from `text` (scoring reading) against `reference`.

    Args:
        kind: "number" (reference is a number) or "label" (reference is one of `labels`).
    """
    if kind == "number":
        return numbers_equal(extract_number(text, reading="scoring"), float(reference))
    if kind == "label":
        return extract_label(text, labels or [], reading="scoring") == reference
    raise ValueError(f"unknown answer kind {kind!r}")


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
