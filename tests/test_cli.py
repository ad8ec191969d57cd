"""The real CLI on a tiny teacher: the whole distill job, and user errors without tracebacks."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import save_tiny_teacher, tiny_llama, write_chat_jsonl

KDLM = [sys.executable, "-m", "kdlm.cli"]
SRC = str(Path(__file__).resolve().parents[1] / "src")  # subprocesses run this checkout's code, not the installed one


def cli_env(cwd: Path) -> dict:
    pythonpath = os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "KDLM_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath}


def run_cli(*args, cwd: Path, env_extra: dict | None = None, check_ok: bool = True):
    env = {**cli_env(cwd), **(env_extra or {})}
    proc = subprocess.run([*KDLM, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check_ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_teacher(root / "teacher")
    write_chat_jsonl(root / "chat.jsonl", count=40)
    return root


def base_args(root: Path, output: str) -> list[str]:
    return [
        f"teacher.model={root / 'teacher'}", f"data.train={root / 'chat.jsonl'}", "data.heldout=8",
        "data.teacher_answers=false", "data.max_length=96", "student.num_layers=2", "train.batch_size=4",
        "train.max_steps=15", "train.lr=3e-3", f"train.output_dir={root / output}", "eval.batch_size=4",
        "eval.generation_tokens=4",
    ]


def fidelity_by_hand(root: Path, saved: dict, folder: Path) -> tuple[float, float, int]:
    """KL(teacher || student) per answer token and top-1 agreement on the held-out examples of a run whose
    config is `saved`, recomputed from the saved student in `folder` and the teacher: one example at a time
    (no padding), float64 log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlm.data import encode_records, load_records, split_heldout

    seed = saved["data"]["seed"] if saved["data"].get("seed") is not None else saved["train"]["seed"]
    _, heldout = split_heldout(load_records(str(root / "chat.jsonl")), saved["data"]["heldout"], seed=seed)
    examples = encode_records(AutoTokenizer.from_pretrained(root / "teacher"), heldout,
                              max_length=saved["data"]["max_length"])
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", torch_dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    vocab = min(teacher.config.vocab_size, student.config.vocab_size)
    kl = agree = tokens = 0.0
    with torch.no_grad():
        for example in examples:
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
            where = labels[1:] != -100  # position t predicts token t + 1
            t = torch.log_softmax(teacher(ids).logits[0, :-1][where, :vocab].double(), -1)
            s = torch.log_softmax(student(ids).logits[0, :-1][where, :vocab].double(), -1)
            kl += float((t.exp() * (t - s)).sum())
            agree += float((t.argmax(-1) == s.argmax(-1)).sum())
            tokens += int(where.sum())
    return kl / tokens, agree / tokens, int(tokens)


