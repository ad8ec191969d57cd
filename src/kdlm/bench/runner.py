"""`kdlm bench CONFIG`: every (axes cell, method, seed) of the grid as a `kdlm distill` run, then one evaluation and report.

Each run lives in `output_dir/runs/METHOD-seedS` (`CELL-METHOD-seedS` with axes, CELL the axis value names
joined by "_") and is finished when its `bench_run.json` exists
with the fingerprint of its resolved config: a rerun skips it; an interrupted run resumes from its
last checkpoint; a run whose config changed starts again. The student is built once
(`shared/student-init`) and the teacher's top-k targets are cached once (`shared/teacher-cache`) for
every method that trains from the same cache, so methods differ only in their objective and seed. With
axes, each distinct student setting gets its own start (`shared/student-init-KEY`), each data size its
own training file (`shared/train-FP-N.jsonl`, the first N records) and cache; every cell is checked against
the teacher (layers, widths, parameters) and the data (records) before any run starts.

Cost per run: wall-clock of training, and FLOPs estimated as 6 * N_student * tokens for the student
(forward + backward) plus 2 * N_teacher * tokens for each teacher forward: every step with an online
teacher, once over the training set with a cached one (charged in full to each run that uses the
cache), plus 2 * N * tokens for each model's sampling in on-policy methods (GKD, DistiLLM, MiniLLM, ImitKD:
prompt and decoded tokens, from the run's training log). Tokens are the target tokens trained on; the
teacher's answer generation, shared by every method, is not counted.
"""

from __future__ import annotations

import csv
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from kdlm.bench.config import BenchConfig, Cell
from kdlm.bench.report import write_bench_report
from kdlm.bench.stats import noise_groups, pareto_front, summarise
from kdlm.config import RunConfig, flatten, load_config
from kdlm.data.records import load_records
from kdlm.errors import KdlmError
from kdlm.evaluate.suite import Fidelity, evaluate_suite
from kdlm.fingerprint import fingerprint
from kdlm.models import describe_model, load_model
from kdlm.teachers.cache import read_manifest
from kdlm.xtok.run import load_student_tokenizer

console = Console(stderr=True)
CACHE_KEYS = ("teacher.model", "teacher.top_k", "teacher.cache_kind", "teacher.samples", "data", "train.bf16")
PARETO_X = {"params (M)": ("parameters (M)", False), "disk (MB)": ("disk size (MB)", False),
            "generate tok/s": ("measured generation tokens/s", True)}  # eval column -> (axis label, higher is better)


