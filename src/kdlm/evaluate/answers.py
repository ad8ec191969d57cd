"""Pull the final answer out of a model's free text, so that accuracy is an exact match.

Two kinds of answers: numbers (gsm8k, svamp) and labels from a fixed set (yes/no/maybe for
pubmedqa, Yes/No for the LegalBench classification tasks). An explicit marker ("The answer is X",
"#### X", "Answer: X") wins; otherwise the last number, or the first label word, in the text.

src/kdlm/recipes/answers.py (chain-of-thought recipes) has its own extraction; the two may be merged.
"""

from __future__ import annotations

import math
import re

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_MARKERS = (
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE),
)
_ANY_NUMBER = re.compile(_NUMBER)
_LABEL_MARKER = re.compile(r"answer\s*(?:is|:)\s*:?\s*\**\s*([A-Za-z]+)", re.IGNORECASE)


def parse_number(text: str) -> float | None:
    """`"$1,234.50"` -> 1234.5; None when `text` holds no number."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The final numeric answer in `text`: after a marker if there is one, else the last number."""
    for marker in _MARKERS:
        found = marker.findall(text)
        if found:
            return parse_number(found[-1])
    numbers = _ANY_NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def numbers_equal(predicted: float | None, reference: float, tolerance: float = 1e-6) -> bool:
    """Exact match of numbers, forgiving float noise (72 == 72.0)."""
    return predicted is not None and math.isclose(predicted, reference, rel_tol=tolerance, abs_tol=tolerance)


def extract_label(text: str, labels: list[str]) -> str | None:
    """The label of `labels` that `text` answers (case-insensitive, returned as spelled in `labels`).

    A label after "answer is"/"Answer:" wins; otherwise the label word that appears first.
    """
    span = label_span(text, labels)
    return span[0] if span else None


def label_span(text: str, labels: list[str]) -> tuple[str, int, int] | None:
    """(label as spelled in `labels`, start, end of the word in `text`) of the answer `extract_label` reads."""
    by_lower = {label.lower(): label for label in labels}
    for match in reversed(list(_LABEL_MARKER.finditer(text))):
        if match.group(1).lower() in by_lower:
            return by_lower[match.group(1).lower()], match.start(1), match.end(1)
    best = None
    for lower, label in by_lower.items():
        match = re.search(r"\b" + re.escape(lower) + r"\b", text.lower())
        if match and (best is None or match.start() < best[1]):
            best = (label, match.start(), match.end())
    return best


def is_correct(text: str, reference: str | float, *, kind: str, labels: list[str] | None = None) -> bool:
    """Exact match of the answer extracted from `text` against `reference`.

    Args:
        kind: "number" (reference is a number) or "label" (reference is one of `labels`).
    """
    if kind == "number":
        return numbers_equal(extract_number(text), float(reference))
    if kind == "label":
        return extract_label(text, labels or []) == reference
    raise ValueError(f"unknown answer kind {kind!r}")
