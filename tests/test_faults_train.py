"""Faults around training (issue 16): SIGTERM, reused folders, changed configs, crafted checkpoints, interrupted
answer caches, over-long prompts, missing caches, full disks, read-only folders and API keys.

Each test plays the fault against the real code (the CLI in a subprocess where the user would meet it)
and checks what the user sees and that nothing is lost.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdlm.config import LossConfig, TrainConfig, load_config
from kdlm.data import encode_records, load_records
from kdlm.errors import KdlmError
from kdlm.generate.cache import fingerprint as cache_fingerprint
from kdlm.generate.config import load_generate_config
from kdlm.generate.teacher_answers import answer_prompts
from kdlm.pipeline import distill
from kdlm.teachers.cache import cache_identity, read_targets, write_cache
from kdlm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdlm.train.loop import train
from test_cli import KDLM, cli_env, run_cli
from tiny import save_tiny_teacher, tiny_llama, tiny_tokenizer, write_chat_jsonl

HERE = Path(__file__).parent
SECRET = "sk-test-5c2f9e1d"


# --- in-process: the training loop and its checkpoints -------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    data = write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl")
    examples = encode_records(tokenizer, load_records(str(data)), max_length=128)
    return tokenizer, examples, tiny_llama(len(tokenizer), num_layers=4, seed=1)


def _train(setup, output_dir, *, steps=3, student=None, **train_options):
    tokenizer, examples, teacher = setup
    student = student or tiny_llama(len(tokenizer), num_layers=2, seed=2)
    options = {"batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "bf16": False, **train_options}
    config = TrainConfig(output_dir=str(output_dir), max_steps=steps, **options)
    result = train(student, examples, train_config=config, loss_config=LossConfig(), pad_token_id=tokenizer.pad_token_id,
                   vocab_size=len(tokenizer), teacher=teacher)
    return student, result


def _log_steps(output_dir: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in (output_dir / "train_log.csv").read_text().splitlines()[1:]]


def test_resume_refuses_a_changed_config_naming_the_keys(setup, tmp_path):
    _train(setup, tmp_path, steps=3)
    with pytest.raises(KdlmError) as error:
        _train(setup, tmp_path, steps=3, resume=True, lr=1e-3, batch_size=2)
    message = str(error.value)
    listed = [line.split(":")[0].strip() for line in message.splitlines() if line.startswith("  ")]
    assert listed == ["train.batch_size", "train.lr"]  # resume differs too, but it may change
    assert "train.lr: checkpoint has 0.003, this run has 0.001" in message and "train.overwrite=true" in message
    _, result = _train(setup, tmp_path, steps=5, resume=True, log_every=2)  # keys that may change
    assert [r["step"] for r in result.history] == [4, 5]


def test_a_used_output_dir_is_refused_unless_overwrite(setup, tmp_path):
    _train(setup, tmp_path, steps=3)
    before = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(KdlmError, match="already holds checkpoints .*train.resume=true.*train.overwrite=true"):
        _train(setup, tmp_path, steps=2)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == before  # nothing lost
    assert _log_steps(tmp_path) == [1, 2, 3]
    _train(setup, tmp_path, steps=2, overwrite=True)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]
    assert _log_steps(tmp_path) == [1, 2]  # the old run's steps are gone, not mixed in


def test_resume_without_a_checkpoint_says_so(setup, tmp_path, capsys):
    _, result = _train(setup, tmp_path, steps=2, resume=True)
    out = capsys.readouterr().out
    assert "train.resume=true" in out and "holds no checkpoint" in out and str(tmp_path / "checkpoints") in out
    assert [r["step"] for r in result.history] == [1, 2]


def test_wall_clock_saves(setup, tmp_path, capsys):
    assert TrainConfig().save_every_minutes == 10  # on by default
    _train(setup, tmp_path / "off", steps=3, save_every_minutes=0)
    assert "min)" not in capsys.readouterr().out
    _train(setup, tmp_path / "on", steps=3, save_every_minutes=1e-9)  # always due: a save after every step
    out = capsys.readouterr().out
    assert out.count("checkpoint (every 1e-09 min)") == 2 and out.count("checkpoint (end of training)") == 1


def test_checkpoint_restores_every_rng_and_loads_without_pickled_objects(setup, tmp_path):
    student = tiny_llama(259, num_layers=1)
    optimizer = torch.optim.AdamW(student.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # numpy keeps a cached Gaussian: its state has more than the key array
    path = save_checkpoint(tmp_path, model=student, optimizer=optimizer, scheduler=scheduler, state={"step": 1})
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_checkpoint(path, model=student, optimizer=optimizer, scheduler=scheduler)
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    for part in ("model.pt", "optimizer.pt", "rng.pt"):
        torch.load(path / part, weights_only=True)  # torch's own check: tensors and plain values only


class _RunsShell:
    """Unpickling this runs a shell command: what a crafted checkpoint part would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("part", ["rng.pt", "optimizer.pt", "model.pt"])
