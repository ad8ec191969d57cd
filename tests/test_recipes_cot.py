"""Chain-of-thought recipe: parsers, filters, formats and the per-record loss weight on crafted inputs;
then the whole recipe against a rule-based arithmetic teacher served over the real API on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import shared_data
from kdlm.config import LossConfig, TrainConfig
from kdlm.data import collate, encode_records, load_records
from kdlm.errors import KdlmError
from kdlm.final_answer import extract_label, extract_number, majority_vote, normalise_gold
from kdlm.generate import load_generate_config
from kdlm.recipes import cot
from kdlm.recipes.arith import ArithTeacher, make_dataset, parse_problem
from kdlm.recipes.tasks import TaskSpec, accuracy, load_task
from kdlm.serve import ServerThread
from kdlm.train.loop import StudentObjective, train
from kdlm.train.tasks import num_targets, task_scaled
from tiny import save_tiny_teacher, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
KDLM = [sys.executable, "-m", "kdlm.cli"]
YES_NO_MAYBE = ["yes", "no", "maybe"]


# ---- parsers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 + 5 = 12. 12 - 3 = 9.\nAnswer: 9", "9"),
        ("She had 3, then 4 more.\nThe answer is $1,200.50.", "1200.5"),  # first number after the marker
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("12 - 3 = 9. --> 9 END 17 more tokens", "9"),  # nothing after END counts
        ("so 3 apples then 5 more", "5"),  # no marker: the last number
        ("Answer: 5.0", "5"),
        ("Answer: -4", "-4"),
        ("I cannot find a problem to solve.", None),  # unparseable
        ("Answer: many", None),  # a marker with no number after it
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text, reading="rationale") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, it looks so at first. Answer: no", "no"),  # after the marker, not the first mention
        ("It could be yes, but on balance MAYBE", "maybe"),  # no marker: the last label, case-insensitive
        ("Yesterday it was unclear.", None),  # whole words only
        ("The answer is: Maybe.", "maybe"),
    ],
)
def test_extract_label(text, expected):
    assert extract_label(text, YES_NO_MAYBE, reading="rationale") == expected


def test_gold_answers_are_normalised_like_parsed_ones():
    assert normalise_gold(51.0, "number") == "51" == extract_number("Answer: 51", reading="rationale")
    assert normalise_gold("Yes", "label", YES_NO_MAYBE) == "yes"
    with pytest.raises(ValueError, match="not a number"):
        normalise_gold("twelve", "number")


def test_majority_vote_with_ties_and_unparseable_samples():
    vote = majority_vote(["4", "5", "4", None, None])
    assert (vote.answer, vote.count, vote.total, vote.agreement) == ("4", 2, 5, 0.4)
    tie = majority_vote(["4", "5", None])  # 1 vs 1: no pseudo-label
    assert tie.answer is None and tie.count == 1 and tie.agreement == 0.0
    assert majority_vote([None, None]).answer is None  # Nones never win, however many
    assert majority_vote(["7", None, None]).answer == "7"


def test_split_rationale_drops_the_answer_statement():
    assert cot.split_rationale("7 + 5 = 12. 12 - 3 = 9.\nAnswer: 9") == "7 + 5 = 12. 12 - 3 = 9."
    assert cot.split_rationale("No marker here, 9.") == "No marker here, 9."


# ---- filters ---------------------------------------------------------------------------------------


def samples(*pairs):
    return [{"rationale": rationale, "answer": answer} for rationale, answer in pairs]


def test_gold_filter_rejects_a_wrong_rationale():
    group = samples(("3 + 4 = 7.", "7"), ("3 + 4 = 8.", "8"), ("3 + 4 = 7.", "7"), ("three and four", None))
    kept, info = cot.select_rationales(group, "7", "gold")
    assert [sample["rationale"] for sample in kept] == ["3 + 4 = 7."]  # the wrong one out, the duplicate once
    assert info["correct"] == 2 and all(sample["label"] == "7" for sample in kept)
    kept_all, _ = cot.select_rationales(group, "7", "gold", distinct=False)
    assert len(kept_all) == 2


def test_majority_filter_uses_the_vote_as_label_and_a_threshold():
    group = samples(("a", "8"), ("b", "8"), ("c", "7"), ("d", None))
    kept, info = cot.select_rationales(group, None, "majority", min_agreement=0.5)
    assert [sample["rationale"] for sample in kept] == ["a", "b"] and {s["label"] for s in kept} == {"8"}
    assert info["vote"].agreement == 0.5
    assert cot.select_rationales(group, None, "majority", min_agreement=0.6)[0] == []  # 2 of 4 is not enough
    tie = samples(("a", "8"), ("b", "7"))
    assert cot.select_rationales(tie, None, "majority", min_agreement=0.0)[0] == []  # a tie keeps nothing


def test_no_filter_keeps_every_parsed_sample_with_its_own_answer():
    group = samples(("a", "8"), ("b", "7"), ("c", None))
    kept, _ = cot.select_rationales(group, "7", "none")
    assert [(s["rationale"], s["label"]) for s in kept] == [("a", "8"), ("b", "7")]


def test_gold_filter_without_labels_is_a_clear_error():
    with pytest.raises(KdlmError, match="filter=majority"):
        cot.select_rationales(samples(("a", "1")), None, "gold")


# ---- formats ---------------------------------------------------------------------------------------


def recipe(**fields):
    return cot.CotSettings(task=TaskSpec(source="arith:4:0", format="arith"), **fields)


def test_finetune_cot_format_ends_with_a_marker_that_evaluation_parses():
    (record,) = cot.format_records("Q?", "3 + 4 = 7.", "7", recipe(format="finetune_cot"), {"id": 1})
    assert record == {"prompt": "Q?", "response": "3 + 4 = 7. --> 7 END", "meta": {"id": 1}}
    # What a student writes after END (it may run on) does not change the parsed answer.
    assert cot.parse_student_output(record["response"] + " 8 + 1 = 9", recipe()) == "7"


def test_step_by_step_format_has_two_prefixed_tasks_with_weights():
    example = {"id": 4, "question": "Q?", "answer": "7"}
    kept = [{"rationale": "3 + 4 = 7.", "label": "7", "source": "teacher"},
            {"rationale": "4 + 3 = 7.", "label": "7", "source": "teacher"}]
    label, first, second = cot.question_records(example, kept, recipe(format="step_by_step"))
    assert (label["prompt"], label["response"], label["task"], label["weight"]) == ("[label] Q?", "7", "label", 0.5)
    assert (first["prompt"], first["response"], first["task"], first["weight"]) == ("[rationale] Q?", "3 + 4 = 7.", "rationale", 0.5)
    assert second["response"] == "4 + 3 = 7."  # one label record per question, one rationale record per rationale
    assert cot.student_prompt("Q?", recipe(format="step_by_step")) == "[label] Q?"  # only the label task at inference
    # A question whose every rationale was filtered out still trains its label (the reference trains labels on all).
    (alone,) = cot.question_records(example, [], recipe(format="step_by_step", label_weight=0.8))
    assert (alone["task"], alone["response"], alone["weight"], alone["meta"]["source"]) == ("label", "7", 0.8, "gold")
    # task_means=false: weights only, pooled over tokens (the task stays in meta for analysis)
    pooled = cot.question_records(example, kept[:1], recipe(format="step_by_step", task_means=False))
    assert all("task" not in r for r in pooled) and [r["meta"]["task"] for r in pooled] == ["label", "rationale"]


def test_the_label_of_a_question_without_gold_is_the_kept_rationales_vote():
    kept = [{"rationale": "a", "label": "5", "source": "teacher"}, {"rationale": "b", "label": "6", "source": "teacher"},
            {"rationale": "c", "label": "6", "source": "teacher"}]
    assert cot.question_label(None, kept, recipe(filter="none")) == "6"
    assert cot.question_label("5", kept, recipe(filter="gold")) == "5"
    assert cot.question_label(None, [], recipe(filter="majority")) is None
    assert cot.question_records({"id": 0, "question": "Q", "answer": None}, [], recipe(format="step_by_step")) == []


def test_mt_cot_format_explains_then_answers():
    example = {"id": 1, "question": "Q?", "answer": "7"}
    answer, explain = cot.question_records(example, [{"rationale": "3 + 4 = 7.", "label": "7", "source": "teacher"}],
                                           recipe(format="mt_cot", rationale_weight=0.3))
    assert (answer["prompt"], answer["response"], answer["task"], answer["weight"]) == ("[answer] Q?", "7", "answer", 0.5)
    assert (explain["prompt"], explain["response"], explain["task"], explain["weight"]) == (
        "[explain] Q?", "3 + 4 = 7. --> 7 END", "explain", 0.3)


def test_a_bad_recipe_names_the_key():
    with pytest.raises(KdlmError, match=r"(?s)invalid recipe.*recipe.format: Input should be 'finetune_cot'"):
        cot.parse_recipe({"task": {"source": "arith:4:0", "format": "arith"}, "format": "chain"})
    with pytest.raises(KdlmError, match=r"recipe.task.source: Field required"):
        cot.parse_recipe({"task": {"format": "arith"}})


def test_accuracy_counts_unparseable_outputs_as_wrong():
    assert accuracy(["--> 7 END", "I do not know", "Answer: 3"], ["7", "7", "4"], "number") == pytest.approx(1 / 3)


# ---- tasks and the rule-based teacher -------------------------------------------------------------


def test_task_loaders_read_the_shared_data_sets():
    data = shared_data()
    gsm8k = load_task(TaskSpec(source=str(data / "gsm8k/train.jsonl"), format="gsm8k", limit=2))
    assert gsm8k[0]["answer"] == "72" and "<<" not in gsm8k[0]["rationale"] and "####" not in gsm8k[0]["rationale"]
    svamp = load_task(TaskSpec(source=str(data / "svamp/SVAMP.json"), format="svamp", limit=1))
    assert svamp[0]["answer"] == "51" and svamp[0]["rationale"] == "( 76.0 - 25.0 ) = 51."
    pubmed = load_task(TaskSpec(source=str(data / "pubmedqa/pqal_train_dev.json"), format="pubmedqa",
                                answer_type="label", labels=YES_NO_MAYBE, limit=3))
    assert {example["answer"] for example in pubmed} <= set(YES_NO_MAYBE)


def test_malformed_task_record_names_its_line(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"question": "1 + 1?", "answer": 2}\n{"question": "2 + 2?", "answer": "four"}\n')
    with pytest.raises(KdlmError, match=r"task.jsonl:2.*not a number"):
        load_task(TaskSpec(source=str(path)))
    path.write_text('{"prompt": "1 + 1?", "answer": 2}\n')
    with pytest.raises(KdlmError, match=r"task.jsonl:1.*needs \"question\""):
        load_task(TaskSpec(source=str(path)))


def test_rule_based_teacher_solves_and_slips_at_its_rate():
    problems = make_dataset(200, seed=3)
    assert parse_problem(problems[0]["question"])[1] == problems[0]["operations"]
    right = ArithTeacher(0.0)
    assert all(extract_number(right.answer([{"role": "user", "content": p["question"]}], seed=i), reading="rationale") == str(p["answer"])
               for i, p in enumerate(problems))
    wrong = ArithTeacher(0.25)
    misses = sum(extract_number(wrong.answer([{"role": "user", "content": p["question"]}], seed=i), reading="rationale") != str(p["answer"])
                 for i, p in enumerate(problems))
    assert 30 <= misses <= 70  # 25% of 200 = 50, binomial sd ~6


# ---- the per-record loss weight --------------------------------------------------------------------


def test_weighted_loss_equals_a_hand_computed_one(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "weighted.jsonl"
    path.write_text(
        json.dumps({"prompt": "[label] 3 + 4?", "response": "7", "weight": 1.0}) + "\n"
        + json.dumps({"prompt": "[rationale] 3 + 4?", "response": "3 + 4 = 7.", "weight": 0.3}) + "\n"
    )
    examples = encode_records(tokenizer, load_records(str(path)), max_length=64)
    assert [example["weight"] for example in examples] == [1.0, 0.3]
    model = tiny_llama(len(tokenizer), seed=1)
    reference = tiny_llama(len(tokenizer), seed=1).double()
    numerator = unweighted = denominator = 0.0
    for example in examples:  # float64, one example at a time, no padding
        ids = torch.tensor([example["input_ids"]])
        logprobs = torch.log_softmax(reference(input_ids=ids).logits[0, :-1], dim=-1)
        labels = torch.tensor(example["labels"][1:])
        mask = labels != -100
        token_ce = -logprobs[mask].gather(1, labels[mask][:, None]).sum().item()
        numerator += example["weight"] * token_ce
        unweighted += token_ce
        denominator += mask.sum().item()
    assert unweighted / denominator - numerator / denominator > 1.0  # the weight matters at this scale
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, bf16=False, warmup_steps=0)
    result = train(model, examples, train_config=config, loss_config=LossConfig(kd_weight=0),
                   pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    assert result.history[0]["ce"] == pytest.approx(numerator / denominator, rel=1e-5)


@pytest.mark.parametrize("weight", ["-1", '"heavy"', "true"])
def test_a_bad_weight_names_the_line(tmp_path, weight):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b", "weight": ' + weight + "}\n")
    with pytest.raises(KdlmError, match=r"bad.jsonl:2.*\"weight\" must be a finite number"):
        load_records(str(path))


TASK_ROWS = [  # (prompt, response, task, weight): short labels, long rationales, as Distilling Step-by-Step writes
    ("[label] 3 + 4?", "7", "label", 0.75),
    ("[rationale] 3 + 4?", "Three plus four: 3 + 4 = 7.", "rationale", 0.25),
    ("[label] 5 + 7?", "12", "label", 0.75),
    ("[rationale] 5 + 7?", "Five plus seven is twelve: 5 + 7 = 12.", "rationale", 0.25),
]


def task_examples(tokenizer, with_tasks: bool = True) -> list[dict]:
    records = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}], "weight": w}
               | ({"task": t} if with_tasks else {}) for p, r, t, w in TASK_ROWS]
    return encode_records(tokenizer, records, max_length=96)


def token_terms(model, example: dict, teacher_topk: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64, from the definitions: per target token, the CE and the top-k FKL over k + 1 buckets."""
    logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].double()
    labels = torch.tensor(example["labels"][1:])
    logprobs = torch.log_softmax(logits[labels != -100], dim=-1)
    ce = -logprobs.gather(1, labels[labels != -100][:, None]).squeeze(1)
    if teacher_topk is None:
        return ce, torch.zeros_like(ce)
    ids, teacher_logprobs = teacher_topk
    p = teacher_logprobs.double().exp()
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], dim=-1)
    q = logprobs.exp().gather(1, ids)
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], dim=-1)
    return ce, (p * (p.log() - q.log())).sum(-1)