def _find(path: str, root: Path) -> Path:
    """A path as given (relative to the working directory), else relative to the bench file's folder or its parent."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    for folder in (root, root.parent):
        if (folder / candidate).exists():
            return folder / candidate
    raise KdlmError(f"{path}: not found (relative to the working directory or to {root})")


def make_config(base: Path | None, overrides: dict[str, Any]) -> RunConfig:
    return load_config(base, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])


def _pick(config: RunConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump() if hasattr(node, "model_dump") else node


def uses_cache(config: RunConfig) -> bool:
    return config.loss.kd_weight > 0 and config.teacher.signal == "topk" and not config.hints.enabled


def convert_self_instruct(source: Path, target: Path, limit: int | None) -> Path:
    """Self-Instruct records -> prompt/response JSONL (the first instance of each task)."""
    lines = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            instance = row["instances"][0]
            prompt = row["instruction"] + (f"\n\n{instance['input']}" if instance.get("input") else "")
            lines.append(json.dumps({"prompt": prompt, "response": instance["output"]}))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise KdlmError(f"{source}:{number}: not a Self-Instruct record (instruction, instances[{{input, output}}])") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines[:limit]) + "\n")
    return target


class Bench:
    def __init__(self, config: BenchConfig, root: Path):
        self.config = config
        self.out = Path(config.output_dir)
        self.base = _find(config.base, root) if config.base else None
        self.root = root
        self.fidelity: Fidelity | None = None
        self.teachers: dict[str, dict] = {}  # teacher.model -> {"parameters"}
        self.base_student_key: str | None = None
        self.shared_timings: dict[str, float] = {}
        self.caches: dict[str, Path] = {}

    def common_overrides(self) -> dict[str, Any]:
        overrides = flatten(self.config.distill)
        if self.config.train_data is not None:
            source = _find(self.config.train_data.self_instruct, self.root)
            target = self.out / "shared" / "train.jsonl"
            convert_self_instruct(source, target, self.config.train_data.limit)
            overrides["data.train"] = str(target)
        base = make_config(self.base, overrides)
        overrides["data.seed"] = base.data.seed if base.data.seed is not None else base.train.seed
        overrides["eval.enabled"] = False
        self.base_student_key = student_key(make_config(self.base, overrides))
        return overrides

    def cell_overrides(self, cell: Cell, common: dict[str, Any]) -> dict[str, Any]:
        """The overrides a cell applies after the method's: its axis values, its data file, its shared student."""
        late = dict(cell.overrides)
        config = make_config(self.base, {**common, **late})
        self.check_cell(cell, config)
        if cell.prompts is not None:
            late["data.train"] = str(self.data_subset(config, cell))
        if self.config.shared_student and config.student.init != "model":
            late.update({"student.init": "model", "student.model": str(self.shared_student(config))})
        return late

    def check_cell(self, cell: Cell, config: RunConfig) -> None:
        """Refuse a cell the teacher or the data cannot provide, naming the axis value (or distill setting) behind it."""
        student = config.student
        if student.init == "prune":
            shape = teacher_shape(config.teacher.model)
            limits = [("student.num_layers", student.num_layers, shape.get("num_hidden_layers"), "layers")]
            for name in ("hidden_size", "intermediate_size", "num_attention_heads"):
                value = getattr(student.width, name) if student.width is not None else None
                limits.append((f"student.width.{name}", value, shape.get(name), name.replace("_", " ")))
            if student.target_params is not None and student.target_params > 1:
                limits.append(("student.target_params", student.target_params, self.teacher_size(config), "parameters"))
            for key, value, most, what in limits:
                if value is not None and most is not None and value > most:
                    raise KdlmError(f"{self.setter(cell, key)}: {key}={value:g}, but the teacher ({config.teacher.model}) has "
                                    f"{most:g} {what}; a pruned student keeps at most that many: lower it")
        if cell.prompts is not None:
            where = f"axes.{cell.prompts_axis} value {cell.values[cell.prompts_axis]!r}"
            if config.data.heldout:
                raise KdlmError(f"{where}: prompts: {cell.prompts} with data.heldout={config.data.heldout} would change the "
                                "held-out split with the data size; set distill.data.heldout: 0 (the bench evaluates on its own prompts)")
            available = len(load_records(config.data.train))
            if cell.prompts > available:
                raise KdlmError(f"{where}: prompts: {cell.prompts}, but data.train ({config.data.train}) has {available} "
                                f"records; give at most {available}")

    def setter(self, cell: Cell, key: str) -> str:
        """Which axis value (or the common distill settings) set `key` for this cell."""
        found = "distill"
        for axis, name in cell.values.items():
            value = next(v for v in self.config.axes[axis] if v.name == name)
            if any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in value.overrides()):
                found = f"axes.{axis} value {name!r}"
        return found

    def data_subset(self, config: RunConfig, cell: Cell) -> Path:
        """The first `cell.prompts` records of data.train, as JSONL in the shared folder (written once)."""
        records = load_records(config.data.train)[: cell.prompts]
        target = self.out / "shared" / f"train-{fingerprint({'train': config.data.train})}-{cell.prompts}.jsonl"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(json.dumps(record) + "\n" for record in records))
        return target

    def shared_student(self, base: RunConfig) -> Path:
        """The start of every run with these student settings: `shared/student-init` for the base's, else one per key."""
        from kdlm.pipeline import run_build_student

        key = student_key(base)
        name = "student-init" if key == self.base_student_key else f"student-init-{key}"
        folder = self.out / "shared" / name
        if not (folder / "config.json").exists():
            started = time.perf_counter()
            config = base.model_copy(deep=True)
            config.train.output_dir = str(self.out / "shared" / "building")
            config.data.seed = base.data.seed if base.data.seed is not None else base.train.seed
            built = run_build_student(config)
            shutil.rmtree(folder, ignore_errors=True)
            built.rename(folder)
            shutil.rmtree(built.parent, ignore_errors=True)
            self.shared_timings["build_student_s" if name == "student-init" else f"build_{name}_s"] = time.perf_counter() - started
        return folder

    def shared_cache(self, config: RunConfig) -> Path:
        """The cache for this run's teacher and data settings, written once per bench."""
        from kdlm.pipeline import run_cache_teacher

        settings = {name: _pick(config, name) for name in CACHE_KEYS}
        if config.teacher.api_base:  # top-k log-probs from a served teacher (kdlm.teachers.api): its own cache
            settings["teacher.api_base"] = config.teacher.api_base
        key = fingerprint(settings)
        folder = self.out / "shared" / f"teacher-cache-{key}"
        if key not in self.caches:
            started = time.perf_counter()
            cache_config = config.model_copy(deep=True)
            cache_config.teacher.cache = str(folder)
            run_cache_teacher(cache_config)
            self.shared_timings[f"teacher_cache_{key}_s"] = time.perf_counter() - started
            self.caches[key] = folder
            gc.collect()
        return folder

    def teacher_size(self, config: RunConfig) -> int:
        """The teacher's parameter count (loaded once per teacher); the first teacher loaded also serves the curves."""
        spec = config.teacher.model
        if spec not in self.teachers:
            teacher, tokenizer = load_model(spec)
            self.teachers[spec] = {"parameters": describe_model(teacher)["parameters"]}
            if self.config.curve_every and self.fidelity is None:
                settings = self.config.eval.model_copy(update={"teacher": spec})
                self.fidelity = Fidelity(teacher, tokenizer, settings)
            del teacher
            gc.collect()
        return self.teachers[spec]["parameters"]

    def run_one(self, method: str, seed: int, common: dict[str, Any], cell: Cell | None = None,
                late: dict[str, Any] | None = None) -> dict:
        from kdlm.pipeline import distill

        name = f"{cell.label}-{method}-seed{seed}" if cell is not None and cell.label else f"{method}-seed{seed}"
        run_dir = self.out / "runs" / name
        overrides = {**common, **flatten(self.config.method(method)), **(late or {}), "train.seed": seed, "train.output_dir": str(run_dir)}
        config = make_config(self.base, overrides)
        identity = fingerprint(config.model_dump())
        done_file = run_dir / "bench_run.json"
        if done_file.exists():
            done = json.loads(done_file.read_text())
            if done.get("fingerprint") == identity:
                console.print(f"[green]skip[/] {run_dir.name}: finished earlier")
                return done
            console.print(f"[yellow]{run_dir.name}: its config changed since it ran; running it again[/]")
            shutil.rmtree(run_dir)
        teacher_parameters = self.teacher_size(config)
        cache_tokens = 0
        if uses_cache(config) and self.config.shared_cache:
            config.teacher.cache = str(self.shared_cache(config))
            cache_tokens = (read_manifest(Path(config.teacher.cache)) or {}).get("num_tokens", 0)
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*/state.json")):
            config.train.resume = True
            console.print(f"{run_dir.name}: resuming from its last checkpoint")
        curve: list[dict] = []
        probe = {"parameters": None, "eval_s": 0.0}
        # a student with its own tokenizer (loss.cross_tokenizer) is probed in its tokens (kdlm.evaluate.xvocab)
        probe_tokenizer = None
        if self.fidelity is not None:
            probe_tokenizer = load_student_tokenizer(config) if config.loss.cross_tokenizer != "off" else self.fidelity.tokenizer

        def on_step(step: int, student) -> None:
            if probe["parameters"] is None:
                probe["parameters"] = sum(p.numel() for p in student.parameters())
            every = self.config.curve_every
            if every and self.fidelity is not None and (step % every == 0 or step == config.train.max_steps):
                started = time.perf_counter()
                try:
                    point = self.fidelity(student, probe_tokenizer)
                finally:
                    student.train()
                spent = time.perf_counter() - started
                probe["eval_s"] += spent
                keys = ("kl_to_teacher", "top1_agreement", "ece", "answer_perplexity", "bits_per_byte")
                point.setdefault("top1_agreement", point.get("top1_agreement_aligned"))  # another tokenizer: aligned tokens
                curve.append({"step": step, **{k: point.get(k) for k in keys}})

        console.rule(f"{method} seed {seed}")
        started = time.perf_counter()
        report = distill(config, on_step=on_step)
        wall = time.perf_counter() - started - probe["eval_s"]
        train_s = report["timings"].get("train_s", float("nan")) - probe["eval_s"]
        tokens = report["tokens"]
        student_parameters = probe["parameters"] or describe_model(load_model(str(run_dir / "student"))[0])["parameters"]
        teacher_tokens = 0
        if config.loss.kd_weight > 0 or config.hints.enabled:
            teacher_tokens = cache_tokens if config.teacher.cache else tokens
        if uses_cache(config) and not config.teacher.cache:  # the run's own cache: one pass over its data
            teacher_tokens = (read_manifest(run_dir / "teacher_cache") or {}).get("num_tokens", tokens)
        if config.teacher.signal == "online" and config.loss.kd_weight > 0:
            teacher_tokens = tokens
        decode = decode_tokens(run_dir / "train_log.csv")
        done = {
            "method": method, "seed": seed, "fingerprint": identity, "run_dir": str(run_dir),
            "wall_s": wall, "train_s": train_s, "steps": report["steps"], "tokens": tokens,
            "student_parameters": student_parameters, "teacher_parameters": teacher_parameters,
            "teacher_tokens": teacher_tokens, "decode_tokens": decode,
            "flops": 6 * student_parameters * tokens + 2 * teacher_parameters * teacher_tokens
            + 2 * student_parameters * decode["student"] + 2 * teacher_parameters * decode["teacher"],
            "curve": curve, "curve_eval_s": probe["eval_s"],
        }
        done_file.write_text(json.dumps(done, indent=1))
        gc.collect()
        return done


