"""Training metrics through Accelerate's trackers (train.report_to) and the push of the student to the Hub."""

from __future__ import annotations

import csv
import importlib.util

import pytest

import kdlm
from kdlm.errors import KdlmError
from kdlm.train.trackers import resolve_report_to
from tiny import trained_tiny_teacher, write_chat_jsonl

SETTINGS = {"data.heldout": 0, "data.teacher_answers": False, "data.max_length": 160, "student.num_layers": 1,
            "student.keep_first_last": False, "train.batch_size": 4, "train.max_steps": 3, "eval.enabled": False}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    model, tokenizer = trained_tiny_teacher(num_layers=2, steps=5)
    data = write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", count=12)
    return model, tokenizer, data


def run(teacher, folder, **extra):
    model, tokenizer, data = teacher
    return kdlm.distill(None, overrides={**SETTINGS, "train.output_dir": str(folder), "data.train": str(data), **extra},
                        teacher=model, tokenizer=tokenizer)


def test_tensorboard_gets_the_same_numbers_as_the_csv(teacher, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_report_to("auto") == ["tensorboard"]
    run(teacher, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "train_log.csv").open()))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    assert len(rows) == 3 and sorted(logged) == [int(r["step"]) for r in rows]
    assert [logged[int(r["step"])] for r in rows] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)


def test_report_to_none_writes_the_csv_only(teacher, tmp_path):
    run(teacher, tmp_path / "run", **{"train.report_to": "none"})
    assert (tmp_path / "run" / "train_log.csv").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_an_unknown_or_missing_tracker_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(KdlmError, match="train.report_to"):
        kdlm.distill(None, overrides={"train.report_to": ["neptune"], "train.output_dir": str(tmp_path / "x")})
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(KdlmError, match="wandb is not installed"):
            kdlm.distill(None, overrides={"train.report_to": ["wandb"], "train.output_dir": str(tmp_path / "y")})
    assert not (tmp_path / "y" / "student").exists()


def test_a_failed_push_says_what_is_saved(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdlmError, match=r"could not push .*student.* saved") as error:
        run(teacher, tmp_path / "run", **{"train.push_to_hub": "someone/tiny-student"})
    assert "huggingface-cli upload someone/tiny-student" in str(error.value)
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "student" / "README.md").is_file() and (tmp_path / "run" / "report.json").is_file()