def task_mean_objective(terms: list[torch.Tensor], examples: list[dict]) -> torch.Tensor:
    """sum over tasks of weight * (that task's mean per-token term), by hand."""
    total = 0.0
    for task in {example["task"] for example in examples}:
        mine = [(t, e["weight"]) for t, e in zip(terms, examples, strict=True) if e["task"] == task]
        total = total + sum(w * t.sum() for t, w in mine) / sum(t.numel() for t, _ in mine)
    return total


def test_task_scaled_weights_are_the_inverse_task_token_shares():
    examples = [{"labels": [-100, 5, 6], "task": "a", "weight": 0.5}, {"labels": [-100, 5, 6, 7, 8, 9], "task": "b"},
                {"labels": [-100, -100, 9], "task": "a", "weight": 0.5}]
    (scaled,) = task_scaled(examples, [examples], step_tokens=8)  # task a: 2 + 1 tokens, task b: 5
    assert [e["weight"] for e in scaled] == [0.5 * 8 / 3, 1.0 * 8 / 5, 0.5 * 8 / 3]
    assert "weight" not in examples[1]  # the examples themselves are left as they were


def test_task_means_equal_a_hand_computation_whatever_the_micro_batches(tmp_path):
    tokenizer = tiny_tokenizer()
    examples = task_examples(tokenizer)
    reference = tiny_llama(len(tokenizer), seed=1).double()
    ce = [token_terms(reference, example)[0] for example in examples]
    expected = task_mean_objective(ce, examples).item()
    pooled = sum(e["weight"] * t.sum() for t, e in zip(ce, examples, strict=True)).item() / sum(t.numel() for t in ce)
    assert abs(expected - pooled) > 0.2  # pooling over tokens would be a different objective
    for batch_size, grad_accum, seed in [(4, 1, 0), (1, 4, 0), (2, 2, 1), (1, 4, 2)]:
        config = TrainConfig(output_dir=str(tmp_path / f"run{batch_size}-{seed}"), max_steps=1, batch_size=batch_size,
                             grad_accum=grad_accum, bf16=False, warmup_steps=0, seed=seed)
        result = train(tiny_llama(len(tokenizer), seed=1), examples, train_config=config, loss_config=LossConfig(kd_weight=0),
                       pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
        assert result.history[0]["ce"] == pytest.approx(expected, rel=1e-5), (batch_size, grad_accum, seed)


def test_task_means_gradient_is_the_same_for_any_split_and_order_of_the_step():
    tokenizer = tiny_tokenizer()
    examples = task_examples(tokenizer)
    reference = tiny_llama(len(tokenizer), seed=1).double()
    task_mean_objective([token_terms(reference, example)[0] for example in examples], examples).backward()
    expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
    model = tiny_llama(len(tokenizer), seed=1)
    objective = StudentObjective(model, LossConfig(kd_weight=0, fused=False), len(tokenizer))
    for split in ([[0, 1, 2, 3]], [[3], [1], [0], [2]], [[2, 0], [1, 3]]):
        model.zero_grad()
        step = [examples[i] for batch in split for i in batch]
        step_tokens = sum(num_targets(example) for example in step)
        for batch in task_scaled(step, [[examples[i] for i in batch] for batch in split], step_tokens):
            (objective(collate(batch, tokenizer.pad_token_id), None, 0.0)[0] / step_tokens).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        assert torch.allclose(grads, expected, rtol=1e-4, atol=1e-6), split


@pytest.mark.parametrize("fused,with_tasks", [(True, True), (False, True), (True, False)])
def test_weighted_records_train_on_the_teachers_topk_targets(tmp_path, fused, with_tasks):
    tokenizer = tiny_tokenizer()
    examples = task_examples(tokenizer, with_tasks)
    teacher = tiny_llama(len(tokenizer), seed=2).double()
    targets = []
    for example in examples:  # what read_targets gives: per example, the top-4 of each target row
        labels = torch.tensor(example["labels"][1:])
        with torch.no_grad():
            rows = torch.log_softmax(teacher(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1][labels != -100], -1)
        values, ids = rows.topk(4, dim=-1)
        targets.append((ids, values.float()))
    reference = tiny_llama(len(tokenizer), seed=1).double()
    terms = [token_terms(reference, example, target) for example, target in zip(examples, targets, strict=True)]
    kd_weight = 0.6
    mixed = [(1 - kd_weight) * ce + kd_weight * kd for ce, kd in terms]
    if with_tasks:
        expected = task_mean_objective(mixed, examples).item()
    else:  # weights only: each token's loss times its record's weight, over all target tokens
        expected = (sum(e["weight"] * t.sum() for t, e in zip(mixed, examples, strict=True)) / sum(t.numel() for t in mixed)).item()
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, grad_accum=2, bf16=False, warmup_steps=0)
    result = train(tiny_llama(len(tokenizer), seed=1), examples, train_config=config, topk_targets=targets,
                   loss_config=LossConfig(kd_weight=kd_weight, divergence="fkl", fused=fused),
                   pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    # abs: the fp32 model sums per-token terms of order 1, so the total carries ~1e-7 of rounding (float64 reference)
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-5, abs=2e-7)
    kd_only = task_mean_objective([kd for _, kd in terms], examples).item() if with_tasks else None
    if kd_only is not None:
        assert result.history[0]["kd"] == pytest.approx(kd_only, rel=1e-5, abs=2e-7)


