"""Evaluation tasks read from the data files beside the checkout (../shared/data, or $KDLM_DATA).

Three kinds:
- `rouge`: prompts with human references, scored by ROUGE-L on sampled answers
  (`selfinst`: the 252 user-oriented Self-Instruct instructions; `rouge:PATH` any JSONL of
  prompt/reference; `selfinst-seed`: the 175 Self-Instruct seed tasks);
- `accuracy`: labelled questions, scored by exact match after answer extraction, zero-shot and
  k-shot (`gsm8k`, `svamp`, `pubmedqa`, `legalbench` = its three Yes/No tasks, or one of them as
  `legalbench-hearsay`, `legalbench-proa`, `legalbench-personal_jurisdiction`);
- `perplexity`: plain text (`wikitext-2`, `tinyshakespeare`, `ppl:PATH`);
- domain tasks of the applications (docs/apps.md): `gsm8k-test` and `pubmedqa-test` (the records the app
  configs hold out), `legalbench-rule_qa`
  (ROUGE-L against the rule), `medical-refusal` (kind `refusal`: our out-of-scope medical prompts).
  Accuracy tasks with `checks` get domain metrics (kdlm.evaluate.domain): calibration and abstention
  (pubmedqa), rationale correctness (gsm8k, svamp). Rows with a missing or unknown label are skipped and
  counted in `Task.skipped` (kdlm.data.domains).

k-shot exemplars come from a pool disjoint from the evaluated items: the first `EXEMPLAR_POOL`
records of gsm8k, svamp and pubmedqa (items are taken after them), LegalBench's train.tsv.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kdlm.data.domains import read_gsm8k, read_legalbench, read_pubmedqa, read_svamp
from kdlm.errors import KdlmError

EXEMPLAR_POOL = 50
LEGALBENCH = {
    "hearsay": "Is this evidence hearsay (an out-of-court statement offered to prove the truth of what it asserts)?",
    "proa": "Does this statute create a private right of action?",
    "personal_jurisdiction": "Does the court in which the plaintiff sued have personal jurisdiction over the defendant?",
}
ACCURACY_TASKS = ("gsm8k", "svamp", "pubmedqa", *(f"legalbench-{name}" for name in LEGALBENCH))
ROUGE_TASKS = ("selfinst", "selfinst-seed")
DOMAIN_TASKS = ("gsm8k-test", "pubmedqa-test", "legalbench-rule_qa", "medical-refusal")
GSM8K_TEST = 1319  # records in GSM8K's official test split
PUBMEDQA_TEST = 150  # of the 500 shipped PubMedQA records: the healthcare app trains on the other 350
RULE_QA_INSTRUCTION = "Answer this question about a legal rule in one or two sentences, naming the rule."
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
    kind: str  # rouge | accuracy | perplexity | refusal
    items: list[Item] = field(default_factory=list)
    exemplars: list[Item] = field(default_factory=list)
    answer_kind: str = ""  # number | label
    labels: list[str] = field(default_factory=list)
    instruction: str = ""
    text: str = ""  # perplexity tasks
    skipped: list[str] = field(default_factory=list)  # rows with a missing or unknown label, "file:line: reason"
    checks: tuple[str, ...] = ()  # domain metrics besides accuracy: calibration, abstention, rationale


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


def _gsm8k(split: str = "train") -> Task:
    """`gsm8k`: train.jsonl after the exemplar pool. `gsm8k-test`: test.jsonl when present, else the last
    GSM8K_TEST records of train.jsonl (the official test split's size), which the app configs never train on."""
    test_file = data_root() / "gsm8k/test.jsonl"
    source = test_file if split == "test" and test_file.is_file() else _file("gsm8k/train.jsonl")
    rows = read_gsm8k(source)
    items = [Item(prompt=row["question"], reference=float(row["answer"].replace(",", "")),
                  demonstration=f"{row['rationale']}\nThe answer is {row['answer']}.") for row in rows.rows]
    exemplars, evaluated = items[:EXEMPLAR_POOL], items[EXEMPLAR_POOL:]
    if split == "test" and source != test_file:
        evaluated = items[-GSM8K_TEST:]
    name = "gsm8k" if split == "train" else "gsm8k-test"
    return Task(name, "accuracy", evaluated, exemplars, "number", instruction=MATH_SUFFIX, skipped=rows.skipped,
                checks=("rationale",))


def _svamp() -> Task:
    rows = read_svamp(_file("svamp/SVAMP.json"))
    items = [Item(prompt=row["question"], reference=float(row["answer"]),
                  demonstration=f"{row['equation']} = {row['answer']}\nThe answer is {row['answer']}.") for row in rows.rows]
    return Task("svamp", "accuracy", items[EXEMPLAR_POOL:], items[:EXEMPLAR_POOL], "number", instruction=MATH_SUFFIX,
                skipped=rows.skipped, checks=("rationale",))


def _pubmedqa(context_chars: int = 1200, split: str = "all") -> Task:
    """`pubmedqa`: the records after the exemplar pool; `pubmedqa-test`: the last PUBMEDQA_TEST records, which
    the healthcare app never trains on (it reads the first 500 - PUBMEDQA_TEST)."""
    rows = read_pubmedqa(_file("pubmedqa/pqal_train_dev.json"))
    items = []
    for row in rows.rows:
        context = " ".join(row["contexts"])[:context_chars]
        answer = row["answer"]
        items.append(Item(prompt=f"Context: {context}\n\nQuestion: {row['question']}", reference=answer,
                          demonstration=f"{row['rationale'] or ''}\nThe answer is {answer}.".lstrip()))
    labels = ["yes", "no", "maybe"]
    instruction = ("Answer the research question with yes, no or maybe (maybe when the context does not settle it). "
                   + LABEL_SUFFIX.format(labels="yes/no/maybe"))
    evaluated = items[-PUBMEDQA_TEST:] if split == "test" else items[EXEMPLAR_POOL:]
    return Task("pubmedqa" if split == "all" else "pubmedqa-test", "accuracy", evaluated, items[:EXEMPLAR_POOL], "label",
                labels, instruction, skipped=rows.skipped, checks=("calibration", "abstention"))


def _legalbench(name: str) -> Task:
    train, test = (read_legalbench(_file(f"legalbench/{name}/{split}.tsv")) for split in ("train", "test"))
    test.check_not_empty()
    if name == "rule_qa":
        items = [Item(prompt=f"{RULE_QA_INSTRUCTION}\n\n{row['question']}", reference=row["answer"]) for row in test.rows]
        return Task("legalbench-rule_qa", "rouge", items, skipped=test.skipped)
    instruction = LEGALBENCH[name] + " Answer Yes or No. " + LABEL_SUFFIX.format(labels="Yes/No")
    items, exemplars = ([Item(prompt=row["question"], reference=row["answer"], demonstration=f"The answer is {row['answer']}.")
                         for row in rows.rows] for rows in (test, train))
    return Task(f"legalbench-{name}", "accuracy", items, exemplars, "label", ["Yes", "No"], instruction,
                skipped=train.skipped + test.skipped)


def refusal_task(path: Path | None = None) -> Task:
    """`medical-refusal`: our prompts (kdlm/data/builtin/medical_refusal.jsonl), each {"prompt", "expect"}:
    `refuse` for an out-of-scope request (individual dosage or treatment advice, a diagnosis of a person),
    `answer` for an in-scope general question (over-refusal check)."""
    path = path or Path(__file__).resolve().parents[1] / "data" / "builtin" / "medical_refusal.jsonl"
    items = []
    for number, row in enumerate(_jsonl(path), 1):
        if row.get("expect") not in ("refuse", "answer") or not isinstance(row.get("prompt"), str):
            raise KdlmError(f"{path}:{number}: expected {{\"prompt\": str, \"expect\": \"refuse\" or \"answer\"}}")
        items.append(Item(prompt=row["prompt"], reference=row["expect"]))
    return Task("medical-refusal", "refusal", items)


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
    if spec == "gsm8k-test":
        return [_gsm8k("test")]
    if spec == "medical-refusal":
        return [refusal_task()]
    if spec == "svamp":
        return [_svamp()]
    if spec == "pubmedqa":
        return [_pubmedqa()]
    if spec == "pubmedqa-test":
        return [_pubmedqa(split="test")]
    if spec == "legalbench":
        return [_legalbench(name) for name in LEGALBENCH]
    if spec.startswith("legalbench-") and spec[len("legalbench-") :] in (*LEGALBENCH, "rule_qa"):
        return [_legalbench(spec[len("legalbench-") :])]
    known = ", ".join([*ROUGE_TASKS, *ACCURACY_TASKS, "legalbench", *DOMAIN_TASKS, *PERPLEXITY_TASKS, "rouge:PATH", "ppl:PATH", "fidelity", "cost"])
    raise KdlmError(f"unknown task {spec!r}; choose from {known}")


def build_prompt(task: Task, item: Item, shots: int) -> str:
    """The user message: `shots` worked examples, then the question and the answer format."""
    parts = []
    for example in task.exemplars[:shots]:
        parts.append(f"Question: {example.prompt}\nAnswer: {example.demonstration}")
    parts.append(f"Question: {item.prompt}\n{task.instruction}".rstrip())
    return "\n\n".join(parts)
