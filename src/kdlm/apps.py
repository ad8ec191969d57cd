"""`kdlm app CONFIG`: a domain application (healthcare, education, law) run end to end with kdlm's verbs.

An app config (configs/apps/*.yaml) holds three sections, each the config of one verb:
- `generate`: a `kdlm generate` config with the chain-of-thought recipe (teacher rationales in the
  domain's form, filtered against gold answers, or by self-consistency where there are none);
- `distill`: a `kdlm distill` config trained on the kept records (white-box from the teacher's top-k, or
  SeqKD with `loss.kd_weight: 0` for an API teacher);
- `eval`: `kdlm eval` settings (domain tasks and the retention tasks selfinst and wikitext-2).

The app owns the paths that join the steps: generate writes OUTPUT_DIR/data/train.jsonl, distill reads it
and writes OUTPUT_DIR/student, eval writes OUTPUT_DIR/eval. It writes each step's resolved config and the
equivalent commands (OUTPUT_DIR/commands.sh), runs the steps, and writes OUTPUT_DIR/report.md. Every step
resumes from what an earlier run left (the request cache, checkpoints, the eval result cache).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kdlm.config import RunConfig, load_yaml_model
from kdlm.errors import KdlmError
from kdlm.evaluate.suite import EvalSuiteConfig
from kdlm.generate.config import GenerateConfig

STEPS = ("generate", "distill", "eval")


class AppConfig(BaseModel):
    """An application: its domain, the teacher route it uses, and the config of each verb."""

    model_config = ConfigDict(extra="forbid")

    domain: Literal["healthcare", "education", "law"]
    route: Literal["openai", "domain", "arith"] = Field(
        "openai", description="The teacher route (docs/apps.md), named in the report: any OpenAI-compatible teacher, "
        "a domain teacher (the bundled model fine-tuned on gold answers), or the rule-based arithmetic teacher.")
    output_dir: str = Field(..., description="Folder of the data, the student, the evaluation and the report.")
    steps: list[Literal["generate", "distill", "eval"]] = Field(default_factory=lambda: list(STEPS))
    generate: GenerateConfig
    distill: RunConfig
    eval: EvalSuiteConfig

    @field_validator("generate", mode="before")
    @classmethod
    def _cot_recipe(cls, value):
        """The domain rationales come from the CoT recipe: say so before the recipe's own keys are checked."""
        recipe = value.get("recipe") if isinstance(value, dict) else None
        if isinstance(recipe, dict) and recipe.get("name") != "cot":
            raise ValueError("generate.recipe.name must be cot (the domain rationales come from the CoT recipe)")
        return value


def load_app_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> AppConfig:
    """Read and validate an app config (every section, the recipe included) and join the steps' paths.

    Overrides are dotted from the top: generate.sampling.n=2 distill.train.max_steps=5 eval.limit=20.

    Raises:
        KdlmError: a missing file, bad YAML, an unknown key or a bad value in any section (named).
    """
    config = load_yaml_model(AppConfig, path, overrides, what="app config",
                             sections="domain, route, output_dir, generate, distill, eval",
                             example="distill.train.max_steps=5")
    if config.generate.recipe is None:
        source = str(path) + (" with overrides " + " ".join(overrides) if overrides else "")
        raise KdlmError(f"{source}: generate.recipe.name must be cot (the domain rationales come from the CoT recipe)")
    return join_paths(config)


def join_paths(config: AppConfig) -> AppConfig:
    """generate -> OUTPUT_DIR/data/train.jsonl -> distill -> OUTPUT_DIR/student -> eval -> OUTPUT_DIR/eval."""
    out = Path(config.output_dir)
    data = str(out / "data" / "train.jsonl")
    generate = config.generate.model_copy(update={"output": data})
    distill = config.distill.model_copy(deep=True)
    distill.data.train = data
    distill.data.teacher_answers = False  # train on the kept teacher outputs, not on new answers
    distill.train.output_dir = str(out / "student")
    evaluation = config.eval.model_copy(update={"output_dir": str(out / "eval")})
    return config.model_copy(update={"generate": generate, "distill": distill, "eval": evaluation})