def test_a_crafted_checkpoint_is_refused_and_runs_nothing(setup, tmp_path, part):
    _train(setup, tmp_path, steps=2)
    marker = tmp_path / "pwned"
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    torch.save({"torch": _RunsShell(f"touch {marker}")}, checkpoint / part)
    student = tiny_llama(259, num_layers=2, seed=2)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    with pytest.raises(KdlmError, match=f"{part} refused: it holds Python objects"):
        _train(setup, tmp_path, steps=3, resume=True, student=student)
    assert not marker.exists()
    assert all(torch.equal(before[name], tensor) for name, tensor in student.state_dict().items())
    torch.load(checkpoint / part, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.exists()


def test_a_refused_teacher_cache_write_names_the_file_and_a_rerun_finishes(setup, tmp_path):
    tokenizer, examples, teacher = setup
    identity = cache_identity(kind="topk", teacher="tiny", tokenizer=tokenizer, vocab_size=len(tokenizer),
                              examples=examples, top_k=4, examples_per_shard=8)
    write = lambda: write_cache(teacher, examples, tmp_path, identity=identity,  # noqa: E731
                                pad_token_id=tokenizer.pad_token_id, show_progress=False)
    blocked = tmp_path / "shard-00001.safetensors.tmp"
    blocked.mkdir(parents=True)  # the OS refuses this write (EISDIR) inside safetensors, as it would a full disk
    with pytest.raises(OSError) as error:
        write()
    assert (error.value.filename, error.value.strerror) == (str(blocked), "Is a directory")
    first_shard = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    blocked.rmdir()
    assert write()["complete"] and len(read_targets(tmp_path)) == len(examples)
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == first_shard  # kept, not written again


# --- the teacher answer cache ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def answerer():
    tokenizer = tiny_tokenizer()
    return tiny_llama(len(tokenizer), num_layers=1), tokenizer


def _chats(count: int, long_at: int | None = None) -> list[dict]:
    chats = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(count)]
    if long_at is not None:
        chats[long_at]["messages"][0]["content"] = "x" * 600  # 600 byte tokens: over the tiny model's 512 positions
    return chats


def _answer(answerer, chats, cache_file, model=True):
    model_, tokenizer = answerer
    return answer_prompts(model_ if model else None, tokenizer, chats, teacher_name="tiny", max_new_tokens=4,
                          batch_size=2, bf16=False, cache_file=cache_file)


def _rows(cache_file: Path, table: str) -> dict:
    with sqlite3.connect(cache_file) as connection:
        column = "created" if table == "answers" else "reason"
        return dict(connection.execute(f"SELECT fingerprint, {column} FROM {table}"))


def test_a_rerun_keeps_the_answers_paid_for_and_answers_only_the_rest(answerer, tmp_path):
    cache_file = tmp_path / "answers.sqlite"  # each answer is committed as it is decoded (SQLite, WAL)
    first = _answer(answerer, _chats(3), cache_file)  # a run stopped after 3 answers leaves these
    paid_for = _rows(cache_file, "answers")
    results = _answer(answerer, _chats(5), cache_file)
    entries = _rows(cache_file, "answers")
    assert len(entries) == 5 and len(paid_for) == 3
    assert all(entries[key] == created for key, created in paid_for.items())  # kept, not generated again
    assert [r["messages"][-1] for r in results[:3]] == [r["messages"][-1] for r in first]


