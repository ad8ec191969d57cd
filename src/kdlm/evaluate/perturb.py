"""Adversarial perturbations of prompts at three levels, as PromptBench (Zhu et al., 2023) organises them.

- `char`: typos (a neighbouring key on a QWERTY keyboard), swaps of two adjacent letters, deletions;
- `word`: synonym substitution (from a small shipped list), deletion, insertion of a filler word;
- `sentence`: irrelevant or distracting sentences appended (StressTest/CheckList-style and GSM-IC-style
  sentences with numbers that do not matter).

A spec reads `LEVEL:RATE` (all operations of the level) or `LEVEL.OP:RATE` (one operation), e.g.
`char:0.05`, `word.synonym:0.2`, `sentence:1`. The rate is exact, not a probability:
- char: round(rate x letters) letters are edited (digits are never touched, so answers keep their numbers);
- word: round(rate x words made of letters only) words are edited;
- sentence: round(rate x sentences of the prompt) distractors are appended.
Item i under seed s uses `random.Random(s * 1_000_003 + i)` (the suite's sampling convention), so a
perturbed prompt depends on the seed and its index only: not on `limit` or on the other items.

nlpaug was tried and not used: its rate is per word with a ceiling (a rate of 0.1 edited 24.6% of the
letters of a GSM8K question), it draws from the global `random`/numpy state, and its synonym,
insertion and sentence augmenters need WordNet or a language model, which cannot be fetched offline.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kdlm.errors import KdlmError
from kdlm.evaluate.synonyms import DISTRACTORS, FILLERS, SYNONYMS

OPERATIONS = {"char": ("typo", "swap", "delete"), "word": ("synonym", "delete", "insert"), "sentence": ("append",)}
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_WORD = re.compile(r"[A-Za-z]+")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def _neighbours() -> dict[str, str]:
    """Keys next to each letter on a QWERTY keyboard (same row, and the rows above and below)."""
    where = {key: (row, col) for row, keys in enumerate(_ROWS) for col, key in enumerate(keys)}
    out = {}
    for key, (row, col) in where.items():
        out[key] = "".join(k for k, (r, c) in where.items() if k != key and abs(r - row) <= 1 and abs(c - col) <= 1)
    return out


NEIGHBOURS = _neighbours()


@dataclass(frozen=True)
class PerturbSpec:
    level: str
    operations: tuple[str, ...]
    rate: float

    def __str__(self) -> str:
        op = "" if self.operations == OPERATIONS[self.level] else "." + self.operations[0]
        return f"{self.level}{op}:{self.rate:g}"


def parse_spec(text: str, setting: str = "perturb") -> PerturbSpec:
    """`char:0.1`, `word.synonym:0.2`, `sentence:1` -> PerturbSpec; a clear error naming `setting` otherwise."""
    name, sep, rate_text = str(text).strip().partition(":")
    level, _, op = name.partition(".")
    if not sep or level not in OPERATIONS or (op and op not in OPERATIONS[level]):
        choices = ", ".join(f"{lvl}[.{'|'.join(ops)}]" for lvl, ops in OPERATIONS.items())
        raise KdlmError(f"{setting}: {text!r} is not LEVEL[.OP]:RATE with LEVEL[.OP] one of {choices}")
    try:
        rate = float(rate_text)
    except ValueError:
        raise KdlmError(f"{setting}: rate {rate_text!r} in {text!r} is not a number") from None
    if not 0.0 <= rate <= 1.0:
        raise KdlmError(f"{setting}: rate {rate:g} in {text!r} is outside [0, 1]")
    return PerturbSpec(level, (op,) if op else OPERATIONS[level], rate)


def perturb_text(text: str, spec: PerturbSpec, seed: int, index: int = 0) -> tuple[str, int]:
    """(perturbed text, number of edits) of `text` under `spec`, for item `index` under `seed`."""
    rng = random.Random(seed * 1_000_003 + index)
    if spec.level == "char":
        return _perturb_chars(text, spec, rng)
    if spec.level == "word":
        return _perturb_words(text, spec, rng)
    return _append_sentences(text, spec, rng)


def _perturb_chars(text: str, spec: PerturbSpec, rng: random.Random) -> tuple[str, int]:
    letters = [i for i, c in enumerate(text) if c.isascii() and c.isalpha()]
    chosen = set(rng.sample(letters, round(spec.rate * len(letters))))
    chars = list(text)
    for position in sorted(chosen, reverse=True):  # right to left: a deletion does not shift what is left to do
        op = rng.choice(spec.operations)
        right = position + 1
        if op == "swap" and (right in chosen or right >= len(chars) or not chars[right].isalpha()
                             or chars[right].lower() == chars[position].lower()):
            op = "typo"  # a swap needs a different letter to its right that no other edit touches
        if op == "typo":
            replacement = rng.choice(NEIGHBOURS[chars[position].lower()])
            chars[position] = replacement.upper() if chars[position].isupper() else replacement
        elif op == "swap":
            chars[position], chars[right] = chars[right], chars[position]
        else:
            del chars[position]
    return "".join(chars), len(chosen)


def _perturb_words(text: str, spec: PerturbSpec, rng: random.Random) -> tuple[str, int]:
    tokens = re.split(r"(\s+)", text)  # words at even indices, the whitespace between them at odd ones
    words = [i for i in range(0, len(tokens), 2) if _WORD.fullmatch(tokens[i])]
    if spec.operations == ("synonym",):  # only words the list knows can change
        words = [i for i in words if tokens[i].lower() in SYNONYMS]
    count = min(round(spec.rate * len([i for i in range(0, len(tokens), 2) if _WORD.fullmatch(tokens[i])])), len(words))
    for position in sorted(rng.sample(words, count), reverse=True):
        word = tokens[position]
        ops = [op for op in spec.operations if op != "synonym" or word.lower() in SYNONYMS]
        op = rng.choice(ops)
        if op == "synonym":
            synonym = rng.choice(SYNONYMS[word.lower()])
            tokens[position] = synonym.capitalize() if word[0].isupper() else synonym
        elif op == "insert":  # a filler before the word: "how really many"
            tokens[position] = f"{rng.choice(FILLERS)} {word}"
        else:
            tokens[position] = ""
    return re.sub(r"  +", " ", "".join(tokens)).strip(), count


def count_sentences(text: str) -> int:
    return max(1, len(_SENTENCE_END.findall(text.strip())))


def _append_sentences(text: str, spec: PerturbSpec, rng: random.Random) -> tuple[str, int]:
    count = round(spec.rate * count_sentences(text))
    added = rng.sample(DISTRACTORS, min(count, len(DISTRACTORS)))
    return (text.rstrip() + " " + " ".join(added)) if added else text, len(added)