def teacher_shape(spec: str) -> dict:
    """The teacher's model config (layers, widths) without loading its weights where it is a folder or bundled."""
    from transformers import AutoConfig

    from kdlm.models.loading import ensure_bundled

    folder = ensure_bundled(spec.removeprefix("bundled:")) if spec.startswith("bundled:") else Path(spec)
    if folder.is_dir() and (folder / "config.json").exists():
        return AutoConfig.from_pretrained(folder).to_dict()
    return load_model(spec)[0].config.to_dict()


def student_key(config: RunConfig) -> str:
    """What a built student depends on: its settings, the teacher, and the data it calibrates on."""
    return fingerprint({"student": config.student.model_dump(), "teacher": config.teacher.model, "data": config.data.model_dump()})


def decode_tokens(train_log: Path) -> dict[str, int]:
    """Tokens the student and the teacher ran while sampling during a run, from its training log.

    The logged counters are cumulative and start again from 0 when a run resumes, so each drop starts a
    new segment. Off-policy runs log none.
    """
    counts = {"student": 0, "teacher": 0}
    if not train_log.exists():
        return counts
    with train_log.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for name in counts:
        previous = 0
        for row in rows:
            value = row.get(f"decode_tokens_{name}")
            if value in (None, "", "nan"):
                continue
            value = int(float(value))
            counts[name] += value - previous if value >= previous else value
            previous = value
    return counts


