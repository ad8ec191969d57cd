"""benchmarks/cross_tokenizer.py --preset tiny end to end: every run trains, and the table has its rows and targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("reference", "seqkd", "uld-topk", "uld-live", "hybrid-topk", "hybrid-live")


def run_script(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(ROOT / "benchmarks" / "cross_tokenizer.py"), "--preset", "tiny", "--out", str(out),
               "--seeds", "1", *extra]  # one seed: half the subprocesses; the script's seed loop is the same
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_tiny_grid_trains_every_run_and_prints_the_targets(tmp_path):
    out = tmp_path / "grid"
    run_script(out)
    rows = json.loads((out / "results.json").read_text())["rows"]
    budgets = {(r["method"], r["budget"], r["seed"]) for r in rows}
    assert budgets == ({(m, "equal steps", 1) for m in METHODS} | {(m, "equal wall-clock", 1) for m in METHODS[1:]})
    for row in rows:
        assert row["steps"] >= 1 and row["train_s"] > 0 and row["bits_per_byte"] > 0 and 0 <= row["rouge_l"] <= 100
        if row["budget"] == "equal steps":
            assert row["steps"] == 3
    own = load_file(str(out / "student-own" / "student-init" / "model.safetensors"))
    same = load_file(str(out / "student-same" / "student-init" / "model.safetensors"))
    for folder in (out / "runs").iterdir():
        start = same if folder.name.startswith("reference") else own
        trained = load_file(str(folder / "student" / "model.safetensors"))
        assert trained.keys() == start.keys()
        assert any(not (trained[k] == start[k]).all() for k in start), f"{folder.name}: the student did not change"
    params = {r["method"]: r["params_m"] for r in rows}
    assert params["seqkd"] == params["hybrid-live"] != params["reference"]  # two students, two tokenizers

    lines = (out / "results.md").read_text().splitlines()
    assert lines[0].startswith("| method | budget | steps")
    table = [line for line in lines[2:] if line.startswith("| ") and " | equal " in line]
    assert len(table) == len(METHODS) + len(METHODS) - 1
    targets = [line for line in lines if line.startswith("| (c)") or line.startswith("| own-tokenizer")
               or line.startswith("| a cross-tokenizer step")]
    assert len(targets) == 4
    for line in targets:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1] in ("pass", "miss") and cells[2]

    before = {folder.name: (folder / "report.json").stat().st_mtime for folder in (out / "runs").iterdir()}
    proc = run_script(out)  # resumable: nothing is trained or evaluated again
    assert "$ kdlm" not in proc.stdout
    assert before == {folder.name: (folder / "report.json").stat().st_mtime for folder in (out / "runs").iterdir()}

    # A subset at another budget (--methods, --steps): its own runs-2steps/, the same students and cache.
    proc = run_script(out, "--methods", "hybrid-topk,reference", "--steps", "2")
    assert "$ kdlm build-student" not in proc.stdout and "$ kdlm cache-teacher" not in proc.stdout
    assert before == {folder.name: (folder / "report.json").stat().st_mtime for folder in (out / "runs").iterdir()}
    result = json.loads((out / "results-2steps.json").read_text())
    assert result["steps"] == 2
    assert {(r["method"], r["budget"]) for r in result["rows"]} == {
        ("reference", "equal steps"), ("hybrid-topk", "equal steps"), ("hybrid-topk", "equal wall-clock")}
    assert all(r["steps"] == 2 for r in result["rows"] if r["budget"] == "equal steps")
    assert {f.name for f in (out / "runs-2steps").iterdir()} == {"reference-steps-s1", "hybrid-topk-steps-s1", "hybrid-topk-clock-s1"}
    lines = (out / "results-2steps.md").read_text().splitlines()
    assert not any(line.startswith("| (c)") for line in lines)  # SeqKD did not run: target (c) is left out
    assert sum(line.startswith("| own-tokenizer") or line.startswith("| a cross-tokenizer step") for line in lines) == 2


def test_a_subset_without_the_reference_is_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for methods in ("seqkd,hybrid-topk", "reference,nope"):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cross_tokenizer.py"), "--preset", "tiny",
                               "--out", str(tmp_path / "x"), "--methods", methods], env=env, capture_output=True, text=True)
        assert proc.returncode != 0 and f"--methods {methods}" in proc.stderr and "with reference" in proc.stderr
        assert not (tmp_path / "x").exists()  # refused before anything is built
