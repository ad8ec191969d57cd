"""kdlm's Python API: the commands as functions, for notebooks and scripts.

    from kdlm import DistillConfig, distill

    report = distill(DistillConfig(train={"max_steps": 20, "output_dir": "runs/api"}))
    report = distill("configs/quickstart.yaml", overrides={"train.max_steps": 20})
    report = distill(teacher=model, tokenizer=tokenizer, train_dataset=dataset, overrides=["train.max_steps=20"])

Each function runs what its command runs (`kdlm distill`, `kdlm eval`, `kdlm generate`), with the same
config, checks and outputs; only the way settings and data come in differs:

- a config is a `DistillConfig` (the pydantic model `kdlm distill` reads), a YAML path, a dict, or None
  (the defaults); `overrides` are dotted `key=value` strings or a dict of dotted keys, applied on top;
- models may be objects (a transformers `PreTrainedModel` and its tokenizer) instead of specs: they are used
  in place, not copied (kdlm.models.loading.register_model);
- `train_dataset` may be a `datasets.Dataset`, a list of dicts or a path, in any record shape kdlm reads,
  TRL's included (`prompt`/`completion`, conversational `prompt`/`completion`, `messages`, `text`). It is
  written to `train.output_dir/train_data.jsonl` and the run reads it from there, so that the run folder
  holds everything needed to repeat it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kdlm.config import RunConfig, apply_override, load_config, load_yaml_model
from kdlm.errors import KdlmError

DistillConfig = RunConfig  # the name users look for; one class


def distill(
    config: RunConfig | str | Path | Mapping | None = None,
    *,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    teacher: Any = None,
    tokenizer: Any = None,
    student: Any = None,
    student_tokenizer: Any = None,
    train_dataset: Any = None,
    on_step: Callable | None = None,
) -> dict:
    """Distill a teacher into a student, as `kdlm distill` does; returns the report (also in output_dir).

    Args:
        config: settings (see the module docstring); None: the defaults (the bundled teacher, builtin data).
        overrides: dotted settings applied on top, e.g. ``{"train.max_steps": 20}`` or ``["loss.divergence=jsd"]``.
        teacher: a model spec (str) or a `PreTrainedModel`, with `tokenizer` (its tokenizer) when an object.
        student: a `PreTrainedModel` to train (sets student.init=model); its tokenizer defaults to `tokenizer`.
        train_dataset: training records (a `datasets.Dataset`, a list of dicts or a file path).
        on_step: called after each optimizer step with (step, student).

    Raises:
        KdlmError: a bad setting (named), a model object without its tokenizer, malformed records (the row named).
    """
    from kdlm.pipeline import distill as run

    settings = _as_config(config, overrides)
    updates: dict[str, Any] = {}
    if teacher is not None:
        updates["teacher.model"] = _spec(teacher, tokenizer, "teacher")
    if student is not None:
        updates["student.init"] = "model"
        updates["student.model"] = _spec(student, student_tokenizer or tokenizer, "student")
    if train_dataset is not None:
        updates["data.train"] = str(write_dataset(train_dataset, Path(settings.train.output_dir) / "train_data.jsonl"))
    if updates:
        settings = _as_config(settings, updates)
    return run(settings, on_step=on_step)


def evaluate(models: Iterable[Any], *, tokenizers: Iterable[Any] | None = None, **settings: Any) -> dict:
    """Evaluate models as `kdlm eval` does; returns the results (also in output_dir/eval.json).

    Args:
        models: specs (folders, bundled:NAME, hub ids) or `PreTrainedModel` objects (then `tokenizers`, one
            per model, None for a spec).
        settings: any `kdlm.evaluate.suite.EvalSuiteConfig` field, e.g. ``tasks=["selfinst"], limit=8``.
    """
    from pydantic import ValidationError

    from kdlm.evaluate.suite import EvalSuiteConfig, evaluate_suite

    models = list(models)
    tokenizers = list(tokenizers) if tokenizers is not None else [None] * len(models)
    if len(tokenizers) != len(models):
        raise KdlmError(f"evaluate: {len(models)} models but {len(tokenizers)} tokenizers")
    specs = [_spec(model, tok, f"models[{i}]") for i, (model, tok) in enumerate(zip(models, tokenizers, strict=True))]
    try:
        config = EvalSuiteConfig.model_validate(settings)
    except ValidationError as exc:
        raise KdlmError(f"bad eval setting: {exc}") from None
    return evaluate_suite(specs, config)


def generate(config: str | Path | Mapping | None = None, *, overrides: Iterable[str] | Mapping[str, Any] = ()):
    """Have a teacher answer prompts (or run a recipe) as `kdlm generate` does; returns the run's statistics."""
    from kdlm.generate.config import GenerateConfig
    from kdlm.generate.engine import generate as run
    from kdlm.recipes.calls import run_recipe

    settings = _validated(GenerateConfig, config, overrides)
    return run_recipe(settings) if settings.recipe is not None else run(settings)


def write_dataset(dataset: Any, path: Path) -> Path:
    """Normalise records (a `datasets.Dataset`, a list of dicts, or a file) and write them as kdlm JSONL."""
    from kdlm.atomic import write_jsonl
    from kdlm.data.records import load_records, normalise_record

    if isinstance(dataset, str | Path):
        records = load_records(str(dataset))
    else:
        if hasattr(dataset, "to_list"):  # datasets.Dataset
            dataset = dataset.to_list()
        if not isinstance(dataset, list | tuple):
            raise KdlmError(f"train_dataset must be a datasets.Dataset, a list of dicts or a path, got {type(dataset).__name__}")
        records = [normalise_record(row, f"train_dataset[{i}]") for i, row in enumerate(dataset)]
    if not records:
        raise KdlmError("train_dataset is empty")
    write_jsonl(path, records)
    return path


def _spec(model: Any, tokenizer: Any, what: str) -> str:
    if isinstance(model, str | Path):
        return str(model)
    if not hasattr(model, "config") or not hasattr(model, "forward"):
        raise KdlmError(f"{what}: give a model spec (str) or a transformers PreTrainedModel, got {type(model).__name__}")
    if tokenizer is None:
        raise KdlmError(f"{what} is a model object: pass its tokenizer too (tokenizer=...)")
    from kdlm.models.loading import register_model

    return register_model(model, tokenizer)


def _as_config(config: RunConfig | str | Path | Mapping | None, overrides) -> RunConfig:
    if isinstance(config, str | Path) or config is None:
        return load_config(config, _override_list(overrides))
    return _validated(RunConfig, config, overrides)


def _validated(model: type, config, overrides):
    """A pydantic config from a model instance, a dict, a YAML path or None, with dotted overrides on top."""
    if isinstance(config, str | Path) or config is None:
        return load_yaml_model(model, config, _override_list(overrides))
    tree = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    if isinstance(config, RunConfig) and config.teacher.api_key is not None:
        tree["teacher"]["api_key"] = config.teacher.api_key.get_secret_value()  # model_dump masks it
    items = overrides.items() if isinstance(overrides, Mapping) else (_split(item) for item in overrides)
    for key, value in items:
        apply_override(tree, key, value)
    return load_yaml_model(model, None, (), tree=tree)


def _override_list(overrides) -> list[str]:
    if isinstance(overrides, Mapping):
        import json

        return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in overrides.items()]
    return list(overrides)


def _split(item: str) -> tuple[str, Any]:
    import yaml

    if "=" not in item:
        raise KdlmError(f"override {item!r} must look like key=value, e.g. train.max_steps=50")
    key, _, text = item.partition("=")
    return key.strip(), yaml.safe_load(text)
