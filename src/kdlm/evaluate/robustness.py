"""Robustness in `kdlm eval`: perturbed copies of the tasks and out-of-distribution pairs, and their report.

A perturbed task `NAME@SPEC` (e.g. `gsm8k@char:0.05`) runs the clean task's scorer on prompts perturbed
by kdlm.evaluate.perturb, once per seed of `seeds`: seed s perturbs the prompts and, for ROUGE-L, also
samples the answers, so the clean and the perturbed ROUGE-L of seed s are paired. The report gives,
per model and metric, the clean score, the perturbed score (mean ± std over seeds) and the drop
(clean - perturbed per seed, for perplexity perturbed - clean: always how much worse), and for
generation tasks the ROUGE-L between the model's answer and the teacher's on the same prompt and seed.

An OOD pair `A->B` reports the score on task A (in distribution) next to task B (out of it); both
must be scored the same way: the same kind and, for labelled tasks, the same label set.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

from kdlm.errors import KdlmError
from kdlm.evaluate.perturb import PerturbSpec, parse_spec, perturb_text
from kdlm.evaluate.tasks import Task, load_task

PERPLEXITY_CHARS_PER_TOKEN = 8  # a perturbed perplexity text is cut to max_tokens x this many characters first


@dataclasses.dataclass
class PerturbedTask:
    base: Task
    spec: PerturbSpec

    @property
    def name(self) -> str:
        return f"{self.base.name}@{self.spec}"


def perturb_task(task: Task, spec: PerturbSpec, seed: int, max_text_chars: int) -> Task:
    """A copy of `task` whose questions (or text) are perturbed; exemplars and references stay clean."""
    if task.kind == "perplexity":
        return dataclasses.replace(task, text=perturb_text(task.text[:max_text_chars], spec, seed)[0])
    items = [dataclasses.replace(item, prompt=perturb_text(item.prompt, spec, seed, index)[0]) for index, item in enumerate(task.items)]
    return dataclasses.replace(task, items=items)


def run_perturbed(task: PerturbedTask, seeds: list[int], score: Callable[[Task, int], dict], max_text_chars: int) -> dict:
    """`score(perturbed task, seed)` for each seed: the clean scorer's result under each perturbation seed."""
    per_seed = [score(perturb_task(task.base, task.spec, seed, max_text_chars), seed) for seed in seeds]
    return {"perturb": str(task.spec), "seeds": list(seeds), "per_seed": per_seed}


def expand_tasks(specs: list[str], perturb: list[str]) -> tuple[list[Task], list[PerturbedTask]]:
    """Clean tasks named by `specs` and their perturbed copies: `NAME@SPEC` entries and `perturb` for all."""
    suite_specs = [parse_spec(text, "perturb") for text in perturb]
    clean: list[Task] = []
    perturbed: list[PerturbedTask] = []
    for spec in specs:
        name, _, own = spec.partition("@")
        for task in load_task(name):
            if all(t.name != task.name for t in clean):
                clean.append(task)
            for perturbation in ([parse_spec(own, f"tasks: {spec}")] if own else []) + suite_specs:
                entry = PerturbedTask(task, perturbation)
                if all(p.name != entry.name for p in perturbed):
                    perturbed.append(entry)
    return clean, perturbed


def check_ood_pairs(pairs: list[str]) -> list[tuple[str, str]]:
    """`A->B` texts -> (A, B) task names; a clear error naming `ood` when the two are not scored alike."""
    out = []
    for pair in pairs:
        source, sep, target = (part.strip() for part in pair.partition("->"))
        if not sep or not source or not target:
            raise KdlmError(f"ood: {pair!r} is not IN_DISTRIBUTION->OUT_OF_DISTRIBUTION (e.g. gsm8k->svamp)")
        tasks = [load_task(name) for name in (source, target)]
        if any(len(found) != 1 for found in tasks):
            raise KdlmError(f"ood: {pair!r} must name single tasks (legalbench-NAME, not legalbench)")
        first, second = tasks[0][0], tasks[1][0]
        if first.kind != second.kind or first.answer_kind != second.answer_kind:
            raise KdlmError(f"ood: {pair!r} pairs a {first.kind} {first.answer_kind} task with a {second.kind} {second.answer_kind} one; "
                            "pair tasks scored the same way")
        if {label.lower() for label in first.labels} != {label.lower() for label in second.labels}:
            raise KdlmError(f"ood: {pair!r}: the label sets differ ({sorted(first.labels)} vs {sorted(second.labels)}); "
                            "pair tasks that answer with the same labels")
        out.append((first.name, second.name))
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def metric_values(result: dict) -> dict[str, list[float]]:
    """Metric name -> its values (one per seed for ROUGE-L, one for accuracy and perplexity)."""
    if "rouge_l" in result:
        return {"ROUGE-L": list(result["per_seed"])}
    if "perplexity" in result:
        return {"ppl": [result["perplexity"]]}
    return {key: [value] for key, value in result.items() if key.endswith("-shot")}


