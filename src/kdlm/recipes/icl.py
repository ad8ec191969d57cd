"""In-context learning distillation (Huang et al., arXiv 2212.10670; shared/METHODS.md §8.9), black-box.

The student learns to answer a query given k demonstrations, from the teacher's answers to the same
k-shot prompts, plus a language-modelling term on the demonstrations. Two settings:

- `multitask`: in-context tuning on the target tasks themselves: training prompts are built from the
  tasks' training examples and the student is evaluated on held-out queries of the same tasks;
- `meta`: meta in-context tuning: training prompts come from the `tasks`, evaluation from
  `eval_tasks`, which must be different tasks (the student never trains on them).

Steps of `kdlm generate configs/icl.yaml` (a `recipe:` section with `name: icl`):
1. Per training task, hold out `heldout` examples; for each of up to `queries` other examples, draw
   `shots` demonstrations from the rest of the task's training pool and build a k-shot prompt.
2. The teacher answers each prompt `sampling.n` times; the answer is parsed (kdlm.final_answer) and,
   with n > 1, the majority answer is kept (a tie or no parse drops the query). `label_source: gold`
   trains on gold answers instead (the paper's CE term), still through the same prompts.
3. Records: k-shot prompt -> answer (weight 1) and, when `lm_weight` > 0, the demonstrations as plain
   text trained with the language-modelling loss (weight `lm_weight`).
4. Evaluation prompts: OUTPUT.eval.jsonl, each held-out query of each evaluation task zero-shot and
   k-shot (demonstrations from that task's training pool), with task, shots and gold under `meta`.
"""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console

from kdlm.atomic import write_jsonl
from kdlm.config import _format_errors
from kdlm.errors import KdlmError
from kdlm.final_answer import extract_answer, majority_vote
from kdlm.generate.recipe_settings import IclSettings
from kdlm.recipes.cot import _ask
from kdlm.recipes.tasks import accuracy, greedy_outputs, load_task

console = Console(stderr=True)


def parse_recipe(tree: dict | IclSettings, source: str = "recipe") -> IclSettings:
    """The settings of a `recipe:` section given as a mapping (a validated one is returned as it is)."""
    try:
        return IclSettings.model_validate(tree)
    except ValidationError as error:
        raise KdlmError(_format_errors(error, source).replace("invalid config", "invalid recipe").replace("\n  ", "\n  recipe.")) from None


def demonstration(example: dict) -> str:
    return f"Input: {example['question']}\nOutput: {example['answer']}"


def kshot_prompt(demonstrations: list[dict], query: str, instruction: str | None = None) -> str:
    """k demonstrations then the query, in one fixed layout; k = 0 gives the zero-shot prompt."""
    parts = [instruction] if instruction else []
    parts += [demonstration(example) for example in demonstrations]
    parts.append(f"Input: {query}\nOutput:")
    return "\n\n".join(parts)


def draw_demonstrations(pool: list[dict], query: dict, shots: int, rng: random.Random) -> list[dict]:
    """`shots` examples of the pool other than the query, drawn without replacement."""
    others = [example for example in pool if example["id"] != query["id"]]
    if len(others) < shots:
        raise KdlmError(f"{shots} demonstrations asked, but the task's training pool has {len(others)} other examples; "
                        "lower recipe.shots or recipe.heldout")
    return rng.sample(others, shots)


def split_pool(examples: list[dict], heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training pool, held-out queries) after a seeded shuffle."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    if heldout >= len(examples):
        raise KdlmError(f"heldout={heldout} leaves no training examples of {len(examples)}")
    return examples[heldout:], examples[:heldout]


def build_training_prompts(recipe: IclSettings) -> list[dict]:
    """Per training query: {"task", "prompt", "demonstrations", "gold", "spec"}."""
    rng = random.Random(recipe.seed)
    items = []
    for spec in recipe.tasks:
        pool, _ = split_pool(load_task(spec), recipe.heldout if recipe.setting == "multitask" else 0, recipe.seed)
        for query in pool[: recipe.queries] if recipe.queries else pool:
            demos = draw_demonstrations(pool, query, recipe.shots, rng)
            items.append({"task": spec.display_name(), "prompt": kshot_prompt(demos, query["question"], spec.instruction),
                          "demonstrations": demos, "gold": query["answer"], "spec": spec})
    return items


