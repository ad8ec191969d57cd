"""The bench config: one base `kdlm distill` config, a grid of axes x methods x seeds (each a set of overrides), and the evaluation."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kdlm.config import flatten, load_yaml_model
from kdlm.errors import KdlmError
from kdlm.evaluate.suite import EvalSuiteConfig

# Methods that `kdlm distill` runs through its config; a bench config may define more or override these.
STANDARD_METHODS: dict[str, dict[str, Any]] = {
    "sft": {"loss.kd_weight": 0.0, "data.teacher_answers": False},  # CE on the human references
    "seqkd": {"loss.kd_weight": 0.0},  # CE on the teacher's answers (sequence-level KD)
    "fkl": {"loss.divergence": "fkl"},
    "rkl": {"loss.divergence": "rkl"},
    "jsd": {"loss.divergence": "jsd", "loss.beta": 0.5},
    "skl": {"loss.divergence": "skl", "loss.alpha": 0.1},
    "srkl": {"loss.divergence": "srkl", "loss.alpha": 0.1},
    "tvd": {"loss.divergence": "tvd"},
    "akl": {"loss.divergence": "akl"},
    "fkl-online": {"loss.divergence": "fkl", "teacher.signal": "online"},
    "fkl-hidden": {"loss.divergence": "fkl", "teacher.signal": "online", "hints.hidden_weight": 1.0},
    "fkl-sampled": {"loss.divergence": "fkl", "teacher.cache_kind": "sampled", "teacher.samples": 64},
    # On-policy methods (configs/gkd.yaml etc.): the live teacher scores the student's own samples.
    "gkd": {"teacher.signal": "online", "loss.divergence": "jsd", "loss.beta": 0.5, "method.name": "gkd",
            "method.lmbda": 0.5, "method.max_new_tokens": 64},
    # DistiLLM's buffer is scaled to the run: the reference's 1,000 samples fill within the first few percent of
    # its thousands of steps; 128 (16 micro-batches of 8) fill within the first half of 80 steps, so that replay acts.
    "distillm": {"teacher.signal": "online", "loss.divergence": "srkl", "loss.alpha": 0.1, "method.name": "distillm",
                 "method.init_threshold": 0.5, "method.capacity": 128, "method.max_new_tokens": 64},
    # MiniLLM and ImitKD as configs/minillm.yaml and configs/imitkd.yaml run them (the reference settings, issue 15):
    # MiniLLM samples the mixture at temperature 1 (LMOps); ImitKD anneals the data share as 200^(-t/T).
    "minillm": {"teacher.signal": "online", "loss.divergence": "rkl", "method.name": "minillm",
                "method.teacher_mix": 0.2, "method.temperature": 1.0, "method.pt_kd_ratio": 0.5, "method.max_new_tokens": 64},
    "imitkd": {"teacher.signal": "online", "loss.divergence": "fkl", "method.name": "imitkd",
               "method.data_schedule": "exponential", "method.max_new_tokens": 64},
}


class TrainData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    self_instruct: str = Field(..., description="Self-Instruct-format JSONL (instruction, instances[{input, output}]).")
    limit: int | None = Field(None, ge=1, description="Keep the first N records.")


class AxisValue(BaseModel):
    """One value of a bench axis: a name, `kdlm distill` overrides (nested or dotted; any other key), and optionally
    `prompts` (train on the first N records of data.train), `x` (its position on the quality-vs-axis plot) and
    `series` (which line it belongs to there)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(..., description="Short name, used in run folder names (letters, digits, '.', '+').")
    x: float | None = Field(None, description="Position on the quality-vs-axis plot (default: the values in order, evenly spaced).")
    prompts: int | None = Field(None, ge=1, description="Train on the first N records of data.train (the data-size axis).")
    series: str | None = Field(None, description="Values of one series are joined by a line on the quality-vs-axis plot "
                               "(e.g. depth, width, both on a students axis); default: one series per axis.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.+]+", value):
            raise ValueError(f"axis value name {value!r}: use letters, digits, '.' and '+' only (it names run folders)")
        return value

    def overrides(self) -> dict[str, Any]:
        return flatten(dict(self.model_extra or {}))


