"""`kdlm bench` axes on a tiny teacher: the grid of students x data sizes x teacher access, resume, refused
axis values, the Pareto sets against a brute-force computation, and the report's charts."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlm.bench.config import BenchConfig, load_bench_config
from kdlm.bench.runner import run_bench
from kdlm.bench.stats import pareto_front
from kdlm.errors import KdlmError
from test_cli import cli_env
from tiny import save_tiny_teacher, write_chat_jsonl

STUDENTS = [{"name": "d2", "student": {"num_layers": 2}},  # depth only: 2 of the teacher's 4 layers
            {"name": "w64", "student": {"width": {"intermediate_size": 64}}}]  # width only: all 4 layers, half the MLP
DATA = [{"name": "p12", "x": 12, "prompts": 12}, {"name": "p20", "x": 20, "prompts": 20}]
ACCESS = [{"name": "black", "loss": {"kd_weight": 0.0}},  # SeqKD on the teacher's text
          {"name": "gray", "teacher": {"top_k": 20}}]  # the top-20 log-probs an API returns (here: the local teacher's)


def _config(root: Path, **changes) -> dict:
    config = {
        "output_dir": str(root / "bench"),
        "distill": {
            "teacher": {"model": str(root / "teacher"), "top_k": 16},
            "data": {"train": str(root / "chat.jsonl"), "heldout": 0, "max_length": 96, "answer_max_new_tokens": 12},
            "student": {"calibration_samples": 4},
            "train": {"batch_size": 4, "max_steps": 2, "lr": 3.0e-3, "bf16": False},
        },
        "axes": {"students": STUDENTS, "data": DATA, "access": ACCESS},
        "methods": ["fkl"],
        "seeds": [0],
        "quantize": ["none", "int8"],
        "eval": {"tasks": ["fidelity", "cost"], "fidelity_prompts": 3, "fidelity_max_new_tokens": 8, "generation_tokens": 4,
                 "batch_size": 4, "bf16": False},
        "metric": "KL to teacher",
        "higher_is_better": False,
        "quality": ["top-1 agreement"],
    }
    config.update(changes)
    return config


def _write(root: Path, config: dict) -> Path:
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cli(root: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kdlm.cli", "bench", str(root / "bench.yaml")], cwd=root,
                          env=cli_env(root), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny 4-layer teacher and 24 chat records, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("axes-inputs")
    save_tiny_teacher(root / "teacher")
    write_chat_jsonl(root / "chat.jsonl", count=24)
    return root


def _config_in(folder: Path, inputs: Path, **changes) -> dict:
    config = _config(inputs, **changes)
    config["output_dir"] = str(folder / "bench")
    return config


@pytest.fixture(scope="module")
def grid(tmp_path_factory, inputs):
    root = tmp_path_factory.mktemp("axes")
    _write(root, _config_in(root, inputs))
    _cli(root)
    return root


def _expected_runs() -> dict[str, tuple[dict, dict, dict]]:
    return {f"{s['name']}_{d['name']}_{a['name']}-fkl-seed0": (s, d, a) for s in STUDENTS for d in DATA for a in ACCESS}


def test_cells_are_the_product_of_the_axes_in_order():
    axes = {"a": [{"name": "a1", "k.y": 1}, {"name": "a2", "k": {"y": 2}}],
            "b": [{"name": "b1", "k.y": 3, "z": 1}, {"name": "b2"}, {"name": "b3", "prompts": 5}]}
    cells = BenchConfig(axes=axes).cells()
    # reference: nested loops, later axes overriding earlier ones
    expected = []
    for a in axes["a"]:
        for b in axes["b"]:
            merged = {"k.y": a.get("k.y", (a.get("k") or {}).get("y"))}
            merged.update({k: v for k, v in b.items() if k not in ("name", "prompts")})
            expected.append((f"{a['name']}_{b['name']}", {"a": a["name"], "b": b["name"]}, merged, b.get("prompts")))
    assert [(c.label, c.values, c.overrides, c.prompts) for c in cells] == expected
    assert [c.label for c in BenchConfig().cells()] == [""]  # no axes: one cell, the plain method grid


def test_grid_runs_every_cell_with_its_settings(grid):
    root = grid
    runs = root / "bench" / "runs"
    expected = _expected_runs()
    assert sorted(p.name for p in runs.iterdir()) == sorted(expected)
    students = set()
    records = [json.loads(line) for line in Path(yaml.safe_load((root / "bench.yaml").read_text())["distill"]["data"]["train"]).read_text().splitlines()]
    for name, (student, data, access) in expected.items():
        config = yaml.safe_load((runs / name / "config.yaml").read_text())
        done = json.loads((runs / name / "bench_run.json").read_text())
        assert done["steps"] == 2
        students.add(config["student"]["model"])
        built = json.loads((Path(config["student"]["model"]) / "config.json").read_text())
        if student["name"] == "d2":
            assert built["num_hidden_layers"] == 2 and built["intermediate_size"] == 128
        else:
            assert built["num_hidden_layers"] == 4 and built["intermediate_size"] == 64
        train = [json.loads(line) for line in Path(config["data"]["train"]).read_text().splitlines()]
        assert len(train) == data["prompts"]
        assert [r["messages"][0]["content"] for r in train] == [r["prompt"] for r in records[: data["prompts"]]]
        if access["name"] == "black":
            assert config["loss"]["kd_weight"] == 0.0 and done["teacher_tokens"] == 0
        else:
            assert config["teacher"]["top_k"] == 20 and config["loss"]["kd_weight"] == 1.0
            manifest = json.loads((Path(config["teacher"]["cache"]) / "manifest.json").read_text())
            assert manifest["top_k"] == 20
    assert len(students) == 2, "one shared student start per student setting, whatever the data size or access"


def test_rerun_skips_finished_cells(grid):
    root = grid
    runs = sorted((root / "bench" / "runs").iterdir())
    stamps = {run: (run / "train_log.csv").stat().st_mtime_ns for run in runs}
    second = _cli(root)
    assert second.stderr.count("finished earlier") == len(runs)
    assert all((run / "train_log.csv").stat().st_mtime_ns == stamps[run] for run in runs)


def _brute_force(points, x_higher, y_higher):
    def better_or_equal(a, b, higher):
        return a >= b if higher else a <= b

    optimal = []
    for i, (x, y) in enumerate(points):
        dominated = any(better_or_equal(ox, x, x_higher) and better_or_equal(oy, y, y_higher) and (ox, oy) != (x, y)
                        for j, (ox, oy) in enumerate(points) if j != i)
        optimal.append(not dominated)
    return optimal


def test_pareto_front_equals_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 12)
        grid_values = trial % 2 == 0  # few distinct values: ties in x, in y and repeated points
        points = [(rng.randint(0, 3), rng.randint(0, 3)) if grid_values else (rng.random(), rng.random()) for _ in range(n)]
        for x_higher, y_higher in itertools.product((False, True), repeat=2):
            assert pareto_front(points, x_higher, y_higher) == _brute_force(points, x_higher, y_higher), (points, x_higher, y_higher)
    assert pareto_front([(1.0, float("nan")), (2.0, 1.0)], False, True) == [False, True]


def test_frontier_marks_the_brute_force_pareto_sets(grid):
    result = json.loads((grid / "bench" / "bench.json").read_text())
    frontier = result["frontier"]
    points = frontier["points"]
    assert len(points) == 2 * len(_expected_runs())  # each trained student, as is and int8
    by_label = {p["label"]: p for p in points}
    for name in _expected_runs():
        group = name.removesuffix("-seed0")
        plain, int8 = by_label[group], by_label[f"{group} int8"]
        assert int8["params (M)"]["mean"] == pytest.approx(plain["params (M)"]["mean"])
        assert int8["disk (MB)"]["mean"] < plain["disk (MB)"]["mean"], "int8 weights take less room"
    directions = {"params (M)": False, "disk (MB)": False, "generate tok/s": True}
    quality = {"KL to teacher": False, "top-1 agreement": True}
    assert frontier["quality"] == quality
    for (cost, x_higher), (column, y_higher) in itertools.product(directions.items(), quality.items()):
        pairs = [(p[cost]["mean"], p[column]["mean"]) for p in points]
        expected = [p["label"] for p, on in zip(points, _brute_force(pairs, x_higher, y_higher), strict=True) if on]
        assert frontier["pareto"][f"{cost}|{column}"] == expected


def test_report_holds_the_axis_and_pareto_charts(grid):
    out = grid / "bench"
    charts = ["quality_vs_axis_students", "quality_vs_axis_data", "quality_vs_axis_access",
              "pareto_params", "pareto_disk", "pareto_tok_per_s"]
    for chart in charts:
        data = (out / "plots" / f"{chart}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    page = (out / "report.html").read_text()
    assert all(f'id="plot-{chart}"' in page for chart in charts)
    table = (out / "bench.md").read_text().split("## Students: cost, quality, Pareto-optimal")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| student")]
    assert len(rows) == 2 * len(_expected_runs()) + 1  # every point and the teacher


@pytest.mark.parametrize("axis, value, message", [
    ("students", {"name": "d9", "student": {"num_layers": 9}},
     r"axes.students value 'd9': student.num_layers=9, but the teacher .* has 4 layers"),
    ("students", {"name": "h128", "student.width.hidden_size": 128},
     r"axes.students value 'h128': student.width.hidden_size=128, but the teacher .* has 64 hidden size"),
    ("data", {"name": "p99", "prompts": 99}, r"axes.data value 'p99': prompts: 99, but data.train .* has 24 records; give at most 24"),
])
def test_an_axis_value_the_teacher_or_data_cannot_provide_is_refused(tmp_path, inputs, axis, value, message):
    config = _config_in(tmp_path, inputs)
    config["axes"] = {"students": STUDENTS, "data": DATA, **{axis: [*config["axes"][axis], value]}}
    path = _write(tmp_path, config)
    with pytest.raises(KdlmError, match=message):
        run_bench(*load_bench_config(path))
    assert not (tmp_path / "bench" / "runs").exists(), "checked before the first run"


def test_bad_axes_settings_are_refused(tmp_path, inputs):
    config = _config_in(tmp_path, inputs)
    config["distill"]["data"]["heldout"] = 2
    with pytest.raises(KdlmError, match=r"axes.data value 'p12': prompts: 12 with data.heldout=2 .* set distill.data.heldout: 0"):
        run_bench(*load_bench_config(_write(tmp_path, config)))
    for axes, message in ((({"s": [{"name": "a"}, {"name": "a"}]}), "axes.s: value names must differ; a appears"),
                          (({"s": []}), "axes.s: give at least one value"),
                          (({"method": [{"name": "a"}]}), "not method, seed or quantize"),
                          (({"s": [{"name": "a b"}]}), "use letters, digits")):
        with pytest.raises(KdlmError, match=message):
            load_bench_config(_write(tmp_path, _config_in(tmp_path, inputs, axes=axes)))


def test_axes_report_renders_in_headless_chromium(grid):
    from conftest import missing
    from test_bench import _browser

    browser_path = _browser()
    if browser_path is None:
        missing("no headless Chromium: pip install playwright && python -m playwright install chromium "
                "(or apt-get install chromium-headless-shell)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((grid / "bench" / "report.html").as_uri())
        page.wait_for_load_state("load")
        images = dict(page.evaluate("Array.from(document.querySelectorAll('figure img')).map(i => [i.closest('figure').id, i.naturalWidth])"))
        browser.close()
    assert not errors
    for chart in ("quality_vs_axis_students", "quality_vs_axis_data", "quality_vs_axis_access", "pareto_params", "pareto_disk", "pareto_tok_per_s"):
        assert images[f"plot-{chart}"] > 300, images
