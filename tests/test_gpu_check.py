"""The GPU check's dry run, as CI runs it: the real script on the CPU at tiny sizes, then its JSON and markdown.

This is the only run the GPU check gets before a GPU session runs it for real, so it checks the plumbing a
first GPU run depends on: every step reports ok or a reason, the per-step results land in one JSON with
the keys the markdown and the README read, and a failing step cannot take the others down with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a dozen processes (each step, pytest, kdlm distill); about a minute on 2 quiet cores
STEPS = ["environment", "cuda_vs_cpu", "loss_memory", "quickstart", "tests", "two_gpu"]


def _run(out: Path, *extra: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "OUT"}  # $OUT only where a test sets it
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    copy = tmp_path_factory.mktemp("device_out")
    proc = _run(out, env_extra={"OUT": str(copy)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, copy, json.loads((out / "gpu_check.json").read_text())


def test_every_step_reports_ok_or_a_reason(dry_run):
    _, _, summary = dry_run
    assert summary["dry_run"] is True
    assert list(summary["steps"]) == STEPS
    for name, step in summary["steps"].items():
        assert step["status"] in ("ok", "skipped"), (name, step)
        if step["status"] == "skipped":
            assert step["reason"].strip(), name
    # In a dry run only the 2-GPU step has nothing to run on; the others ran their tiny versions.
    assert [name for name, step in summary["steps"].items() if step["status"] == "skipped"] == ["two_gpu"]


def test_step_results_hold_what_the_summary_reports(dry_run):
    _, _, summary = dry_run
    steps = summary["steps"]
    environment = steps["environment"]["result"]
    assert {"torch", "cuda_available", "devices", "bf16_supported", "precision_auto", "missing_packages"} <= set(environment)
    assert environment["precision_auto"].startswith("precision: ")
    assert set(environment["kdlm_imports"].values()) == {"ok"}

    compared = steps["cuda_vs_cpu"]["result"]
    assert set(compared["objective"]) == {"fused-online", "fused-topk", "dense-online", "dense-topk"}
    assert all(case["ok"] and case["loss_cpu"] > 0 for case in compared["objective"].values())
    assert compared["decode"]["same_token_ids"] and compared["decode"]["tokens"] > 0

    loss = steps["loss_memory"]["result"]
    assert (loss["tokens"], loss["vocab"], loss["dtype"]) == (256, 1024, "bf16")
    for name in ("dense", "fused"):
        assert loss["variants"][name]["status"] == "ok"
    # bf16 inputs, fp32 inside: the fused loss computes the dense loss's value.
    assert loss["variants"]["fused"]["loss_rel_diff"] < 1e-3
    for name in ("trl", "liger"):
        assert loss["variants"][name]["status"] in ("ok", "skipped", "failed")
    assert abs(loss["liger_published"]["ratio"] - 0.161) < 0.001

    quickstart = steps["quickstart"]["result"]
    assert quickstart["steps"] == 2 and quickstart["target_tokens"] > 0
    assert {"load_teacher_s", "data_s", "build_student_s", "teacher_signal_s", "train_s"} <= set(quickstart["timings_s"])
    assert [row["model"] for row in quickstart["rows"]] == ["teacher", "student before", "student after"]

    tests = steps["tests"]["result"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0


def test_markdown_and_the_copies_in_out(dry_run):
    out, copy, summary = dry_run
    markdown = (out / "gpu_check.md").read_text()
    for name in STEPS:
        assert f"| {name} |" in markdown
    assert "16.1%" in markdown and "fused-online" in markdown and "train_s" in markdown
    assert json.loads((copy / "gpu_check.json").read_text()) == summary
    assert (copy / "gpu_check.md").read_text() == markdown
    assert "===== quickstart.log" in (copy / "gpu_check_logs.txt").read_text()


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path):
    """A teacher that does not exist fails the quickstart step alone, with kdlm's error in the JSON; the step
    after it still runs, and the steps left out with --only are recorded as such."""
    proc = _run(tmp_path, "--teacher", str(tmp_path / "no-such-teacher"), "--only", "quickstart,two_gpu")
    assert proc.returncode == 1, proc.stderr[-2000:]
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert list(steps) == STEPS
    assert steps["quickstart"]["status"] == "failed" and "no-such-teacher" in steps["quickstart"]["error"]
    assert steps["two_gpu"] == {"status": "skipped", "reason": "dry run: no GPUs"}
    assert steps["environment"] == {"status": "skipped", "reason": "not selected with --only"}
    assert "| quickstart | failed |" in (tmp_path / "gpu_check.md").read_text()
