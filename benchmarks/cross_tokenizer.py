"""Issue 19's measurement: a student with its own (smaller) tokenizer, distilled across tokenizers.

    PYTHONPATH=src python benchmarks/cross_tokenizer.py --preset tiny --out runs/xtok-tiny   # minutes (a test runs it)
    PYTHONPATH=src python benchmarks/cross_tokenizer.py --preset cpu --out runs/xtok-cpu     # 31 min on 2 bf16 (AMX) cores; 3-5 h fp32-only

Every step drives kdlm's own commands, each in a subprocess: `kdlm build-student` (the own-tokenizer student:
`student.tokenizer=bpe:N`, the reference's layers), `kdlm cache-teacher` (one top-k cache in the teacher's
tokens, shared by every cached run), `kdlm distill` with overrides per method, and one `kdlm eval` over the trained
students (bits per byte of the teacher's answers, ROUGE-L, parameters). Methods, each with two training seeds
(``train.seed``; ``data.seed`` is fixed, so all runs see the same data):

- ``reference``: the same-tokenizer student, trained as the quickstart (forward KL from the top-k cache);
- ``seqkd``: the own-tokenizer student, cross-entropy on the teacher's answers only (``loss.kd_weight=0``);
- ``uld-topk`` / ``uld-live``: ULD (``loss.cross_tokenizer=uld``) from the cache / the live teacher;
- ``hybrid-topk`` / ``hybrid-live``: exact mapping + ULD (``loss.cross_tokenizer=hybrid``), cache / live.

Budgets: every method trains the preset's steps ("equal steps"); every method but the reference trains again
for the reference's training wall-clock of the same seed ("equal wall-clock"): as many steps as its own
equal-steps run says fit in that time (so its learning-rate schedule has the same shape), with
``train.max_minutes`` set to that time as well. The shared teacher cache's one-off cost is not charged to
the cached runs (it serves every student); it is printed.

Resumable: a run whose ``report.json`` exists, the evaluation when ``OUT/eval/eval.json`` holds every run
(and kdlm eval's own result cache otherwise), the built students and a complete cache are reused. The last
output is a markdown table and the issue's three targets, each pass or miss with its figures (also written
to OUT/results.md and OUT/results.json).

Other budgets and subsets: ``--steps 120`` trains the quickstart's budget into OUT/runs-120steps/ (evaluated in
eval-120steps/, tabled in results-120steps.md) from the same students and cache; ``--methods
reference,seqkd,hybrid-topk`` runs only those (the reference always: it sets the clock), and the table
leaves out the targets whose methods did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("reference", "seqkd", "uld-topk", "uld-live", "hybrid-topk", "hybrid-live")
SEEDS = (1, 2)
QUICKSTART_LAYERS = "[0,1,8,10,11,18,19,20,21,22,23,24,27,28,29]"  # what the quickstart's influence choice keeps
SHARED_DATA = ROOT.parent / "shared" / "data"  # the data folder beside the checkout (docs/student-tokenizer.md)
TOKENIZER_TEXT = "[builtin:quickstart," + ",".join(str(SHARED_DATA / name) for name in (
    "wikitext-2/valid.txt", "self-instruct-seed/seed_tasks.jsonl", "self-instruct-user-eval/user_oriented_instructions.jsonl")) + "]"


@dataclass
class Preset:
    """What differs between the tiny test grid and the CPU one."""

    config: list[str]  # a YAML config first, or nothing
    common: list[str]  # overrides of every command
    reference: list[str]  # build-student overrides of the same-tokenizer student
    build: list[str]  # build-student overrides of the own-tokenizer student
    steps: int
    eval_args: list[str]
    rouge_task: str
    kd_weight: float = 0.5  # the cross-tokenizer runs: (1 - w) CE + w D, as ULD's paper pairs them
    env: dict = field(default_factory=dict)


def tiny_preset(out: Path) -> Preset:
    """Tiny models of tests/tiny.py: a 2-layer byte-level teacher, 1-layer students, a 300-token BPE."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import CORPUS, save_tiny_teacher, write_chat_jsonl

    teacher, data, rouge = out / "teacher", out / "chat.jsonl", out / "rouge.jsonl"
    if not (teacher / "config.json").exists():
        save_tiny_teacher(teacher, num_layers=2)
    if not data.exists():
        write_chat_jsonl(data, count=24)
        rouge.write_text("".join(json.dumps({"prompt": text[:20], "reference": text}) + "\n" for text in CORPUS[:3]))
    common = [f"teacher.model={teacher}", f"data.train={data}", "data.heldout=4", "data.teacher_answers=false",
              "data.max_length=96", "data.seed=0", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0",
              "train.bf16=false", "eval.enabled=false", "teacher.top_k=8"]
    return Preset(
        config=[], common=common, reference=["student.layers=[0]"],
        build=["student.layers=[0]", "student.tokenizer=bpe:300", "loss.cross_tokenizer_min_aligned=0"],
        steps=3, rouge_task=f"rouge:{rouge}", env={"KDLM_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1"},
        eval_args=["--teacher", str(teacher), "--seeds", "10", "--max-new-tokens", "6", "--set", "fidelity_prompts=2",
                   "--set", "fidelity_max_new_tokens=6", "--set", "batch_size=2", "--set", "bf16=false",
                   "--set", "generation_tokens=2"],
    )


