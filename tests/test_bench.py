"""`kdlm bench` on a tiny grid: runs, skip on rerun, FLOP accounting, the table, and the HTML report in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import missing
from kdlm.bench.config import load_bench_config
from kdlm.errors import KdlmError
from kdlm.models import load_model
from test_cli import cli_env
from tiny import save_tiny_teacher, write_chat_jsonl

METHODS = ["sft", "seqkd", "fkl", "rkl"]
SEEDS = [0, 1]


def _bench_yaml(root: Path) -> Path:
    config = {
        "output_dir": str(root / "bench"),
        "distill": {
            "teacher": {"model": str(root / "teacher"), "top_k": 16},
            "data": {"train": str(root / "chat.jsonl"), "heldout": 4, "max_length": 96, "answer_max_new_tokens": 16},
            "student": {"num_layers": 2},
            "train": {"batch_size": 4, "max_steps": 6, "lr": 3.0e-3, "bf16": False},
        },
        "methods": METHODS,
        "seeds": SEEDS,
        "curve_every": 3,
        "eval": {"tasks": ["fidelity", "cost"], "fidelity_prompts": 3, "fidelity_max_new_tokens": 8, "generation_tokens": 4,
                 "batch_size": 4, "bf16": False},
        "metric": "KL to teacher",
        "higher_is_better": False,
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_bench_cli(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kdlm.cli", "bench", str(root / "bench.yaml"), *overrides], cwd=root,
                          env=cli_env(root), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    save_tiny_teacher(root / "teacher")
    write_chat_jsonl(root / "chat.jsonl", count=24)
    _bench_yaml(root)
    first = run_bench_cli(root)
    return root, first


def _run_dirs(root: Path) -> list[Path]:
    return [root / "bench" / "runs" / f"{method}-seed{seed}" for method in METHODS for seed in SEEDS]


def test_every_run_finishes_with_its_cost(bench):
    root, _ = bench
    shared = root / "bench" / "shared"
    caches = list(shared.glob("teacher-cache-*"))
    assert len(caches) == 1, "fkl and rkl share one teacher cache"
    cache_tokens = json.loads((caches[0] / "manifest.json").read_text())["num_tokens"]
    teacher_params = sum(p.numel() for p in load_model(str(root / "teacher"))[0].parameters())
    for run_dir in _run_dirs(root):
        done = json.loads((run_dir / "bench_run.json").read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["student"]["model"] == str(shared / "student-init"), "every run starts from the shared student"
        assert config["data"]["seed"] == 0 and config["train"]["seed"] == done["seed"]
        student_params = sum(p.numel() for p in load_model(str(run_dir / "student"))[0].parameters())
        history = json.loads((run_dir / "history.json").read_text())
        assert done["steps"] == 6 and done["tokens"] == history[-1]["tokens"]
        teacher_tokens = cache_tokens if done["method"] in ("fkl", "rkl") else 0
        assert done["flops"] == 6 * student_params * done["tokens"] + 2 * teacher_params * teacher_tokens
        assert done["wall_s"] > 0 and [p["step"] for p in done["curve"]] == [3, 6]
    # Same data for every seed and method: the teacher answered each prompt once (one answer cache line per prompt).
    sft = yaml.safe_load((root / "bench" / "runs" / "sft-seed0" / "config.yaml").read_text())
    assert sft["data"]["teacher_answers"] is False and sft["loss"]["kd_weight"] == 0


def test_table_ranks_methods_with_noise_marks(bench):
    root, _ = bench
    result = json.loads((root / "bench" / "bench.json").read_text())
    methods = result["methods"]
    assert set(methods) == set(METHODS)
    for method, entry in methods.items():
        kls = [run["eval"]["KL to teacher"] for run in entry["runs"]]
        assert entry["metric"]["mean"] == pytest.approx(sum(kls) / len(kls))
        assert entry["metric"]["n"] == 2
        assert entry["vs_best"] in ("best", "within noise", "below")
        assert method not in entry["ties"]
    # Distilling from the teacher's distribution brings the student closer to it than cross-entropy alone.
    assert methods["fkl"]["metric"]["mean"] < methods["sft"]["metric"]["mean"]
    best = min(methods, key=lambda m: methods[m]["metric"]["mean"])
    assert methods[best]["vs_best"] == "best" and methods[best]["rank"] == 1
    table = (root / "bench" / "bench.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and "**best**" in table
    assert sorted(p.name for p in (root / "bench" / "plots").glob("*.png")) == [
        "quality_vs_flops.png", "quality_vs_step.png", "quality_vs_wallclock.png", "training_loss.png"]


def test_bits_per_byte_is_summarised_per_method_and_reported(bench):
    root, _ = bench
    result = json.loads((root / "bench" / "bench.json").read_text())
    for entry in result["methods"].values():
        values = [run["eval"]["bits/byte"] for run in entry["runs"]]
        assert entry["bits/byte"]["mean"] == pytest.approx(sum(values) / len(values)) and entry["bits/byte"]["n"] == 2
    table = (root / "bench" / "bench.md").read_text()
    header_line = next(line for line in table.splitlines() if line.startswith("| rank |"))
    header = [cell.strip() for cell in header_line.strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    fkl = next(cells for cells in rows if cells[header.index("method")] == "fkl")  # not a row naming fkl as a tie
    bits = result["methods"]["fkl"]["bits/byte"]
    assert fkl[header.index("bits/byte")] == f"{bits['mean']:.3f} ± {bits['std']:.3f}"


def test_aggregate_leaves_out_cells_that_are_not_numbers():
    """A student with another tokenizer has "n/a (tokenizer)" for KL and ECE: left out of the summaries, and
    of the ranking when the ranking metric is one of them."""
    from kdlm.bench.config import BenchConfig
    from kdlm.bench.report import markdown_table
    from kdlm.bench.runner import aggregate

    config = BenchConfig(methods=["same", "cross"], seeds=[0, 1], metric="KL to teacher", higher_is_better=False)
    runs, rows = [], []
    for method, kl in (("same", 0.5), ("cross", "n/a (tokenizer)")):
        for seed in (0, 1):
            runs.append({"method": method, "seed": seed, "run_dir": f"/r/{method}-{seed}", "wall_s": 1.0, "flops": 1.0, "tokens": 1})
            rows.append({"model": f"{method}-{seed}", "KL to teacher": kl, "bits/byte": 1.0 + seed, "top-1 agreement": 0.25,
                         "top-1 on": "1:1-aligned (40% of tokens)" if method == "cross" else "all tokens"})
    result = aggregate(config, runs, rows)
    methods = result["methods"]
    assert methods["same"]["metric"]["mean"] == 0.5 and methods["cross"]["metric"]["n"] == 0
    assert "KL to teacher" not in methods["cross"] and methods["cross"]["bits/byte"]["mean"] == 1.5
    assert methods["same"]["rank"] == 1
    table = markdown_table({**result, "evaluation": rows})
    assert "Top-1 agreement of cross-0, cross-1 (another tokenizer" in table


def test_rerun_skips_finished_runs_and_reruns_a_missing_one(bench):
    root, _ = bench
    runs = _run_dirs(root)
    stamps = {run: (run / "train_log.csv").stat().st_mtime_ns for run in runs}
    second = run_bench_cli(root)
    assert second.stderr.count("finished earlier") == len(runs)
    assert all((run / "train_log.csv").stat().st_mtime_ns == stamps[run] for run in runs), "a finished run trained again"
    # A run without its record (e.g. killed before the end) runs again; the others are still skipped.
    victim = root / "bench" / "runs" / "rkl-seed1"
    shutil.rmtree(victim)
    third = run_bench_cli(root)
    assert third.stderr.count("finished earlier") == len(runs) - 1
    assert (victim / "bench_run.json").exists()


def test_bad_bench_config_is_refused(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("methods: [sft, nonsense]\n")
    with pytest.raises(KdlmError, match="unknown method 'nonsense'"):
        load_bench_config(path)
    path.write_text("method: [sft]\n")
    with pytest.raises(KdlmError, match="method: unknown key"):
        load_bench_config(path)


def _browser() -> str | None:
    """A headless Chromium: playwright's own download, else the system's (Debian: chromium-headless-shell)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    with sync_playwright() as p:
        if os.path.exists(p.chromium.executable_path):
            return p.chromium.executable_path
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_html_report_renders_in_headless_chromium(bench):
    root, _ = bench
    browser_path = _browser()
    if browser_path is None:
        missing("no headless Chromium: pip install playwright && python -m playwright install chromium "
                "(or apt-get install chromium-headless-shell)")
    from playwright.sync_api import sync_playwright

    report = root / "bench" / "report.html"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(
            "Array.from(document.querySelectorAll('figure img')).map(i => [i.closest('figure').id, i.naturalWidth, i.naturalHeight])"
        )
        rows = page.evaluate("document.querySelectorAll('table tr').length")
        page.screenshot(path=str(root / "report.png"), full_page=True)
        browser.close()
    assert not errors
    assert sorted(figure for figure, _, _ in images) == [
        "plot-quality_vs_flops", "plot-quality_vs_step", "plot-quality_vs_wallclock", "plot-training_loss"]
    assert all(width > 300 and height > 200 for _, width, height in images), images
    assert rows == 2 + len(METHODS)  # header, one row per method, the teacher
    assert (root / "report.png").stat().st_size > 20_000


