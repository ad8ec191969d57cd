"""Evaluation metrics against hand computations: ROUGE-L, ECE, answer extraction, perplexity, fidelity, noise marks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kdlm.bench.stats import noise_groups, summarise, within_noise
from kdlm.errors import KdlmError
from kdlm.evaluate.metrics import text_perplexity
from kdlm.evaluate.quality import expected_calibration_error, generate_texts, rouge_l, token_fidelity
from kdlm.evaluate.tasks import build_prompt, load_task, reference_items
from kdlm.final_answer import extract_label, extract_number, is_correct
from tiny import CORPUS, tiny_llama, tiny_tokenizer

# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_matches_hand_computed_lcs():
    # reference: the cat is on a mat / prediction: the cat sat on the mat
    # LCS = the, cat, on, mat (4 tokens); P = 4/6, R = 4/6, F = 2PR/(P+R) = 2/3.
    assert rouge_l("the cat sat on the mat", "the cat is on a mat") == pytest.approx(200 / 3)
    # prediction a b c d e, reference a c e: LCS 3, P = 3/5, R = 3/3, F = 2*0.6*1/1.6 = 0.75.
    assert rouge_l("a b c d e", "a c e") == pytest.approx(75.0)
    # Porter stemming on words longer than 3 characters, lower case, punctuation dropped: running -> run, dogs -> dog.
    assert rouge_l("Running, DOGS!", "run dog") == pytest.approx(100.0)
    assert rouge_l("completely different", "nothing shared") == 0.0
    # Several references: the best one counts.
    assert rouge_l("a b c d e", ["x y", "a c e"]) == pytest.approx(75.0)


# ---------------------------------------------------------------- ECE


def test_ece_on_crafted_probabilities():
    # 10 bins. Two predictions at 0.95 (one right): |0.5 - 0.95| * 2/4; two at 0.55 (both right): |1 - 0.55| * 2/4.
    confidence = torch.tensor([0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(confidence, correct, num_bins=10) == pytest.approx(0.45)
    # Perfectly calibrated: 0.75 confidence, 3 of 4 right.
    assert expected_calibration_error(torch.full((4,), 0.75), torch.tensor([1, 1, 1, 0]).bool(), 10) == pytest.approx(0.0)
    # A confidence on a bin edge (0.6) falls into (0.5, 0.6]: one bin of 0.55 and 0.6, accuracy 0.5 -> |0.5 - 0.575|.
    # (float64: the float32 nearest to 0.6 lies above it, in the next bin.)
    edge = torch.tensor([0.55, 0.6], dtype=torch.float64)
    assert expected_calibration_error(edge, torch.tensor([True, False]), 10) == pytest.approx(0.075)


def test_token_fidelity_against_float64():
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(7, 11, generator=generator) * 3, torch.randn(5, 11, generator=generator)]
    teacher = [torch.randn(7, 11, generator=generator) * 2, torch.randn(5, 11, generator=generator) * 4]
    labels = [torch.randint(0, 11, (7,), generator=generator), torch.randint(0, 11, (5,), generator=generator)]
    result = token_fidelity(student, teacher, labels, num_bins=15)

    s, t, y = (torch.cat(x).double() for x in (student, teacher, labels))
    y = y.long()
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    nll = -ls.gather(-1, y[:, None]).mean()
    agreement = (s.argmax(-1) == t.argmax(-1)).double().mean()
    confidence, predicted = ls.exp().max(-1)
    ece = 0.0
    for b in range(15):  # bins (b/15, (b+1)/15]
        in_bin = (confidence > b / 15) & (confidence <= (b + 1) / 15)
        if in_bin.any():
            ece += in_bin.double().mean() * abs((predicted[in_bin] == y[in_bin]).double().mean() - confidence[in_bin].mean())
    assert result["kl_to_teacher"] == pytest.approx(float(kl), rel=1e-5)
    assert result["answer_perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert result["top1_agreement"] == pytest.approx(float(agreement))
    assert result["ece"] == pytest.approx(float(ece), abs=1e-6)
    assert result["eval_tokens"] == 12


# ---------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She sold 48 + 24 = 72 clips. The answer is 72.", 72.0),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 1,234", 1234.0),
        ("Each costs $6, so 3 of them cost $18.00. The answer is $18.00.", 18.0),
        ("First 5 apples, then 2 more, for a total of 7", 7.0),  # no marker: the last number
        ("The answer is -3. (Not 4.)", -3.0),  # a marker wins over a later number
        ("Answer: 0.5", 0.5),
        ("I do not know.", None),
    ],
)
def test_extract_number(text, expected):
    number = extract_number(text, reading="scoring")  # a normal-form string
    assert (None if number is None else float(number)) == expected


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("The answer is No.", ["Yes", "No"], "No"),
        ("Yes, it is hearsay, though no witness saw it.", ["Yes", "No"], "Yes"),  # first label word
        ("It is hard to say... The answer is: no", ["Yes", "No"], "No"),  # the marker wins over a first word
        ("answer: maybe", ["yes", "no", "maybe"], "maybe"),
        ("Nothing suggests it, nobody knows.", ["Yes", "No"], None),  # whole words only
    ],
)
def test_extract_label(text, labels, expected):
    assert extract_label(text, labels, reading="scoring") == expected


def test_is_correct_exact_match():
    assert is_correct("so the answer is 72.0", 72, kind="number")
    assert not is_correct("so the answer is 71", 72, kind="number")
    assert is_correct("The answer is yes.", "yes", kind="label", labels=["yes", "no", "maybe"])
    assert not is_correct("The answer is Yes.", "No", kind="label", labels=["Yes", "No"])


# ---------------------------------------------------------------- tasks on the shared data


def test_tasks_from_the_data_files():
    (gsm8k,) = load_task("gsm8k")
    assert gsm8k.exemplars[0].reference == 72.0  # Natalia's clips, the first record
    assert "<<" not in gsm8k.exemplars[0].demonstration
    assert {id(i) for i in gsm8k.items}.isdisjoint(id(e) for e in gsm8k.exemplars)
    prompt = build_prompt(gsm8k, gsm8k.items[0], shots=2)
    assert prompt.count("Question:") == 3 and gsm8k.items[0].prompt in prompt
    assert build_prompt(gsm8k, gsm8k.items[0], shots=0).count("Question:") == 1
    hearsay, proa, jurisdiction = load_task("legalbench")
    assert {item.reference for item in hearsay.items} == {"Yes", "No"}
    (pubmedqa,) = load_task("pubmedqa")
    assert {item.reference for item in pubmedqa.items} <= {"yes", "no", "maybe"}
    (selfinst,) = load_task("selfinst")
    assert len(selfinst.items) == 252
    with pytest.raises(KdlmError, match="unknown task"):
        load_task("gsm9k")


def test_reference_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "reference": "b"}) + "\n{not json\n")
    with pytest.raises(KdlmError, match="refs.jsonl:2"):
        reference_items(path)
    path.write_text(json.dumps({"prompt": "a", "reference": "b"}) + "\n" + json.dumps({"question": "a"}) + "\n")
    with pytest.raises(KdlmError, match="refs.jsonl:2"):
        reference_items(path)


# ---------------------------------------------------------------- perplexity and generation on a tiny model


def test_text_perplexity_matches_float64():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    text = " ".join(CORPUS)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    reference_model = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = reference_model(input_ids=ids).logits[0].double()
    nll = -logits[:-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).mean()
    assert text_perplexity(model, tokenizer, text, window=512) == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_batched_generation_is_the_greedy_decode_of_each_prompt():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=1)
    prompts = ["water boils", "the quick brown fox jumps over the lazy dog", "two plus"]
    batched = generate_texts(model, tokenizer, prompts, seed=0, temperature=0.0, max_new_tokens=6, batch_size=3)
    for prompt, text in zip(prompts, batched, strict=True):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(chat, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert text == expected
    # Sampling: one seed per prompt, so the batch size does not change a prompt's answer.
    one = generate_texts(model, tokenizer, prompts, seed=5, max_new_tokens=6, batch_size=1)
    three = generate_texts(model, tokenizer, prompts, seed=5, max_new_tokens=6, batch_size=3)
    other = generate_texts(model, tokenizer, prompts, seed=6, max_new_tokens=6, batch_size=3)
    assert one == three and other != three


# ---------------------------------------------------------------- noise marks


def test_noise_marks_on_crafted_numbers():
    a = summarise([1.0, 1.2, 0.8])  # mean 1.0, std 0.2
    b = summarise([1.1, 1.3, 0.9])  # mean 1.1, std 0.2: |diff| 0.1 < 2 * sqrt(0.04/3 + 0.04/3) = 0.327
    c = summarise([2.0, 2.1, 1.9])  # mean 2.0, std 0.1: vs a |diff| 1.0 > 2 * sqrt(0.04/3 + 0.01/3) = 0.258
    assert (a["mean"], a["std"], a["n"]) == (pytest.approx(1.0), pytest.approx(0.2), 3)
    assert a["low"] <= a["mean"] <= a["high"]
    assert within_noise(a, b) is True
    assert within_noise(a, c) is False
    marks = noise_groups({"a": a, "b": b, "c": c})
    assert marks["c"] == {"rank": 1, "vs_best": "best", "ties": []}
    assert marks["b"]["vs_best"] == "below" and marks["b"]["ties"] == ["a"]
    assert marks["a"]["rank"] == 3 and marks["a"]["ties"] == ["b"]
    lower = noise_groups({"a": a, "c": c}, higher_is_better=False)
    assert lower["a"]["vs_best"] == "best" and lower["c"]["vs_best"] == "below"
    single = noise_groups({"x": summarise([1.0]), "y": summarise([2.0])})
    assert single["x"]["vs_best"] == "not tested"
    same = noise_groups({"x": summarise([1.0, 1.0]), "y": summarise([1.0, 1.0])})
    assert same["y"]["vs_best"] == "within noise"
