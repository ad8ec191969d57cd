"""The Python API (`from kdlm import distill, DistillConfig`): the same run as the file-based path, with model
objects and TRL-shaped datasets."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

import kdlm
from kdlm.errors import KdlmError
from tiny import CORPUS, trained_tiny_teacher

SETTINGS = {"data.heldout": 4, "data.teacher_answers": False, "data.max_length": 160, "student.num_layers": 1, "student.keep_first_last": False,
            "train.batch_size": 4, "train.max_steps": 3, "train.lr": 3e-3, "eval.enabled": False}


def trl_rows(count: int = 16) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"{CORPUS[i % len(CORPUS)]} ({i})"}],
             "completion": [{"role": "assistant", "content": CORPUS[(i + 1) % len(CORPUS)]}]} for i in range(count)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    model, tokenizer = trained_tiny_teacher(num_layers=2, steps=10)
    folder = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


def history(folder) -> list[float]:
    return [row["loss"] for row in json.loads((folder / "history.json").read_text())]


def test_objects_and_a_dataset_train_exactly_like_a_folder_and_a_file(teacher, tmp_path):
    model, tokenizer, folder = teacher
    rows = trl_rows()
    report = kdlm.distill(kdlm.DistillConfig(train={"output_dir": str(tmp_path / "api")}), overrides=SETTINGS,
                          teacher=model, tokenizer=tokenizer, train_dataset=datasets.Dataset.from_list(rows))
    assert report["steps"] == 3
    written = [json.loads(line) for line in (tmp_path / "api" / "train_data.jsonl").read_text().splitlines()]
    assert written[0] == {"messages": rows[0]["prompt"] + rows[0]["completion"]}
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = [f"{key}={value}" for key, value in SETTINGS.items()]
    kdlm.distill(None, overrides=[*overrides, f"teacher.model={folder}", f"data.train={tmp_path / 'rows.jsonl'}",
                                  f"train.output_dir={tmp_path / 'files'}"])
    by_api, by_files = history(tmp_path / "api"), history(tmp_path / "files")
    assert len(by_api) == 3 and by_api == pytest.approx(by_files, rel=1e-5)


def test_a_student_object_is_trained_and_the_teacher_stays_untouched(teacher, tmp_path):
    model, tokenizer, _ = teacher
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    student, _ = trained_tiny_teacher(num_layers=1, steps=1)
    kdlm.distill({"train": {"output_dir": str(tmp_path / "run")}}, overrides=SETTINGS, teacher=model, tokenizer=tokenizer,
                 student=student, train_dataset=trl_rows())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    saved = json.loads((tmp_path / "run" / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1


def test_bad_input_is_named(teacher, tmp_path):
    model, tokenizer, _ = teacher
    with pytest.raises(KdlmError, match="pass its tokenizer"):
        kdlm.distill(None, teacher=model)
    with pytest.raises(KdlmError, match=r"train_dataset\[1\]: unknown record shape"):
        kdlm.distill({"train": {"output_dir": str(tmp_path / "bad")}}, teacher=model, tokenizer=tokenizer,
                     train_dataset=[{"prompt": "a", "completion": "b"}, {"question": "?"}])
    with pytest.raises(KdlmError, match="train.max_steps"):
        kdlm.distill({"train": {"max_steps": -1}})
    with pytest.raises(AttributeError):
        kdlm.nothing  # noqa: B018