def test_task_records_are_refused_with_an_on_policy_method(tmp_path):
    tokenizer = tiny_tokenizer()

    class Method:  # the loop checks before it uses the method
        pass

    with pytest.raises(KdlmError, match="per-task means.*method.name=offpolicy"):
        train(tiny_llama(len(tokenizer)), task_examples(tokenizer), train_config=TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=1),
              loss_config=LossConfig(kd_weight=0), pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
              method=Method())


# ---- the recipe against a served teacher -----------------------------------------------------------


def generate_config(tmp_path: Path, url: str, *overrides: str):
    return load_generate_config(ROOT / "configs" / "cot.yaml", [
        f"teacher.base_url={url}", "teacher.model=arith-teacher", "progress=false", f"output={tmp_path}/cot.jsonl",
        "recipe.task.format=arith", "recipe.task.source=arith:30:0", "recipe.task.limit=null", "recipe.heldout=5",
        "recipe.prompt=zero_shot", *overrides,
    ])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class MuteTeacher(ArithTeacher):
    """Writes rationales without any answer; states the answer only when asked for it (stage 2)."""

    def answer(self, messages, seed):
        if messages[-1]["content"] == cot.FINAL_ANSWER_CUE:
            return super().answer(messages[:1], seed)
        return "I worked it out in my head."


