"""The bench config: one base `kdlm distill` config, a grid of methods (overrides) x seeds, and the evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kdlm.config import load_yaml_model
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
    "distillm": {"teacher.signal": "online", "loss.divergence": "srkl", "loss.alpha": 0.1, "method.name": "distillm",
                 "method.init_threshold": 0.5, "method.max_new_tokens": 64},
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


def load_bench_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[BenchConfig, Path]:
    """Read a bench YAML with `key=value` overrides; returns the config and the file's folder."""
    path = Path(path)
    config = load_yaml_model(BenchConfig, path, overrides, what="bench config", example="seeds=[0]",
                             sections="sections (base, distill, methods, seeds, eval, ...)")
    for name in config.methods:
        config.method(name)
    return config, path.parent
