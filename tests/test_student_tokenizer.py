"""A student with its own tokenizer: the trained BPE, the embedding init rule (against a hand
computation), bad input, and `kdlm build-student student.tokenizer=...` through the real CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdlm.config import load_config
from kdlm.data import load_records
from kdlm.errors import KdlmError
from kdlm.models import build_pruned_student, load_model
from kdlm.models.student_tokenizer import (
    init_embeddings_from_teacher,
    load_user_tokenizer,
    record_texts,
    special_tokens,
    train_bpe_tokenizer,
)
from kdlm.pipeline import build_student, run_build_student
from test_cli import _error, run_cli
from tiny import CORPUS, tiny_llama, tiny_tokenizer, write_chat_jsonl

# Repeated multi-byte characters, so that the BPE learns tokens that hold part of a character.
TEXTS = [*CORPUS, "日本語 日本 日本語の本 café café naïve 🙂🙂"] * 4


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def student_tokenizer(teacher_tokenizer):
    return train_bpe_tokenizer(teacher_tokenizer, TEXTS, 330)


def test_bpe_keeps_the_teachers_special_tokens_roles_and_chat_template(teacher_tokenizer, student_tokenizer):
    assert len(student_tokenizer) == 330
    assert student_tokenizer.convert_ids_to_tokens([0, 1, 2]) == special_tokens(teacher_tokenizer)
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(student_tokenizer, name) == getattr(teacher_tokenizer, name)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert student_tokenizer.apply_chat_template(chat, tokenize=False) == teacher_tokenizer.apply_chat_template(chat, tokenize=False)
    rendered = student_tokenizer.apply_chat_template(chat, tokenize=False)
    ids = student_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(student_tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2  # specials stay whole


def test_the_bpe_round_trips_the_shipped_text(teacher_tokenizer):
    texts = record_texts(load_records("builtin:quickstart"))
    tokenizer = train_bpe_tokenizer(teacher_tokenizer, texts, 2000)
    assert len(tokenizer) == 2000
    for text in [*texts, "naïve café 日本語 🙂\n\n  x  1234567"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # merges learned: the shipped prompts take far fewer tokens than bytes
    total_bytes = sum(len(text.encode()) for text in texts)
    total_tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    assert total_tokens < 0.5 * total_bytes


def _hand_mean(teacher_rows: torch.Tensor, teacher_tokenizer, student_token: str) -> torch.Tensor:
    # The tiny teacher has no merges: its tokenisation of any bytes is one token per byte, i.e. one per
    # byte-level character of the student's token string.
    ids = [teacher_tokenizer.convert_tokens_to_ids(char) for char in student_token]
    return teacher_rows.double()[ids].mean(0)


@pytest.mark.parametrize("tied", [True, False])
def test_each_new_row_is_the_mean_of_the_teachers_rows_for_the_same_bytes(teacher_tokenizer, student_tokenizer, tied):
    teacher = tiny_llama(len(teacher_tokenizer), num_layers=3, seed=3)
    if not tied:
        teacher.config.tie_word_embeddings = False
        teacher.lm_head = torch.nn.Linear(64, len(teacher_tokenizer), bias=False)
        torch.nn.init.normal_(teacher.lm_head.weight)
    student = build_pruned_student(teacher, [0, 2])
    fallback = init_embeddings_from_teacher(student, teacher, teacher_tokenizer, student_tokenizer)
    assert fallback == 0
    assert student.config.vocab_size == len(student_tokenizer) == student.get_input_embeddings().weight.shape[0]
    vocab = student_tokenizer.get_vocab()
    merged = [token for token in vocab if len(token) > 1 and token not in special_tokens(student_tokenizer)]
    as_bytes = [bytes(student_tokenizer.convert_tokens_to_string([t]), "utf-8", "surrogateescape") for t in merged]
    assert any(b"\xef\xbf\xbd" in text for text in as_bytes), "some token should hold part of a character (no string)"
    assert any("Ã©" in token for token in merged) and "Ġcapital" in merged
    rows = {"embed": (student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)}
    if not tied:
        rows["lm_head"] = (student.lm_head.weight, teacher.lm_head.weight)
        assert student.lm_head.weight.data_ptr() != student.get_input_embeddings().weight.data_ptr()
    for token in [*merged, "a", "Ġ"]:
        index = vocab[token]
        for student_rows, teacher_rows in rows.values():
            expected = _hand_mean(teacher_rows.detach(), teacher_tokenizer, token).float()
            torch.testing.assert_close(student_rows[index].detach(), expected, rtol=0, atol=1e-6)
    special = vocab["<|im_end|>"]
    torch.testing.assert_close(student.get_input_embeddings().weight[special], teacher.get_input_embeddings().weight[2])
    assert student.config.eos_token_id == student_tokenizer.eos_token_id


def test_a_vocabulary_smaller_than_bytes_and_specials_is_refused(teacher_tokenizer):
    with pytest.raises(KdlmError, match=r"at least bpe:259"):
        train_bpe_tokenizer(teacher_tokenizer, TEXTS, 258)


def test_a_brought_tokenizer_needs_a_chat_template_or_the_explicit_fallback(tmp_path, teacher_tokenizer, student_tokenizer):
    with pytest.raises(KdlmError, match="does not exist"):
        load_user_tokenizer(str(tmp_path / "nowhere"), teacher_tokenizer, "own")
    bare = train_bpe_tokenizer(teacher_tokenizer, TEXTS, 300)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(KdlmError, match="tokenizer_chat_template=teacher"):
        load_user_tokenizer(str(tmp_path / "bare"), teacher_tokenizer, "own")
    loaded = load_user_tokenizer(str(tmp_path / "bare"), teacher_tokenizer, "teacher")
    assert loaded.chat_template == teacher_tokenizer.chat_template and len(loaded) == 300
    student_tokenizer.save_pretrained(tmp_path / "own")
    file_only = load_user_tokenizer(str(tmp_path / "own" / "tokenizer.json"), teacher_tokenizer, "teacher")
    assert file_only.get_vocab() == student_tokenizer.get_vocab()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-tokenizer")
    teacher_tokenizer = tiny_tokenizer()  # an untrained teacher is enough: nothing here trains
    tiny_llama(len(teacher_tokenizer), num_layers=4).save_pretrained(root / "teacher")
    teacher_tokenizer.save_pretrained(root / "teacher")
    write_chat_jsonl(root / "chat.jsonl", count=24)
    return root


def _args(root, output: str) -> list[str]:
    return [
        f"teacher.model={root / 'teacher'}", f"data.train={root / 'chat.jsonl'}", "data.teacher_answers=false",
        "student.layers=[0,3]", f"train.output_dir={root / output}",
    ]


def test_build_student_with_a_trained_bpe_through_the_cli(workspace):
    out = run_cli("build-student", *_args(workspace, "bpe"), "student.tokenizer=bpe:300", cwd=workspace)
    assert "student tokenizer: 300 tokens" in out.stdout and "(0 rows the teacher cannot spell" in out.stdout
    folder = workspace / "bpe" / "student-init"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    student = AutoModelForCausalLM.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "teacher")
    assert len(tokenizer) == 300 and student.config.vocab_size == 300 and tokenizer.chat_template
    assert student.config.kdlm_teacher_layers == [0, 3]
    saved_parameters = sum(p.numel() for p in student.parameters())
    assert saved_parameters == sum(p.numel() for p in build_pruned_student(teacher, [0, 3]).parameters()) - 64 * (259 - 300)
    # the pruned layers are the teacher's, unchanged
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    text = json.loads((workspace / "chat.jsonl").read_text().splitlines()[0])["response"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(text)["input_ids"]) < len(text.encode())

    # a tokenizer brought as a folder is saved with the student as it is (in-process: one CLI start is enough)
    run_build_student(load_config(None, [*_args(workspace, "brought"), f"student.tokenizer={folder}"]))
    brought = AutoTokenizer.from_pretrained(workspace / "brought" / "student-init")
    assert brought.get_vocab() == tokenizer.get_vocab()


def test_build_student_bad_tokenizer_settings_are_one_line_errors(workspace):
    assert "at least bpe:259" in _error(workspace, "build-student", *_args(workspace, "x"), "student.tokenizer=bpe:100")
    with pytest.raises(KdlmError, match="does not exist"):
        run_build_student(load_config(None, [*_args(workspace, "x"), "student.tokenizer=no/such/dir"]))
    with pytest.raises(KdlmError, match="keeps its tokenizer"):
        run_build_student(load_config(None, [*_args(workspace, "x"), "student.tokenizer=bpe:300", "student.init=model"]))
    with pytest.raises(KdlmError, match="bpe:N"):
        load_config(None, ["student.tokenizer=bpe:lots"])
    config = load_config(None, [*_args(workspace, "x"), "student.tokenizer=bpe:300"])
    with pytest.raises(KdlmError, match="kdlm build-student"):
        build_student(config, *load_model(str(workspace / "teacher")), [], None)


def test_a_bos_the_teacher_prepends_the_student_prepends_too():
    from tokenizers import processors

    teacher_tokenizer = tiny_tokenizer()
    teacher_tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    assert teacher_tokenizer("a")["input_ids"][0] == teacher_tokenizer.bos_token_id
    student_tokenizer = train_bpe_tokenizer(teacher_tokenizer, TEXTS, 300)
    ids = student_tokenizer("the fox")["input_ids"]
    assert ids[0] == student_tokenizer.bos_token_id and student_tokenizer.decode(ids[1:]) == "the fox"
    assert train_bpe_tokenizer(tiny_tokenizer(), TEXTS, 300)("the fox")["input_ids"][0] != 1
