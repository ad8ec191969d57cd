"""Evol-Instruct (WizardLM, Xu et al. 2023, arXiv 2304.12244): make instructions harder, round after round.

In each of `rounds` rounds every instruction of the pool gets one operation drawn at random: an
in-depth rewrite (add a constraint, deepen, concretize, ask for more reasoning steps, complicate the
input; each may add only 10 to 20 words) or an in-breadth mutation (a new, rarer prompt of the same
domain). The teacher evolves it, then the eliminator checks the evolution:

1. no information gain: the teacher, asked whether the two instructions are equal, says they are;
2. hard to answer: the teacher's answer contains "sorry" and is shorter than 80 words;
3. the answer is only punctuation and stop words;
4. the evolved instruction copies the template's own wording ("#Rewritten Prompt#", "given prompt", ...).

An evolution that passes replaces its instruction in the pool and goes, with its answer, to the output;
one that fails leaves the instruction in the pool unchanged, to be evolved again next round.
"""

from __future__ import annotations

import random
import re

from kdlm.data import load_records
from kdlm.errors import KdlmError
from kdlm.generate.recipe_settings import DEPTH_OPERATIONS, EvolInstructSettings
from kdlm.recipes.calls import Request, Session, chat_record, user
from kdlm.recipes.filters import looks_unanswered, only_punctuation_and_stop_words

# Template wording an evolved instruction must not copy (eliminator rule 4).
TEMPLATE_MARKERS = ("#the prompt#", "#rewritten prompt#", "#created prompt#", "rewritten prompt", "given prompt",
                    "created prompt", "original prompt")


def _forbidden() -> str:
    return "Never write the phrases '#The Prompt#', '#Rewritten Prompt#', 'given prompt' or 'rewritten prompt' in your reply."


def evolve_prompt(instruction: str, operation: str) -> str:
    if operation == "breadth":
        return (
            "Take inspiration from the prompt below and write a brand-new prompt. It should belong to the same "
            "domain but be rarer, have a similar length and complexity, and be reasonable and answerable by "
            f"humans. {_forbidden()} Reply with the new prompt only.\n\n#The Prompt#:\n{instruction}\n\n#Created Prompt#:"
        )
    return (
        "Rewrite the prompt below into a harder version that well-known AI assistants (ChatGPT, GPT-4) find more "
        "challenging, while it stays reasonable and can be understood and answered by humans. Keep any non-text "
        f"part of it (tables, code) and any input it has. {DEPTH_OPERATIONS[operation]} Add no more than 10 to 20 "
        f"words. {_forbidden()} Reply with the rewritten prompt only.\n\n#The Prompt#:\n{instruction}\n\n#Rewritten Prompt#:"
    )


def equality_prompt(first: str, second: str) -> str:
    return (
        "Are these two instructions equal: the same constraints and requirements, and the same depth and breadth "
        "of inquiry? Answer Equal or Not Equal.\n\n"
        f"First instruction:\n{first}\n\nSecond instruction:\n{second}"
    )


def parse_equal(text: str) -> bool | None:
    """'Equal' -> True, 'Not equal' -> False (first words, any case); anything else -> None."""
    match = re.match(r"\W*(not[\s_-]*equal|unequal|equal)\b", text, flags=re.IGNORECASE)
    return None if match is None else match.group(1).lower() == "equal"


def clean_evolution(text: str) -> str:
    """The evolved instruction: stripped of blank edges and of quotes around the whole of it."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def elimination_reason(evolved: str, answer: str | None, equal: bool | None, sorry_max_words: int = 80) -> str | None:
    """Why the eliminator rejects an evolution, or None when it passes.

    Args:
        evolved: the evolved instruction (cleaned).
        answer: the teacher's answer to it (None when not asked yet: only the instruction's own rules run).
        equal: the teacher's verdict on original vs evolved (None when not asked or unparseable).
    """
    if not evolved:
        return "empty"
    lowered = evolved.lower()
    if any(marker in lowered for marker in TEMPLATE_MARKERS):
        return "copied_template"
    if equal is True:
        return "no_information_gain"
    if answer is None:
        return None
    if looks_unanswered(answer, max_words=sorry_max_words):
        return "hard_to_answer"
    if only_punctuation_and_stop_words(answer):
        return "stop_words_only"
    return None


def load_instructions(session: Session) -> list[str]:
    config = session.config
    records = load_records(config.prompts, split=config.split)[: config.limit or None]
    instructions = []
    for index, record in enumerate(records, start=1):
        users = [message["content"] for message in record.get("messages", []) if message["role"] == "user"]
        if not users or not users[0].strip():
            raise KdlmError(f"{config.prompts}: record {index} has no user prompt to evolve")
        instructions.append(users[0].strip())
    if not instructions:
        raise KdlmError(f"{config.prompts}: no instructions to evolve")
    return instructions


def run(session: Session, settings: EvolInstructSettings) -> dict:
    teacher, model = session.teacher, session.config.teacher.model
    rng = random.Random(settings.seed)
    pool = [{"instruction": text, "source": index, "evolutions": 0} for index, text in enumerate(load_instructions(session))]
    rows = []
    if settings.include_original:
        answers = teacher.ask([Request(user(entry["instruction"]), settings.answer) for entry in pool])
        for entry, answer in zip(pool, answers, strict=True):
            if answer is not None:
                rows.append(chat_record(entry["instruction"], answer.text, {
                    "recipe": "evol_instruct", "round": 0, "source": entry["source"], "teacher": model}))

    for round_index in range(1, settings.rounds + 1):
        operations = [rng.choice(settings.operations) for _ in pool]
        # sample=round: an instruction that failed is evolved afresh next round, not answered from the cache.
        evolved = teacher.ask([Request(user(evolve_prompt(entry["instruction"], operation)), settings.evolve,
                                       sample=round_index) for entry, operation in zip(pool, operations, strict=True)])
        candidates = [clean_evolution(answer.text) if answer else "" for answer in evolved]
        # Cheap rules first, so that no judge or answer request is paid for an evolution that already failed.
        alive = [index for index, text in enumerate(candidates) if elimination_reason(text, None, None) is None]
        for index in set(range(len(pool))) - set(alive):
            session.count(f"eliminated_{elimination_reason(candidates[index], None, None)}")
        verdicts = teacher.ask([Request(user(equality_prompt(pool[index]["instruction"], candidates[index])), settings.judge)
                                for index in alive])
        equal = {index: (parse_equal(verdict.text) if verdict else None) for index, verdict in zip(alive, verdicts, strict=True)}
        # An unreadable verdict counts as a failure: the instruction stays in the pool and is tried again.
        session.count("eliminated_judge_unparseable", sum(verdict is None for verdict in equal.values()))
        session.count("eliminated_no_information_gain", sum(verdict is True for verdict in equal.values()))
        alive = [index for index in alive if equal[index] is False]
        answers = teacher.ask([Request(user(candidates[index]), settings.answer) for index in alive])
        for index, answer in zip(alive, answers, strict=True):
            entry = pool[index]
            reason = elimination_reason(candidates[index], answer.text if answer else "", False, settings.sorry_max_words)
            if reason is not None:
                session.count(f"eliminated_{reason}")
                continue
            entry["instruction"], entry["evolutions"] = candidates[index], entry["evolutions"] + 1
            session.count(f"evolved_{operations[index]}")
            rows.append(chat_record(entry["instruction"], answer.text, {
                "recipe": "evol_instruct", "round": round_index, "source": entry["source"],
                "operation": operations[index], "evolutions": entry["evolutions"], "teacher": model}))
    return session.finish(rows, "evol_instruct")
