"""Labelled tasks for the reasoning and in-context recipes, and greedy evaluation of a student on them.

A task is a list of examples `{"id", "question", "answer", "rationale"}`: the gold answer already in the
parsers' normal form (kdlm.final_answer), None for an unlabelled question, and a worked solution when the data set has one (GSM8K's
solutions, SVAMP's equations, the synthetic task's steps), which can stand in for teacher rationales.
"""

from __future__ import annotations

from pathlib import Path

from kdlm.data.domains import jsonl_objects, read_gsm8k, read_legalbench, read_pubmedqa, read_svamp
from kdlm.errors import KdlmError
from kdlm.final_answer import extract_answer, normalise_gold
from kdlm.generate.recipe_settings import TaskSpec

FORMATS = ("qa", "gsm8k", "svamp", "pubmedqa", "legalbench", "arith")


def load_task(spec: TaskSpec) -> list[dict]:
    """The task's examples, gold answers normalised (rows with a missing or unknown label are skipped:
    `load_task_counted` also returns them)."""
    return load_task_counted(spec)[0]


def load_task_counted(spec: TaskSpec) -> tuple[list[dict], list[str]]:
    """(the task's examples with gold answers normalised, the skipped rows as "file:line: reason").

    Rows of the domain formats (gsm8k, svamp, pubmedqa, legalbench) whose label is missing or not in the
    label set are skipped and counted (kdlm.data.domains); a qa record's gold answer must parse.

    Raises:
        KdlmError: a missing file or one in the wrong format (the message names the file, the line and the
            expected fields), a qa gold answer that does not parse, or an empty task.
    """
    if spec.answer_type == "label" and not spec.labels:
        raise KdlmError(f"task {spec.source}: answer_type=label needs `labels`, e.g. labels: [yes, no, maybe]")
    skipped: list[str] = []
    if spec.format == "arith":
        raw = _arith(spec.source)
    else:
        path = Path(spec.source).expanduser()
        if not path.is_file():
            raise KdlmError(f"task file not found: {path} (format {spec.format})")
        if spec.format == "qa":
            raw = _qa(path)
        else:
            rows = {"gsm8k": read_gsm8k, "svamp": read_svamp, "pubmedqa": read_pubmedqa, "legalbench": read_legalbench}[spec.format](path)
            raw = [(row["where"], _question(row, spec.format), row["answer"], row["rationale"]) for row in rows.rows]
            skipped = rows.skipped
    examples = []
    for where, question, answer, rationale in raw[: spec.limit] if spec.limit else raw:
        try:  # an unlabelled question (qa without "answer") has gold None: filter=majority labels it
            gold = None if answer is None else normalise_gold(answer, spec.answer_type, spec.labels)
        except ValueError as error:
            if spec.format != "qa":  # a domain label outside the task's label set: counted and skipped
                skipped.append(f"{where}: {error}")
                continue
            raise KdlmError(f"{where}: {error}; fix the record or the task's answer_type/labels") from None
        examples.append({"id": len(examples), "question": question, "answer": gold, "rationale": rationale})
    if not examples:
        raise KdlmError(f"task {spec.source} has no examples" + (f" ({len(skipped)} rows skipped; first: {skipped[0]})" if skipped else ""))
    return examples, skipped


def _question(row: dict, form: str) -> str:
    if form == "pubmedqa":
        return f"Context: {' '.join(row['contexts'])}\nQuestion: {row['question']}"
    return row["question"]


def _qa(path: Path) -> list[tuple]:
    rows = []
    for where, record, line in jsonl_objects(path):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise KdlmError(f'{where}: a task record needs "question" (a string) and, when labelled, "answer"; '
                            f"got {line[:120]}")
        rows.append((where, record["question"], record.get("answer"), record.get("rationale")))
    return rows


def _arith(source: str) -> list[tuple]:
    from kdlm.recipes.arith import make_dataset, worked_steps

    try:
        prefix, count, seed = source.split(":")
        count, seed = int(count), int(seed)
        assert prefix == "arith"
    except (ValueError, AssertionError):
        raise KdlmError(f"format=arith takes source arith:COUNT:SEED, e.g. arith:500:0; got {source!r}") from None
    rows = []
    for problem in make_dataset(count, seed):
        lines, _ = worked_steps(problem["start"], problem["operations"])
        rows.append((f"arith {source}", problem["question"], problem["answer"], " ".join(lines)))
    return rows


def greedy_outputs(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """The model's greedy answers to single-turn chat prompts (its chat template), in order."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
                for prompt in prompts[start : start + batch_size]
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outputs


def accuracy(outputs: list[str], golds: list[str], answer_type: str, labels: list[str] | None = None) -> float:
    """Share of outputs whose parsed answer equals the gold one (an unparseable output counts as wrong)."""
    if not golds:
        raise ValueError("accuracy over no examples")
    hits = sum(extract_answer(text, answer_type, labels, reading="rationale") == gold for text, gold in zip(outputs, golds, strict=True))
    return hits / len(golds)