def cpu_preset(out: Path) -> Preset:
    """The quickstart (bundled teacher, its 15 layers), 10 steps: 31 min on two bf16 (AMX) cores, 3-5 h in fp32 (module doc)."""
    prompts = out / "prompts.jsonl"
    if not prompts.exists():
        from kdlm.data import load_records

        records = load_records("builtin:quickstart")[:112]
        out.mkdir(parents=True, exist_ok=True)
        prompts.write_text("".join(json.dumps(record) + "\n" for record in records))
    common = [f"data.train={prompts}", "data.heldout=8", "data.seed=0", "data.answer_max_new_tokens=128",
              "eval.enabled=false"]  # train.bf16 stays auto: bf16 where the CPU runs it fast, fp32 elsewhere
    return Preset(
        config=[str(ROOT / "configs/quickstart.yaml")], common=common,
        reference=[f"student.layers={QUICKSTART_LAYERS}"],
        build=[f"student.layers={QUICKSTART_LAYERS}", "student.tokenizer=bpe:16000", f"student.tokenizer_text={TOKENIZER_TEXT}"],
        steps=10, rouge_task="selfinst",
        eval_args=["--limit", "32", "--seeds", "10", "--max-new-tokens", "64"],
    )


def method_overrides(method: str, preset: Preset, same_student: Path, own_student: Path, cache: Path) -> list[str]:
    if method == "reference":
        return ["student.init=model", f"student.model={same_student}", "teacher.signal=topk", f"teacher.cache={cache}"]
    own = ["student.init=model", f"student.model={own_student}", "loss.cross_tokenizer_min_aligned=0"]
    if method == "seqkd":
        return [*own, "loss.cross_tokenizer=hybrid", "loss.kd_weight=0", "teacher.signal=online"]
    loss, signal = method.split("-")
    teacher = ["teacher.signal=topk", f"teacher.cache={cache}"] if signal == "topk" else ["teacher.signal=online"]
    return [*own, f"loss.cross_tokenizer={loss}", f"loss.kd_weight={preset.kd_weight}", *teacher]


