"""Self-Instruct (Wang et al. 2022, arXiv 2212.10560): bootstrap instructions from 175 seed tasks.

1. Each request shows 8 shuffled instructions, 6 seed (human) and 2 machine-written ones, as a numbered
   list, and asks the teacher for the next ones.
   With `classification_only` only the classification seed tasks are shown and make up the pool
   (the reference's `--use_clf_seed_tasks_only`).
2. A generation cut off by the length limit is dropped whole (the reference's post-processing returns
   nothing for it). Every new instruction of the others passes the heuristic filters (4-150 words, no
   blocked word, not a program request, no punctuation or non-ASCII first character), an exact
   duplicate check, and ROUGE-L novelty: max ROUGE-L against every seed and machine instruction < 0.7.
   Kept instructions join the pool at once and feed later prompts.
3. The teacher says, few-shot, whether each instruction is a classification task.
4. Instances: classification tasks are written output-first (the labels, then an input for each, which
   avoids label imbalance), the others input-first. The reference's post-processing
   (prepare_for_finetuning.py): the last instance of a cut-off generation, empty outputs, input ==
   output, an input or output ending in ":" (an incomplete generation) and duplicates are dropped; a
   task two of whose instances share a non-empty input but differ in output loses all its instances;
   at most 5 per task, drawn at random.

Output: one chat record per instance, and OUTPUT.instructions.jsonl with each machine instruction, its 10
most similar pool instructions and its mean similarity. `encoding: templates` (default) lays out the
prompt with one of the reference's encodings drawn at random per instance (e.g. "Task: {instruction}" /
"Input: {input}" / "Output:", or instruction and input separated by blank lines), and, as the reference
does half of the time, drops a lone field name before a colon in the input and single-spaces its blank
lines; `encoding: plain` writes instruction, blank line, input. The output is the assistant's reply.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from kdlm.atomic import write_jsonl
from kdlm.errors import KdlmError
from kdlm.generate.recipe_settings import SelfInstructSettings
from kdlm.recipes.calls import Request, Session, chat_record, user
from kdlm.recipes.filters import ExactDedup, RougeNovelty, instruction_problem

# ---------------------------------------------------------------- prompts (our wording of the recipe)

def generation_prompt(instructions: list[str], classification_only: bool = False) -> str:
    count = len(instructions)
    kind = ("classification tasks: tasks whose answer is one label out of a small, fixed set; name the possible "
            "labels in the instruction where you can") if classification_only else "tasks"
    listing = "\n".join(f"{index}. {text}" for index, text in enumerate(instructions, start=1))
    return (
        f"We are collecting varied {kind} for training a text assistant. Here are {count} of them:\n\n{listing}\n\n"
        f"Continue the list with 8 new ones, numbered {count + 1} to {count + 8}, one instruction per line. "
        "Make them differ from the ones above and from each other in topic and in the kind of work they ask for "
        "(open questions, rewriting, classification, brainstorming, explaining, editing, ...). Each must be "
        "doable with text alone."
    )


def classify_prompt(instruction: str, examples: list[dict]) -> str:
    shots = "\n\n".join(f"Task: {seed['instruction']}\nClassification task: {'Yes' if seed['is_classification'] else 'No'}"
                        for seed in examples)
    return (
        "Is the task a classification task, one whose answer is a label from a small, fixed set (yes/no, a "
        "sentiment, a category, one of given options) rather than free text? Answer Yes or No.\n\n"
        f"{shots}\n\nTask: {instruction}\nClassification task:"
    )


def _format_instances(seed: dict, output_first: bool) -> str:
    lines = [f"Task: {seed['instruction']}"]
    for number, instance in enumerate(seed["instances"], start=1):
        if output_first:
            lines += [f"Class label: {instance['output']}", f"Input: {instance['input']}".rstrip()]
        else:
            lines += [f"Example {number}", f"Input: {instance['input']}".rstrip(), f"Output: {instance['output']}"]
    return "\n".join(lines)


def instance_prompt(instruction: str, examples: list[dict], output_first: bool, limit: int) -> str:
    shots = "\n\n".join(_format_instances(seed, output_first) for seed in examples)
    if output_first:
        how = ("The task is a classification task. Write its possible class labels, and for each label an input "
               "that belongs to it: a \"Class label:\" line followed by an \"Input:\" line. Leave the input empty when "
               f"the task needs none. At most {limit} labels.")
    else:
        how = ("Write examples of the task, numbered \"Example 1\", \"Example 2\", ..., each with an \"Input:\" line "
               "and an \"Output:\" line that correctly answers it. Leave the input empty when the task needs none. "
               f"At most {limit} examples.")
    return f"{how}\n\n{shots}\n\nTask: {instruction}"


# ---------------------------------------------------------------- parsers

_ITEM = re.compile(r"(?m)^[ \t]*\d{1,3}[ \t]*[.)][ \t]*")


def parse_instructions(text: str, truncated: bool = False) -> list[tuple[str, bool]]:
    """The numbered items of a generation, as (instruction, cut off); text before the first number is dropped.

    An item ends at the next number or at a blank line (Self-Instruct stops generating at a blank line, so
    what a chat model writes after one is commentary, not the instruction). When the generation hit the
    length limit, the last item may be incomplete and is marked so.
    """
    pieces = _ITEM.split(text)[1:]
    items = [" ".join(re.split(r"\n[ \t]*\n", piece, maxsplit=1)[0].split()) for piece in pieces]
    items = [item for item in items if item]
    return [(item, truncated and index == len(items) - 1) for index, item in enumerate(items)]


def parse_yes_no(text: str) -> bool | None:
    """Yes -> True, No -> False, from the answer's first word (after a label the model may echo, such as
    "Classification task:"); anything else -> None."""
    match = re.match(r"\W*(?:(?:classification\s+)?task\s*:|answer\s*:)?\W*(yes|no)\b", text, flags=re.IGNORECASE)
    return None if match is None else match.group(1).lower() == "yes"


_NONE = {"", "none", "<none>", "n/a", "null", "(none)", "<noinput>", "no input", "empty"}


def _clean_input(text: str) -> str:
    text = text.strip()
    return "" if text.lower().strip(" .") in _NONE else text


def parse_instances_input_first(text: str) -> list[dict]:
    """`Example N / Input: ... / Output: ...` blocks -> [{input, output}]; blocks without an output are skipped."""
    blocks = re.split(r"(?im)^[ \t]*(?:#+[ \t]*)?Example[ \t]*\d+[ \t]*[:.]?", text)
    if len(blocks) == 1:  # a single example written without its header
        blocks = ["", text]
    instances = []
    for block in blocks[1:]:
        parts = re.split(r"(?i)Output[ \t]*\d*[ \t]*:", block, maxsplit=1)
        if len(parts) < 2:
            continue
        raw_input = re.sub(r"(?i)^\s*Input[ \t]*\d*[ \t]*:", "", parts[0])
        instances.append({"input": _clean_input(raw_input), "output": parts[1].strip()})
    return instances


def parse_instances_output_first(text: str) -> list[dict]:
    """`Class label: ... / Input: ...` blocks -> [{input, output}] with the label as the output."""
    instances = []
    for block in re.split(r"(?i)Class[ \t]*label[ \t]*:", text)[1:]:
        parts = re.split(r"(?i)Input[ \t]*\d*[ \t]*:", block, maxsplit=1)
        label = parts[0].strip()
        instances.append({"input": _clean_input(parts[1]) if len(parts) > 1 else "", "output": label})
    return instances


def parse_instances(text: str, output_first: bool, truncated: bool = False) -> list[dict]:
    """Instances in either format; when the generation hit the length limit, the last one may be cut off
    and is dropped (as Self-Instruct does with the last instruction of a cut generation)."""
    instances = (parse_instances_output_first if output_first else parse_instances_input_first)(text)
    return instances[:-1] if truncated else instances


_LEFTOVER = re.compile(r"(?i)\b(?:input|output|class[ \t]*label)[ \t]*\d*[ \t]*:")


def clean_instances(instances: list[dict], limit: int, rng: random.Random | None = None) -> list[dict]:
    """The reference's instance post-processing, then at most `limit` instances.

    Dropped: empty outputs, input == output, an input or output ending in ":" (an incomplete generation),
    fields that still hold another field's marker (a malformed block, e.g. "Output: ... Output: ..."),
    and duplicates. If two of the remaining instances share a non-empty input but differ in output, the
    task's instances are all dropped (which one is right cannot be told). `limit` are drawn with `rng`
    (the reference samples them at random), or the first ones without it.
    """
    kept, seen = [], set()
    for instance in instances:
        key = (" ".join(instance["input"].split()), " ".join(instance["output"].split()))
        if not key[1] or key[0] == key[1] or key in seen or _LEFTOVER.search(key[0] + " " + key[1]) \
                or key[0].endswith(":") or key[1].endswith(":"):
            continue
        seen.add(key)
        kept.append(instance)
    outputs: dict[str, str] = {}
    for instance in kept:
        text, output = " ".join(instance["input"].split()), " ".join(instance["output"].split())
        if text and outputs.setdefault(text, output) != output:
            return []
    return rng.sample(kept, min(limit, len(kept))) if rng is not None else kept[:limit]


# The reference's encodings of an instance for fine-tuning (prepare_for_finetuning.py), as (prompt layout)
# with {instruction} and {input}; the output is the response. Its completions start with a space and end
# with <|endoftext|>: in a chat record the template writes the turn's end instead.
TEMPLATES_WITH_INPUT = ("{instruction}\nInput: {input}\nOutput:", "{instruction}\n\nInput: {input}\n\nOutput:",
                        "Task: {instruction}\nInput: {input}\nOutput:", "{instruction}\n\n{input}\n\nOutput:",
                        "{instruction}\n\n{input}", "{instruction}\n{input}", "Task: {instruction}\n\n{input}")
TEMPLATES_WITHOUT_INPUT = ("{instruction} Output:", "{instruction}\nOutput:", "{instruction}\n\nOutput:",
                           "{instruction}", "Task: {instruction}")


def encode_prompt(instruction: str, text: str, rng: random.Random | None) -> str:
    """The user turn of an instance: a reference encoding drawn with `rng`, or instruction + blank line + input
    without it. With `rng`, half of the inputs lose a lone field name before a colon ("Sentence: ...") and
    have blank lines single-spaced, as the reference prepares them."""
    instruction, text = instruction.strip(), text.strip()
    if rng is None:
        return instruction + (f"\n\n{text}" if text else "")
    if rng.random() < 0.5:
        if len(set(re.findall(r"(\w+):", text))) == 1:
            text = text.split(":", 1)[1].strip()
        text = text.replace("\n\n", "\n")
    layouts = TEMPLATES_WITH_INPUT if text else TEMPLATES_WITHOUT_INPUT
    return rng.choice(layouts).format(instruction=instruction, input=text)


# ---------------------------------------------------------------- the recipe

def load_seed_tasks(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise KdlmError(f"seed tasks not found: {path} (set recipe.seed_tasks to the JSONL of seed tasks)")
    tasks = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
            assert isinstance(task["instruction"], str) and task["instruction"].strip()
            assert isinstance(task.get("instances", []), list)
            task.setdefault("instances", [])
            task.setdefault("is_classification", False)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise KdlmError(f"{path}:{number}: a seed task needs a non-empty \"instruction\" and a list of "
                            "\"instances\" ({\"input\", \"output\"})") from None
        tasks.append(task)
    if not tasks:
        raise KdlmError(f"{path}: no seed tasks")
    return tasks


def grow_pool(session: Session, settings: SelfInstructSettings, seeds: list[dict], rng: random.Random) -> list[dict]:
    """Steps 1-2: rounds of generation requests until `num_instructions` machine instructions pass the filters."""
    seed_texts = [task["instruction"] for task in seeds if task["is_classification"] or not settings.classification_only]
    if not seed_texts:
        raise KdlmError(f"recipe.classification_only: {settings.seed_tasks} has no seed task with \"is_classification\": true")
    novelty = RougeNovelty(seed_texts, threshold=settings.rouge_threshold)
    exact = ExactDedup(seed_texts)
    machine: list[dict] = []
    for round_index in range(settings.max_rounds):
        if len(machine) >= settings.num_instructions:
            break
        requests = []
        for _ in range(settings.requests_per_round):
            shown = [entry["instruction"] for entry in rng.sample(machine, min(settings.machine_examples, len(machine)))]
            shown += rng.sample(seed_texts, min(len(seed_texts), settings.human_examples + settings.machine_examples - len(shown)))
            rng.shuffle(shown)
            requests.append(Request(user(generation_prompt(shown, settings.classification_only)), settings.generation,
                                    sample=round_index))
        for answer in session.teacher.ask(requests):
            if answer is None:
                continue
            if answer.finish_reason == "length":  # the reference drops a cut-off generation whole
                session.count("generations_truncated")
                continue
            items = parse_instructions(answer.text)
            if not items:
                session.count("generations_unparseable")
            for text, cut in items:
                problem = instruction_problem(text, min_words=settings.min_words, max_words=settings.max_words,
                                              blocked_words=settings.blocked_words, truncated=cut)
                if problem is None and text in exact:
                    problem = "duplicate"
                check = None
                if problem is None:
                    check = novelty.check(text)
                    if not check.novel:
                        problem = "similar"
                if problem is not None:
                    session.count(f"rejected_{problem}")
                    continue
                novelty.add(text)
                exact.add(text)
                machine.append({"instruction": text, "most_similar_instructions": check.most_similar,
                                "avg_similarity_score": round(check.mean_score, 4)})
        session.count("rounds")
    return machine[: settings.num_instructions]


def run(session: Session, settings: SelfInstructSettings) -> dict:
    seeds = load_seed_tasks(settings.seed_tasks)
    rng = random.Random(settings.seed)
    machine = grow_pool(session, settings, seeds, rng)
    if len(machine) < settings.num_instructions:
        session.count("short_of_target", settings.num_instructions - len(machine))

    # Step 3: classification or not, few-shot from labelled seeds (half of each kind where possible).
    labelled = {flag: [task for task in seeds if task["is_classification"] == flag] for flag in (True, False)}
    shots = (rng.sample(labelled[True], min(len(labelled[True]), settings.classify_examples // 2))
             + rng.sample(labelled[False], min(len(labelled[False]), settings.classify_examples - settings.classify_examples // 2)))
    rng.shuffle(shots)
    answers = session.teacher.ask([Request(user(classify_prompt(entry["instruction"], shots)), settings.classify)
                                   for entry in machine])
    for entry, answer in zip(machine, answers, strict=True):
        entry["is_classification"] = None if answer is None else parse_yes_no(answer.text)
        if entry["is_classification"] is None:
            session.count("classification_unparseable")  # such tasks get input-first instances
        else:
            session.count("classification_tasks" if entry["is_classification"] else "other_tasks")

    # Step 4: instances, output-first for classification tasks.
    with_instances = {flag: [task for task in seeds if task["instances"] and task["is_classification"] == flag]
                      for flag in (True, False)}
    requests = []
    for entry in machine:
        output_first = bool(entry["is_classification"])
        pool = with_instances[output_first]
        examples = rng.sample(pool, min(len(pool), settings.instance_examples))
        requests.append(Request(user(instance_prompt(entry["instruction"], examples, output_first,
                                                     settings.instances_per_task)), settings.instances))
    rows = []
    for index, (entry, answer) in enumerate(zip(machine, session.teacher.ask(requests), strict=True)):
        found = parse_instances(answer.text, bool(entry["is_classification"]), answer.finish_reason == "length") if answer else []
        entry["instances"] = clean_instances(found, settings.instances_per_task, rng)
        if not entry["instances"]:
            session.count("tasks_without_instances")
        for instance in entry["instances"]:
            prompt = encode_prompt(entry["instruction"], instance["input"], rng if settings.encoding == "templates" else None)
            rows.append(chat_record(prompt, instance["output"], {
                "recipe": "self_instruct", "instruction_index": index, "is_classification": entry["is_classification"],
                "teacher": session.config.teacher.model}))
    write_jsonl(session.output.with_suffix(".instructions.jsonl"), machine)
    session.count("instructions", len(machine))
    return session.finish(rows, "self_instruct")