def test_rationalization_is_the_fallback_when_no_sample_is_correct(tmp_path):
    with ServerThread(ArithTeacher(error_rate=1.0)) as server:  # every sample slips
        stats = cot.run(generate_config(tmp_path, server.url, "sampling.n=2", "recipe.format=finetune_cot"))
    assert stats["kept"] == stats["rationalized"] == stats["questions"] == 25
    records = read_jsonl(tmp_path / "cot.jsonl")
    assert {record["meta"]["source"] for record in records} == {"rationalization"}
    golds = {str(p["answer"]) for p in make_dataset(30, 0)}
    assert all(cot.parse_student_output(r["response"], cot.parse_recipe(generate_config(tmp_path, "x").recipe))
               == r["meta"]["gold"] in golds for r in records)


def test_unlabelled_questions_get_the_majority_answer_as_label(tmp_path):
    problems = make_dataset(12, seed=5)
    task = tmp_path / "unlabelled.jsonl"
    task.write_text("".join(json.dumps({"question": p["question"]}) + "\n" for p in problems))
    common = ["recipe.task.format=qa", f"recipe.task.source={task}", "recipe.heldout=0", "sampling.n=5"]
    with ServerThread(ArithTeacher(error_rate=0.2)) as server:
        with pytest.raises(KdlmError, match="use recipe.filter=majority"):
            cot.run(generate_config(tmp_path, server.url, *common))
        stats = cot.run(generate_config(tmp_path, server.url, *common, "recipe.filter=majority",
                                        "recipe.min_agreement=0.6", "recipe.format=finetune_cot"))
    golds = {p["question"]: str(p["answer"]) for p in problems}
    records = read_jsonl(tmp_path / "cot.jsonl")
    # With 5 samples at a 20% slip rate, a wrong answer almost never wins 3 votes: labels equal the truth.
    assert stats["questions_kept"] >= 10 and stats["rationalized"] == 0
    assert all(cot.parse_student_output(r["response"], cot.parse_recipe(generate_config(tmp_path, "x").recipe))
               == golds[r["prompt"]] for r in records)
    assert all(r["meta"]["gold"] is None for r in records)