class Grid:
    def __init__(self, preset: Preset, out: Path, seeds: tuple[int, ...] = SEEDS, methods: tuple[str, ...] = METHODS,
                 steps: int | None = None):
        self.preset, self.out, self.seeds = preset, out, seeds
        self.methods = tuple(m for m in METHODS if m in methods)
        # Another budget than the preset's trains and evaluates in folders of its own (runs-120steps/, ...),
        # beside the same students and cache.
        self.steps = steps or preset.steps
        self.tag = "" if self.steps == preset.steps else f"-{self.steps}steps"
        self.runs, self.eval = out / f"runs{self.tag}", out / f"eval{self.tag}"
        self.env = {**os.environ, **preset.env, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.own_student = out / "student-own" / "student-init"
        self.same_student = out / "student-same" / "student-init"
        self.cache = out / "teacher-cache"

    def kdlm(self, *args: str) -> None:
        command = [sys.executable, "-m", "kdlm.cli", *args]
        print("$ kdlm", " ".join(args), flush=True)
        subprocess.run(command, check=True, env=self.env, cwd=self.out)

    def prepare(self) -> None:
        """Both students before training and the shared top-k cache (which also has the teacher answer the prompts)."""
        base = [*self.preset.config, *self.preset.common]
        if not (self.same_student / "config.json").exists():
            self.kdlm("build-student", *base, *self.preset.reference, f"train.output_dir={self.out / 'student-same'}")
        if not (self.own_student / "config.json").exists():
            self.kdlm("build-student", *base, *self.preset.build, f"train.output_dir={self.out / 'student-own'}")
        if not (self.cache / "manifest.json").exists() or not self._cache_complete():
            self.kdlm("cache-teacher", *base, "teacher.signal=topk", f"teacher.cache={self.cache}",
                      f"train.output_dir={self.out / 'cache-run'}")

    def _cache_complete(self) -> bool:
        manifest = json.loads((self.cache / "manifest.json").read_text())
        return bool(manifest.get("complete"))

    def train(self, method: str, seed: int, budget: str, steps: int, max_minutes: float | None = None) -> dict:
        folder = self.runs / f"{method}-{budget}-s{seed}"
        report = folder / "report.json"
        if not report.exists():
            extra = [f"train.max_minutes={max_minutes:.4f}"] if max_minutes else []
            self.kdlm("distill", *self.preset.config, *self.preset.common, *method_overrides(method, self.preset, self.same_student, self.own_student, self.cache),
                      f"train.seed={seed}", f"train.max_steps={steps}", f"train.output_dir={folder}", "train.overwrite=true", *extra)
        return {"folder": folder, **json.loads(report.read_text())}

    def evaluate(self, folders: list[Path]) -> dict[str, dict]:
        """One `kdlm eval` over every trained student (the teacher loaded and its answers made once); its result
        cache skips what an earlier call scored. Returns {run name: bits_per_byte, rouge_l, params_m}."""
        result = self.eval / "eval.json"
        names = {folder.name for folder in folders}
        if not result.exists() or not names <= set(json.loads(result.read_text())["models"]):
            self.kdlm("eval", *map(str, folders), "--tasks", f"fidelity,{self.preset.rouge_task},cost",
                      "--out", str(self.eval), "--set", "teacher_row=false", *self.preset.eval_args)
        models = json.loads(result.read_text())["models"]
        scores = {}
        for name in names:
            rouge = next(v for k, v in models[name].items() if k not in ("fidelity", "cost") and "rouge_l" in v)
            scores[name] = {"bits_per_byte": models[name]["fidelity"]["bits_per_byte"], "rouge_l": rouge["rouge_l"],
                            "params_m": models[name]["cost"]["parameters_m"]}
        return scores

    def run_all(self) -> list[dict]:
        self.prepare()
        steps, trained = self.steps, []
        for seed in self.seeds:
            runs = {method: self.train(method, seed, "steps", steps) for method in self.methods}
            clock = runs["reference"]["timings"]["train_s"]
            trained += [(method, seed, "equal steps", runs[method]) for method in self.methods]
            for method in self.methods[1:]:
                per_step = runs[method]["timings"]["train_s"] / max(runs[method]["steps"], 1)
                fitting = max(1, round(clock / per_step))
                trained.append((method, seed, "equal wall-clock", self.train(method, seed, "clock", fitting, max_minutes=clock / 60)))
        scores = self.evaluate([run["folder"] for *_, run in trained])
        return [{"method": method, "seed": seed, "budget": budget, "steps": run["steps"], "train_s": run["timings"]["train_s"],
                 **scores[run["folder"].name]} for method, seed, budget, run in trained]


def _stats(rows: list[dict], method: str, budget: str, key: str) -> tuple[float, float]:
    """(mean, spread = max - min) over seeds; the reference counts for both budgets (its run sets the clock)."""
    values = [r[key] for r in rows if r["method"] == method and (r["budget"] == budget or method == "reference")]
    return statistics.fmean(values), max(values) - min(values)


def targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The issue's targets: (name, passed, figures); a target whose methods did not run (--methods) is left out."""
    checks, ran = [], {r["method"] for r in rows}
    for hybrid in ("hybrid-topk", "hybrid-live"):
        if not {hybrid, "seqkd"} <= ran:
            continue
        parts, passed = [], True
        for key, sign in (("bits_per_byte", -1), ("rouge_l", 1)):
            (mean, spread), (base, base_spread) = (_stats(rows, m, "equal wall-clock", key) for m in (hybrid, "seqkd"))
            margin = sign * (mean - base)
            needed = max(spread, base_spread)
            passed &= margin > needed
            parts.append(f"{key} {mean:.3f} vs {base:.3f} (better by {margin:+.3f}, seed spread {needed:.3f})")
        checks.append((f"(c) {hybrid} beats SeqKD by more than the seed spread at equal wall-clock", passed, "; ".join(parts)))
    own, ref = "hybrid-topk", "reference"
    if own not in ran:
        return checks
    bpb = _stats(rows, ref, "equal steps", "bits_per_byte")[0] / _stats(rows, own, "equal steps", "bits_per_byte")[0]
    rouge_ref = _stats(rows, ref, "equal steps", "rouge_l")[0]
    rouge = _stats(rows, own, "equal steps", "rouge_l")[0] / rouge_ref if rouge_ref else float("inf")  # reference 0
    params = _stats(rows, own, "equal steps", "params_m")[0] / _stats(rows, ref, "equal steps", "params_m")[0]
    checks.append(("own-tokenizer student (hybrid-topk, equal steps): >= 95% of the reference's quality with <= 80% of "
                   "its parameters", bpb >= 0.95 and rouge >= 0.95 and params <= 0.8,
                   f"bits/byte quality {bpb:.1%} (reference / student), ROUGE-L {rouge:.1%}, parameters {params:.1%}"))
    per_step = {m: statistics.fmean(r["train_s"] / r["steps"] for r in rows if r["method"] == m and r["budget"] == "equal steps")
                for m in METHODS if m in ran}
    ratio = per_step["hybrid-topk"] / per_step["reference"]
    others = ", ".join(f"{m} {per_step[m] / per_step['reference']:.2f}x" for m in METHODS[1:] if m in ran and m != "hybrid-topk")
    checks.append(("a cross-tokenizer step (hybrid-topk) costs at most 1.3x a same-tokenizer step (reference, top-k)",
                   ratio <= 1.3, f"{ratio:.2f}x ({per_step['hybrid-topk']:.2f} s vs {per_step['reference']:.2f} s per step; {others})"))
    return checks


def markdown(rows: list[dict]) -> str:
    lines = ["| method | budget | steps (per seed) | train s (mean) | bits/byte | ROUGE-L | params (M) |",
             "|---|---|---|---|---|---|---|"]
    for budget in ("equal steps", "equal wall-clock"):
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method and r["budget"] == budget]
            if not mine:
                continue
            bpb, rouge = (_stats(rows, method, budget, key) for key in ("bits_per_byte", "rouge_l"))
            lines.append(f"| {method} | {budget} | {', '.join(str(r['steps']) for r in mine)} | "
                         f"{statistics.fmean(r['train_s'] for r in mine):.1f} | {bpb[0]:.3f} ± {bpb[1] / 2:.3f} | "
                         f"{rouge[0]:.2f} ± {rouge[1] / 2:.2f} | {mine[0]['params_m']:.3f} |")
    lines += ["", "± is half the spread (max - min) over the seeds.", "", "| target | result | figures |", "|---|---|---|"]
    lines += [f"| {name} | {'pass' if passed else 'miss'} | {figures} |" for name, passed, figures in targets(rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "cpu"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds (default: 1 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="equal-steps budget instead of the preset's (tiny 3, cpu 10; the quickstart trains 120), "
                             "trained into OUT/runs-Nsteps/ (eval-Nsteps/, results-Nsteps.md) beside the same students and cache")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset, reference included (default all: {','.join(METHODS)}); e.g. "
                             "reference,seqkd,hybrid-topk decides target (c) for the cache and the 95%% target in half the time")
    args = parser.parse_args()
    methods = tuple(m.strip() for m in args.methods.split(","))
    if "reference" not in methods or not set(methods) <= set(METHODS):  # before anything is built
        raise SystemExit(f"--methods {','.join(methods)}: choose among {','.join(METHODS)}, with reference (it sets the clock)")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: give at least 1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    preset = tiny_preset(out) if args.preset == "tiny" else cpu_preset(out)
    grid = Grid(preset, out, tuple(args.seeds), methods, args.steps)
    rows = grid.run_all()
    text = markdown(rows)
    (out / f"results{grid.tag}.json").write_text(json.dumps({"preset": args.preset, "steps": grid.steps, "rows": rows}, indent=1, default=str))
    (out / f"results{grid.tag}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
