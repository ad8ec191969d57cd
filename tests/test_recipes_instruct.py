"""Instruction-following recipes (Self-Instruct, Evol-Instruct, Lion) and SeqKD on their output.

Unit tests feed the filters and parsers crafted inputs with hand-written expectations. Integration
tests run each recipe end to end over HTTP on loopback: against a scripted OpenAI-compatible teacher
whose answers are known (tests/scripted_teacher.py), so the recipes' counts can be predicted by hand;
against `kdlm serve` with a tiny random model, whose gibberish the recipes must survive; and through
the CLI, killed mid-run and resumed. A tiny `kdlm distill` with configs/seqkd.yaml then trains on the
produced JSONL and its first-step loss is checked against cross-entropy computed here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer

from conftest import shared_data
from kdlm.data import load_records
from kdlm.errors import KdlmError
from kdlm.generate import GenerateConfig, load_generate_config
from kdlm.generate.recipe_settings import LionSettings
from kdlm.recipes.calls import run_recipe
from kdlm.recipes.evol_instruct import clean_evolution, elimination_reason, parse_equal
from kdlm.recipes.filters import (
    ExactDedup,
    RougeNovelty,
    instruction_problem,
    looks_unanswered,
    only_punctuation_and_stop_words,
)
from kdlm.recipes.lion import creation_sampling, generation_problem, judge, parse_scores
from kdlm.recipes.self_instruct import (
    clean_instances,
    encode_prompt,
    load_seed_tasks,
    parse_instances,
    parse_instances_input_first,
    parse_instances_output_first,
    parse_instructions,
    parse_yes_no,
)
from scripted_teacher import AppThread, scripted_app

ROOT = Path(__file__).resolve().parents[1]


def seed_tasks_path() -> Path:
    return shared_data() / "self-instruct-seed" / "seed_tasks.jsonl"


SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


# ---------------------------------------------------------------- filters

def test_exact_dedup_ignores_case_and_spacing_only():
    dedup = ExactDedup(["Give me a list of fruits."])
    assert not dedup.add("give me  a list of FRUITS.")  # same text
    assert dedup.add("Give me a list of fruits!")  # punctuation differs: not an exact duplicate
    assert "GIVE ME A LIST OF FRUITS!" in dedup


def test_rouge_novelty_matches_rouge_score_and_a_hand_computed_value():
    pool = RougeNovelty(["Give me three reasons to learn Python.", "Write a poem about the sea."])
    # Candidate tokens: give three reasons to learn python (6); pool: give me three reasons to learn python (7).
    # LCS 6: precision 6/6, recall 6/7, F = 2 * 6/7 / (1 + 6/7) = 12/13.
    check = pool.check("Give three reasons to learn Python")
    assert check.max_score == pytest.approx(12 / 13)
    assert check.max_score == pytest.approx(rouge_l("Give me three reasons to learn Python.", "Give three reasons to learn Python"))
    assert not check.novel  # a near-duplicate over 0.7
    assert list(check.most_similar)[0] == "Give me three reasons to learn Python."
    # "write a short story about the sea" vs "write a poem about the sea": LCS = write a about the sea = 5;
    # P = 5/7, R = 5/6, F = 2PR/(P+R) = 10/13 = 0.769: not novel either. Below it, a novel one.
    assert pool.check("Write a short story about the sea.").max_score == pytest.approx(10 / 13)
    novel = pool.check("Translate this sentence into French.")
    assert novel.novel and novel.max_score == 0.0
    # The threshold is strict: exactly 0.7 is not novel.
    assert not RougeNovelty(["a b c d e f g h i j"], threshold=0.7).check("a b c d e f g x y z").novel  # F = 0.7


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Write a haiku about autumn leaves.", None),
        ("", "empty"),
        ("Sort these numbers.", "too_short"),  # 3 words
        ("Sort these four numbers.", None),  # 4 words: kept
        (" ".join(["word"] * 151), "too_long"),
        ("Draw a cat using ASCII art.", "blocked_word"),
        ("Describe the IMAGES in the article.", "blocked_word"),
        ("Tell me how to go to the station.", "blocked_word"),
        ("Explain how a graphical user interface works.", None),  # "graph" only as part of a word
        ("Write a program that sorts a list.", "program"),
        ("- List five fruits that are red.", "punctuation_start"),
        ("\"Quote\" the first line of a poem.", "punctuation_start"),
        ("Écris un poème sur la mer.", "non_ascii_start"),
    ],
)
def test_self_instruct_heuristic_filters(text, expected):
    assert instruction_problem(text) == expected


def test_a_truncated_item_is_rejected_whatever_its_text():
    assert instruction_problem("Write a haiku about autumn leaves.", truncated=True) == "truncated"


def test_answer_checks_of_the_eliminator():
    assert looks_unanswered("Sorry, I can't help with that.")
    assert not looks_unanswered("Sorry " + "word " * 80)  # long enough: an answer that apologises, then answers
    assert not looks_unanswered("Here is the answer: 42.")
    assert only_punctuation_and_stop_words("It is what it is, and so on...")
    assert only_punctuation_and_stop_words("  ?! ")
    assert not only_punctuation_and_stop_words("It is Paris.")


# ---------------------------------------------------------------- parsers

def test_parse_instructions_drops_the_preamble_and_marks_the_cut_item():
    text = "Sure! Here are some:\n9. Name a fruit that is red.\n10) Explain why\n   the sky is blue.\n11. Cut off he"
    assert parse_instructions(text) == [("Name a fruit that is red.", False), ("Explain why the sky is blue.", False),
                                        ("Cut off he", False)]
    assert parse_instructions(text, truncated=True)[-1] == ("Cut off he", True)
    assert parse_instructions("I cannot think of any tasks.") == []  # unparseable: no numbered item
    # A chat model's commentary after a blank line is not part of the item.
    assert parse_instructions("9. Plan a menu for a week.\n\nThe list is numbered 9 to 16.\n10. Name a bird.") == [
        ("Plan a menu for a week.", False), ("Name a bird.", False)]


def test_parse_yes_no():
    assert parse_yes_no("Yes") is True
    assert parse_yes_no(" no, it is not.") is False
    assert parse_yes_no("**Yes**.") is True
    assert parse_yes_no("Maybe") is None
    assert parse_yes_no("Task: No") is False  # an echoed label (the bundled teacher does this)
    assert parse_yes_no("Task: You need to write") is None
    assert parse_yes_no("Nobody knows") is None  # "no" must be a whole word


def test_parse_instances_input_first_and_output_first():
    text = ("Example 1\nInput: 2 + 2\nOutput: 4\n"
            "Example 2\nInput: none\nOutput: Paris is the capital of France.\n"
            "Example 3\nInput: half an example")  # no output: skipped
    assert parse_instances_input_first(text) == [{"input": "2 + 2", "output": "4"},
                                                 {"input": "", "output": "Paris is the capital of France."}]
    assert parse_instances_input_first("Output: just an answer") == [{"input": "", "output": "just an answer"}]
    assert parse_instances_input_first("gibberish without structure") == []
    labelled = "Class label: positive\nInput: I loved it.\nClass label: negative\nInput: Awful.\nClass label: neutral"
    assert parse_instances_output_first(labelled) == [{"input": "I loved it.", "output": "positive"},
                                                      {"input": "Awful.", "output": "negative"},
                                                      {"input": "", "output": "neutral"}]
    assert parse_instances_output_first("no labels here") == []
    assert parse_instances(labelled, output_first=True, truncated=True) == parse_instances_output_first(labelled)[:2]
    assert parse_instances(text, output_first=False) == parse_instances_input_first(text)


def test_clean_instances_applies_the_reference_post_processing():
    # An input or output ending in ":" is an incomplete generation: dropped, the others kept.
    assert clean_instances([{"input": "Translate:", "output": "x"}, {"input": "a", "output": "The answer is:"},
                            {"input": "b", "output": "c"}], 5) == [{"input": "b", "output": "c"}]
    # Two instances with the same non-empty input but different outputs: the task loses all its instances.
    assert clean_instances([{"input": "2 + 2", "output": "4"}, {"input": "2 + 2", "output": "5"},
                            {"input": "3 + 3", "output": "6"}], 5) == []
    # ... but not for an empty input (a task without input has many answers), nor for an exact duplicate.
    assert len(clean_instances([{"input": "", "output": "one poem"}, {"input": "", "output": "another poem"},
                                {"input": "q", "output": "r"}, {"input": "q", "output": " r"}], 5)) == 3
    # At most `limit`, drawn at random with an rng (the reference's random.sample), the first ones without.
    many = [{"input": f"in {i}", "output": f"out {i}"} for i in range(8)]
    drawn = [clean_instances(many, 5, random.Random(seed)) for seed in range(20)]
    assert all(len(d) == 5 and all(i in many for i in d) for d in drawn) and len({json.dumps(d) for d in drawn}) > 1
    assert clean_instances(many, 5) == many[:5]


def test_encode_prompt_draws_the_reference_layouts_and_prepares_inputs():
    assert encode_prompt(" Add the numbers. ", " 2 3 ", None) == "Add the numbers.\n\n2 3"
    assert encode_prompt("Name a bird.", "", None) == "Name a bird."
    seen, stripped = set(), 0
    for seed in range(200):
        prompt = encode_prompt("Classify the sentiment.", "Sentence: I loved it.\n\nA lot.", random.Random(seed))
        kept = reference_encodings("Classify the sentiment.", "Sentence: I loved it.\n\nA lot.")
        prepared = reference_encodings("Classify the sentiment.", "I loved it.\nA lot.")  # one field name: dropped
        assert prompt in kept + prepared
        seen.add(prompt)
        stripped += prompt in prepared
    assert len(seen) == 14 and 60 < stripped < 140  # all 7 layouts x both inputs; preparation about half the time
    two_fields = {encode_prompt("Compare.", "A: x\nB: y", random.Random(seed)) for seed in range(100)}
    assert all("A: x" in prompt for prompt in two_fields)  # two field names: the input keeps them
    assert {encode_prompt("Name a bird.", "", random.Random(seed)) for seed in range(100)} == set(reference_encodings("Name a bird.", ""))


def test_lion_generation_filters_on_crafted_generations():
    assert generation_problem("Describe the water cycle to a child in simple words.", truncated=False) is None
    assert generation_problem("Write an Instruction that asks for a poem about rain.", False) == "instruction_word"
    assert generation_problem("Describe the water cycle to a child in simple", truncated=True) == "truncated"
    assert generation_problem("Name three rivers.", False) == "too_short"  # three words or fewer
    assert generation_problem("Name four big rivers.", False) is None
    assert generation_problem("- List the planets of the solar system.", False) == "punctuation_start"
    assert generation_problem("Écrivez un poème sur la mer et le ciel.", False) == "non_ascii_start"
    assert generation_problem("", False) == "empty"


def test_lion_creation_sampling_follows_the_reference():
    settings = LionSettings(student={"model": "student"})
    sampling = creation_sampling(settings, "Solve this riddle about time [hard]")  # 6 words
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (1.0, 1.0, 24)
    capped = LionSettings(student={"model": "student"}, create={"max_tokens": 10})
    assert creation_sampling(capped, "Solve this riddle about time [hard]").max_tokens == 10
    assert creation_sampling(LionSettings(student={"model": "student"}, create_tokens_per_word=None), "a b").max_tokens == 1024


def test_lion_drops_cut_off_and_instruction_generations_and_draws_seeds_at_random(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    # Hard seeds: 2 words give max_tokens 8, which cuts the scripted answer (13 words); 6 words do not.
    lines = ["Riddle [hard]", "Solve this riddle about time [hard]", "Prove that the root of two is irrational [hard]",
             "What colour is the sky?"]
    prompts.write_text("".join(json.dumps({"prompt": line}) + "\n" for line in lines))
    with AppThread(scripted_app()) as server:
        recipe = {"name": "lion", "rounds": 1, "new_hard": 12, "new_easy": 0, "student": {"model": "student", "base_url": server.url}}
        stats = run_recipe(recipe_config(tmp_path, server.url, recipe, prompts=str(prompts)))
        sent = [p for p in server.app.state.prompts if p.startswith("Take inspiration from the instruction below")]
    seeds = [p.split("Instruction:\n", 1)[1].split("\n\nNew instruction:", 1)[0] for p in sent]
    assert len(seeds) == 12 and set(seeds) == set(lines[:3])  # drawn at random: not cycled in order
    assert seeds != [lines[i % 3] for i in range(12)]
    assert stats["new_hard_rejected_truncated"] == seeds.count("Riddle [hard]") >= 1
    assert stats["new_hard"] == 12 - seeds.count("Riddle [hard]")


def test_clean_instances_drops_duplicates_empty_outputs_and_copies():
    instances = [{"input": "a", "output": "b"}, {"input": "a", "output": " b "}, {"input": "x", "output": ""},
                 {"input": "same", "output": "same"}, {"input": "c", "output": "d"}, {"input": "e", "output": "f"}]
    assert clean_instances(instances, limit=5) == [{"input": "a", "output": "b"}, {"input": "c", "output": "d"},
                                                   {"input": "e", "output": "f"}]
    assert len(clean_instances(instances, limit=2)) == 2
    assert clean_instances([{"input": "", "output": "Output: \nOutput:"}, {"input": "x", "output": "y Input: z"}], 5) == []


def test_evol_eliminator_rules():
    assert parse_equal("Equal") is True
    assert parse_equal("Not Equal.") is False
    assert parse_equal("not equal") is False
    assert parse_equal("I think so") is None
    assert clean_evolution('  "Name five rivers."  ') == "Name five rivers."
    ok = "Name five European rivers longer than 1,000 km."
    assert elimination_reason(ok, "The Danube, the Volga, ...", False) is None
    assert elimination_reason("", None, None) == "empty"
    assert elimination_reason("#Rewritten Prompt#: Name rivers.", None, None) == "copied_template"
    assert elimination_reason("Here is the rewritten prompt: name rivers", None, None) == "copied_template"
    assert elimination_reason(ok, "Danube", True) == "no_information_gain"
    assert elimination_reason(ok, "Sorry, I don't know these rivers.", False) == "hard_to_answer"
    assert elimination_reason(ok, "It is, and so on.", False) == "stop_words_only"


def test_referee_scores_and_both_orders():
    assert parse_scores("Assistant 1 is more detailed.\n8 6") == (8.0, 6.0)
    assert parse_scores("Reasons...\n\n7.5, 9\n") == (7.5, 9.0)
    assert parse_scores("Reasons\n8/10 6/10") == (8.0, 6.0)
    assert parse_scores("Both are good.") is None  # unparseable
    assert parse_scores("Reasons\n8 6 7") is None  # three numbers
    assert parse_scores("Reasons\n11 3") is None  # out of range
    assert parse_scores("") is None
    # Teacher shown first: (10, 9); student shown first: (10, 9). A referee that favours the first answer by one
    # point: averaged over both orders, teacher 9.5, student 9.5, not hard; the first order alone would say hard.
    assert judge((10, 9), (10, 9), gap=1.0) == (9.5, 9.5, False)
    assert judge((10, 4), (5, 9), gap=1.0) == (9.5, 4.5, True)
    assert judge((8, 7), (7, 8), gap=1.0) == (8.0, 7.0, True)  # a gap of exactly 1 is hard


def test_seed_tasks_are_read_and_bad_lines_are_named(tmp_path):
    seeds = load_seed_tasks(str(seed_tasks_path()))
    assert len(seeds) == 175 and sum(task["is_classification"] for task in seeds) > 0
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Fine task here.", "instances": []}\n{"instances": []}\n')
    with pytest.raises(KdlmError, match=r"seeds.jsonl:2: a seed task needs"):
        load_seed_tasks(str(bad))
    with pytest.raises(KdlmError, match="seed tasks not found"):
        load_seed_tasks(str(tmp_path / "missing.jsonl"))


def test_bad_recipe_settings_name_the_key():
    # The recipe's settings are validated with the config, when it is read (before any request).
    with pytest.raises(KdlmError, match=r"recipe.rouge_threshold: .*less than or equal to 1(.|\n)*recipe.colour: unknown key"):
        run_recipe(load_generate_config(ROOT / "configs" / "self_instruct.yaml", ["recipe.rouge_threshold=2", "recipe.colour=red"]))
    with pytest.raises(KdlmError, match="recipe.name must name a recipe"):
        run_recipe(load_generate_config(None, ["recipe.name=nonsense"]))


# ---------------------------------------------------------------- end to end against the scripted teacher

def recipe_config(tmp_path: Path, url: str, recipe: dict, **top) -> GenerateConfig:
    return GenerateConfig.model_validate({
        "output": str(tmp_path / "data.jsonl"), "progress": False,
        "teacher": {"model": "teacher", "base_url": url}, "limits": {"concurrency": 4, "timeout_s": 30},
        "recipe": recipe, **top,
    })


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def self_instruct_recipe(**extra) -> dict:
    return {"name": "self_instruct", "seed_tasks": str(seed_tasks_path()), "num_instructions": 10, "requests_per_round": 2, **extra}


def test_self_instruct_end_to_end(tmp_path):
    with AppThread(scripted_app()) as server:
        stats = run_recipe(recipe_config(tmp_path, server.url, self_instruct_recipe()))
        prompts = list(server.app.state.prompts)
    seeds = [task["instruction"] for task in load_seed_tasks(str(seed_tasks_path()))]
    machine = read_jsonl(tmp_path / "data.instructions.jsonl")
    texts = [entry["instruction"] for entry in machine]
    assert len(texts) == 10
    # Every kept instruction passes the filters and is novel against the seeds and every other kept one.
    assert all(instruction_problem(text) is None for text in texts)
    assert max(rouge_l(seed, text) for seed in seeds for text in texts) < 0.7
    assert max(rouge_l(a, b) for a, b in combinations(texts, 2)) < 0.7
    # Each generation answer (2 rounds x 2 requests) planted one of each defect.
    assert stats["rounds"] == 2
    assert stats["rejected_blocked_word"] == stats["rejected_duplicate"] == stats["rejected_punctuation_start"] == 4
    assert stats["rejected_too_short"] >= 4 and stats["rejected_similar"] >= 1
    # The prompts: 8 examples each, all seeds in round 1, 6 seeds + 2 machine instructions in round 2.
    generation = [prompt for prompt in prompts if "Continue the list with 8 new ones" in prompt]
    assert len(generation) == 4
    for number, prompt in enumerate(generation):
        shown = [line.split(". ", 1)[1] for line in prompt.splitlines() if line[:2] in {f"{i}." for i in range(1, 9)}]
        assert len(shown) == 8
        assert sum(text in seeds for text in shown) == (8 if number < 2 else 6)
    # Classification: the scripted teacher says yes to "Classify ..." tasks; those get output-first instances.
    for entry in machine:
        assert entry["is_classification"] == entry["instruction"].startswith("Classify")
        expected_outputs = {"noun", "verb"} if entry["is_classification"] else None
        assert len(entry["instances"]) == 2  # the planted duplicate / empty / input==output ones are gone
        if expected_outputs:
            assert {instance["output"] for instance in entry["instances"]} == expected_outputs
    output_first = [prompt for prompt in prompts if prompt.startswith("The task is a classification task")]
    assert len(output_first) == sum(entry["is_classification"] for entry in machine) >= 1
    records = read_jsonl(tmp_path / "data.jsonl")
    assert len(records) == 20 == stats["records"]
    # encoding: templates (the default): each prompt is one of the reference's layouts of its instance.
    layouts = set()
    for record in records:
        entry = machine[record["meta"]["instruction_index"]]
        instance = next(i for i in entry["instances"] if i["output"] == record["messages"][1]["content"])
        rendered = reference_encodings(entry["instruction"], instance["input"])
        assert record["messages"][0]["content"] in rendered
        layouts.add(rendered.index(record["messages"][0]["content"]))
    assert len(layouts) >= 3  # drawn at random per instance


def reference_encodings(instruction: str, text: str) -> list[str]:
    """Self-Instruct's prompt encodings (prepare_for_finetuning.py), written out here independently (the
    scripted inputs hold no colon or blank line, so the input preprocessing leaves them as they are)."""
    if text:
        return [f"{instruction}\nInput: {text}\nOutput:", f"{instruction}\n\nInput: {text}\n\nOutput:",
                f"Task: {instruction}\nInput: {text}\nOutput:", f"{instruction}\n\n{text}\n\nOutput:",
                f"{instruction}\n\n{text}", f"{instruction}\n{text}", f"Task: {instruction}\n\n{text}"]
    return [f"{instruction} Output:", f"{instruction}\nOutput:", f"{instruction}\n\nOutput:", instruction,
            f"Task: {instruction}"]


def test_self_instruct_drops_a_cut_off_generation_whole_and_plain_encoding(tmp_path):
    # 40 tokens cut every scripted generation (about 70 words) after a few complete items: all are dropped.
    with AppThread(scripted_app()) as server:
        stats = run_recipe(recipe_config(tmp_path / "cut", server.url, self_instruct_recipe(
            max_rounds=1, generation={"max_tokens": 40})))
        assert stats["generations_truncated"] == 2 and stats["records"] == 0
        assert not any(key.startswith("rejected_") for key in stats)  # no item of them was even looked at
        run_recipe(recipe_config(tmp_path / "plain", server.url, self_instruct_recipe(encoding="plain")))
    machine = read_jsonl(tmp_path / "plain" / "data.instructions.jsonl")
    for record in read_jsonl(tmp_path / "plain" / "data.jsonl"):
        entry = machine[record["meta"]["instruction_index"]]
        instance = next(i for i in entry["instances"] if i["output"] == record["messages"][1]["content"])
        assert record["messages"][0]["content"] == entry["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else "")


def test_classification_only_shows_and_compares_against_classification_seeds_only(tmp_path):
    seeds = load_seed_tasks(str(seed_tasks_path()))
    classification = {task["instruction"] for task in seeds if task["is_classification"]}
    with AppThread(scripted_app()) as server:
        run_recipe(recipe_config(tmp_path, server.url, self_instruct_recipe(classification_only=True, max_rounds=1)))
        prompts = [p for p in server.app.state.prompts if "Continue the list with 8 new ones" in p]
    assert len(prompts) == 2 and all("classification tasks" in prompt for prompt in prompts)
    for prompt in prompts:  # round 1: every example shown is a classification seed
        shown = [line.split(". ", 1)[1] for line in prompt.splitlines() if line[:2] in {f"{i}." for i in range(1, 9)}]
        assert len(shown) == 8 and set(shown) <= classification
    # The novelty pool holds only those seeds: a kept instruction's most similar texts are classification seeds.
    for entry in read_jsonl(tmp_path / "data.instructions.jsonl"):
        assert all(text in classification or text not in {t["instruction"] for t in seeds}
                   for text in entry["most_similar_instructions"])
    no_classification = tmp_path / "seeds.jsonl"
    no_classification.write_text(json.dumps({"instruction": "Write a poem.", "instances": [], "is_classification": False}) + "\n")
    with pytest.raises(KdlmError, match="classification_only.*no seed task"):
        run_recipe(recipe_config(tmp_path / "none", "http://127.0.0.1:9", self_instruct_recipe(
            classification_only=True, seed_tasks=str(no_classification))))


def test_evol_instruct_end_to_end(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = ["Name three rivers in Europe.", "Write a haiku about rain.", "Explain photosynthesis simply.",
             "Repeat after me [copy]", "Describe a cat [marker]", "Prove the conjecture [sorry]", "Say something [stop]"]
    prompts.write_text("".join(json.dumps({"prompt": line}) + "\n" for line in lines))
    with AppThread(scripted_app()) as server:
        stats = run_recipe(recipe_config(tmp_path, server.url, {"name": "evol_instruct", "rounds": 2},
                                         prompts=str(prompts)))
        sent = list(server.app.state.prompts)
    records = read_jsonl(tmp_path / "data.jsonl")
    # 7 originals + 3 clean instructions evolved in each of 2 rounds; each planted defect fails in both rounds.
    assert len(records) == 7 + 3 * 2
    for reason in ("copied_template", "no_information_gain", "hard_to_answer", "stop_words_only"):
        assert stats[f"eliminated_{reason}"] == 2, reason
    assert sum(value for key, value in stats.items() if key.startswith("evolved_")) == 6
    final = [record for record in records if record["meta"]["round"] == 2]
    assert sorted(record["messages"][0]["content"] for record in final) == sorted(f"{line} (step 1) (step 2)" for line in lines[:3])
    assert all(record["meta"]["evolutions"] == 2 for record in final)
    # A failed evolution goes back unchanged: round 2 evolved the original again (same step number).
    assert sum("#The Prompt#:\nProve the conjecture [sorry]\n" in prompt for prompt in sent) == 2
    # The cheap rule ran first: no judge or answer request for an evolution that copied the template.
    assert not any("[marker] now" in prompt for prompt in sent if not prompt.startswith("Rewrite"))


def test_refused_requests_are_skipped_and_failing_ones_stop_the_run_with_what_to_do(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ["Name a river.", "Too long [refuse]"]))
    with AppThread(scripted_app()) as server:
        config = recipe_config(tmp_path, server.url, {"name": "evol_instruct", "rounds": 1}, prompts=str(prompts))
        stats = run_recipe(config)
        # A refused request is sent once, not retried; the recipe goes on without it.
        assert stats["requests_refused"] == 2  # the original's answer and its evolution
        assert [record["messages"][0]["content"] for record in read_jsonl(tmp_path / "data.jsonl")] == [
            "Name a river.", "Name a river. (step 1)"]
        prompts.write_text(json.dumps({"prompt": "Name a lake."}) + "\n" + json.dumps({"prompt": "Busy [down]"}) + "\n")
        config.limits.max_retries, config.limits.backoff_s = 1, 0.01
        before = _cached(tmp_path / "data.sqlite")
        with pytest.raises(KdlmError, match=r"1 requests to teacher failed after 1 retries.*rerun of the same command"):
            run_recipe(config)
        assert _cached(tmp_path / "data.sqlite") == before + 1  # the answer that did arrive is kept


def _cached(cache: Path) -> int:
    if not cache.exists():
        return 0
    with sqlite3.connect(cache) as connection:
        try:
            return connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


def test_lion_end_to_end_with_a_served_student(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = ["Solve this riddle about time [hard]", "Prove that the square root of two is irrational [hard]",
             "What colour is the sky?", "Rate this poem please [junk]"]
    prompts.write_text("".join(json.dumps({"prompt": line}) + "\n" for line in lines))
    with AppThread(scripted_app()) as server:
        recipe = {"name": "lion", "rounds": 2, "new_hard": 3, "new_easy": 2, "referee_retries": 1,
                  "student": {"model": "student", "base_url": server.url}}
        stats = run_recipe(recipe_config(tmp_path, server.url, recipe, prompts=str(prompts)))
        sent = list(server.app.state.prompts)
    # Round 1: 2 hard, 1 easy (the position bias cancels over both orders), the junk review unreadable twice
    # in each order. 3 new hard (distinct), 2 new easy from one seed: the second is an exact duplicate.
    # Round 2 judges 8: hard 2 + 3, easy 1 + 1; 3 new hard; of the 2 new easy, the one written again from the
    # round-1 seed is the same text as in round 1 (this teacher's easy answer depends on the seed only).
    assert stats["judged_hard"] == 2 + 5 and stats["judged_easy"] == 1 + 2
    assert stats["reviews_unparseable"] == 2 * 4 and stats["unjudged_unparseable"] == 2
    assert stats["new_hard"] == 6 and stats["new_easy"] == 2 and stats["new_easy_rejected_duplicate"] == 2
    records = read_jsonl(tmp_path / "data.jsonl")
    assert len(records) == 4 + 4 + 4
    assert all(record["messages"][1]["content"].startswith("Teacher answer") for record in records)
    hard_made = [record for record in records if record["meta"]["origin"] == "hard"]
    assert len(hard_made) == 6 and all(record["messages"][0]["content"].endswith("[hard]") for record in hard_made)
    # Both orders were asked for the easy question: teacher's answer first once, the student's first once.
    reviews = [prompt for prompt in sent if prompt.startswith("A user asked:\nWhat colour is the sky?")]
    firsts = {prompt.split("### Answer 1\n", 1)[1][:13] for prompt in reviews}
    assert firsts == {"Teacher answe", "Good answer: "}


# ---------------------------------------------------------------- kill and resume through the CLI

def _cli(*args: str, cwd: Path, **environment: str) -> subprocess.Popen:
    env = {**os.environ, "KDLM_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **environment,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "kdlm.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_self_instruct_cli_killed_mid_run_resumes_without_paying_twice(tmp_path):
    def args(url: str) -> list[str]:
        return ["generate", str(ROOT / "configs" / "self_instruct.yaml"), f"recipe.seed_tasks={seed_tasks_path()}",
                "recipe.num_instructions=10", "recipe.requests_per_round=2", f"output={tmp_path / 'run' / 'data.jsonl'}",
                "progress=false", "teacher.model=teacher", f"teacher.base_url={url}", "limits.concurrency=2"]

    cache = tmp_path / "run" / "data.sqlite"
    with AppThread(scripted_app(latency_s=0.15)) as server:
        straight = run_recipe(recipe_config(tmp_path / "straight", server.url, self_instruct_recipe()))
        total = straight["requests_sent"]
        proc = _cli(*args(server.url), cwd=tmp_path)
        while _cached(cache) < 8 and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    done_before = _cached(cache)
    assert 8 <= done_before < total, "the kill must land mid-run"
    assert not (tmp_path / "run" / "data.jsonl").exists()
    # The rerun asks a server of its own, so that its count holds only the rerun's requests (none cut by the kill).
    with AppThread(scripted_app(latency_s=0.15)) as fresh:
        rerun = _cli(*args(fresh.url), cwd=tmp_path)
        stdout, stderr = rerun.communicate()
        assert rerun.returncode == 0, stdout + stderr
        resent = fresh.app.state.received
    stats = json.loads((tmp_path / "run" / "data.stats.json").read_text())
    assert stats["requests_cached"] == done_before and stats["requests_sent"] == total - done_before
    assert resent == total - done_before  # nothing the cache held was sent again
    assert (tmp_path / "run" / "data.jsonl").read_text() == (tmp_path / "straight" / "data.jsonl").read_text()


# ---------------------------------------------------------------- junk from a real tiny model behind `kdlm serve`

def _tiny_folder(folder: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    # Byte-level tokens: the recipes' prompts run to ~2,000 tokens, hence the long context.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _run_recipes_against_kdlm_serve(tmp_path: Path, model: str, student: Path, max_tokens: int) -> dict:
    """Serve MODEL with `kdlm serve`, run the three recipes at tiny sizes against it, check what any teacher
    must satisfy (whatever it writes), and return the recipes' statistics."""
    import httpx

    from kdlm.serve import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    env_home = {"KDLM_CACHE": os.environ.get("KDLM_CACHE", str(Path.home() / ".cache" / "kdlm"))}
    server = _cli("serve", model, "--port", str(port), "--threads", "1", "--name", "served", "--dtype", "auto",
                  cwd=tmp_path, **env_home)
    try:
        while True:
            assert server.poll() is None, server.communicate()
            try:
                if httpx.get(url + "/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        sampling = {"max_tokens": max_tokens}
        base = {"teacher": {"model": "served", "base_url": url}, "limits": {"concurrency": 8, "timeout_s": 300},
                "progress": False}
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in
                                   ["Name three rivers in Europe.", "Write a haiku about rain.", "What is 7 times 8?"]))
        runs = {
            "self_instruct": {"name": "self_instruct", "seed_tasks": str(seed_tasks_path()), "num_instructions": 3, "max_rounds": 1,
                              "requests_per_round": 2, "generation": {"max_tokens": 2 * max_tokens},
                              "classify": {"max_tokens": 8}, "instances": sampling},
            "evol_instruct": {"name": "evol_instruct", "rounds": 1, "evolve": sampling, "answer": sampling},
            "lion": {"name": "lion", "rounds": 1, "new_hard": 1, "new_easy": 1, "referee_retries": 0,
                     "answer": sampling, "referee": sampling, "create": sampling,
                     "student": {"backend": "transformers", "model": str(student), "bf16": False, "batch_size": 4}},
        }
        results = {}
        for name, recipe in runs.items():
            config = GenerateConfig.model_validate({**base, "prompts": str(prompts), "recipe": recipe,
                                                    "output": str(tmp_path / name / "data.jsonl")})
            results[name] = run_recipe(config)
    finally:
        server.terminate()
        server.wait()
    # Whatever the teacher wrote was parsed as far as it goes and filtered; what is kept passes the filters.
    machine = read_jsonl(tmp_path / "self_instruct" / "data.instructions.jsonl")
    seeds = [task["instruction"] for task in load_seed_tasks(str(seed_tasks_path()))]
    assert all(instruction_problem(entry["instruction"]) is None for entry in machine)
    assert all(rouge_l(seed, entry["instruction"]) < 0.7 for seed in seeds for entry in machine)
    assert results["self_instruct"]["requests_sent"] >= 2 and results["self_instruct"]["rounds"] == 1
    evol = results["evol_instruct"]
    eliminated = sum(value for key, value in evol.items() if key.startswith("eliminated_"))
    evolved = sum(value for key, value in evol.items() if key.startswith("evolved_"))
    assert eliminated + evolved == 3 and evol["records"] == 3 + evolved
    lion = results["lion"]
    assert lion["judged_hard"] + lion["judged_easy"] + lion.get("unjudged_unparseable", 0) == 3
    assert lion["records"] == 3 + lion["new_hard"] + lion["new_easy"]
    for name in runs:  # and the output is training data
        records = load_records(str(tmp_path / name / "data.jsonl")) if results[name]["records"] else []
        assert len(records) == results[name]["records"]
        assert all(record["messages"][-1]["role"] == "assistant" for record in records)
    return results