def test_two_stage_asks_for_the_answer_a_rationale_does_not_state(tmp_path):
    with ServerThread(MuteTeacher()) as server:
        for mode in ("always", "missing"):
            stats = cot.run(generate_config(tmp_path / mode, server.url, "sampling.n=1", "recipe.rationalize=false",
                                            f"recipe.two_stage={mode}"))
            assert stats["unparsed"] == 0 and stats["kept"] == 25 and stats["answer_calls"] == 25
        with pytest.raises(KdlmError, match="no rationale passed the filter"):
            cot.run(generate_config(tmp_path / "one-stage", server.url, "sampling.n=1", "recipe.rationalize=false",
                                    "recipe.two_stage=off"))


class SecondThoughtsTeacher(ArithTeacher):
    """States a wrong answer (99) after correct steps; asked for its final answer (stage 2), gives the right one."""

    def answer(self, messages, seed):
        if messages[-1]["content"] == cot.FINAL_ANSWER_CUE:
            return super().answer(messages[:1], seed)
        return super().answer(messages, seed).rsplit("Answer:", 1)[0] + "Answer: 99"


def test_zero_shot_two_stage_reads_every_answer_from_the_second_call(tmp_path):
    with ServerThread(SecondThoughtsTeacher()) as server:
        always = cot.run(generate_config(tmp_path / "always", server.url, "sampling.n=2", "recipe.rationalize=false",
                                         "recipe.format=finetune_cot"))
        # missing: every rationale states 99, so no second call is made and the gold filter keeps nothing.
        with pytest.raises(KdlmError, match="no rationale passed the filter"):
            cot.run(generate_config(tmp_path / "missing", server.url, "sampling.n=2", "recipe.rationalize=false",
                                    "recipe.format=finetune_cot", "recipe.two_stage=missing"))
        assert not (tmp_path / "missing" / "cot.final-answers.jsonl").exists()
    # always: 50 samples (two identical per question: one second-stage call each); the second stage's (right)
    # answers pass the gold filter.
    assert (always["samples"], always["answer_calls"], always["kept"]) == (50, 25, 25)  # 2 identical samples: asked once
    first = read_jsonl(tmp_path / "always" / "cot.rationales.jsonl")[0]["messages"][0]["content"]
    assert first.endswith("\n\n" + cot.KOJIMA_CUE) and "Answer:" not in first  # the cue alone, no format request
    records = read_jsonl(tmp_path / "always" / "cot.jsonl")
    assert all(r["response"].endswith(f"--> {r['meta']['gold']} END") and "99" not in r["response"] for r in records)