@pytest.mark.parametrize("signal", ["topk", "online"])
def test_distill_end_to_end_brings_the_student_closer(workspace, signal):
    out = f"run-{signal}"
    proc = run_cli("distill", *base_args(workspace, out), f"teacher.signal={signal}", "teacher.top_k=16", cwd=workspace)
    from kdlm.precision import resolve_precision

    said = resolve_precision("auto", "cpu").describe()
    assert " ".join(said.split()) in " ".join(proc.stdout.split())  # says what it chose, and why
    assert "bf16: auto" in (workspace / out / "config.yaml").read_text()  # the saved config stays portable
    report = json.loads((workspace / out / "report.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["teacher"]["kl_to_teacher"] == pytest.approx(0, abs=1e-5)
    assert rows["teacher"]["top1_agreement"] == 1.0
    before, after = rows["student before"], rows["student after"]
    kl, top1, tokens = fidelity_by_hand(workspace, report["config"], workspace / out / "student")
    assert after["eval_tokens"] == tokens
    assert after["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert after["top1_agreement"] == pytest.approx(top1, abs=1e-4)
    assert after["kl_to_teacher"] < before["kl_to_teacher"]
    assert after["answer_perplexity"] < before["answer_perplexity"]
    assert (workspace / out / "report.md").read_text().count("|") > 20
    assert (workspace / out / "train_log.csv").read_text().count("\n") == 16  # header + 15 steps
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(workspace / out / "student")
    assert student.config.num_hidden_layers == 2
    card = (workspace / out / "student" / "README.md").read_text()  # the model card names its origin and scores
    assert str(workspace / "teacher") in card and "steps" in card and f"{after['kl_to_teacher']:.3f}" in card


def test_teacher_answers_are_generated_once_and_cached(workspace):
    args = base_args(workspace, "answers") + ["data.teacher_answers=true", "data.answer_max_new_tokens=8",
                                               "train.max_steps=1", "eval.enabled=false"]
    run_cli("distill", *args, cwd=workspace)
    cache = list((workspace / "cache" / "answers").glob("*.sqlite"))
    assert len(cache) == 1

    def rows():
        with sqlite3.connect(cache[0]) as connection:
            return connection.execute("SELECT fingerprint, text, created FROM answers ORDER BY fingerprint").fetchall()

    lines = rows()
    assert len(lines) == 40  # 32 training prompts + 8 held out, each answered once
    run_cli("distill", *args, "train.overwrite=true", cwd=workspace)  # a second run in a used folder must say so
    assert rows() == lines  # the rerun paid for nothing


def _error(workspace, *args) -> str:
    proc = run_cli(*args, cwd=workspace, check_ok=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.stderr


def test_unknown_key_names_key_and_file(workspace):
    config = workspace / "bad.yaml"
    config.write_text("# kdlm distill bad.yaml\ntrain:\n  max_stepz: 3\n")
    message = _error(workspace, "distill", str(config))
    assert "train.max_stepz" in message and "bad.yaml" in message


def test_missing_model_path(workspace):
    message = _error(workspace, "distill", *base_args(workspace, "x"), f"teacher.model={workspace / 'no-such-model'}")
    assert "no-such-model" in message


def test_malformed_record_names_file_and_line(workspace):
    bad = workspace / "broken.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    message = _error(workspace, "distill", *base_args(workspace, "x"), f"data.train={bad}")
    assert "broken.jsonl:2" in message


def test_empty_dataset(workspace):
    empty = workspace / "empty.jsonl"
    empty.write_text("\n")
    message = _error(workspace, "distill", *base_args(workspace, "x"), f"data.train={empty}")
    assert "no records" in message


def test_student_with_another_tokenizer_is_refused(workspace):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(300)}
    other = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=other, eos_token="w1", pad_token="w1")
    folder = workspace / "other-student"
    tiny_llama(300).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    message = _error(workspace, "distill", *base_args(workspace, "x"), "student.init=model", f"student.model={folder}")
    assert "tokenizer" in message.lower()


def test_build_student_then_eval_compares_it_with_the_teacher(workspace):
    args = base_args(workspace, "built") + ["student.layers=[0,3]"]
    run_cli("build-student", *args, cwd=workspace)
    folder = workspace / "built" / "student-init"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(folder)
    assert student.config.num_hidden_layers == 2 and student.config.kdlm_teacher_layers == [0, 3]
    # A random model beside it: the trained teacher's answers are peaked enough that the built student agrees
    # on every top-1, and so would a top-1 agreement stuck at 1.
    stranger = workspace / "built" / "random"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tiny_llama(len(tokenizer), num_layers=1, seed=7).save_pretrained(stranger)
    tokenizer.save_pretrained(stranger)
    run_cli("eval", *args, f"eval.models=[{folder},{stranger}]", cwd=workspace)
    report = json.loads((workspace / "built" / "eval" / "report.json").read_text())
    rows = report["rows"]
    assert [row["model"] for row in rows] == ["teacher", str(folder), str(stranger)]
    assert rows[0]["top1_agreement"] == 1.0 and rows[1]["kl_to_teacher"] > 1e-4
    for row, model in zip(rows[1:], [folder, stranger], strict=True):
        kl, top1, tokens = fidelity_by_hand(workspace, report["config"], model)
        assert row["eval_tokens"] == tokens
        assert row["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
        assert row["top1_agreement"] == pytest.approx(top1, abs=1e-4)
    assert rows[2]["top1_agreement"] < 0.5
    assert rows[1]["disk_mb"] > 0


def test_eval_without_models_is_a_clear_error(workspace):
    message = _error(workspace, "eval", *base_args(workspace, "x"))
    assert "eval.models" in message


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(workspace):
    import signal
    import time

    out = workspace / "interrupted"
    args = base_args(workspace, "interrupted") + ["eval.enabled=false", "train.max_steps=100000"]
    env = cli_env(workspace)
    # A shell that starts pytest in the background leaves SIGINT ignored, and children inherit that; restore
    # the default so that Python turns the signal into KeyboardInterrupt as in a terminal.
    proc = subprocess.Popen([*KDLM, "distill", *args], cwd=workspace, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = out / "train_log.csv"
    while proc.poll() is None and (not log.exists() or log.read_text().count("\n") < 5):  # no deadline: polls step 4
        time.sleep(0.2)
    try:
        assert proc.poll() is None and log.exists() and log.read_text().count("\n") >= 5, "training never got to step 4"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:  # never leave a 100,000-step run behind
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert "train.resume=true" in stdout + stderr
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "state.json").exists()
    saved_step = json.loads((checkpoints[-1] / "state.json").read_text())["step"]
    assert saved_step >= 4

    run_cli("distill", *args[:-1], f"train.max_steps={saved_step + 3}", "train.resume=true", cwd=workspace)
    steps = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    assert steps[-3:] == [saved_step + 1, saved_step + 2, saved_step + 3]