def commands(config: AppConfig) -> list[str]:
    """The verbs the app runs, as commands over the resolved configs it writes into OUTPUT_DIR."""
    out = Path(config.output_dir)
    evaluation = config.eval
    options = ["--tasks", ",".join(evaluation.tasks), "--out", evaluation.output_dir,
               "--teacher", evaluation.teacher or "none"]
    if evaluation.limit:
        options += ["--limit", str(evaluation.limit)]
    defaults = EvalSuiteConfig().model_dump()
    for key, value in evaluation.model_dump(exclude={"tasks", "output_dir", "teacher", "limit"}).items():
        if value != defaults[key]:
            options += ["--set", f"{key}={json.dumps(value)}"]
    return [f"kdlm generate {out / 'generate.yaml'}", f"kdlm distill {out / 'distill.yaml'}",
            "kdlm eval " + shlex.join([config.distill.train.output_dir, *options])]


def write_plan(config: AppConfig) -> None:
    """OUTPUT_DIR/generate.yaml, distill.yaml (resolved, without secrets) and commands.sh."""
    from kdlm.config import dump_config

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    generate = config.generate.model_dump(mode="json")
    generate["teacher"]["api_key"] = None  # a secret: read from teacher.api_key_env
    (out / "generate.yaml").write_text(yaml.safe_dump(generate, sort_keys=False))
    dump_config(config.distill, out / "distill.yaml")
    lines = [f"# {config.domain} application, teacher route {config.route}: what `kdlm app` runs", *commands(config)]
    (out / "commands.sh").write_text("\n".join(lines) + "\n")


def run_app(config: AppConfig) -> Path:
    """Run the configured steps in order, then write the report; returns its path."""
    from kdlm.evaluate.suite import evaluate_suite
    from kdlm.pipeline import distill
    from kdlm.recipes.calls import run_recipe

    write_plan(config)
    if "generate" in config.steps:
        run_recipe(config.generate)
    if "distill" in config.steps:
        data = Path(config.distill.data.train)
        if not data.is_file():
            raise KdlmError(f"distill: {data} does not exist; run the generate step first (steps: [generate, ...])")
        distill(config.distill)
    if "eval" in config.steps:
        evaluate_suite([config.distill.train.output_dir], config.eval)
    return write_report(config)


def write_report(config: AppConfig) -> Path:
    """OUTPUT_DIR/report.md: the route, what the teacher produced and the filter kept, and the evaluation."""
    out = Path(config.output_dir)
    recipe = config.generate.recipe
    lines = [f"# {config.domain} application", "",
             f"- teacher route: {config.route} (generate teacher `{config.generate.teacher.model}`, "
             f"distill teacher `{config.distill.teacher.model}`)",
             f"- filter: {recipe.filter}; student format: {recipe.format}; "
             f"distillation: {'SeqKD (CE on kept outputs)' if config.distill.loss.kd_weight == 0 else 'white-box, teacher top-k'}",
             "", "Commands:", "", "```", *commands(config), "```"]
    stats_file = Path(config.generate.output).with_name("train.stats.json")
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        parsed = 1 - stats["unparsed"] / stats["samples"] if stats.get("samples") else float("nan")
        lines += ["", "## Data", "",
                  f"- task rows skipped for a missing or unknown label: {stats.get('skipped_rows', 0)}",
                  f"- training questions: {stats['questions']} (held out: {stats['heldout']})",
                  f"- teacher samples: {stats['samples']}, answer parse rate {parsed:.1%} ({stats['unparsed']} unparseable, dropped)",
                  f"- kept: {stats['kept']} rationales for {stats['questions_kept']} questions "
                  f"({stats['rationalized']} by rationalization) -> {stats['records']} records"]
    eval_md = Path(config.eval.output_dir) / "eval.md"
    if eval_md.is_file():
        results = json.loads((Path(config.eval.output_dir) / "eval.json").read_text())["models"]
        skipped = {task: value["skipped_rows"] for model in results.values() for task, value in model.items()
                   if isinstance(value, dict) and value.get("skipped_rows")}
        lines += ["", "## Evaluation", "", eval_md.read_text().strip(), "",
                  f"Evaluation rows skipped for a missing or unknown label: {skipped or 'none'}."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
