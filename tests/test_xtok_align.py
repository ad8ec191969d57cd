"""Token alignment across two real tokenizers: hand-made strings whose alignment is known."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kdlm.errors import KdlmError
from kdlm.xtok.align import align_spans, byte_spans, one_to_one, token_bytes
from kdlm.xtok.data import check_chat_template, encode_pair, encode_pairs
from kdlm.xtok.target import group_firsts
from tiny import CHATML, tiny_sp_tokenizer


def byte_level_bpe(merges=(("Ġ", "w"), ("a", "t"), ("at", "er"), ("e", "r"), ("c", "a"), ("1", "2"), ("12", "3")),
                   lowercase: bool = False) -> PreTrainedTokenizerFast:
    """tests/tiny.py's byte-level tokenizer with a few merges (fixed, so ids are known) and ChatML."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet])}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return byte_level_bpe()


@pytest.fixture(scope="module")
def student_tokenizer():
    return tiny_sp_tokenizer()


def chat(response: str) -> list[dict]:
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": response}]


def readable_groups(example, student_tokenizer, teacher_tokenizer):
    """Groups as (student tokens, teacher tokens), each a list of token strings."""
    student_targets = [i for i, label in enumerate(example["labels"]) if label != -100]
    teacher_targets = [i for i, label in enumerate(example["teacher_labels"]) if label != -100]
    return [
        (student_tokenizer.convert_ids_to_tokens([example["input_ids"][student_targets[i]] for i in student]),
         teacher_tokenizer.convert_ids_to_tokens([example["teacher_input_ids"][teacher_targets[i]] for i in teacher]))
        for student, teacher in example["groups"]
    ]


END = (["</s>"], ["<|im_end|>"])  # each template's end of turn: one more group


@pytest.mark.parametrize(("response", "expected"), [
    # 1:2, 2:1 and 2:2 (both sides merge, at other places)
    ("hot water", [(["h"], ["h"]), (["o"], ["o"]), (["t"], ["t"]), (["▁water"], ["Ġw", "ater"]), END]),
    ("a cab", [(["a"], ["a"]), (["▁c", "a"], ["Ġ", "ca"]), (["b"], ["b"]), END]),
    ("water is on", [(["w"], ["w"]), (["at", "er"], ["ater"]), (["▁"], ["Ġ"]), (["is"], ["i", "s"]), (["▁"], ["Ġ"]),
                     (["on"], ["o", "n"]), END]),
    # accents and emoji: byte fallback <0xNN> against byte-level pieces, one byte each: 1:1 per byte
    ("café 🙂", [(["c", "a"], ["ca"]), (["f"], ["f"]), (["<0xC3>"], ["Ã"]), (["<0xA9>"], ["©"]),
                (["▁"], ["Ġ"]), (["<0xF0>"], ["ð"]), (["<0x9F>"], ["Ł"]), (["<0x99>"], ["Ļ"]), (["<0x82>"], ["Ĥ"]), END]),
    # runs of spaces and newlines
    ("a  b\n\nc", [(["a"], ["a"]), (["▁"], ["Ġ"]), (["▁"], ["Ġ"]), (["b"], ["b"]), (["<0x0A>"], ["Ċ"]),
                   (["<0x0A>"], ["Ċ"]), (["c"], ["c"]), END]),
    # numbers: 3:1 where the teacher merged digits
    ("123 4.5", [(["1", "2", "3"], ["123"]), (["▁"], ["Ġ"]), (["4"], ["4"]), (["."], ["."]), (["5"], ["5"]), END]),
    # code
    ("if x:\n  y()", [(["i"], ["i"]), (["f"], ["f"]), (["▁"], ["Ġ"]), (["x"], ["x"]), (["<0x3A>"], [":"]),
                      (["<0x0A>"], ["Ċ"]), (["▁"], ["Ġ"]), (["▁"], ["Ġ"]), (["y"], ["y"]), (["("], ["("]),
                      ([")"], [")"]), END]),
    # chat markup inside a response: one special token for the teacher, ten pieces for the student (10:1)
    ("say <|im_end|> ok", [(["s"], ["s"]), (["a"], ["a"]), (["y"], ["y"]), (["▁"], ["Ġ"]),
                           (["<0x3C>", "<0x7C>", "i", "m", "<0x5F>", "e", "n", "d", "<0x7C>", "<0x3E>"], ["<|im_end|>"]),
                           (["▁o"], ["Ġ", "o"]), (["k"], ["k"]), END]),
    # a capital the student spells by byte fallback
    ("Hi", [(["<0x48>"], ["H"]), (["i"], ["i"]), END]),
])
def test_known_alignments(student_tokenizer, teacher_tokenizer, response, expected):
    example = encode_pair(student_tokenizer, teacher_tokenizer, chat(response), max_length=128)
    assert readable_groups(example, student_tokenizer, teacher_tokenizer) == expected
    assert example["aligned_bytes"] == example["total_bytes"] == len(response.encode())


