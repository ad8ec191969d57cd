"""A bridge to lm-evaluation-harness (`pip install kdlm[lm-eval]`): any of its tasks on a loaded model.

`run_lm_eval` wraps an already loaded model and tokenizer in lm-eval's HFLM and runs
`lm_eval.simple_evaluate`. lm-eval's own tasks fetch their datasets from the Hugging Face Hub, so
they need internet; `write_local_tasks` defines tasks on our data files (LegalBench Yes/No tasks and
PubMedQA as multiple choice over the answer words, scored by log-likelihood), which run offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from kdlm.errors import KdlmError
from kdlm.evaluate.tasks import load_task

LOCAL_TASKS = {  # our name -> the kdlm task it is built from
    "kdlm_legalbench_hearsay": "legalbench-hearsay",
    "kdlm_legalbench_proa": "legalbench-proa",
    "kdlm_legalbench_personal_jurisdiction": "legalbench-personal_jurisdiction",
    "kdlm_pubmedqa": "pubmedqa",
}


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise KdlmError("the lm-eval bridge needs lm-evaluation-harness: pip install 'kdlm[lm-eval]' (or pip install lm-eval)") from None
    return lm_eval


def write_local_tasks(folder: Path, names: list[str] | None = None) -> Path:
    """Write lm-eval task YAMLs (and their JSONL data) for our labelled data files into `folder`.

    Each task is multiple choice: the context is the question and "Answer:", the choices are the
    task's labels with a leading space, and the metric is accuracy of the most likely choice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in names or list(LOCAL_TASKS):
        if name not in LOCAL_TASKS:
            raise KdlmError(f"unknown local lm-eval task {name!r}; choose from {', '.join(LOCAL_TASKS)}")
        task = load_task(LOCAL_TASKS[name])[0]
        data = folder / f"{name}.jsonl"
        with data.open("w") as handle:
            for item in task.items:
                handle.write(json.dumps({"question": item.prompt, "label": task.labels.index(item.reference)}) + "\n")
        spec = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": [f"{label}" for label in task.labels],
            "target_delimiter": " ",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def run_lm_eval(
    model, tokenizer, tasks: list[str], *, include_path: Path | None = None, limit: int | None = None,
    num_fewshot: int | None = None, batch_size: int = 8,
) -> dict[str, dict]:
    """Run lm-eval tasks on a loaded model; returns {task: {metric: value}} (lm-eval's "results")."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:
        output = simple_evaluate(
            model=wrapped, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=False, bootstrap_iters=0,
        )
    except (ConnectionError, OSError) as exc:
        raise KdlmError(
            f"lm-eval could not load the data of {tasks} ({exc}); its own tasks download from the Hugging Face Hub, "
            f"offline use a local task ({', '.join(LOCAL_TASKS)})"
        ) from None
    return {name: {k: v for k, v in metrics.items() if isinstance(v, (int, float))} for name, metrics in output["results"].items()}