def test_recipes_survive_gibberish_from_kdlm_serve(tmp_path):
    teacher = _tiny_folder(tmp_path / "teacher", seed=0)
    student = _tiny_folder(tmp_path / "student", seed=1)
    _run_recipes_against_kdlm_serve(tmp_path, str(teacher), student, max_tokens=24)


@pytest.mark.slow
def test_recipes_against_kdlm_serve_with_the_bundled_teacher(tmp_path):
    student = _tiny_folder(tmp_path / "student", seed=1)
    results = _run_recipes_against_kdlm_serve(tmp_path, "bundled:smollm2-135m-instruct", student, max_tokens=32)
    assert results["evol_instruct"]["records"] >= 3  # the teacher answers the starting instructions, at least


# ---------------------------------------------------------------- SeqKD on a recipe's output

def test_seqkd_config_trains_with_cross_entropy_on_the_teacher_written_jsonl(tmp_path):
    from kdlm.config import load_config
    from kdlm.models import load_model
    from kdlm.pipeline import distill
    from tiny import save_tiny_teacher

    with AppThread(scripted_app()) as server:
        run_recipe(recipe_config(tmp_path / "gen", server.url, self_instruct_recipe(num_instructions=4)))
    data = tmp_path / "gen" / "data.jsonl"
    records = read_jsonl(data)
    folder = save_tiny_teacher(tmp_path / "tiny", num_layers=2)
    config = load_config(ROOT / "configs" / "seqkd.yaml", [
        f"teacher.model={folder}", "student.init=model", f"student.model={folder}", f"data.train={data}",
        "data.heldout=0", f"train.output_dir={tmp_path / 'seqkd'}", "train.max_steps=2",
        f"train.batch_size={len(records)}", "train.bf16=false", "eval.enabled=false",
    ])
    assert config.data.teacher_answers is False and config.loss.kd_weight == 0
    report = distill(config)
    first = json.loads((tmp_path / "seqkd" / "history.json").read_text())[0]

    # Reference: the student before training (the tiny model itself), cross-entropy on the answer tokens only.
    model, tokenizer = load_model(str(folder))
    total, count = 0.0, 0
    for record in records:
        # ChatML: the prompt with the assistant header, then the answer and its end-of-turn token as targets.
        prompt_text = tokenizer.apply_chat_template(record["messages"][:1], tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompt_text + record["messages"][1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
        targets = ids[0, 1:]
        keep = torch.arange(1, len(full)) >= len(prompt)
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        total += losses[keep].sum().item()
        count += int(keep.sum())
    assert first["tokens"] == count
    assert first["ce"] == pytest.approx(total / count, rel=1e-4)
    assert first["loss"] == pytest.approx(first["ce"]) and report["steps"] == 2


def test_lion_retrains_a_local_student_each_round_and_a_rerun_redoes_nothing(tmp_path):
    from tiny import save_tiny_teacher

    folder = save_tiny_teacher(tmp_path / "tiny", num_layers=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ["What is two plus two?", "Name a sea."]))
    overrides = [f"teacher.model={folder}", "student.init=model", f"student.model={folder}", "data.heldout=0",
                 "train.max_steps=1", "train.batch_size=2", "train.bf16=false", "eval.enabled=false"]
    with AppThread(scripted_app()) as server:
        recipe = {"name": "lion", "rounds": 1, "new_hard": 1, "new_easy": 1, "referee_retries": 0,
                  "answer": {"max_tokens": 8}, "train_config": str(ROOT / "configs" / "seqkd.yaml"),
                  "train_overrides": overrides,
                  "student": {"backend": "transformers", "model": str(folder), "bf16": False, "batch_size": 2}}
        config = recipe_config(tmp_path, server.url, recipe, prompts=str(prompts))
        first = run_recipe(config)
        trained = tmp_path / "data-round1" / "student"
        stamp = (trained / "model.safetensors").stat().st_mtime
        output = (tmp_path / "data.jsonl").read_text()
        again = run_recipe(config)
    # The round's imitation data is the teacher's answers to the Train Pool, and the student trained on it.
    imitation = read_jsonl(tmp_path / "data-round1" / "imitation.jsonl")
    assert [record["messages"][0]["content"] for record in imitation] == ["What is two plus two?", "Name a sea."]
    assert all(record["messages"][1]["content"].startswith("Teacher answer") for record in imitation)
    assert json.loads((tmp_path / "data-round1" / "report.json").read_text())["steps"] == 1
    # The scripted referee rates any answer but "I don't know" 9, first position +1: every question is easy.
    assert first["judged_easy"] == 2 and first["judged_hard"] == 0 and first["new_easy"] == 1
    assert again["requests_sent"] == 0 and (trained / "model.safetensors").stat().st_mtime == stamp
    assert (tmp_path / "data.jsonl").read_text() == output
