"""`kdlm bench CONFIG`: every (method, seed) of the grid as a `kdlm distill` run, then one evaluation and report.

Each run lives in `output_dir/runs/METHOD-seedS` and is finished when its `bench_run.json` exists
with the fingerprint of its resolved config: a rerun skips it; an interrupted run resumes from its
last checkpoint; a run whose config changed starts again. The student is built once
(`shared/student-init`) and the teacher's top-k targets are cached once (`shared/teacher-cache`) for
every method that trains from the same cache, so methods differ only in their objective and seed.

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

from kdlm.bench.config import BenchConfig
from kdlm.bench.report import write_bench_report
from kdlm.bench.stats import noise_groups, summarise
from kdlm.config import RunConfig, flatten, load_config
from kdlm.errors import KdlmError
from kdlm.evaluate.suite import Fidelity, evaluate_suite
from kdlm.generate.cache import fingerprint
from kdlm.models import describe_model, load_model
from kdlm.teachers.cache import read_manifest
from kdlm.xtok.run import load_student_tokenizer

console = Console(stderr=True)
CACHE_KEYS = ("teacher.model", "teacher.top_k", "teacher.cache_kind", "teacher.samples", "data", "train.bf16")



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
        self.teacher_parameters: int | None = None
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
        if self.config.shared_student and base.student.init != "model":
            overrides.update({"student.init": "model", "student.model": str(self.shared_student(base))})
        return overrides

    def shared_student(self, base: RunConfig) -> Path:
        from kdlm.pipeline import run_build_student

        folder = self.out / "shared" / "student-init"
        if not (folder / "config.json").exists():
            started = time.perf_counter()
            config = base.model_copy(deep=True)
            config.train.output_dir = str(self.out / "shared")
            config.data.seed = base.data.seed if base.data.seed is not None else base.train.seed
            run_build_student(config)
            self.shared_timings["build_student_s"] = time.perf_counter() - started
        return folder

    def shared_cache(self, config: RunConfig) -> Path:
        """The cache for this run's teacher and data settings, written once per bench."""
        from kdlm.pipeline import run_cache_teacher

        key = fingerprint({name: _pick(config, name) for name in CACHE_KEYS})
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
        if self.teacher_parameters is None:
            teacher, tokenizer = load_model(config.teacher.model)
            self.teacher_parameters = describe_model(teacher)["parameters"]
            if self.config.curve_every and self.fidelity is None:
                settings = self.config.eval.model_copy(update={"teacher": config.teacher.model})
                self.fidelity = Fidelity(teacher, tokenizer, settings)
            del teacher
            gc.collect()
        return self.teacher_parameters

    def run_one(self, method: str, seed: int, common: dict[str, Any]) -> dict:
        from kdlm.pipeline import distill

        run_dir = self.out / "runs" / f"{method}-seed{seed}"
        overrides = {**common, **flatten(self.config.method(method)), "train.seed": seed, "train.output_dir": str(run_dir)}
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
    runs, failures = [], []
    for method in config.methods:
        for seed in config.seeds:
            try:
                runs.append(bench.run_one(method, seed, common))
            except KdlmError as exc:
                console.print(f"[red]{method} seed {seed} failed:[/] {exc}")
                failures.append({"method": method, "seed": seed, "error": str(exc)})
    bench.fidelity = None
    gc.collect()
    eval_config = config.eval.model_copy(update={"output_dir": str(out / "eval")})
    if eval_config.teacher:
        eval_config.teacher = make_config(bench.base, common).teacher.model
    evaluation = evaluate_suite([run["run_dir"] for run in runs], eval_config) if runs else {"rows": []}
    result = aggregate(config, runs, evaluation["rows"])
    result.update({"failures": failures, "shared_timings": bench.shared_timings, "evaluation": evaluation["rows"]})
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=float))
    write_bench_report(result, out)
    if failures:
        raise KdlmError(f"{len(failures)} run(s) failed: " + "; ".join(f"{f['method']} seed {f['seed']}: {f['error']}" for f in failures))
    return result


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
        methods.setdefault(run["method"], {"runs": []})["runs"].append(run)
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
            "seeds": config.seeds, "method_order": [m for m in config.methods if m in methods]}