def test_generate_cli_runs_the_recipe_resumes_and_distill_trains_on_it(tmp_path):
    teacher = ArithTeacher(error_rate=0.3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "KDLM_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    with ServerThread(teacher) as server:
        args = [*KDLM, "generate", str(ROOT / "configs" / "cot.yaml"), f"teacher.base_url={server.url}",
                "teacher.model=arith-teacher", "progress=false", f"output={tmp_path}/cot.jsonl", "recipe.task.format=arith",
                "recipe.task.source=arith:40:1", "recipe.task.limit=null", "recipe.heldout=8", "sampling.n=3",
                "recipe.format=step_by_step", "recipe.rationale_weight=0.5"]
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        sent = teacher.requests
        again = subprocess.run(args, env=env, capture_output=True, text=True)
        assert again.returncode == 0 and teacher.requests == sent  # the rerun pays for nothing twice
    samples_file = read_jsonl(tmp_path / "cot.rationales.jsonl")
    assert len(samples_file) == 32 * 3  # 40 problems less 8 held out, 3 samples each
    # cot.yaml: two_stage always, one answer call per distinct (question, rationale)
    assert len(read_jsonl(tmp_path / "cot.final-answers.jsonl")) == len({json.dumps(s["messages"]) for s in samples_file})
    assert samples_file[0]["messages"][0]["content"].endswith("\n\nLet's think step by step.")  # zero-shot (cot.yaml)
    golds = {p["question"]: str(p["answer"]) for p in make_dataset(40, 1)}
    wrong = {cot.split_rationale(s["messages"][-1]["content"]) for s in samples_file
             if extract_number(s["messages"][-1]["content"], reading="rationale") != golds[s["messages"][-2]["content"].split("\n\n")[0]]}
    assert wrong, "the teacher slipped at 30%: some samples must be wrong"
    records = read_jsonl(tmp_path / "cot.jsonl")
    rationales = [r for r in records if r["meta"]["task"] == "rationale"]
    assert rationales and not {r["response"] for r in rationales} & wrong  # the filter removed every wrong one
    assert all(r["weight"] == 0.5 for r in rationales)
    labels = [r for r in records if r.get("task") == "label"]
    assert len(labels) == 32 and all(r["response"] == r["meta"]["gold"] and r["weight"] == 0.5 for r in labels)
    assert len(read_jsonl(tmp_path / "cot.heldout.jsonl")) == 8

    save_tiny_teacher(tmp_path / "teacher", num_layers=2)
    proc = subprocess.run([*KDLM, "distill", str(ROOT / "configs" / "quickstart.yaml"), f"teacher.model={tmp_path}/teacher",
                           f"data.train={tmp_path}/cot.jsonl", "data.teacher_answers=false", "data.heldout=0",
                           "loss.kd_weight=0", "student.init=random", "student.num_layers=1", "train.max_steps=2",
                           "train.batch_size=4", f"train.output_dir={tmp_path}/student", "eval.enabled=false"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "student" / "student" / "config.json").is_file()


def test_a_recipe_killed_mid_run_resumes_without_asking_twice(tmp_path):
    import signal
    import time

    teacher = ArithTeacher(error_rate=0.2, latency_s=0.05)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with ServerThread(teacher) as server:
        args = [*KDLM, "generate", str(ROOT / "configs" / "cot.yaml"), f"teacher.base_url={server.url}",
                "teacher.model=arith-teacher", "progress=false", f"output={tmp_path}/cot.jsonl", "recipe.task.format=arith",
                "recipe.task.source=arith:40:2", "recipe.task.limit=null", "recipe.heldout=0", "recipe.prompt=zero_shot",
                "sampling.n=3", "limits.concurrency=4"]
        first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while teacher.requests < 30:
            assert first.poll() is None, "the first run ended before it was killed"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait()
        asked_before = teacher.requests
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert asked_before < 40 * 3  # killed inside the rationale stage
    samples = read_jsonl(tmp_path / "cot.rationales.jsonl")
    assert len(samples) == 40 * 3
    repeated = sum(times - 1 for times in teacher.seen.values())
    assert repeated <= 4  # at most the requests in flight at the kill (limits.concurrency) were asked again


def test_an_unknown_recipe_is_a_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([*KDLM, "generate", "recipe.name=nope", f"output={tmp_path}/x.jsonl"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "must name a recipe" in proc.stderr and "'nope'" in proc.stderr


@pytest.mark.slow
def test_cot_and_icl_configs_run_against_kdlm_serve_with_the_bundled_teacher(tmp_path):
    """`kdlm generate configs/cot.yaml` and `configs/icl.yaml` against `kdlm serve bundled:...`, at tiny sizes."""
    import time

    import httpx

    from kdlm.final_answer import extract_answer
    from kdlm.serve import free_port

    shared_data()
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",  # the user's KDLM_CACHE: the converted teacher is reused
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([*KDLM, "serve", "bundled:smollm2-135m-instruct", "--port", str(port), "--threads", "1",
                               "--dtype", "auto"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(url + "/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        common = [f"teacher.base_url={url}", "progress=false", "sampling.max_tokens=40"]
        # SCoTD's unfiltered corpus: the 135M teacher rarely gets GSM8K right, but every parsed answer is kept.
        cot_run = subprocess.run([*KDLM, "generate", str(ROOT / "configs" / "cot.yaml"), *common,
                                  f"output={tmp_path}/cot.jsonl", "sampling.n=2", "recipe.task.limit=5",
                                  "recipe.heldout=1", "recipe.demonstrations=1", "recipe.filter=none"],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
        assert cot_run.returncode == 0, cot_run.stdout + cot_run.stderr
        icl_run = subprocess.run([*KDLM, "generate", str(ROOT / "configs" / "icl.yaml"), *common,
                                  f"output={tmp_path}/icl.jsonl", "sampling.max_tokens=3", "recipe.queries=2",
                                  "recipe.heldout=1", "sampling.n=1"],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
        assert icl_run.returncode == 0, icl_run.stdout + icl_run.stderr
    finally:
        server.terminate()
        server.wait()
    samples_by_question = {}  # what the teacher answered, in its rationales and in the second stage
    for stage in ("rationales", "final-answers"):
        for sample in read_jsonl(tmp_path / f"cot.{stage}.jsonl"):
            question = sample["messages"][0]["content"].split("\n\n")[0]
            samples_by_question.setdefault(question, []).append(extract_answer(sample["messages"][-1]["content"], "number", reading="rationale"))
    records = read_jsonl(tmp_path / "cot.jsonl")
    assert records and all(r["task"] in ("label", "rationale") for r in records)
    for record in (r for r in records if r["task"] == "label"):  # the teacher's own answers, else the gold one
        expected = samples_by_question[record["prompt"].removeprefix("[label] ")]
        assert record["response"] in expected if record["meta"]["source"] == "teacher" else record["response"] == record["meta"]["gold"]
    icl_records = load_records(str(tmp_path / "icl.jsonl"))
    assert all(r["messages"][-1]["content"] in ("Yes", "No") for r in icl_records if "messages" in r)
    assert len(read_jsonl(tmp_path / "icl.eval.jsonl")) == 3 * 2  # 3 tasks x 1 held-out query x (0, 2 shots)


def test_worked_solutions_stand_in_for_teacher_rationales(tmp_path):
    data = shared_data()
    config = load_generate_config(ROOT / "configs" / "cot.yaml", [
        "teacher.base_url=http://127.0.0.1:9/v1", "progress=false", f"output={tmp_path}/cot.jsonl",  # nothing listens
        f"recipe.task.source={data}/gsm8k/train.jsonl", "recipe.task.limit=6", "recipe.heldout=1",
        "recipe.rationales=dataset", "recipe.format=finetune_cot",
    ])
    stats = cot.run(config)  # no request is sent: an unreachable teacher would stop the run
    assert stats["samples"] == 0 and stats["records"] == 5
    solutions = {example["question"]: example for example in load_task(TaskSpec(source=f"{data}/gsm8k/train.jsonl",
                                                                                  format="gsm8k", limit=6))}
    for record in read_jsonl(tmp_path / "cot.jsonl"):
        example = solutions[record["prompt"]]
        assert record["response"] == f"{example['rationale']} --> {example['answer']} END"