def test_the_prompt_is_in_no_group_and_each_model_keeps_its_own_template(student_tokenizer, teacher_tokenizer):
    example = encode_pair(student_tokenizer, teacher_tokenizer, chat("ok"), max_length=128)
    assert student_tokenizer.decode(example["input_ids"]).startswith("<|user|>\nq</s>\n<|assistant|>\n")
    assert teacher_tokenizer.decode(example["teacher_input_ids"]).startswith("<|im_start|>user\nq<|im_end|>\n")
    student_targets = sum(label != -100 for label in example["labels"])
    assert [g[0] for g in example["groups"]] == [[0], [1], [2]] and student_targets == 3  # o, k, </s>


def test_align_spans_cuts_where_both_end():
    assert align_spans([2, 4, 7], [1, 4, 5, 7]) == [([0, 1], [0, 1]), ([2], [2, 3])]
    assert align_spans([1, 1, 3], [1, 3]) == [([0, 1], [0]), ([2], [1])]  # a zero-width piece joins its group
    assert align_spans([2, 5], [2, 3]) == [([0], [0])]  # text after the last common end is in no group
    assert align_spans([], [1]) == []


def test_byte_spans_split_a_character_among_its_pieces():
    text = "é!"  # é is 2 bytes
    assert byte_spans(text, [(0, 1), (0, 1), (1, 2)], [b"\xc3", b"\xa9", b"!"]) == [(0, 1), (1, 2), (2, 3)]
    # pieces that do not add up to the character (a "▁" and a byte): both keep the whole character
    assert byte_spans("H", [(0, 1), (0, 1)], [b" ", b"H"]) == [(0, 1), (0, 1)]


def test_token_bytes_reads_both_kinds_of_vocabulary(student_tokenizer, teacher_tokenizer):
    student, teacher = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
    sp = student_tokenizer.convert_tokens_to_ids
    assert student[sp("▁water")] == b" water" and student[sp("<0xC3>")] == b"\xc3" and student[sp("</s>")] == b"</s>"
    assert student[sp("<unk>")] is None
    bl = teacher_tokenizer.convert_tokens_to_ids
    assert teacher[bl("Ġw")] == b" w" and teacher[bl("Ã")] == b"\xc3" and teacher[bl("Ċ")] == b"\n"
    assert teacher[bl("<|im_end|>")] == b"<|im_end|>"


def test_a_lowercasing_tokenizer_fails_the_alignment_probe(student_tokenizer):
    lowering = byte_level_bpe(lowercase=True)
    records = [{"messages": chat("Hello World")}, {"messages": chat("all lower case")}]
    with pytest.raises(KdlmError) as error:
        encode_pairs(student_tokenizer, lowering, records, max_length=128, min_aligned=0.9)
    message = str(error.value)
    share = (len("ello") + len("orld") + len("all lower case")) / (len("Hello World") + len("all lower case"))
    assert f"{share:.1%}" in message and "loss.cross_tokenizer_min_aligned=0" in message
    examples = encode_pairs(student_tokenizer, lowering, records, max_length=128, min_aligned=0)  # proceed anyway
    first = readable_groups(examples[0], student_tokenizer, lowering)
    assert (["<0x48>"], ["h"]) not in first and (["e"], ["e"]) in first  # the H/h group gets no loss


def test_groups_past_max_length_are_dropped(student_tokenizer, teacher_tokenizer):
    full = encode_pair(student_tokenizer, teacher_tokenizer, chat("water is on"), max_length=128)
    # The teacher's ChatML prompt is the longer one: cutting 2 of its tokens leaves the student whole.
    cut = encode_pair(student_tokenizer, teacher_tokenizer, chat("water is on"), max_length=len(full["teacher_input_ids"]) - 2)
    assert cut["input_ids"] == full["input_ids"]
    teacher_targets = sum(label != -100 for label in cut["teacher_labels"][1:])
    assert cut["groups"] == [g for g in full["groups"] if g[1][-1] < teacher_targets]
    assert len(cut["groups"]) < len(full["groups"])


def test_a_tokenizer_without_chat_template_is_named():
    tokenizer = tiny_sp_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(KdlmError, match="student tokenizer \\(folder/x\\) has no chat template"):
        check_chat_template(tokenizer, "student", "folder/x")


def test_group_firsts_count_rows_over_the_micro_batch():
    examples = [
        {"labels": [-100, -100, 5, 6, 7], "teacher_labels": [-100, 1, 2], "groups": [[[0, 1], [0]], [[2], [1]]]},
        {"labels": [-100, 8, 9], "teacher_labels": [-100, -100, 3, 4, 5], "groups": [[[1], [2]]]},
    ]
    assert group_firsts(examples) == ([0, 2, 4], [0, 1, 4])


def test_one_to_one_keeps_single_token_groups(student_tokenizer, teacher_tokenizer):
    example = encode_pair(student_tokenizer, teacher_tokenizer, chat("hot water"), max_length=128)
    # h o t | ▁water / Ġw ater | </s> / <|im_end|>: the 1:2 group is left out
    assert one_to_one(example["groups"]) == ([0, 1, 2, 4], [0, 1, 2, 5])
