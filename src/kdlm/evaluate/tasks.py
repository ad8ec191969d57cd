"""Evaluation tasks read from the data files beside the checkout (../shared/data, or $KDLM_DATA).

Three kinds:
- `rouge`: prompts with human references, scored by ROUGE-L on sampled answers
  (`selfinst`: the 252 user-oriented Self-Instruct instructions; `rouge:PATH` any JSONL of
  prompt/reference; `selfinst-seed`: the 175 Self-Instruct seed tasks);
- `accuracy`: labelled questions, scored by exact match after answer extraction, zero-shot and
  k-shot (`gsm8k`, `svamp`, `pubmedqa`, `legalbench` = its three Yes/No tasks, or one of them as
  `legalbench-hearsay`, `legalbench-proa`, `legalbench-personal_jurisdiction`);
- `perplexity`: plain text (`wikitext-2`, `tinyshakespeare`, `ppl:PATH`).

k-shot exemplars come from a pool disjoint from the evaluated items: the first `EXEMPLAR_POOL`
records of gsm8k, svamp and pubmedqa (items are taken after them), LegalBench's train.tsv.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdlm.errors import KdlmError

EXEMPLAR_POOL = 50
LEGALBENCH = {
    "hearsay": "Is this evidence hearsay (an out-of-court statement offered to prove the truth of what it asserts)?",
    "proa": "Does this statute create a private right of action?",
    "personal_jurisdiction": "Does the court in which the plaintiff sued have personal jurisdiction over the defendant?",
}
ACCURACY_TASKS = ("gsm8k", "svamp", "pubmedqa", *(f"legalbench-{name}" for name in LEGALBENCH))
ROUGE_TASKS = ("selfinst", "selfinst-seed")
PERPLEXITY_TASKS = {"wikitext-2": "wikitext-2/valid.txt", "tinyshakespeare": "tinyshakespeare/input.txt"}
MATH_SUFFIX = 'Solve the problem step by step, then finish with "The answer is N." where N is a number.'
LABEL_SUFFIX = 'Finish with "The answer is {labels}."'


@dataclass
class Item:
    prompt: str  # the question alone (few-shot examples are added by `build_prompt`)
    reference: str | float | list[str]
    demonstration: str = ""  # the worked answer, when this item serves as a k-shot example


@dataclass
class Task:
    name: str
    kind: str  # rouge | accuracy | perplexity
    items: list[Item] = field(default_factory=list)
    exemplars: list[Item] = field(default_factory=list)
    answer_kind: str = ""  # number | label
    labels: list[str] = field(default_factory=list)
    instruction: str = ""
    text: str = ""  # perplexity tasks


def data_root() -> Path:
    """$KDLM_DATA, else ../shared/data from the working directory, else beside the checkout."""
    if os.environ.get("KDLM_DATA"):
        return Path(os.environ["KDLM_DATA"])
    for candidate in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[4] / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def _file(relative: str) -> Path:
    path = data_root() / relative
    if not path.is_file():
        raise KdlmError(f"data file not found: {path}; set KDLM_DATA to the folder that holds {relative.split('/')[0]}/")
    return path


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KdlmError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise KdlmError(f"{path}:{number}: a record must be a JSON object")
        rows.append(row)
    return rows


def self_instruct_items(path: Path) -> list[Item]:
    """Self-Instruct records (instruction, instances[{input, output}]) -> one item per instance."""
    return [item for row in _jsonl(path) for item in _self_instruct_row(row)]


def _self_instruct_row(row: dict) -> list[Item]:
    return [
        Item(prompt=row["instruction"] + (f"\n\n{i['input']}" if i.get("input") else ""), reference=i["output"])
        for i in row["instances"]
    ]


def reference_items(path: Path) -> list[Item]:
    """A JSONL of prompt/reference (also prompt/response, instruction/input/output, Self-Instruct)."""
    items = []
    for number, row in enumerate(_jsonl(path), 1):
        if "instances" in row and "instruction" in row:
            items += _self_instruct_row(row)
            continue
        if "prompt" in row:
            prompt = row["prompt"]
        elif "instruction" in row:
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        else:
            raise KdlmError(f"{path}:{number}: needs `prompt` (or `instruction`) and `reference` (or `response`/`output`)")
        reference = row.get("reference", row.get("response", row.get("output")))
        if not isinstance(prompt, str) or not (isinstance(reference, str) or isinstance(reference, list)):
            raise KdlmError(f"{path}:{number}: `prompt` must be a string and `reference` a string or a list of strings")
        items.append(Item(prompt=prompt, reference=reference))
    if not items:
        raise KdlmError(f"{path}: no records")
    return items


def _gsm8k() -> Task:
    items = []
    for row in _jsonl(_file("gsm8k/train.jsonl")):
        solution, _, final = row["answer"].rpartition("####")
        solution = re.sub(r"<<[^>]*>>", "", solution).strip()
        answer = float(final.strip().replace(",", ""))
        items.append(Item(prompt=row["question"], reference=answer, demonstration=f"{solution}\nThe answer is {final.strip()}."))
    return Task("gsm8k", "accuracy", items[EXEMPLAR_POOL:], items[:EXEMPLAR_POOL], "number", instruction=MATH_SUFFIX)


def _svamp() -> Task:
    items = []
    for row in json.loads(_file("svamp/SVAMP.json").read_text()):
        answer = float(row["Answer"])
        shown = f"{answer:g}"
        body = row["Body"].rstrip(" .") + ". " + row["Question"]
        items.append(Item(prompt=body, reference=answer, demonstration=f"{row['Equation'].strip()} = {shown}\nThe answer is {shown}."))
    return Task("svamp", "accuracy", items[EXEMPLAR_POOL:], items[:EXEMPLAR_POOL], "number", instruction=MATH_SUFFIX)


def _pubmedqa(context_chars: int = 1200) -> Task:
    items = []
    for row in json.loads(_file("pubmedqa/pqal_train_dev.json").read_text()).values():
        context = " ".join(row["CONTEXTS"])[:context_chars]
        prompt = f"Context: {context}\n\nQuestion: {row['QUESTION']}"
        answer = row["final_decision"]
        items.append(Item(prompt=prompt, reference=answer, demonstration=f"{row['LONG_ANSWER']}\nThe answer is {answer}."))
    labels = ["yes", "no", "maybe"]
    instruction = "Answer the research question with yes, no or maybe. " + LABEL_SUFFIX.format(labels="yes/no/maybe")
    return Task("pubmedqa", "accuracy", items[EXEMPLAR_POOL:], items[:EXEMPLAR_POOL], "label", labels, instruction)


def _legalbench(name: str) -> Task:
    def read(split: str) -> list[Item]:
        with _file(f"legalbench/{name}/{split}.tsv").open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        return [Item(prompt=row["text"].strip(), reference=row["label"].strip(), demonstration=f"The answer is {row['label'].strip()}.") for row in rows]

    instruction = LEGALBENCH[name] + " Answer Yes or No. " + LABEL_SUFFIX.format(labels="Yes/No")
    return Task(f"legalbench-{name}", "accuracy", read("test"), read("train"), "label", ["Yes", "No"], instruction)


def load_task(spec: str) -> list[Task]:
    """Tasks named by `spec` (see the module docstring); `legalbench` expands to three tasks."""
    if spec == "selfinst":
        return [Task("selfinst", "rouge", self_instruct_items(_file("self-instruct-user-eval/user_oriented_instructions.jsonl")))]
    if spec == "selfinst-seed":  # the 175 seed tasks: the in-distribution side of the selfinst-seed->selfinst pair
        return [Task("selfinst-seed", "rouge", self_instruct_items(_file("self-instruct-seed/seed_tasks.jsonl")))]
    if spec.startswith("rouge:"):
        path = Path(spec[len("rouge:") :])
        if not path.is_file():
            raise KdlmError(f"{spec}: file not found")
        return [Task(path.stem, "rouge", reference_items(path))]
    if spec in PERPLEXITY_TASKS:
        return [Task(spec, "perplexity", text=_file(PERPLEXITY_TASKS[spec]).read_text())]
    if spec.startswith("ppl:"):
        path = Path(spec[len("ppl:") :])
        if not path.is_file():
            raise KdlmError(f"{spec}: file not found")
        return [Task(path.stem, "perplexity", text=path.read_text())]
    if spec == "gsm8k":
        return [_gsm8k()]
    if spec == "svamp":
        return [_svamp()]
    if spec == "pubmedqa":
        return [_pubmedqa()]
    if spec == "legalbench":
        return [_legalbench(name) for name in LEGALBENCH]
    if spec.startswith("legalbench-") and spec[len("legalbench-") :] in LEGALBENCH:
        return [_legalbench(spec[len("legalbench-") :])]
    known = ", ".join([*ROUGE_TASKS, *ACCURACY_TASKS, "legalbench", *PERPLEXITY_TASKS, "rouge:PATH", "ppl:PATH", "fidelity", "cost"])
    raise KdlmError(f"unknown task {spec!r}; choose from {known}")


def build_prompt(task: Task, item: Item, shots: int) -> str:
    """The user message: `shots` worked examples, then the question and the answer format."""
    parts = []
    for example in task.exemplars[:shots]:
        parts.append(f"Question: {example.prompt}\nAnswer: {example.demonstration}")
    parts.append(f"Question: {item.prompt}\n{task.instruction}".rstrip())
    return "\n\n".join(parts)