EVAL_COLUMNS = ("bits/byte", "top-1 agreement", "KL to teacher", "ECE")  # summarised per method from kdlm eval's rows


def run_bench(config: BenchConfig, root: Path = Path(".")) -> dict:
    """Run (or skip) every run of the grid, evaluate the students, write bench.json/.md, plots, report.html."""
    bench = Bench(config, root)
    out = bench.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    common = bench.common_overrides()
    cells = config.cells()
    for cell in cells:  # every cell checked before the first run: a bad axis value fails at once
        bench.check_cell(cell, make_config(bench.base, {**common, **cell.overrides}))
    runs, failures = [], []
    for cell in cells:
        late = bench.cell_overrides(cell, common)
        for method in config.methods:
            for seed in config.seeds:
                try:
                    done = bench.run_one(method, seed, common, cell, late)
                except KdlmError as exc:
                    console.print(f"[red]{cell.label + ' ' if cell.label else ''}{method} seed {seed} failed:[/] {exc}")
                    failures.append({"method": f"{cell.label}-{method}" if cell.label else method, "seed": seed, "error": str(exc)})
                    continue
                done.update({"cell": cell.values, "group": f"{cell.label}-{method}" if cell.label else method})
                runs.append(done)
    bench.fidelity = None
    gc.collect()
    rows = evaluate_runs(bench, config, common, runs)
    result = aggregate(config, runs, rows)
    result.update({"failures": failures, "shared_timings": bench.shared_timings, "evaluation": rows})
    if config.axes or len(config.quantize) > 1:
        result["frontier"] = frontier(config, result, rows)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=float))
    write_bench_report(result, out)
    if failures:
        raise KdlmError(f"{len(failures)} run(s) failed: " + "; ".join(f"{f['method']} seed {f['seed']}: {f['error']}" for f in failures))
    return result