def test_self_instruct_conversion_keeps_human_outputs_and_names_bad_lines(tmp_path):
    from kdlm.bench.runner import convert_self_instruct
    from kdlm.config import flatten

    source = tmp_path / "seed.jsonl"
    rows = [{"instruction": "Add.", "instances": [{"input": "2 and 3", "output": "5"}]},
            {"instruction": "Greet.", "instances": [{"input": "", "output": "Hello!"}]}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    target = convert_self_instruct(source, tmp_path / "out.jsonl", limit=None)
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert records == [{"prompt": "Add.\n\n2 and 3", "response": "5"}, {"prompt": "Greet.", "response": "Hello!"}]
    assert len(convert_self_instruct(source, tmp_path / "one.jsonl", limit=1).read_text().splitlines()) == 1
    source.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(KdlmError, match="seed.jsonl:2"):
        convert_self_instruct(source, tmp_path / "bad.jsonl", limit=None)
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e.f": 3}) == {"a.b": 1, "a.c.d": 2, "e.f": 3}


def test_every_standard_method_resolves_to_the_config_it_names():
    """Each grid method's overrides land in a valid `kdlm distill` config that the pipeline accepts."""
    from kdlm.bench.config import STANDARD_METHODS
    from kdlm.bench.runner import _pick, make_config, uses_cache
    from kdlm.pipeline import _check_signal

    base = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    for name, overrides in STANDARD_METHODS.items():
        config = make_config(base, overrides)
        for key, value in overrides.items():
            assert _pick(config, key) == value, (name, key)
        _check_signal(config)  # refused combinations (e.g. on-policy from a cache) raise here
        on_policy = config.method.name != "offpolicy"
        assert not (on_policy and uses_cache(config)), name
    assert {"gkd", "distillm", "minillm", "imitkd"} <= set(STANDARD_METHODS)
    # the bench runs each method as its shipped config does, but for sample lengths, DistiLLM's start and its buffer
    # (scaled to the bench's 80 steps, so that replay acts)
    for name in ("gkd", "distillm", "minillm", "imitkd"):
        shipped = make_config(base.parent / f"{name}.yaml", {})
        benched = make_config(base, STANDARD_METHODS[name])
        differ = [key for key in type(shipped.method).model_fields
                  if getattr(shipped.method, key) != getattr(benched.method, key) and key not in ("max_new_tokens", "init_threshold", "capacity")]
        assert differ == [], (name, differ)


def test_decode_tokens_sum_the_log_across_a_resume(tmp_path):
    from kdlm.bench.runner import decode_tokens

    log = tmp_path / "train_log.csv"
    assert decode_tokens(log) == {"student": 0, "teacher": 0}  # no log: nothing sampled
    # Cumulative counters; the run resumed after step 2 and counted again from 0.
    log.write_text("step,loss,decode_tokens_student,decode_tokens_teacher\n1,1.0,10,0\n2,1.0,25,4\n"
                   "3,1.0,5,0\n4,1.0,12,4\n")
    assert decode_tokens(log) == {"student": 25 + 12, "teacher": 4 + 4}
    log.write_text("step,loss\n1,1.0\n")  # an off-policy run
    assert decode_tokens(log) == {"student": 0, "teacher": 0}
