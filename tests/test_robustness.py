"""Perturbations (exact rates, determinism) and the robustness/OOD report of `kdlm eval`, on tiny models."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from rouge_score import rouge_scorer

from kdlm.errors import KdlmError
from kdlm.evaluate.perturb import count_sentences, parse_spec, perturb_text
from kdlm.evaluate.robustness import check_ood_pairs, perturb_task
from kdlm.evaluate.suite import EvalSuiteConfig, evaluate_suite
from kdlm.evaluate.synonyms import SYNONYMS
from kdlm.evaluate.tasks import load_task
from test_cli import run_cli
from tiny import save_tiny_teacher

TEXT = ("Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? Explain each step and give the total.")
LETTERS = sum(c.isalpha() for c in TEXT)
WORDS = sum(w.isalpha() for w in TEXT.split())


def distance(a, b, transpose: bool = False) -> int:
    """Plain Levenshtein distance between two sequences (with adjacent transpositions: optimal string alignment)."""
    rows = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if transpose and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[-1][-1]


@pytest.mark.parametrize("spec", ["char:0.2", "char.swap:0.3", "word:0.3", "word.synonym:0.1", "sentence:1"])
def test_perturbations_are_deterministic_per_seed(spec):
    parsed = parse_spec(spec)
    assert perturb_text(TEXT, parsed, seed=3, index=5) == perturb_text(TEXT, parsed, seed=3, index=5)
    outputs = {perturb_text(TEXT, parsed, seed=seed, index=0)[0] for seed in range(6)}
    assert len(outputs) > 1  # another seed, another perturbation
    assert perturb_text(TEXT, parsed, seed=3, index=0) != perturb_text(TEXT, parsed, seed=3, index=1)


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_character_rates_are_exact(rate):
    expected = round(rate * LETTERS)
    for seed in range(3):
        typo, count = perturb_text(TEXT, parse_spec(f"char.typo:{rate}"), seed)
        assert count == expected and len(typo) == len(TEXT)
        assert sum(x != y for x, y in zip(typo, TEXT, strict=True)) == expected
        assert [c for c in typo if c.isdigit()] == [c for c in TEXT if c.isdigit()]  # numbers never change
        deleted, _ = perturb_text(TEXT, parse_spec(f"char.delete:{rate}"), seed)
        assert len(deleted) == len(TEXT) - expected and distance(deleted, TEXT) == expected
        for spec in (f"char.swap:{rate}", f"char:{rate}"):
            out, count = perturb_text(TEXT, parse_spec(spec), seed)
            assert count == expected
            if rate <= 0.05:  # sparse edits do not touch each other: one edit = one step of the distance
                assert distance(out, TEXT, transpose=True) == expected
            else:  # neighbouring edits may merge into fewer steps (two deletions next to a swap), never more
                assert 0.85 * expected <= distance(out, TEXT, transpose=True) <= expected


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3, 1.0])
def test_word_rates_are_exact(rate):
    expected = round(rate * WORDS)
    words = TEXT.split()
    for seed in range(3):
        deleted = perturb_text(TEXT, parse_spec(f"word.delete:{rate}"), seed)[0].split()
        assert len(deleted) == len(words) - expected and distance(deleted, words) == expected
        inserted = perturb_text(TEXT, parse_spec(f"word.insert:{rate}"), seed)[0].split()
        assert len(inserted) == len(words) + expected and distance(inserted, words) == expected
        known = sum(w.lower() in SYNONYMS for w in words)
        swapped = perturb_text(TEXT, parse_spec(f"word.synonym:{rate}"), seed)[0].split()
        changed = [(old, new) for old, new in zip(words, swapped, strict=True) if old != new]
        assert len(changed) == min(expected, known)
        assert all(new.lower() in SYNONYMS[old.lower()] for old, new in changed)


@pytest.mark.parametrize("rate", [0.0, 0.34, 0.5, 1.0])
def test_sentence_rate_is_exact(rate):
    out, count = perturb_text(TEXT, parse_spec(f"sentence:{rate}"), seed=1)
    assert count == round(rate * 3) and out.startswith(TEXT)
    assert count_sentences(out) == 3 + count


def test_bad_rates_and_pairs_are_clear_errors(tmp_path):
    for spec, message in (("char:1.5", "rate 1.5 in 'char:1.5' is outside [0, 1]"), ("word:-0.1", "outside [0, 1]"),
                          ("char:x", "is not a number"), ("chars:0.1", "is not LEVEL[.OP]:RATE")):
        with pytest.raises(KdlmError, match="perturb"):
            parse_spec(spec)
        with pytest.raises(KdlmError) as error:
            EvalSuiteConfig(perturb=[spec])
        assert message in str(error.value)
    with pytest.raises(KdlmError, match=r"ood: 'pubmedqa->legalbench-hearsay': the label sets differ"):
        check_ood_pairs(["pubmedqa->legalbench-hearsay"])
    with pytest.raises(KdlmError, match="ood: 'gsm8k->legalbench-proa' pairs a accuracy number task"):
        check_ood_pairs(["gsm8k->legalbench-proa"])
    assert check_ood_pairs(["gsm8k->svamp", "selfinst-seed->selfinst", "legalbench-hearsay->legalbench-proa"])[0] == ("gsm8k", "svamp")
    proc = run_cli("eval", "nothing", "--perturb", "char:2", cwd=tmp_path, check_ok=False)
    assert proc.returncode == 2 and "perturb: rate 2 in 'char:2' is outside [0, 1]" in proc.stderr and "Traceback" not in proc.stderr


def test_perturbed_task_keeps_references_and_exemplars():
    (task,) = load_task("svamp")
    spec = parse_spec("word:0.3")
    perturbed = perturb_task(task, spec, seed=4, max_text_chars=0)
    assert [i.prompt for i in perturbed.items[:5]] == [perturb_text(i.prompt, spec, 4, n)[0] for n, i in enumerate(task.items[:5])]
    assert [i.reference for i in perturbed.items] == [i.reference for i in task.items] and perturbed.exemplars == task.exemplars


def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def test_eval_report_recomputes_from_per_example_scores(tmp_path):
    save_tiny_teacher(tmp_path / "teacher")
    shutil.copytree(tmp_path / "teacher", tmp_path / "copy")  # the teacher under another name: agreement 100
    save_tiny_teacher(tmp_path / "small", num_layers=2)
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in (
        ("what is the capital of france? answer in one sentence.", "paris is the capital of france."),
        ("how do plants make food? explain it simply.", "plants make food from light, water and air."),
        ("water boils at what temperature? give the value.", "water boils at one hundred degrees celsius."))))
    config = EvalSuiteConfig(
        tasks=[f"rouge:{refs}", "svamp@sentence:1"], perturb=["word:0.5"], ood=["gsm8k->svamp"], limit=2, seeds=[1, 2],
        shots=[0], max_new_tokens=8, answer_max_new_tokens=6, teacher=str(tmp_path / "teacher"), bf16=False,
        output_dir=str(tmp_path / "out"), batch_size=4,
    )
    report = evaluate_suite([str(tmp_path / "copy"), str(tmp_path / "small")], config)
    models = report["models"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = {(r["model"], r["task"], r["perturb"], r["metric"]): r for r in report["robustness"]}
    assert {key[2] for key in rows} == {"word:0.5", "sentence:1"}
    for model in ("teacher", "copy", "small"):
        clean = [statistics.fmean(items) for items in models[model]["refs"]["per_item"]]
        perturbed = [statistics.fmean(r["per_item"][0]) for r in models[model]["refs@word:0.5"]["per_seed"]]
        row = rows[(model, "refs", "word:0.5", "ROUGE-L")]
        assert row["clean"] == pytest.approx(_mean_std(clean))
        assert row["perturbed"] == pytest.approx(_mean_std(perturbed))
        assert row["drop"] == pytest.approx(_mean_std([c - p for c, p in zip(clean, perturbed, strict=True)]))
        for name in ("svamp@word:0.5", "svamp@sentence:1"):
            clean_acc = statistics.fmean(models[model]["svamp"]["0-shot_items"])
            per_seed = [statistics.fmean(r["0-shot_items"]) for r in models[model][name]["per_seed"]]
            acc_row = rows[(model, "svamp", name.partition("@")[2], "0-shot")]
            assert acc_row["perturbed"] == pytest.approx(_mean_std(per_seed))
            assert acc_row["drop"] == pytest.approx(_mean_std([clean_acc - p for p in per_seed]))
    # The teacher's copy writes the teacher's answers: full agreement, clean and perturbed.
    assert rows[("copy", "refs", "word:0.5", "ROUGE-L")]["agreement_perturbed"] == pytest.approx(100.0)
    small = models["small"]["refs@word:0.5"]["per_seed"]
    teacher = models["teacher"]["refs@word:0.5"]["per_seed"]
    expected = statistics.fmean(100 * scorer.score(t, s)["rougeL"].fmeasure for a, b in zip(small, teacher, strict=True)
                                for s, t in zip(a["texts"][0], b["texts"][0], strict=True))
    assert rows[("small", "refs", "word:0.5", "ROUGE-L")]["agreement_perturbed"] == pytest.approx(expected)
    ood = {(r["model"], r["metric"]): r for r in report["ood"] if r["pair"] == "gsm8k->svamp"}
    assert ood[("small", "0-shot")]["gap"] == pytest.approx(models["small"]["gsm8k"]["0-shot"] - models["small"]["svamp"]["0-shot"])
    markdown = (tmp_path / "out" / "eval.md").read_text()
    assert "## Robustness to perturbed prompts" in markdown and "| small | refs | word:0.5 | ROUGE-L |" in markdown
    assert "## Out of distribution" in markdown and "gsm8k->svamp" in markdown