def evaluate_runs(bench: Bench, config: BenchConfig, common: dict[str, Any], runs: list[dict]) -> list[dict]:
    """`kdlm eval` of every student, once per `quantize` setting (int8 rows are named MODEL-int8); one teacher row."""
    rows: list[dict] = []
    for number, quantize in enumerate(config.quantize):
        eval_config = config.eval.model_copy(update={"output_dir": str(bench.out / "eval"), "quantize": quantize})
        eval_config.teacher_row = eval_config.teacher_row and number == 0  # one teacher row, in the first pass
        if quantize != "none":
            eval_config.bf16 = False  # int8 kernels take fp32 activations
        if eval_config.teacher:
            eval_config.teacher = make_config(bench.base, common).teacher.model
        if runs:
            rows += evaluate_suite([run["run_dir"] for run in runs], eval_config)["rows"]
    return rows


def aggregate(config: BenchConfig, runs: list[dict], rows: list[dict]) -> dict:
    """Per method: mean, std and interval of the ranking metric and of cost; noise marks between methods."""
    by_model = {row["model"]: row for row in rows}
    methods: dict[str, dict] = {}
    for run in runs:
        row = by_model.get(Path(run["run_dir"]).name, {})
        value = row.get(config.metric)
        value = value[0] if isinstance(value, (list, tuple)) else value
        run["metric"] = value if isinstance(value, (int, float)) else None  # "n/a (tokenizer)": not a number
        run["eval"] = row
        methods.setdefault(run.get("group", run["method"]), {"runs": []})["runs"].append(run)
    for entry in methods.values():
        entry["metric"] = summarise([r["metric"] for r in entry["runs"] if r["metric"] is not None])
        for key in ("wall_s", "flops", "tokens"):
            entry[key] = summarise([r[key] for r in entry["runs"]])
        for column in EVAL_COLUMNS:  # numbers only: "n/a (tokenizer)" for KL and ECE of another tokenizer
            values = [r["eval"][column] for r in entry["runs"] if isinstance(r["eval"].get(column), (int, float))]
            if values:
                entry[column] = summarise(values)
    marks = noise_groups({m: e["metric"] for m, e in methods.items()}, config.higher_is_better)
    for method, mark in marks.items():
        methods[method].update(mark)
    teacher = by_model.get("teacher")
    return {"metric": config.metric, "higher_is_better": config.higher_is_better, "methods": methods, "teacher": teacher,
            "seeds": config.seeds, "method_order": list(methods)}


def _number(value: Any) -> float | None:
    value = value[0] if isinstance(value, (list, tuple)) else value  # ROUGE-L: (mean, std over sampling seeds)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def frontier(config: BenchConfig, result: dict, rows: list[dict]) -> dict:
    """One point per (group, quantize): quality and cost summarised over seeds; the Pareto-optimal points per chart.

    A chart is (cost column, quality column); a point is on its front when no other point is at least as good
    on both and better on one (kdlm.bench.stats.pareto_front). The teacher is a reference, not a point.
    """
    by_model = {row["model"]: row for row in rows}
    quality = config.quality_columns()
    points = []
    for group, entry in result["methods"].items():
        for quantize in config.quantize:
            suffix = "" if quantize == "none" else f"-{quantize}"
            evals = [by_model.get(Path(run["run_dir"]).name + suffix, {}) for run in entry["runs"]]
            first = entry["runs"][0]
            point = {"label": group + ("" if quantize == "none" else f" {quantize}"), "group": group,
                     "values": {**first.get("cell", {}), "method": first["method"], "quantize": quantize}}
            for column in [*quality, *PARETO_X]:
                point[column] = summarise([v for row in evals if (v := _number(row.get(column))) is not None])
            points.append(point)
    charts = {}
    for x_column, (_, x_higher) in PARETO_X.items():
        for column, higher in quality.items():
            usable = [p for p in points if p[x_column]["n"] and p[column]["n"]]
            if not usable:
                continue
            front = pareto_front([(p[x_column]["mean"], p[column]["mean"]) for p in usable], x_higher, higher)
            charts[f"{x_column}|{column}"] = [p["label"] for p, on in zip(usable, front, strict=True) if on]
    teacher = {column: _number((result.get("teacher") or {}).get(column)) for column in [*quality, *PARETO_X]}
    return {"points": points, "pareto": charts, "quality": quality, "axes": {a: [v.model_dump() for v in vs] for a, vs in config.axes.items()},
            "teacher": teacher}

