"""kdlm.fingerprint: the one stable JSON hash. Its values are pinned: answer caches, evaluation results,
benchmark runs, teacher caches and checkpoints written before it moved to kdlm/fingerprint.py must still match.
The pinned hex strings were computed with the code before the move (generate/cache.py's fingerprint,
train/checkpoint.py's own sha256 copy, teachers/cache.py's tokenizer hash)."""

from __future__ import annotations

import hashlib
import json

from kdlm.fingerprint import fingerprint
from kdlm.generate import cache as answer_cache
from kdlm.generate import engine
from kdlm.teachers.cache import tokenizer_fingerprint
from kdlm.train.checkpoint import config_fingerprint, config_record

PAYLOAD = {"model": "tiny", "task": {"name": "gsm8k", "n": 3}, "b": [1, 2.5, None, True], "a": "é✓"}


def test_pinned_values_from_before_the_move():
    assert fingerprint(PAYLOAD) == "4e4063b94f2015af"
    assert fingerprint(PAYLOAD, 8) == "4e4063b9"
    assert answer_cache.fingerprint is fingerprint  # the old import path still works
    record = config_record({"train": {"lr": 0.001, "max_steps": 10, "resume": True, "output_dir": "runs/x"},
                            "loss": {"kd_weight": 0.5}, "seed": 3})
    assert config_fingerprint(record) == "532561b6821d65fa"


def test_tokenizer_fingerprint_keeps_its_utf8_value():
    class Vocab:  # anything with get_vocab(), as a Hugging Face tokenizer has
        def get_vocab(self):
            return {"<s>": 0, "é": 2, "a": 1, "✓x": 3}

    assert tokenizer_fingerprint(Vocab()) == "cc0931160a51bf8c"


def test_matches_a_plain_sha256_of_sorted_json():
    for payload in (PAYLOAD, [["é", 1]], {"z": 1, "a": {"y": 2, "b": 3}}, "text", 3.5):
        text = json.dumps(payload, sort_keys=True)
        assert fingerprint(payload) == hashlib.sha256(text.encode()).hexdigest()[:16]
        utf8 = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
        assert fingerprint(payload, 64, ensure_ascii=False) == hashlib.sha256(utf8).hexdigest()
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_request_fingerprint_is_built_on_it():
    key = engine.fingerprint("m", [{"role": "user", "content": "hi"}], {"temperature": 0.0}, 0)
    assert key == "0b3839e87e0242172fe95779e5d4c164"  # 32 digits: the answer caches' key, from before the move
