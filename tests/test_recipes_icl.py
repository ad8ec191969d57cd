"""In-context learning distillation: k-shot prompts, settings, teacher labels by vote, LM records; the
recipe end to end against a served teacher, then training and zero-/k-shot evaluation of a tiny student."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kdlm.config import LossConfig, TrainConfig
from kdlm.data import encode_records, load_records
from kdlm.errors import KdlmError
from kdlm.generate import load_generate_config
from kdlm.recipes import icl
from kdlm.recipes.arith import ArithTeacher, make_dataset
from kdlm.recipes.tasks import TaskSpec
from kdlm.serve import ServerThread
from kdlm.train.loop import train
from tiny import scripted_model, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_kshot_prompt_layout():
    demos = [{"id": 0, "question": "2 + 2?", "answer": "4"}, {"id": 1, "question": "3 + 1?", "answer": "4"}]
    assert icl.kshot_prompt(demos, "5 + 1?", "Add the numbers.") == (
        "Add the numbers.\n\nInput: 2 + 2?\nOutput: 4\n\nInput: 3 + 1?\nOutput: 4\n\nInput: 5 + 1?\nOutput:"
    )
    assert icl.kshot_prompt([], "5 + 1?") == "Input: 5 + 1?\nOutput:"  # zero-shot


def test_demonstrations_never_include_the_query():
    pool = [{"id": i, "question": f"q{i}", "answer": str(i)} for i in range(4)]
    rng = random.Random(0)
    for _ in range(50):
        demos = icl.draw_demonstrations(pool, pool[2], 3, rng)
        assert {d["id"] for d in demos} == {0, 1, 3}
    with pytest.raises(KdlmError, match="lower recipe.shots"):
        icl.draw_demonstrations(pool, pool[0], 4, rng)


def arith_task(source="arith:30:0", **fields):
    return {"source": source, "format": "arith", **fields}


def test_settings_are_checked():
    with pytest.raises(KdlmError, match="set recipe.eval_tasks"):
        icl.parse_recipe({"setting": "meta", "tasks": [arith_task()]})
    with pytest.raises(KdlmError, match="must be unseen"):
        icl.parse_recipe({"setting": "meta", "tasks": [arith_task()], "eval_tasks": [arith_task()]})
    with pytest.raises(KdlmError, match="eval_tasks is for setting=meta"):
        icl.parse_recipe({"tasks": [arith_task()], "eval_tasks": [arith_task("arith:30:1")]})
    with pytest.raises(KdlmError, match="recipe.tasks.0.answer_type"):
        icl.parse_recipe({"tasks": [arith_task(answer_type="words")]})


def test_multitask_holds_out_queries_meta_holds_out_tasks():
    multitask = icl.parse_recipe({"tasks": [arith_task()], "shots": 2, "heldout": 5})
    items = icl.build_training_prompts(multitask)
    evaluation = icl.evaluation_prompts(multitask)
    trained = {item["prompt"].rsplit("Input: ", 1)[1] for item in items}
    held = {record["prompt"].rsplit("Input: ", 1)[1] for record in evaluation}
    assert len(items) == 25 and len(evaluation) == 10 and not trained & held  # 5 queries x (0-shot, 2-shot)
    assert sorted(record["meta"]["shots"] for record in evaluation) == [0] * 5 + [2] * 5
    meta = icl.parse_recipe({"setting": "meta", "tasks": [arith_task()], "eval_tasks": [arith_task("arith:30:7")],
                             "heldout": 4, "shots": 2})
    assert len(icl.build_training_prompts(meta)) == 30  # every example of a training task trains
    assert {r["meta"]["task"] for r in icl.evaluation_prompts(meta)} == {"arith:30:7"}


def test_teacher_labels_by_majority_and_ties_are_dropped():
    spec = TaskSpec(source="x", answer_type="label", labels=["Yes", "No"])
    items = [{"spec": spec}, {"spec": spec}, {"spec": spec}]
    texts = {(0, 0): "Yes", (0, 1): "yes", (0, 2): "No",  # 2 of 3
             (1, 0): "Yes", (1, 1): "No", (1, 2): "not sure",  # a tie
             (2, 0): "hmm", (2, 1): "?"}  # nothing parses (and one sample is missing)
    assert icl.label_queries(items, texts, 3) == ["Yes", None, None]


def test_training_records_add_the_lm_term_on_demonstrations():
    item = {"task": "t", "gold": "4", "prompt": "P",
            "demonstrations": [{"question": "2 + 2?", "answer": "4"}, {"question": "1 + 0?", "answer": "1"}]}
    records = icl.training_records([item, dict(item)], ["4", None], lm_weight=0.5)
    assert records == [
        {"prompt": "P", "response": "4", "weight": 1.0, "meta": {"task": "t", "gold": "4"}},
        {"text": "Input: 2 + 2?\nOutput: 4\n\nInput: 1 + 0?\nOutput: 1", "weight": 0.5,
         "meta": {"task": "t", "gold": "4", "task_kind": "lm"}},
    ]
    assert len(icl.training_records([item], ["4"], lm_weight=0.0)) == 1


def test_icl_recipe_end_to_end_then_train_and_evaluate(tmp_path):
    teacher = ArithTeacher(error_rate=0.0)
    with ServerThread(teacher) as server:
        config = load_generate_config(ROOT / "configs" / "icl.yaml", [
            f"teacher.base_url={server.url}", "teacher.model=arith-teacher", "progress=false",
            f"output={tmp_path}/icl.jsonl", "sampling.n=3", "sampling.max_tokens=64",
            'recipe.tasks=[{"source": "arith:24:0", "format": "arith"}, {"source": "arith:24:1", "format": "arith"}]',
            "recipe.queries=6", "recipe.heldout=4", "recipe.shots=2",
        ])
        stats = icl.run(config)
        assert teacher.requests == 2 * 6 * 3
    assert stats["labelled"] == stats["agree_with_gold"] == 12  # an exact teacher agrees with gold
    records = load_records(str(tmp_path / "icl.jsonl"))
    assert sum("text" in record for record in records) == 12 and all(r["weight"] in (1.0, 0.5) for r in records)
    for record in (r for r in records if "messages" in r):  # the answer is the query's, not a demonstration's
        query = record["messages"][0]["content"].rsplit("Input: ", 1)[1]
        golds = {p["question"]: str(p["answer"]) for seed in (0, 1) for p in make_dataset(24, seed)}
        assert record["messages"][1]["content"] == golds[query.removesuffix("\nOutput:")]

    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    examples = encode_records(tokenizer, records, max_length=512)
    train(model, examples, train_config=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, bf16=False),
          loss_config=LossConfig(kd_weight=0), pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    evaluation = [json.loads(line) for line in (tmp_path / "icl.eval.jsonl").read_text().splitlines()]
    assert len(evaluation) == 2 * 4 * 2
    scores = icl.evaluate(model, tokenizer, load_records(str(tmp_path / "icl.eval.jsonl")), max_new_tokens=4)
    assert set(scores) == {(task, shots) for task in ("arith:24:0", "arith:24:1") for shots in (0, 2)}
    # A model that answers one held-out query's gold to every prompt: each group's score, counted here from
    # the written file, is the share of its golds equal to that answer (known, and not all 0 or all 1).
    golds = [str(record["meta"]["gold"]) for record in evaluation]
    answer = next(gold for gold in golds if len(set(gold)) == len(gold))  # the scripted model writes each token once
    expected: dict[tuple[str, int], list[bool]] = {}
    for record in evaluation:
        key = (record["meta"]["task"], int(record["meta"]["shots"]))
        expected.setdefault(key, []).append(float(record["meta"]["gold"]) == float(answer))
    expected = {key: sum(hits) / len(hits) for key, hits in expected.items()}
    assert 0 < max(expected.values()) and min(expected.values()) < 1
    scripted = icl.evaluate(scripted_model(tokenizer, answer), tokenizer, evaluation, max_new_tokens=4)
    assert scripted == pytest.approx(expected)
