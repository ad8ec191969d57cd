"""Lion (Jiang et al. 2023, arXiv 2305.12870): adversarial distillation in rounds of three stages.

1. Imitation: the teacher answers every instruction of the Train Pool; those answers are the training
   data (optionally the student is trained on them here, each round, with `kdlm distill`).
2. Discrimination: teacher and student answer the Cache Pool; the teacher, as referee, scores both
   answers from 1 to 10 in both orders of presentation; the scores are averaged over the two orders,
   and an instruction is hard when teacher score - student score >= 1 (`gap`), easy otherwise. A
   review whose scores cannot be read is asked again (`referee_retries`), then left out.
3. Generation: the teacher writes new instructions from hard seeds (same domain and task type, similar
   length and difficulty) and, for diversity, from easy seeds (same domain, rarer), one seed per request
   drawn at random, at temperature 1 and top_p 1, with max_tokens 4x the seed's word count (the reference's
   generate_*_instruction.py). The reference's filters drop a generation that contains the word
   "instruction" (after our own "New instruction:" label, which it may echo, is removed), was cut off by
   the length limit, has three words or fewer, or starts with punctuation or a non-ASCII character; then
   exact duplicates and those with ROUGE-L >= 0.7 against the pools are dropped; the rest join both pools.

After the last round the teacher answers the new instructions too: the output is the Train Pool with
the teacher's answers. The student is any model behind the same engine: an OpenAI-compatible endpoint
(`recipe.student.base_url`) or a local folder (`recipe.student.backend: transformers`).
"""

from __future__ import annotations

import random
import re
import string

from kdlm.atomic import write_jsonl
from kdlm.generate.recipe_settings import Answer, LionSettings
from kdlm.generate.sections import TeacherSection
from kdlm.recipes.calls import Calls, Request, Session, chat_record, user
from kdlm.recipes.evol_instruct import clean_evolution, load_instructions
from kdlm.recipes.filters import ExactDedup, RougeNovelty

REFEREE_SYSTEM = "You are a careful, impartial checker of the quality of answers."


def referee_prompt(question: str, first: str, second: str) -> str:
    return (
        f"A user asked:\n{question}\n\n### Answer 1\n{first}\n\n### Answer 2\n{second}\n\n"
        "Rate each answer from 1 to 10 (higher is better) for helpfulness, relevance, accuracy and level of "
        "detail. First explain your judgement; the order in which the answers are shown must not influence it. "
        "Then end with a last line that holds only the two scores, Answer 1's then Answer 2's, separated by a space."
    )


def create_prompt(seed: str, hard: bool) -> str:
    if hard:
        aim = ("It must belong to the same domain and the same type of task as the given one, with a similar "
               "length and difficulty.")
    else:
        aim = "It must belong to the same domain as the given one but be rarer, with a similar length and difficulty."
    return (f"Take inspiration from the instruction below and write a brand-new instruction. {aim} It must be "
            f"reasonable and answerable by humans. Reply with the new instruction only.\n\n"
            f"Instruction:\n{seed}\n\nNew instruction:")


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores on the review's last non-empty line ("8 6", "8, 6", "8/10 6/10"); None otherwise."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    last = re.sub(r"/\s*10\b", " ", lines[-1])
    numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", last)
    if len(numbers) != 2:
        return None
    first, second = float(numbers[0]), float(numbers[1])
    return (first, second) if all(1 <= score <= 10 for score in (first, second)) else None


def generation_problem(text: str, truncated: bool) -> str | None:
    """Why Lion's post-processing drops a new instruction (already stripped of our label), or None to keep it."""
    if not text:
        return "empty"
    if "instruction" in text.lower():
        return "instruction_word"
    if truncated:
        return "truncated"
    if len(text.split()) <= 3:
        return "too_short"
    if text[0] in string.punctuation:
        return "punctuation_start"
    if not text[0].isascii():
        return "non_ascii_start"
    return None


def creation_sampling(settings: LionSettings, seed: str) -> Answer:
    """The creation request's sampling: max_tokens per word of the seed, at most create.max_tokens."""
    if settings.create_tokens_per_word is None:
        return settings.create
    cap = min(settings.create.max_tokens, settings.create_tokens_per_word * max(1, len(seed.split())))
    return settings.create.model_copy(update={"max_tokens": cap})


def judge(teacher_first: tuple[float, float], student_first: tuple[float, float], gap: float) -> tuple[float, float, bool]:
    """(teacher score, student score, hard) from the two orders' score pairs, each in presentation order."""
    teacher = (teacher_first[0] + student_first[1]) / 2
    student = (teacher_first[1] + student_first[0]) / 2
    return teacher, student, teacher - student >= gap