def test_a_jsonl_answer_cache_of_an_older_kdlm_is_imported(answerer, tmp_path, monkeypatch):
    # The older cache: cache_dir()/answers/<hash of the settings>.jsonl, one line per answer keyed by a hash of
    # (messages, sample, settings), a failed prompt as {"key", "failed"}, maybe a line torn by a kill.
    monkeypatch.setenv("KDLM_CACHE", str(tmp_path))
    settings = {"teacher": "tiny", "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 0, "bf16": False}
    chats = _chats(3)
    keys = [cache_fingerprint({"messages": c["messages"], "sample": 0, **settings}) for c in chats]
    lines = [json.dumps({"key": keys[0], "answer": "zero"}), json.dumps({"key": keys[1], "failed": "too long"}),
             json.dumps({"key": keys[2], "answer": "two"}), '{"key": "torn']
    legacy = tmp_path / "answers" / f"{cache_fingerprint(settings)}.jsonl"
    legacy.parent.mkdir()
    legacy.write_text("\n".join(lines))
    _, tokenizer = answerer
    results = answer_prompts(None, tokenizer, chats, teacher_name="tiny", max_new_tokens=4, bf16=False)  # no teacher
    assert [r["messages"][-1]["content"] for r in results] == ["zero", "two"]
    assert legacy.with_suffix(".sqlite").exists()


def test_sampled_answers_keep_the_seeding_of_older_kdlm_versions(answerer, tmp_path):
    # One prompt per batch: the batch's seed is the hash of (messages, sample, settings) the JSONL cache was keyed
    # by, plus the seed; a plain `generate` under that seed is the reference (answers cached before stay valid).
    model, tokenizer = answerer
    settings = {"teacher": "tiny", "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 3, "bf16": False}
    chats = _chats(2)
    results = answer_prompts(model, tokenizer, chats, teacher_name="tiny", max_new_tokens=4, seed=3, batch_size=1,
                             bf16=False, samples_per_prompt=2, cache_file=tmp_path / "answers.sqlite")
    expected = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat["messages"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        for sample in range(2):
            key = cache_fingerprint({"messages": chat["messages"], "sample": sample, **settings})
            torch.manual_seed(int(key, 16) % 2**31 + 3)
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id)
            expected.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    assert [r["messages"][-1]["content"] for r in results] == expected


def test_an_over_long_prompt_fails_alone_and_reruns_finish(answerer, tmp_path, capsys):
    cache_file = tmp_path / "answers.sqlite"
    results = _answer(answerer, _chats(4, long_at=1), cache_file)
    assert [r["messages"][0]["content"] for r in results] == ["question 0", "question 2", "question 3"]
    err = capsys.readouterr().err
    assert "1 of 4 teacher answers failed" in err and "teacher's context of 512 tokens" in err
    failed = list(_rows(cache_file, "failures").values())
    assert len(failed) == 1 and "the prompt has 6" in failed[0]
    again = _answer(answerer, _chats(4, long_at=1), cache_file, model=False)  # no teacher: all cached or failed
    assert again == results and "1 of 4 teacher answers failed" in capsys.readouterr().err
    with pytest.raises(KdlmError, match="all 1 of 1 teacher answers failed"):
        _answer(answerer, [_chats(4, long_at=1)[1]], tmp_path / "only-long.sqlite")


# --- whole runs: `kdlm distill` in a subprocess where the fault meets the CLI, in-process otherwise ---------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    save_tiny_teacher(root / "teacher")
    write_chat_jsonl(root / "chat.jsonl", count=24)
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("KDLM_CACHE", str(tmp_path / "cache"))


def distill_args(root: Path, output: str, steps: int = 8) -> list[str]:
    return [
        f"teacher.model={root / 'teacher'}", f"data.train={root / 'chat.jsonl'}", "data.heldout=0",
        "data.teacher_answers=false", "data.max_length=96", "student.num_layers=2", "train.batch_size=4",
        f"train.max_steps={steps}", "train.lr=3e-3", f"train.output_dir={root / output}", "eval.enabled=false",
        "teacher.top_k=8", f"teacher.api_key={SECRET}",
    ]


def _distill(*args: str) -> dict:
    return distill(load_config(None, list(args)))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "student" / "model.safetensors")


def test_sigterm_saves_and_the_resumed_run_equals_a_straight_one(workspace, capsys):
    _distill(*distill_args(workspace, "straight"))
    straight_output = capsys.readouterr()
    out = workspace / "terminated"
    env = {**cli_env(workspace), "KDLM_TEST_PAUSE_AT_STEP": "4"}
    proc = subprocess.Popen([sys.executable, str(HERE / "paused_cli.py"), "distill", *distill_args(workspace, "terminated")],
                            cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.csv"
    try:
        while proc.poll() is None and (not log.exists() or log.read_text().count("\n") < 5):
            time.sleep(0.1)  # polls for step 4 (the child waits there); no deadline: the CI timeout bounds it
        assert proc.poll() is None, "the run ended before step 4"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stdout + stderr
    assert "Traceback" not in stdout + stderr and "terminated" in stderr and "train.resume=true" in stdout
    assert json.loads((latest_checkpoint(out / "checkpoints") / "state.json").read_text())["step"] == 4
    _distill(*distill_args(workspace, "terminated"), "train.resume=true")
    assert _log_steps(out) == list(range(1, 9))
    expected, got = _weights(workspace / "straight"), _weights(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)
    # The API key given as an override is nowhere in what the runs wrote or printed.
    written = [p for p in workspace.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".csv", ".md")]
    assert len(written) > 10 and all(SECRET not in p.read_text() for p in written)
    assert SECRET not in straight_output.out + straight_output.err + stdout + stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["teacher"]["api_key"] is None


def test_sigkill_loses_only_the_steps_after_the_last_save_and_resume_equals_a_straight_run(workspace):
    """kill -9 (no handler runs) after step 5 with train.save_every=2: the step-4 checkpoint survives, and the
    resumed run trains to the straight run's weights (save_every changes nothing else of a run)."""
    if not (workspace / "straight-every2").exists():
        _distill(*distill_args(workspace, "straight-every2"), "train.save_every=2")
    out = workspace / "killed"
    args = [*distill_args(workspace, "killed"), "train.save_every=2"]
    env = {**cli_env(workspace), "KDLM_TEST_PAUSE_AT_STEP": "5"}
    proc = subprocess.Popen([sys.executable, str(HERE / "paused_cli.py"), "distill", *args],
                            cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.csv"
    try:
        while proc.poll() is None and (not log.exists() or log.read_text().count("\n") < 6):
            time.sleep(0.1)  # polls for step 5 (the child waits there); no deadline: the CI timeout bounds it
        assert proc.poll() is None, "the run ended before step 5"
        proc.kill()
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((latest_checkpoint(out / "checkpoints") / "state.json").read_text())["step"] == 4
    _distill(*args, "train.resume=true")
    expected, got = _weights(workspace / "straight-every2"), _weights(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_a_changed_student_or_a_used_folder_is_refused(workspace):
    args = distill_args(workspace, "used", steps=2)
    _distill(*args)
    saved_config = (workspace / "used" / "config.yaml").read_text()
    with pytest.raises(KdlmError, match="student.num_layers: checkpoint has 2, this run has 3"):
        _distill(*args, "train.resume=true", "student.num_layers=3")
    with pytest.raises(KdlmError, match="already holds checkpoints.*train.overwrite=true"):
        _distill(*args)
    assert (workspace / "used" / "config.yaml").read_text() == saved_config  # the refused runs wrote nothing
    _distill(*args, "train.overwrite=true", "train.max_steps=1")
    assert _log_steps(workspace / "used") == [1]
    assert [p.name for p in (workspace / "used" / "checkpoints").iterdir()] == ["step-000001"]
    assert yaml.safe_load((workspace / "used" / "config.yaml").read_text())["train"]["overwrite"] is False


def test_a_missing_teacher_cache_says_how_to_write_one(workspace):
    missing = workspace / "no-such-cache"
    with pytest.raises(KdlmError) as error:
        _distill(*distill_args(workspace, "x"), f"teacher.cache={missing}", "student.init=model", "student.model=whatever")
    message = str(error.value)
    assert message.startswith(f"teacher.cache={missing}: there is no teacher cache there (the folder does not exist)")
    assert f"kdlm cache-teacher CONFIG teacher.cache={missing}" in message


def test_an_api_key_is_masked_in_config_errors(workspace, tmp_path):
    with pytest.raises(KdlmError) as error:
        load_config(None, distill_args(workspace, "x") + ["train.max_steps=-1"])
    assert SECRET not in str(error.value) and "teacher.api_key=**********" in str(error.value)
    (tmp_path / "run.yaml").write_text("teacher:\n  api_key: 123456789\n")  # a bad value is not echoed either
    with pytest.raises(KdlmError) as error:
        load_config(tmp_path / "run.yaml")
    assert "teacher.api_key: Input should be a valid string (got **********)" in str(error.value)
    with pytest.raises(KdlmError) as error:
        load_generate_config(None, [f"teacher.api_key={SECRET}", "limits.concurrency=0"])
    assert SECRET not in str(error.value) and "teacher.api_key=**********" in str(error.value)
    assert load_config(None, ["teacher.api_key=0x1F"]).teacher.api_key.get_secret_value() == "0x1F"  # not a number


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_is_one_line_and_a_rerun_completes(workspace):
    args = distill_args(workspace, "full", steps=2) + ["teacher.signal=online", "train.save_every=1"]
    # Checkpoint parts of the tiny student are ~0.4 MB; the config, logs and event files stay far below 100 kB.
    proc = subprocess.run([*KDLM, "distill", *args], cwd=workspace, env=cli_env(workspace), capture_output=True,
                          text=True, preexec_fn=_limit_file_size(100_000))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "model.pt: File too large" in error[0], proc.stderr
    _distill(*args)  # nothing half-written is taken for a checkpoint
    assert _log_steps(workspace / "full") == [1, 2]


def _make_read_only(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        # A skip even in CI: root ignores file modes, and a filesystem without chattr +i is no missing install.
        pytest.skip("running as root without chattr +i: no way to make a folder read-only")


def test_a_read_only_output_folder_is_one_line_and_loses_nothing(workspace):
    folder = workspace / "read-only"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    _make_read_only(folder)
    try:
        proc = run_cli("distill", *distill_args(workspace, "read-only"), cwd=workspace, check_ok=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    cause = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert proc.stderr.strip().splitlines() == [f"error: {folder / 'config.yaml'}: {cause}"]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
