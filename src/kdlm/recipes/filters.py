"""Reusable filters for teacher-written instructions and answers.

- `ExactDedup`: drops a text seen before, after case and whitespace normalisation.
- `RougeNovelty`: Self-Instruct's novelty test, ROUGE-L F-measure (rouge-score's `rougeL`, no stemming)
  of a candidate against every text in the pool; a candidate is new when the maximum is below the
  threshold (0.7 in Self-Instruct and Alpaca).
- `instruction_problem`: Self-Instruct's heuristic filters (word count, blocked words, a request for a
  program, a first character that is punctuation or not ASCII), returning the reason for a rejection.
- `looks_unanswered`, `only_punctuation_and_stop_words`: answer checks used by the Evol-Instruct eliminator.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass, field

from rouge_score import rouge_scorer, tokenizers

from kdlm.generate.recipe_settings import BLOCKED_WORDS

# Alpaca's longer list adds media a text model cannot produce either.
ALPACA_BLOCKED_WORDS = BLOCKED_WORDS + ("video", "audio", "music", "flowchart", "diagram")


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


class ExactDedup:
    """Remembers normalised texts; `add` returns False for a text already seen."""

    def __init__(self, texts: Iterable[str] = ()):
        self.seen: set[str] = set()
        for text in texts:
            self.add(text)

    def __contains__(self, text: str) -> bool:
        return normalize(text) in self.seen

    def add(self, text: str) -> bool:
        key = normalize(text)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@dataclass
class Novelty:
    novel: bool
    max_score: float
    mean_score: float
    most_similar: dict[str, float] = field(default_factory=dict)  # the 10 closest pool texts and their scores


class RougeNovelty:
    """A pool of texts and the ROUGE-L novelty test against all of them.

    Texts are tokenised once, with rouge-score's own tokenizer (lower case, alphanumeric words, no
    stemming), so that scores equal `RougeScorer(["rougeL"]).score(...)`; the LCS is computed by the
    library's `_score_lcs`, as Alpaca's generator does, to avoid re-tokenising the pool for every candidate.
    """

    def __init__(self, texts: Iterable[str] = (), threshold: float = 0.7):
        self.threshold = threshold
        self.tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self.texts: list[str] = []
        self.tokens: list[list[str]] = []
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.tokens.append(self.tokenizer.tokenize(text))

    def scores(self, text: str) -> list[float]:
        candidate = self.tokenizer.tokenize(text)
        return [rouge_scorer._score_lcs(reference, candidate).fmeasure for reference in self.tokens]

    def check(self, text: str) -> Novelty:
        scores = self.scores(text)
        if not scores:
            return Novelty(True, 0.0, 0.0)
        ranked = sorted(range(len(scores)), key=lambda index: -scores[index])[:10]
        most_similar = {self.texts[index]: round(scores[index], 4) for index in ranked}
        best = max(scores)
        return Novelty(best < self.threshold, best, sum(scores) / len(scores), most_similar)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def instruction_problem(
    text: str,
    *,
    min_words: int = 4,
    max_words: int = 150,
    blocked_words: Iterable[str] = BLOCKED_WORDS,
    truncated: bool = False,
) -> str | None:
    """Why Self-Instruct would drop this instruction, or None to keep it.

    Args:
        text: the instruction, stripped.
        min_words, max_words: kept when min_words <= words <= max_words (Self-Instruct: 4 to 150).
        blocked_words: whole words or phrases, matched case-insensitively.
        truncated: the generation stopped at the length limit, so this item may be cut off.

    Returns:
        One of "empty", "truncated", "too_short", "too_long", "blocked_word", "program", "punctuation_start",
        "non_ascii_start", or None.
    """
    if not text:
        return "empty"
    if truncated:
        return "truncated"
    words = len(text.split())
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    if any(_has_word(text, word) for word in blocked_words):
        return "blocked_word"
    if text.lower().startswith("write a program"):  # the teacher cannot check a program's behaviour
        return "program"
    if text[0] in string.punctuation:
        return "punctuation_start"
    if not text[0].isascii():
        return "non_ascii_start"
    return None


# A compact English stop-word list (function words only), enough to tell an answer that says nothing.
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
    nor not now of off on once only or other our ours ourselves out over own same she should so some such
    than that the their theirs them themselves then there these they this those through to too under until
    up very was we were what when where which while who whom why will with would you your yours yourself
    yourselves ok okay yes""".split()
)


def only_punctuation_and_stop_words(text: str) -> bool:
    """True when the text has no word outside the stop-word list (empty text included)."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return all(word.strip("'") in STOP_WORDS or not word.strip("'") for word in words)


def looks_unanswered(text: str, *, max_words: int = 80, markers: Iterable[str] = ("sorry",)) -> bool:
    """WizardLM's difficulty signal: an apology ("sorry") in an answer shorter than `max_words` words."""
    lowered = text.lower()
    return len(text.split()) < max_words and any(marker in lowered for marker in markers)