class Cell(BaseModel):
    """One point of the axes grid: the value chosen on every axis, with their overrides merged in axis order."""

    label: str  # value names joined by "_" ("" without axes)
    values: dict[str, str]  # axis -> value name
    overrides: dict[str, Any]
    prompts: int | None = None
    prompts_axis: str | None = None  # the axis that set prompts (named in errors)


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_dir: str = Field("runs/bench", description="Runs, evaluation, table, plots and report.html.")
    base: str | None = Field(None, description="A `kdlm distill` YAML config every run starts from (path relative to the bench file).")
    distill: dict[str, Any] = Field(default_factory=dict, description="Overrides (nested or dotted) applied to the base for every run.")
    train_data: TrainData | None = Field(None, description="Human-written prompt/response data: converted once and used as data.train.")
    methods: list[str] = Field(default_factory=lambda: ["sft", "seqkd", "fkl", "rkl"], description="Methods to run, in order.")
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Extra or changed methods: name -> overrides.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    shared_student: bool = Field(True, description="Build the student once (kdlm build-student) and start every run from it.")
    shared_cache: bool = Field(True, description="One teacher top-k cache for every method that trains from it.")
    curve_every: int = Field(0, ge=0, description="Held-out fidelity every N steps, for the quality-vs-step plot (0: off).")
    axes: dict[str, list[AxisValue]] = Field(
        default_factory=dict, description="Named grids of override sets (e.g. students, data, access), crossed with each other, "
        "the methods and the seeds; an axis value's overrides win over the method's.")
    quantize: list[Literal["none", "int8"]] = Field(
        default_factory=lambda: ["none"], description="Evaluate every trained student as is (none) and/or int8-quantised (no retraining).")
    quality: list[str] = Field(
        default_factory=lambda: ["KL to teacher", "top-1 agreement"],
        description="Eval columns plotted against each axis and on the Pareto charts, beside `metric`.")
    eval: EvalSuiteConfig = Field(default_factory=lambda: EvalSuiteConfig(tasks=["selfinst", "fidelity", "cost"], limit=16, seeds=[10]))
    metric: str = Field("selfinst ROUGE-L", description="Column of the eval table that ranks methods (e.g. 'top-1 agreement').")
    higher_is_better: bool = True

    def method(self, name: str) -> dict[str, Any]:
        if name in self.method_overrides:
            return self.method_overrides[name]
        if name in STANDARD_METHODS:
            return STANDARD_METHODS[name]
        known = ", ".join([*STANDARD_METHODS, *self.method_overrides])
        raise KdlmError(f"unknown method {name!r}; define it under method_overrides or choose from {known}")

    def cells(self) -> list[Cell]:
        """Every combination of one value per axis, the first axis varying slowest; one empty cell without axes."""
        names = list(self.axes)
        cells = []
        for combo in itertools.product(*(self.axes[name] for name in names)):
            overrides: dict[str, Any] = {}
            prompts, prompts_axis = None, None
            for axis, value in zip(names, combo, strict=True):
                overrides.update(value.overrides())
                if value.prompts is not None:
                    prompts, prompts_axis = value.prompts, axis
            cells.append(Cell(label="_".join(value.name for value in combo), values={a: v.name for a, v in zip(names, combo, strict=True)},
                              overrides=overrides, prompts=prompts, prompts_axis=prompts_axis))
        return cells

    def quality_columns(self) -> dict[str, bool]:
        """Eval column -> higher is better, for the axis plots and the Pareto charts (the ranking metric first)."""
        columns = {self.metric: self.higher_is_better}
        for column in self.quality:
            columns.setdefault(column, not (column in LOWER_IS_BETTER or column.endswith(" ppl")))
        return columns


LOWER_IS_BETTER = {"KL to teacher", "bits/byte", "ECE"}


def check_axes(config: BenchConfig) -> None:
    """Refuse empty axes, repeated value names, and an axis named like a reserved grid dimension."""
    for axis, values in config.axes.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", axis) or axis in ("method", "seed", "quantize"):
            raise KdlmError(f"axes.{axis}: an axis name is letters, digits and '_', and not method, seed or quantize")
        if not values:
            raise KdlmError(f"axes.{axis}: give at least one value ({{name: ..., <overrides>}}) or remove the axis")
        names = [value.name for value in values]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise KdlmError(f"axes.{axis}: value names must differ; {', '.join(repeated)} appears more than once")
    if len(set(config.quantize)) != len(config.quantize):
        raise KdlmError(f"quantize: {config.quantize} repeats a value; give each of none, int8 at most once")


def load_bench_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[BenchConfig, Path]:
    """Read a bench YAML with `key=value` overrides; returns the config and the file's folder."""
    path = Path(path)
    config = load_yaml_model(BenchConfig, path, overrides, what="bench config", example="seeds=[0]",
                             sections="sections (base, distill, methods, seeds, eval, ...)")
    for name in config.methods:
        config.method(name)
    check_axes(config)
    return config, path.parent