def evaluation_prompts(recipe: IclSettings) -> list[dict]:
    """Held-out queries of each evaluation task, zero-shot and k-shot, as prompt-only records."""
    rng = random.Random(recipe.seed + 1)
    records = []
    for spec in recipe.eval_tasks or recipe.tasks:
        pool, held = split_pool(load_task(spec), recipe.heldout, recipe.seed)
        for query in held:
            for shots in (0, recipe.shots):
                demos = draw_demonstrations(pool, query, shots, rng) if shots else []
                records.append({"prompt": kshot_prompt(demos, query["question"], spec.instruction),
                                "meta": {"task": spec.display_name(), "shots": shots, "gold": query["answer"],
                                         "answer_type": spec.answer_type, "labels": "|".join(spec.labels or [])}})
    return records


def label_queries(items: list[dict], texts: dict, samples: int) -> list[str | None]:
    """The teacher's label per query: the majority parsed answer over its samples (None: none or a tie)."""
    labels = []
    for index, item in enumerate(items):
        spec = item["spec"]
        answers = [extract_answer(texts[(index, k)], spec.answer_type, spec.labels, reading="rationale")
                   for k in range(samples) if (index, k) in texts]
        labels.append(majority_vote(answers).answer)
    return labels


def training_records(items: list[dict], labels: list[str | None], lm_weight: float) -> list[dict]:
    records = []
    for item, label in zip(items, labels, strict=True):
        if label is None:
            continue
        meta = {"task": item["task"], "gold": item["gold"]}
        records.append({"prompt": item["prompt"], "response": label, "weight": 1.0, "meta": meta})
        if lm_weight > 0:
            text = "\n\n".join(demonstration(example) for example in item["demonstrations"])
            records.append({"text": text, "weight": lm_weight, "meta": {**meta, "task_kind": "lm"}})
    return records


def run(config) -> dict:
    """Run the recipe of a generate config (`config.recipe`); returns counts (also printed)."""
    recipe = config.recipe
    output = Path(config.output)
    items = build_training_prompts(recipe)
    if recipe.label_source == "gold":
        labels = [item["gold"] for item in items]
    else:
        texts = _ask(config, "teacher", [[{"role": "user", "content": item["prompt"]}] for item in items], config.sampling.n)
        labels = label_queries(items, texts, config.sampling.n)
    records = training_records(items, labels, recipe.lm_weight)
    if not records:
        raise KdlmError(f"the teacher's answers gave no label to train on; check {output.stem}.teacher.jsonl")
    write_jsonl(output, records)
    evaluation = evaluation_prompts(recipe)
    if evaluation:
        write_jsonl(output.with_name(f"{output.stem}.eval.jsonl"), evaluation)
    agree = sum(label == item["gold"] for item, label in zip(items, labels, strict=True))
    stats = {"queries": len(items), "labelled": sum(label is not None for label in labels), "agree_with_gold": agree,
             "records": len(records), "eval_prompts": len(evaluation)}
    console.print(
        f"icl ({recipe.setting}): {stats['queries']} k-shot prompts, {stats['labelled']} labelled "
        f"({agree} agree with gold) -> {stats['records']} records in {output}; {stats['eval_prompts']} evaluation prompts",
        highlight=False,
    )
    return stats


def evaluate(model, tokenizer, records: list[dict], *, max_new_tokens: int = 8) -> dict[tuple[str, int], float]:
    """Accuracy of a model on evaluation prompts (from OUTPUT.eval.jsonl), per (task, shots)."""
    outputs = greedy_outputs(model, tokenizer, [record["messages"][0]["content"] if "messages" in record else record["prompt"]
                                                for record in records], max_new_tokens=max_new_tokens)
    groups: dict[tuple[str, int], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault((record["meta"]["task"], int(record["meta"]["shots"])), []).append(index)
    scores = {}
    for key, indices in groups.items():
        meta = records[indices[0]]["meta"]
        labels = meta["labels"].split("|") if meta.get("labels") else None
        scores[key] = accuracy([outputs[i] for i in indices], [records[i]["meta"]["gold"] for i in indices],
                               meta["answer_type"], labels)
    return scores
