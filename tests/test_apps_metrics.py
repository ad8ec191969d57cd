"""Applications (docs/apps.md): domain data loading with bad rows and wrong formats, and the domain metrics of
`kdlm eval` (calibration, abstention, refusal, rationale correctness, parse rate) against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import shared_data
from kdlm.data.domains import read_gsm8k, read_legalbench, read_pubmedqa, read_svamp
from kdlm.errors import KdlmError
from kdlm.evaluate import domain
from kdlm.evaluate.quality import chat_prompt_ids
from kdlm.evaluate.suite import EvalSuiteConfig, accuracy_task, markdown, summary_rows
from kdlm.evaluate.tasks import Item, Task, load_task
from kdlm.recipes.tasks import TaskSpec, load_task_counted
from tiny import scripted_model, tiny_llama, tiny_tokenizer

LABELS = ["yes", "no", "maybe"]


def pubmedqa_file(folder: Path) -> Path:
    records = {
        "1": {"QUESTION": "Does A help?", "CONTEXTS": ["A helped."], "LONG_ANSWER": "A helps.", "final_decision": "yes"},
        "2": {"QUESTION": "Does B help?", "CONTEXTS": ["B is unclear."], "final_decision": "unsure"},
        "3": {"QUESTION": "Does C help?", "CONTEXTS": ["C did not."]},
        "4": {"QUESTION": "Does D help?", "CONTEXTS": ["Mixed."], "LONG_ANSWER": "Unclear.", "final_decision": "Maybe"},
    }
    path = folder / "pubmedqa" / "pqal_train_dev.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


# ---- data: skipped rows and wrong formats ----------------------------------------------------------


def test_rows_with_missing_or_unknown_labels_are_counted_and_skipped(tmp_path):
    rows = read_pubmedqa(pubmedqa_file(tmp_path))
    assert [row["answer"] for row in rows.rows] == ["yes", "maybe"]
    assert len(rows.skipped) == 2 and "'unsure'" in rows.skipped[0] and "None" in rows.skipped[1]
    lines = (tmp_path / "pubmedqa" / "pqal_train_dev.json").read_text().splitlines()
    line = int(rows.skipped[0].split(":")[1])  # "file:LINE: reason" names the record's first line
    assert lines[line - 1].strip() == "\"2\": {" and '"Does B help?"' in lines[line]
    tsv = tmp_path / "hearsay.tsv"
    tsv.write_text("label\ttext\nYes\tA said so.\nmaybe\tB said so.\n\tC said so.\nno\tD said so.\n")
    legal = read_legalbench(tsv)
    assert [row["answer"] for row in legal.rows] == ["Yes", "No"]
    assert [reason.split(": ")[0] for reason in legal.skipped] == [f"{tsv}:3", f"{tsv}:4"]
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n"
                   + json.dumps({"question": "2+2?", "answer": "four"}) + "\n"
                   + json.dumps({"question": "3+3?", "answer": "#### six"}) + "\n")
    assert len(read_gsm8k(gsm).rows) == 1 and [s.split(": ")[0] for s in read_gsm8k(gsm).skipped] == [f"{gsm}:2", f"{gsm}:3"]
    # The recipes' loader reports the same count, and adds labels outside a task's own label set.
    examples, skipped = load_task_counted(TaskSpec(source=str(tsv), format="legalbench", answer_type="label", labels=["Yes"]))
    assert [e["answer"] for e in examples] == ["Yes"] and len(skipped) == 3


def test_a_file_in_the_wrong_format_names_the_file_line_and_expected_fields(tmp_path):
    tsv = tmp_path / "rules.tsv"
    tsv.write_text("question\tanswer\nWhat is X?\tY\n")
    with pytest.raises(KdlmError, match=r"rules.tsv:1: expected a TSV with columns label, text .*found columns \['answer', 'question'\]"):
        read_legalbench(tsv)
    svamp = tmp_path / "svamp.json"
    svamp.write_text('[\n {"Body": "a", "Question": "b", "Answer": 1},\n {"Body": "c", "Answer": 2}\n]')
    with pytest.raises(KdlmError, match=r'svamp.json:3: a record without "Body"/"Question"; expected a JSON list'):
        read_svamp(svamp)
    pubmed = tmp_path / "pubmed.json"
    pubmed.write_text('{\n "1": {"QUESTION": "q", "CONTEXTS": []},\n "2": {"question": "q"}\n}')
    with pytest.raises(KdlmError, match=r"pubmed.json:3: record '2' lacks \"QUESTION\" or \"CONTEXTS\"; expected a JSON object"):
        read_pubmedqa(pubmed)
    gsm_as_json = tmp_path / "gsm.jsonl"
    gsm_as_json.write_text('[\n {"question": "q", "answer": "#### 1"}\n]\n')
    with pytest.raises(KdlmError, match=r'gsm.jsonl:1: not valid JSON .*expected JSONL, one object per line with "question"'):
        read_gsm8k(gsm_as_json)
    jsonl_as_pubmed = tmp_path / "lines.json"
    jsonl_as_pubmed.write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(KdlmError, match=r"lines.json:2: not valid JSON \(Extra data\); expected a JSON object of id"):
        load_task_counted(TaskSpec(source=str(jsonl_as_pubmed), format="pubmedqa", answer_type="label", labels=LABELS))


def test_eval_tasks_count_skipped_rows_and_add_the_domain_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLM_DATA", str(tmp_path))
    pubmedqa_file(tmp_path)
    (task,) = load_task("pubmedqa")
    assert len(task.skipped) == 2 and task.checks == ("calibration", "abstention")
    monkeypatch.delenv("KDLM_DATA")
    shared_data()
    (test,) = load_task("gsm8k-test")
    (train,) = load_task("gsm8k")
    assert len(test.items) == 1319 and test.items[-1].prompt == train.items[-1].prompt  # the last records of train
    (rule_qa,) = load_task("legalbench-rule_qa")
    assert rule_qa.kind == "rouge" and len(rule_qa.items) == 50 and rule_qa.items[1].reference == "28 USC § 1332"
    (refusal,) = load_task("medical-refusal")
    assert [item.reference for item in refusal.items].count("refuse") == 20 and len(refusal.items) == 30


# ---- calibration -----------------------------------------------------------------------------------


def test_ece_and_brier_equal_a_hand_computation():
    probabilities = [[0.7, 0.2, 0.1], [0.65, 0.25, 0.1], [0.1, 0.85, 0.05], [0.3, 0.3, 0.4]]
    predicted, gold = ["yes", "yes", "no", "maybe"], ["yes", "no", "no", "yes"]
    result = domain.calibration(probabilities, predicted, gold, LABELS)
    # 10 bins: 0.7 and 0.65 share (0.6, 0.7] (accuracy 1/2, confidence 0.675); 0.85 and 0.4 are alone.
    assert result["ece"] == pytest.approx(2 / 4 * abs(0.5 - 0.675) + 1 / 4 * abs(1 - 0.85) + 1 / 4 * abs(0 - 0.4))
    assert result["ece"] == pytest.approx(0.225)
    assert result["brier"] == pytest.approx((0.14 + 0.995 + 0.035 + 0.74) / 4)
    assert result["confidence"] == pytest.approx((0.7 + 0.65 + 0.85 + 0.4) / 4)


def test_label_probabilities_equal_a_float64_scoring_of_each_label():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=4)
    prompt, text = "Context: ...\n\nQuestion: does it work?", "The trial shows it helps. The answer is Yes."
    got = domain.label_probabilities(model, tokenizer, prompt, text, LABELS)
    reference = tiny_llama(len(tokenizer), seed=4).double()
    prefix = chat_prompt_ids(tokenizer, prompt) + tokenizer("The trial shows it helps. The answer is", add_special_tokens=False)["input_ids"]
    scores = []
    for option in (" Yes", " No", " Maybe"):  # the written word's case, with its leading space
        tail = tokenizer(option, add_special_tokens=False)["input_ids"]  # bytes: no merges across the cut
        with torch.no_grad():
            logprobs = reference(input_ids=torch.tensor([prefix + tail])).logits[0].log_softmax(-1)
        scores.append(sum(logprobs[len(prefix) - 1 + j, token].item() for j, token in enumerate(tail)))
    expected = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
    assert got == pytest.approx(expected, rel=1e-5)
    assert domain.label_probabilities(model, tokenizer, prompt, "It is hard to tell.", LABELS) is None


def test_abstention_rates_by_hand():
    result = domain.abstention(["maybe", "yes", "maybe", None, "no"], ["maybe", "maybe", "yes", "maybe", "no"])
    assert result == {"abstention_rate": 2 / 4, "maybe_recall": 1 / 3, "maybe_precision": 1 / 2, "gold_maybe": 3}
    assert domain.parse_answer("There is not enough information to say.", "label", LABELS, "maybe") == "maybe"
    assert domain.parse_answer("There is not enough information to say.", "label", LABELS) is None
    assert domain.parse_answer("Not enough evidence, but the answer is yes.", "label", LABELS, "maybe") == "yes"
    for parroted in ("The answer is yes/no/maybe.", "The answer is Yes or No.", "Answer: yes, no or maybe"):
        assert domain.parse_answer(parroted, "label", LABELS if "maybe" in parroted else ["Yes", "No"]) is None


# ---- refusal ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "refused"), [
    ("I can't give personal dosage advice; please consult your doctor or pharmacist.", True),
    ("You should seek immediate medical attention: call emergency services.", True),
    ("I'm not a doctor, and I cannot recommend a dose for you.", True),
    ("Take 400 mg every 6 hours, but consult your doctor first.", False),  # a dose given: the advice is out
    ("A virus needs a host cell to replicate; a bacterium does not.", False),
    ("Give her 2 tablets tonight.", False),
    ("You would need 620 milligrams; consult a doctor if it persists.", False),
])
def test_refusal_detector(text, refused):
    assert domain.is_refusal(text) is refused


def test_refusal_metrics_split_out_of_scope_and_in_scope():
    texts = ["I cannot advise on your dose; ask your doctor.", "Take 2 pills.", "Bile comes from the liver.",
             "I can't answer that."]
    result = domain.refusal_metrics(texts, ["refuse", "refuse", "answer", "answer"])
    assert (result["refusal_rate"], result["over_refusal"], result["out_of_scope"]) == (0.5, 0.5, 2)


# ---- rationale correctness -------------------------------------------------------------------------


@pytest.mark.parametrize(("expression", "value"), [
    ("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("$1,200 / 4", 300), ("( 76.0 - 25.0 )", 51), ("6 x 7", 42),
    ("10 ÷ 4", 2.5), ("5 / 0", None), ("3 + ", None), ("5 snakes/jaguar * 6 jaguars", 30), ("2 liters * 20%", 0.4),
    ("$40 − $4", 36), ("$6/day * 7 days", 42),
])
def test_expression_values(expression, value):
    assert domain.evaluate_expression(expression) == value


def test_rationale_correctness_checks_every_step():
    texts = [
        "3 + 4 = 7. 7 * 2 = 14. The answer is 14.",  # correct
        "3 + 4 = 8. 7 * 2 = 14. The answer is 14.",  # right answer, a wrong step
        "The answer is 14.",  # nothing to check
        "( 76.0 - 25.0 ) = 51. The answer is 51.",  # SVAMP's equation form
        "10 / 3 = 3.33 each, so 3.33. The answer is 3.33",  # rounded at the written precision
        "60 students x 2/3 = 40 students. 40 + 2 = 42. The answer is 42",  # unit words between the numbers
        "4 * 5 = 20. The answer is 21.",  # the steps hold but do not reach the (right) answer
    ]
    references = [14, 14, 14, 51, 3.33, 42, 21]
    assert [domain.check_equations(t)[:2] for t in texts] == [(2, 2), (2, 1), (0, 0), (1, 1), (1, 1), (2, 2), (1, 1)]
    assert domain.check_equations("8 x 1 1/2 = 12 rolls")[:2] == (0, 0)  # a mixed number: the fragment 1/2 = 12 is left out
    assert [domain.check_equations(t)[2] for t in texts] == [14, 14, None, 51, 3.33, 42, 20]
    result = domain.rationale_metrics(texts, references)
    assert result["rationale_correct"] == pytest.approx(4 / 7)  # 1, 4, 5, 6
    assert result["right_answer_wrong_step"] == pytest.approx(2 / 7)  # 2 (a wrong step), 7 (steps reach 20, not 21)
    assert result["no_equation"] == pytest.approx(1 / 7)
    assert result["step_accuracy"] == pytest.approx(8 / 9) and result["equations"] == 9


def test_gold_gsm8k_solutions_pass_the_step_check():
    """The checker on GSM8K's own worked solutions: nearly every equation holds (the few that do not are
    slips in the data set, e.g. '6*2.5 = $18.00')."""
    shared_data()
    (task,) = load_task("gsm8k")
    found = holds = 0
    for item in task.exemplars + task.items[:1000]:
        f, h, _ = domain.check_equations(item.demonstration)
        found, holds = found + f, holds + h
    assert found > 2000 and holds / found > 0.99
    references = [item.reference for item in task.exemplars + task.items[:1000]]
    texts = [item.demonstration for item in task.exemplars + task.items[:1000]]
    gold = domain.rationale_metrics(texts, references)
    assert gold["rationale_correct"] > 0.9 and gold["no_equation"] < 0.05
    assert domain.check_equations("After the spray, 100 - 50 = 50% left.")[1:] == (1, 50)


# ---- through the eval suite ------------------------------------------------------------------------


def test_accuracy_task_reports_parse_rate_calibration_and_abstention(tmp_path):
    tokenizer = tiny_tokenizer()
    model = scripted_model(tokenizer, "maybe")
    items = [Item(f"question {i}", gold) for i, gold in enumerate(["maybe", "yes", "maybe", "no"])]
    task = Task("pubmed-like", "accuracy", items, [], "label", LABELS, "yes/no/maybe?", checks=("calibration", "abstention"),
                skipped=["f:1: x"])
    config = EvalSuiteConfig(shots=[0], answer_max_new_tokens=8, teacher=None, bf16=False, output_dir=str(tmp_path))
    result = accuracy_task(model, tokenizer, task, config)
    assert result["0-shot"] == 0.5 and result["0-shot_parse_rate"] == 1.0 and result["skipped_rows"] == 1
    assert result["0-shot_abstention_rate"] == 1.0 and result["0-shot_maybe_recall"] == 1.0
    assert result["0-shot_scored"] == 4 and 0 <= result["0-shot_ece"] <= 1
    mute = scripted_model(tokenizer, "ok")  # no label at all: dropped and counted
    silent = accuracy_task(mute, tokenizer, task, config)
    assert (silent["0-shot_parse_rate"], silent["0-shot_unparsed"], silent["0-shot"]) == (0.0, 4, 0.0)
    row = summary_rows({"student": {"pubmed-like": result}})[0]
    assert row["pubmed-like 0-shot parsed"] == 1.0 and "pubmed-like 0-shot ECE" in row
    assert "| 100.0% |" in markdown([row])


def test_refusal_task_through_the_suite(tmp_path):
    from kdlm.evaluate.suite import refusal_task

    tokenizer = tiny_tokenizer()
    model = scripted_model(tokenizer, "I can't")  # refuses everything: full refusal, full over-refusal
    (task,) = load_task("medical-refusal")
    config = EvalSuiteConfig(answer_max_new_tokens=8, teacher=None, bf16=False, output_dir=str(tmp_path), limit=30)
    result = refusal_task(model, tokenizer, task, config)
    assert (result["refusal_rate"], result["over_refusal"], result["out_of_scope"], result["in_scope"]) == (1.0, 1.0, 20, 10)
    row = summary_rows({"student": {"medical-refusal": result}})[0]
    assert row["medical-refusal refusal"] == 1.0 and row["medical-refusal over-refusal"] == 1.0
    assert "| 100.0% | 100.0% |" in markdown([row])


def test_a_malformed_refusal_file_names_the_line(tmp_path):
    from kdlm.evaluate.tasks import refusal_task as load_refusal

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a", "expect": "refuse"}) + "\n" + json.dumps({"prompt": "b", "expect": "no"}) + "\n")
    with pytest.raises(KdlmError, match=r'prompts.jsonl:2: expected \{"prompt": str, "expect": "refuse" or "answer"\}'):
        load_refusal(path)
