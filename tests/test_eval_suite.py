"""`kdlm eval MODEL...` on tiny models: the CLI, the result cache, ROUGE-L and accuracy end to end, the lm-eval bridge."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import missing
from kdlm.evaluate.quality import generate_texts
from kdlm.evaluate.suite import EvalSuiteConfig, accuracy_task, evaluate_suite
from kdlm.evaluate.tasks import Item, Task
from kdlm.models import load_model
from test_cli import cli_env
from tiny import save_tiny_teacher, scripted_model, tiny_llama, tiny_tokenizer

PROMPTS = ["water boils at", "the quick brown fox", "two plus two is"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_tiny_teacher(root / "teacher")
    tokenizer = tiny_tokenizer()
    student = tiny_llama(len(tokenizer), num_layers=1, seed=3)
    student.save_pretrained(root / "run" / "student")  # laid out like a `kdlm distill` run folder
    tokenizer.save_pretrained(root / "run" / "student")
    return root


def settings(root, **changes) -> EvalSuiteConfig:
    base = dict(
        tasks=["wikitext-2", "fidelity", "cost"], limit=3, seeds=[1, 2], max_new_tokens=8, answer_max_new_tokens=8,
        teacher=str(root / "teacher"), fidelity_prompts=3, fidelity_max_new_tokens=8, perplexity_max_tokens=128,
        generation_tokens=4, batch_size=4, bf16=False, output_dir=str(root / "out"),
    )
    return EvalSuiteConfig(**{**base, **changes})


def test_cli_eval_writes_json_and_markdown_and_caches(workspace):
    args = [sys.executable, "-m", "kdlm.cli", "eval", str(workspace / "run"), "--tasks", "wikitext-2,fidelity,cost",
            "--limit", "2", "--teacher", str(workspace / "teacher"), "--out", str(workspace / "cli"),
            "--set", "perplexity_max_tokens=128", "--set", "fidelity_prompts=2", "--set", "fidelity_max_new_tokens=6",
            "--set", "generation_tokens=4", "--set", "bf16=false"]
    env = cli_env(workspace)
    first = subprocess.run(args, cwd=workspace, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads((workspace / "cli" / "eval.json").read_text())
    teacher, student = report["models"]["teacher"], report["models"]["run"]
    assert teacher["fidelity"]["kl_to_teacher"] == pytest.approx(0, abs=1e-5)
    assert teacher["fidelity"]["top1_agreement"] == 1.0
    assert student["fidelity"]["kl_to_teacher"] > 0.01
    # Ratios over the teacher, from parameter counts taken here.
    params = {name: sum(p.numel() for p in load_model(str(path))[0].parameters()) for name, path in
              (("teacher", workspace / "teacher"), ("run", workspace / "run" / "student"))}
    assert student["cost"]["compression"] == pytest.approx(params["teacher"] / params["run"], rel=1e-3)
    assert student["cost"]["speedup_generate"] == pytest.approx(
        student["cost"]["generate_tokens_per_s"] / teacher["cost"]["generate_tokens_per_s"])
    markdown = (workspace / "cli" / "eval.md").read_text()
    assert "| teacher |" in markdown and "| run |" in markdown and "wikitext-2 ppl" in markdown
    # A rerun computes nothing: every (model, task) result is cached.
    second = subprocess.run(args, cwd=workspace, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("all results cached") == 2
    bad = subprocess.run([*args[:4], "--tasks", "nope"], cwd=workspace, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_rouge_l_is_100_when_the_reference_is_the_models_own_answer(workspace):
    # The trained tiny teacher writes corpus-like words (a random model writes bytes ROUGE cannot tokenise).
    model, tokenizer = load_model(str(workspace / "teacher"))
    # Sampling at temperature 1 with the suite's seeds: the answers the suite will draw for seed 1.
    own = generate_texts(model, tokenizer, PROMPTS, seed=1, max_new_tokens=8, batch_size=4)
    refs = workspace / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in zip(PROMPTS, own, strict=True)))
    config = settings(workspace, tasks=[f"rouge:{refs}"], seeds=[1], teacher=None, output_dir=str(workspace / "rouge"))
    report = evaluate_suite([str(workspace / "teacher")], config)
    assert report["models"]["teacher"]["refs"]["rouge_l"] == pytest.approx(100.0)
    # Another seed draws other answers: lower ROUGE-L, and a std over the seeds.
    config = settings(workspace, tasks=[f"rouge:{refs}"], seeds=[1, 7], teacher=None, output_dir=str(workspace / "rouge2"))
    result = evaluate_suite([str(workspace / "teacher")], config)["models"]["teacher"]["refs"]
    assert result["per_seed"][0] == pytest.approx(100.0) and result["per_seed"][1] < 100.0
    assert result["rouge_l_std"] == pytest.approx(torch.tensor(result["per_seed"]).std().item())


def test_accuracy_counts_exact_matches_of_extracted_answers(workspace):
    # A model that answers "42" to everything, and items whose reference is 42 or not: the accuracy is known
    # (3 of 5) before the scorer runs.
    tokenizer = tiny_tokenizer()
    model = scripted_model(tokenizer, "42")
    assert generate_texts(model, tokenizer, ["What is six times seven?"], seed=0, temperature=0,
                          max_new_tokens=24) == ["42"]
    references = [42, 41, 42.0, 7, 42]
    items = [Item(prompt=f"question {i}", reference=r) for i, r in enumerate(references)]
    task = Task("numbers", "accuracy", items, [], "number", instruction="Say a number.")
    result = accuracy_task(model, tokenizer, task, settings(workspace, shots=[0], limit=5, answer_max_new_tokens=24))
    assert result["0-shot"] == pytest.approx(3 / 5)
    assert result["0-shot_example"] == "42"
    labels = Task("labels", "accuracy", [Item("a", "yes"), Item("b", "no")], [], "label", ["yes", "no"], "Yes or no?")
    yes = scripted_model(tokenizer, "yes")
    assert accuracy_task(yes, tokenizer, labels, settings(workspace, shots=[0], answer_max_new_tokens=24))["0-shot"] == 0.5


def test_lm_eval_bridge_on_a_local_task(workspace):
    if importlib.util.find_spec("lm_eval") is None:
        missing("lm-eval is not installed: pip install 'kdlm[lm-eval]' (scripts/setup.sh installs it)")
    from kdlm.evaluate.lm_eval_bridge import run_lm_eval, write_local_tasks
    from kdlm.evaluate.tasks import load_task

    model, tokenizer = load_model(str(workspace / "teacher"))
    folder = write_local_tasks(workspace / "lm_eval_tasks", ["kdlm_legalbench_hearsay"])
    results = run_lm_eval(model, tokenizer, ["kdlm_legalbench_hearsay"], include_path=folder, limit=6, batch_size=4)
    # The same multiple choice scored here: log p(" Yes" | context) vs log p(" No" | context).
    (task,) = load_task("legalbench-hearsay")
    right = 0
    for item in task.items[:6]:
        context = tokenizer(f"Question: {item.prompt}\nAnswer:")["input_ids"]
        scores = []
        for choice in task.labels:
            continuation = tokenizer(f"Question: {item.prompt}\nAnswer: {choice}")["input_ids"][len(context):]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
        right += task.labels[max(range(len(scores)), key=scores.__getitem__)] == item.reference
    assert results["kdlm_legalbench_hearsay"]["acc,none"] == pytest.approx(right / 6)