def _agreement(texts: list[list[str]] | None, teacher_texts: list[list[str]] | None) -> float | None:
    """Mean ROUGE-L of the model's answers against the teacher's, over seeds and items."""
    from kdlm.evaluate.quality import rouge_l

    if not texts or not teacher_texts:
        return None
    scores = [rouge_l(mine, theirs) for seed_texts, seed_teacher in zip(texts, teacher_texts, strict=True)
              for mine, theirs in zip(seed_texts, seed_teacher, strict=True)]
    return statistics.fmean(scores)


def robustness_rows(results: dict, teacher: str | None) -> list[dict]:
    """One row per (model, perturbed task, metric): clean, perturbed and drop, each (mean, std) over seeds."""
    rows = []
    for model, tasks in results.items():
        for name, result in tasks.items():
            base = name.partition("@")[0]
            if "@" not in name or base not in tasks or "per_seed" not in result:
                continue
            clean = metric_values(tasks[base])
            perturbed = [metric_values(r) for r in result["per_seed"]]
            for metric, clean_values in clean.items():
                values = [seed_result[metric][0] for seed_result in perturbed if metric in seed_result]
                if len(values) != len(perturbed):
                    continue
                paired = clean_values if len(clean_values) == len(values) else clean_values[:1] * len(values)
                sign = -1 if metric == "ppl" else 1
                drops = [sign * (c - p) for c, p in zip(paired, values, strict=True)]
                row = {"model": model, "task": base, "perturb": result["perturb"], "metric": metric, "seeds": result["seeds"],
                       "clean": _mean_std(clean_values), "perturbed": _mean_std(values), "drop": _mean_std(drops)}
                if metric == "ROUGE-L" and teacher and teacher != model:
                    teacher_tasks = results.get(teacher, {})
                    row["agreement_clean"] = _agreement(tasks[base].get("texts"), teacher_tasks.get(base, {}).get("texts"))
                    row["agreement_perturbed"] = _agreement([r["texts"][0] for r in result["per_seed"] if r.get("texts")],
                                                            [r["texts"][0] for r in teacher_tasks.get(name, {}).get("per_seed", []) if r.get("texts")])
                rows.append(row)
    return rows


def ood_rows(results: dict, pairs: list[tuple[str, str]]) -> list[dict]:
    """One row per (model, pair, metric): the in-distribution score, the OOD score and the gap (ID - OOD)."""
    rows = []
    for model, tasks in results.items():
        for source, target in pairs:
            if source not in tasks or target not in tasks:
                continue
            inside, outside = metric_values(tasks[source]), metric_values(tasks[target])
            for metric in inside.keys() & outside.keys():
                a, b = _mean_std(inside[metric]), _mean_std(outside[metric])
                rows.append({"model": model, "pair": f"{source}->{target}", "metric": metric, "in_distribution": a,
                             "out_of_distribution": b, "gap": (a[0] - b[0]) * (-1 if metric == "ppl" else 1)})
    return rows


def _shown(metric: str, value) -> str:
    if value is None:
        return "-"
    scale, unit = (100, "%") if metric.endswith("-shot") else (1, "")
    if isinstance(value, (tuple, list)):
        return f"{value[0] * scale:.2f} ± {value[1] * scale:.2f}{unit}"
    return f"{value * scale:.2f}{unit}"


def robustness_markdown(rows: list[dict], ood: list[dict]) -> str:
    """The robustness and OOD tables (empty string when neither has a row)."""
    lines = []
    if rows:
        lines += ["## Robustness to perturbed prompts", "",
                  "| model | task | perturbation | metric | clean | perturbed | drop | agreement with teacher (clean -> perturbed) | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            agreement = "-" if row.get("agreement_clean") is None else f"{row['agreement_clean']:.2f} -> {_shown('', row['agreement_perturbed'])}"
            lines.append(f"| {row['model']} | {row['task']} | {row['perturb']} | {row['metric']} | {_shown(row['metric'], row['clean'])} | "
                         f"{_shown(row['metric'], row['perturbed'])} | {_shown(row['metric'], row['drop'])} | {agreement} | {row['seeds']} |")
        lines += ["", "mean ± std over seeds; drop: how much worse the perturbed score is (clean - perturbed; perplexity: "
                  "perturbed - clean); agreement: ROUGE-L of the model's answer against the teacher's on the same prompt and seed."]
    if ood:
        lines += ["", "## Out of distribution", "", "| model | pair | metric | in distribution | out of distribution | gap |", "|---|---|---|---|---|---|"]
        for row in ood:
            lines.append(f"| {row['model']} | {row['pair']} | {row['metric']} | {_shown(row['metric'], row['in_distribution'])} | "
                         f"{_shown(row['metric'], row['out_of_distribution'])} | {_shown(row['metric'], row['gap'])} |")
    return "\n".join(lines)
