"""Chain-of-thought distillation: the teacher writes rationales, filters keep the right ones, and the
student learns them in one of the published formats (shared/METHODS.md §8.5-§8.8, §8.10).

Steps of `kdlm generate configs/cot.yaml` (a `recipe:` section with `name: cot`):

1. Load a labelled task (kdlm.recipes.tasks); hold out `heldout` questions for evaluation; take
   `demonstrations` worked examples for few-shot prompts.
2. Rationales: the teacher answers every training question `sampling.n` times (SCoTD's many samples,
   Fine-tune-CoT's diverse reasoning) under a zero-shot prompt or a few-shot one (worked examples as
   earlier turns). With `rationales: dataset` the data set's worked solutions stand in for the teacher
   and nothing is sent.
3. Answers. `two_stage: always` (the default) is Fine-tune-CoT's Zero-shot-CoT (Kojima et al.; the
   reasoning-teacher code's `zs_cot` steps 1 and 2): the first call elicits the reasoning with "Let's
   think step by step." alone, and a second call, given that reasoning, asks for the answer, which is
   read from its reply (the answer a rationale states is the fallback when that reply has none).
   `missing` asks the first call to end on an `Answer:` line and makes the second call only for the
   rationales that state no answer; `off` never does (kdlm.final_answer parses the rationale).
4. Filter: `gold` keeps rationales whose answer equals the gold label (Fine-tune-CoT, MT-CoT's COTE);
   `majority` keeps those that agree with the majority answer, at least `min_agreement` of the samples
   (self-consistency, for unlabelled data); `none` keeps all (SCoTD's default, DSS `label_type llm`).
   `rationalize` asks the teacher to explain the gold answer for questions with no correct sample and
   keeps its explanation when it reaches that answer (MT-CoT's CROP).
5. Format (JSONL records, one per kept rationale plus, in the two-task formats, one label record per
   question; `kdlm distill` trains on them):
   - `finetune_cot`: question -> "rationale --> answer END" (the student must learn to stop);
   - `step_by_step`: "[label] question" -> answer (task "label", weight `label_weight`) for every
     question with a label, and "[rationale] question" -> rationale (task "rationale", weight
     `rationale_weight`) for each kept rationale; `kdlm distill` trains label_weight * mean CE(label)
     + rationale_weight * mean CE(rationale) per step (kdlm.train.tasks), the reference's
     a * label + (1 - a) * rationale with a = 0.5. Only the label task runs at inference;
   - `mt_cot`: "[answer] question" -> answer and "[explain] question" -> "rationale --> answer END",
     tasks "answer" and "explain", weighted and averaged per task in the same way;
   - `label_only`: question -> answer (the fine-tuning baseline; no teacher needed).
   Held-out questions go to OUTPUT.heldout.jsonl as prompts in the same format, gold under `meta`.

Every teacher request goes through the generation engine with one SQLite cache for all stages, so a
rerun after a kill sends only what is missing.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from kdlm.atomic import write_jsonl
from kdlm.config import _format_errors
from kdlm.errors import KdlmError
from kdlm.final_answer import ANSWER_MARKERS, END_MARKER, END_SPLIT, extract_answer, majority_vote
from kdlm.generate.recipe_settings import CotSettings
from kdlm.recipes.tasks import load_task_counted

console = Console(stderr=True)

# Zero-shot-CoT's trigger (Kojima et al., arXiv 2205.11916), the first stage of Fine-tune-CoT; our wording
# of a cue that also fixes where the answer goes (two_stage: missing / off, few-shot), and of the second stage.
KOJIMA_CUE = "Let's think step by step."
STEP_CUE = "Work through it one step at a time, then write the result on a last line as 'Answer: <answer>'."
FINAL_ANSWER_CUE = "So what is your final answer? Reply with the answer only, as 'Answer: <answer>'."
RATIONALIZE = (
    "{question}\n\nThe correct answer is {answer}. Explain step by step how to reach it, "
    "then write 'Answer: {answer}' on a last line."
)
ARROW = " --> "


def parse_recipe(tree: dict | CotSettings, source: str = "recipe") -> CotSettings:
    """The settings of a `recipe:` section given as a mapping (a validated one is returned as it is)."""
    try:
        return CotSettings.model_validate(tree)
    except ValidationError as error:
        raise KdlmError(_format_errors(error, source).replace("invalid config", "invalid recipe").replace("\n  ", "\n  recipe.")) from None


# ---- prompts ---------------------------------------------------------------------------------------


def zero_shot_messages(question: str, cue: str = STEP_CUE) -> list[dict]:
    """The question and a cue: KOJIMA_CUE (two_stage always) or STEP_CUE, which asks for an Answer: line."""
    return [{"role": "user", "content": f"{question}\n\n{cue}"}]


def few_shot_messages(question: str, demonstrations: list[dict], cue: str = STEP_CUE) -> list[dict]:
    """Worked examples as earlier turns, each answered in the form asked of the teacher."""
    messages = []
    for demo in demonstrations:
        messages.append({"role": "user", "content": f"{demo['question']}\n\n{cue}"})
        messages.append({"role": "assistant", "content": f"{demo['rationale']}\nAnswer: {demo['answer']}"})
    return messages + zero_shot_messages(question, cue)


def final_answer_messages(messages: list[dict], rationale: str) -> list[dict]:
    """Fine-tune-CoT's second stage: the first prompt, the teacher's rationale, and a cue for the answer."""
    return [*messages, {"role": "assistant", "content": rationale}, {"role": "user", "content": FINAL_ANSWER_CUE}]


def rationalize_messages(question: str, answer: str) -> list[dict]:
    """Rationalisation prompting (MT-CoT's RP): explain a given answer."""
    return [{"role": "user", "content": RATIONALIZE.format(question=question, answer=answer)}]


def split_rationale(text: str) -> str:
    """The reasoning without its answer statement: the text before the last answer marker, stripped."""
    text = END_SPLIT.split(text, maxsplit=1)[0]
    markers = list(ANSWER_MARKERS.finditer(text))
    return (text[: markers[-1].start()] if markers else text).strip()


# ---- selection -------------------------------------------------------------------------------------


def select_rationales(samples: list[dict], gold: str | None, mode: str, min_agreement: float = 0.5,
                     distinct: bool = True) -> tuple[list[dict], dict]:
    """The samples to train on, and what the filter saw.

    Args:
        samples: `{"rationale", "answer"}` per teacher sample of one question (`answer` None: unparseable).
        gold: the gold answer, or None for unlabelled data.
        mode: "gold" (answer == gold), "majority" (answer == the majority answer, with enough agreement;
            the majority answer becomes the label) or "none".

    Returns:
        (kept samples, each with the `label` to train on; info {"vote": Vote, "correct": int}).
    """
    vote = majority_vote([sample["answer"] for sample in samples])
    info = {"vote": vote, "correct": sum(gold is not None and sample["answer"] == gold for sample in samples)}
    if mode == "gold":
        if gold is None:
            raise KdlmError("filter=gold needs gold answers; use filter=majority for unlabelled questions")
        kept = [dict(sample, label=gold) for sample in samples if sample["answer"] == gold]
    elif mode == "majority":
        if vote.answer is None or vote.agreement < min_agreement:
            kept = []
        else:
            kept = [dict(sample, label=vote.answer) for sample in samples if sample["answer"] == vote.answer]
    elif mode == "none":
        kept = [dict(sample, label=sample["answer"]) for sample in samples if sample["answer"] is not None]
    else:
        raise ValueError(f"unknown filter {mode!r}")
    if distinct:
        seen, unique = set(), []
        for sample in kept:
            if sample["rationale"] not in seen:
                seen.add(sample["rationale"])
                unique.append(sample)
        kept = unique
    return kept, info


# ---- student formats -------------------------------------------------------------------------------


def student_prompt(question: str, recipe: CotSettings) -> str:
    """What the student sees at inference."""
    if recipe.format == "step_by_step":
        return recipe.label_prefix + question
    if recipe.format == "mt_cot":
        return "[answer] " + question
    return question


def _task_record(prompt: str, response: str, task: str, weight: float, recipe: CotSettings, meta: dict) -> dict:
    record = {"prompt": prompt, "response": response, "weight": weight, "meta": {**meta, "task": task}}
    if recipe.task_means:  # kdlm distill then averages the loss per task (kdlm.train.tasks)
        record["task"] = task
    return record


def label_record(question: str, label: str, recipe: CotSettings, meta: dict) -> dict:
    """The label task of a multi-task format (step_by_step, mt_cot): one per question, rationale or not."""
    if recipe.format == "step_by_step":
        return _task_record(recipe.label_prefix + question, label, "label", recipe.label_weight, recipe, meta)
    return _task_record("[answer] " + question, label, "answer", recipe.label_weight, recipe, meta)


def format_records(question: str, rationale: str, label: str, recipe: CotSettings, meta: dict) -> list[dict]:
    """Training records of one kept rationale in the recipe's format (for step_by_step and mt_cot, its
    rationale task only: the label task is written once per question, by `label_record`)."""
    chain = f"{rationale}{ARROW}{label} {END_MARKER}"
    if recipe.format == "finetune_cot":
        return [{"prompt": question, "response": chain, "meta": meta}]
    if recipe.format == "label_only":
        return [{"prompt": question, "response": label, "meta": meta}]
    if recipe.format == "step_by_step":
        return [_task_record(recipe.rationale_prefix + question, rationale, "rationale", recipe.rationale_weight, recipe, meta)]
    # mt_cot: the explanation task writes the reasoning, then the answer
    return [_task_record("[explain] " + question, chain, "explain", recipe.rationale_weight, recipe, meta)]


def question_label(gold: str | None, kept: list[dict], recipe: CotSettings) -> str | None:
    """The label task's answer for a question: the gold one under filter=gold, else the most common label of
    the kept rationales (the vote under filter=majority), else the gold one if any."""
    labels = [sample["label"] for sample in kept]
    if recipe.filter == "gold" or not labels:
        return gold
    return Counter(labels).most_common(1)[0][0]


def question_records(example: dict, kept: list[dict], recipe: CotSettings) -> list[dict]:
    """Every training record of one question. Multi-task formats train the label task on every question
    that has a label and the rationale task where a rationale was kept (as the reference trains both
    tasks on every example it has)."""
    meta = {"id": example["id"], "gold": example["answer"]}
    records = []
    if recipe.format in ("step_by_step", "mt_cot"):
        label = question_label(example["answer"], kept, recipe)
        if label is not None:
            source = "gold" if label == example["answer"] else "teacher"
            records.append(label_record(example["question"], label, recipe, {**meta, "source": source}))
    for sample in kept:
        records.extend(format_records(example["question"], sample["rationale"], sample["label"], recipe,
                                      {**meta, "source": sample["source"]}))
    return records


def parse_student_output(text: str, recipe: CotSettings) -> str | None:
    task = recipe.task
    return extract_answer(text, task.answer_type, task.labels, reading="rationale")


# ---- the run ---------------------------------------------------------------------------------------


def _ask(config, name: str, prompts: list[list[dict]], n: int, temperature: float | None = None,
         max_tokens: int | None = None) -> dict:
    """Send `prompts` (n samples each) through the engine; {(prompt index, sample): answer text}."""
    from kdlm.generate import generate

    output = Path(config.output)
    stage = output.with_name(f"{output.stem}.{name}.jsonl")
    prompt_file = output.with_name(f"{output.stem}.{name}.prompts.jsonl")
    write_jsonl(prompt_file, [{"messages": messages} for messages in prompts])
    update = {"n": n} | ({} if temperature is None else {"temperature": temperature})
    sampling = config.sampling.model_copy(update=update | ({} if max_tokens is None else {"max_tokens": max_tokens}))
    stage_config = config.model_copy(update={
        "prompts": str(prompt_file), "output": str(stage), "limit": None, "sampling": sampling,
        "cache": config.cache or str(output.with_suffix(".sqlite")),  # one cache for every stage
    })
    generate(stage_config)
    answers = {}
    for line in stage.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        answers[(record["meta"]["prompt_index"], record["meta"]["sample"])] = record["messages"][-1]["content"]
    return answers


def split_task(examples: list[dict], recipe: CotSettings) -> tuple[list[dict], list[dict], list[dict]]:
    """(demonstrations, training questions, held-out questions), after a seeded shuffle."""
    examples = list(examples)
    random.Random(recipe.seed).shuffle(examples)
    demos: list[dict] = []
    if recipe.rationales == "teacher" and recipe.prompt == "few_shot":
        demos = [example for example in examples if example["rationale"]][: recipe.demonstrations]
        if len(demos) < recipe.demonstrations:
            raise KdlmError(f"few_shot needs {recipe.demonstrations} examples with worked solutions; "
                            f"the task has {len(demos)}")
        examples = [example for example in examples if example not in demos]
    if recipe.heldout >= len(examples):
        raise KdlmError(f"heldout={recipe.heldout} leaves no training questions of {len(examples)}")
    cut = len(examples) - recipe.heldout
    return demos, examples[:cut], examples[cut:]


def teacher_samples(config, recipe: CotSettings, train: list[dict], demos: list[dict], stats: dict) -> dict[int, list[dict]]:
    """Stages 1 and 2: `sampling.n` rationales per question, and each one's answer; {question index: samples}."""
    task = recipe.task
    cue = recipe.cue or (KOJIMA_CUE if recipe.two_stage == "always" else STEP_CUE)
    prompts = [few_shot_messages(example["question"], demos, recipe.cue or STEP_CUE) if recipe.prompt == "few_shot"
               else zero_shot_messages(example["question"], cue) for example in train]
    texts = _ask(config, "rationales", prompts, config.sampling.n)
    samples: dict[int, list[dict]] = {i: [] for i in range(len(train))}
    for (index, _), text in sorted(texts.items()):
        answer = extract_answer(text, task.answer_type, task.labels, reading="rationale")
        samples[index].append({"rationale": split_rationale(text), "answer": answer, "source": "teacher", "text": text})
    every = [(i, k) for i, group in samples.items() for k in range(len(group))]
    ask = {"always": every, "missing": [(i, k) for i, k in every if samples[i][k]["answer"] is None], "off": []}[recipe.two_stage]
    # The second stage: the first prompt, the rationale, and a request for the answer alone; asked once per
    # distinct conversation (samples that wrote the same rationale share it).
    conversations = {(i, k): final_answer_messages(prompts[i], samples[i][k]["text"]) for i, k in ask}
    distinct = list({json.dumps(messages): messages for messages in conversations.values()}.items())
    position = {key: index for index, (key, _) in enumerate(distinct)}
    second = _ask(config, "final-answers", [messages for _, messages in distinct], 1, temperature=0.0,
                  max_tokens=recipe.answer_max_tokens) if distinct else {}
    for (i, k), messages in conversations.items():
        answer = extract_answer(second.get((position[json.dumps(messages)], 0), ""), task.answer_type, task.labels, reading="rationale")
        if answer is not None:  # else keep the answer the rationale stated, if any
            samples[i][k]["answer"] = answer
    stats["answer_calls"] = len(distinct)
    stats["samples"] = len(every)
    stats["unparsed"] = sum(s["answer"] is None for group in samples.values() for s in group)
    return samples


def run(config) -> dict:
    """Run the recipe of a generate config (`config.recipe`); returns counts (also printed)."""
    recipe = config.recipe
    task = recipe.task
    examples, skipped = load_task_counted(task)
    if task.instruction:  # the task's question (LegalBench rows hold only the facts), seen by teacher and student
        examples = [{**example, "question": f"{task.instruction}\n\n{example['question']}"} for example in examples]
    demos, train, heldout = split_task(examples, recipe)
    output = Path(config.output)
    stats = {"questions": len(train), "heldout": len(heldout), "samples": 0, "unparsed": 0, "kept": 0,
             "questions_kept": 0, "rationalized": 0, "answer_calls": 0, "records": 0, "skipped_rows": len(skipped)}
    if skipped:
        console.print(f"cot: {len(skipped)} rows skipped for a missing or unknown label (first: {skipped[0]})", highlight=False)

    unlabelled = sum(example["answer"] is None for example in train)
    if unlabelled and (recipe.filter == "gold" or recipe.format == "label_only"):
        raise KdlmError(f"{unlabelled} training questions have no gold answer: use recipe.filter=majority "
                        "(self-consistency labels them) with a teacher-written format")
    if recipe.format == "label_only":
        samples = {i: [{"rationale": "", "answer": example["answer"], "source": "gold"}] for i, example in enumerate(train)}
    elif recipe.rationales == "dataset":
        missing = [example["id"] for example in train if not example["rationale"]]
        if missing:
            raise KdlmError(f"rationales=dataset: {len(missing)} questions have no worked solution (first id {missing[0]})")
        samples = {i: [{"rationale": split_rationale(example["rationale"]), "answer": example["answer"],
                        "source": "dataset"}] for i, example in enumerate(train)}
    else:
        samples = teacher_samples(config, recipe, train, demos, stats)

    kept: dict[int, list[dict]] = {}
    for index, example in enumerate(train):
        mode = "none" if recipe.format == "label_only" else recipe.filter
        kept[index], _ = select_rationales(samples[index], example["answer"] if mode == "gold" else None, mode,
                                           recipe.min_agreement, recipe.distinct)
    empty = [i for i in range(len(train)) if not kept[i]]
    if recipe.rationales == "teacher" and recipe.filter == "gold" and recipe.rationalize and empty \
            and recipe.format != "label_only":
        texts = _ask(config, "rationalizations", [rationalize_messages(train[i]["question"], train[i]["answer"])
                                                  for i in empty], 1, temperature=0.0)
        for position, i in enumerate(empty):
            text = texts.get((position, 0))
            if text is not None and extract_answer(text, task.answer_type, task.labels, reading="rationale") == train[i]["answer"]:
                kept[i] = [{"rationale": split_rationale(text), "answer": train[i]["answer"], "label": train[i]["answer"],
                            "source": "rationalization"}]
                stats["rationalized"] += 1

    records = [record for index, example in enumerate(train) for record in question_records(example, kept[index], recipe)]
    stats["kept"] = sum(len(group) for group in kept.values())
    stats["questions_kept"] = sum(bool(group) for group in kept.values())
    stats["records"] = len(records)
    if not records or (recipe.format != "label_only" and not stats["kept"]):
        raise KdlmError("no rationale passed the filter: check the teacher's answers in the stage files next to "
                        f"{output}, or loosen recipe.filter")
    write_jsonl(output, records)
    if heldout:
        write_jsonl(output.with_name(f"{output.stem}.heldout.jsonl"), [
            {"prompt": student_prompt(example["question"], recipe), "meta": {"id": example["id"], "gold": example["answer"]}}
            for example in heldout
        ])
    output.with_name(f"{output.stem}.stats.json").write_text(json.dumps(stats, indent=1) + "\n")  # for reports
    console.print(
        f"cot: {stats['questions']} questions, {stats['samples']} teacher samples ({stats['answer_calls']} second-stage answer "
        f"calls, {stats['unparsed']} samples without an answer), "
        f"{stats['kept']} rationales kept for {stats['questions_kept']} questions ({stats['rationalized']} by "
        f"rationalization) -> {stats['records']} records in {output}",
        highlight=False,
    )
    return stats