def discriminate(session: Session, settings: LionSettings, student: Calls, cache_pool: list[str]) -> tuple[list[str], list[str]]:
    teacher = session.teacher
    teacher_answers = teacher.ask([Request(user(text), settings.answer) for text in cache_pool])
    student_answers = student.ask([Request(user(text), settings.answer) for text in cache_pool])
    orders = {}  # (instruction index, order) -> parsed scores; order 0: teacher's answer shown first
    for index, (mine, theirs) in enumerate(zip(teacher_answers, student_answers, strict=True)):
        if mine is None or theirs is None:
            session.count("unjudged_missing_answer")
            continue
        orders[index, 0] = orders[index, 1] = None
    for attempt in range(settings.referee_retries + 1):
        pending = [key for key, scores in orders.items() if scores is None]
        requests = []
        for index, order in pending:
            pair = (teacher_answers[index].text, student_answers[index].text)
            first, second = pair if order == 0 else pair[::-1]
            messages = [{"role": "system", "content": REFEREE_SYSTEM},
                        *user(referee_prompt(cache_pool[index], first, second))]
            requests.append(Request(messages, settings.referee, sample=attempt))
        for key, review in zip(pending, teacher.ask(requests), strict=True):
            orders[key] = parse_scores(review.text) if review else None
            if orders[key] is None:
                session.count("reviews_unparseable")
    hard, easy = [], []
    for index in sorted({index for index, _ in orders}):
        if orders[index, 0] is None or orders[index, 1] is None:
            session.count("unjudged_unparseable")
            continue
        _, _, is_hard = judge(orders[index, 0], orders[index, 1], settings.gap)
        (hard if is_hard else easy).append(cache_pool[index])
    session.count("judged_hard", len(hard))
    session.count("judged_easy", len(easy))
    return hard, easy


def create(session: Session, settings: LionSettings, seeds: list[str], count: int, is_hard: bool,
           novelty: RougeNovelty, exact: ExactDedup, round_index: int) -> list[str]:
    kind = "hard" if is_hard else "easy"
    session.count(f"new_{kind}", 0)
    if not seeds or not count:
        return []
    # One seed per request, drawn at random (seeded: a rerun draws the same); the sample index tells apart
    # requests from the same seed, in this round and others (the same request would otherwise get the cached
    # answer back).
    rng = random.Random(f"lion-create-{settings.seed}-{round_index}-{kind}")
    first = round_index * (settings.new_hard + settings.new_easy) + (0 if is_hard else settings.new_hard)
    drawn = [rng.choice(seeds) for _ in range(count)]
    requests = [Request(user(create_prompt(seed, is_hard)), creation_sampling(settings, seed), sample=first + number)
                for number, seed in enumerate(drawn)]
    kept = []
    for answer in session.teacher.ask(requests):
        text = clean_evolution(answer.text) if answer else ""
        text = re.sub(r"(?i)^new instruction\s*:\s*", "", text).strip()
        problem = generation_problem(text, answer is not None and answer.finish_reason == "length")
        if problem is not None:
            session.count(f"new_{kind}_rejected_{problem}")
        elif text in exact:
            session.count(f"new_{kind}_rejected_duplicate")
        elif not novelty.check(text).novel:
            session.count(f"new_{kind}_rejected_similar")
        else:
            novelty.add(text)
            exact.add(text)
            kept.append(text)
    session.count(f"new_{kind}", len(kept))
    return kept


def imitation(session: Session, settings: LionSettings, train_pool: list[dict]) -> list[dict]:
    answers = session.teacher.ask([Request(user(entry["instruction"]), settings.answer) for entry in train_pool])
    return [chat_record(entry["instruction"], answer.text, {"recipe": "lion", "round": entry["round"],
                                                            "origin": entry["origin"], "teacher": session.config.teacher.model})
            for entry, answer in zip(train_pool, answers, strict=True) if answer is not None]


def train_student(session: Session, settings: LionSettings, rows: list[dict], round_index: int) -> TeacherSection:
    """Train the student on this round's imitation data with `kdlm distill`; a finished round is not redone."""
    from kdlm.config import load_config
    from kdlm.pipeline import distill

    folder = session.output.parent / f"{session.output.stem}-round{round_index}"
    data = folder / "imitation.jsonl"
    if not (folder / "student" / "config.json").is_file() or not (folder / "report.json").is_file():
        write_jsonl(data, rows)
        config = load_config(settings.train_config, [*settings.train_overrides, f"data.train={data}",
                                                     "data.teacher_answers=false", f"train.output_dir={folder}"])
        distill(config)
    return TeacherSection(backend="transformers", model=str(folder / "student"), bf16=False,
                          batch_size=settings.student.batch_size)


def run(session: Session, settings: LionSettings) -> dict:
    start = load_instructions(session)
    train_pool = [{"instruction": text, "round": 0, "origin": "start"} for text in start]
    cache_pool = list(start)
    novelty = RougeNovelty(start, threshold=settings.rouge_threshold)
    exact = ExactDedup(start)
    student = session.calls(settings.student)
    for round_index in range(1, settings.rounds + 1):
        rows = imitation(session, settings, train_pool)
        if settings.train_config:
            student = session.calls(train_student(session, settings, rows, round_index))
        hard, easy = discriminate(session, settings, student, cache_pool)
        new_hard = create(session, settings, hard, settings.new_hard, True, novelty, exact, round_index)
        new_easy = create(session, settings, easy, settings.new_easy, False, novelty, exact, round_index)
        for text, origin in [*((text, "hard") for text in new_hard), *((text, "easy") for text in new_easy)]:
            train_pool.append({"instruction": text, "round": round_index, "origin": origin})
            cache_pool.append(text)
        if settings.cache_pool_max:
            cache_pool = cache_pool[-settings.cache_pool_max:]
        session.count("rounds")
    return session.finish(imitation(session, settings, train_pool), "lion")
