"""Configs: defaults validate, overrides apply, bad keys and values name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlm.config import load_config
from kdlm.errors import KdlmError

ROOT = Path(__file__).parent.parent


def test_every_shipped_config_loads_and_names_its_command():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        first_line = path.read_text().splitlines()[0]
        assert first_line.startswith("# kdlm ") and path.name in first_line, path
        if first_line.startswith("# kdlm generate "):  # `kdlm generate` has its own config
            from kdlm.generate import load_generate_config

            assert load_generate_config(path).sampling.n >= 1
            continue
        if first_line.startswith("# kdlm bench "):  # a grid of `kdlm distill` runs over a base config
            from kdlm.bench import load_bench_config
            from kdlm.bench.runner import _find, make_config

            bench, folder = load_bench_config(path)
            base = _find(bench.base, folder) if bench.base else None
            for method in bench.methods:
                assert make_config(base, bench.method(method)).train.max_steps >= 0
            continue
        config = load_config(path)
        assert config.train.max_steps >= 0


def test_every_config_under_configs_loads_and_a_recipe_gets_its_typed_settings():
    from kdlm.apps import load_app_config
    from kdlm.bench import load_bench_config
    from kdlm.generate import load_generate_config, recipe_settings

    classes = {"self_instruct": recipe_settings.SelfInstructSettings, "evol_instruct": recipe_settings.EvolInstructSettings,
               "lion": recipe_settings.LionSettings, "cot": recipe_settings.CotSettings, "icl": recipe_settings.IclSettings}
    recipes = set()
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    launchers = [p for p in paths if not p.read_text().startswith("# kdlm ")]
    assert {p.parent.name for p in launchers} <= {"accelerate"}, launchers  # Accelerate's own launch configs
    paths = [p for p in paths if p not in launchers]
    for path in paths:
        verb = path.read_text().split()[2]  # "# kdlm VERB FILE"
        loaders = {"distill": load_config, "generate": load_generate_config, "bench": load_bench_config,
                   "app": load_app_config}
        config = loaders[verb](path)
        if verb == "generate" and config.recipe is not None:
            assert type(config.recipe) is classes[config.recipe.name], path
            recipes.add(config.recipe.name)
        if verb == "app":
            assert type(config.generate.recipe) is recipe_settings.CotSettings
    assert recipes == set(classes) and len(paths) >= 18


@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        ("cot.yaml", "recipe.task.format=bogus", r"recipe\.task\.format: Input should be 'qa'"),
        ("lion.yaml", "recipe.rounds=0", r"recipe\.rounds: Input should be greater than or equal to 1"),
        ("icl.yaml", "recipe.colour=red", r"recipe\.colour: unknown key"),
        ("self_instruct.yaml", "recipe.name=selfinstruct", r"recipe\.name must name a recipe \(one of self_instruct, "
                                                           r"evol_instruct, lion, cot, icl\), got 'selfinstruct'"),
    ],
)
def test_a_bad_recipe_key_is_named_as_written_in_the_file(config, override, message):
    from kdlm.generate import load_generate_config

    with pytest.raises(KdlmError, match=message) as error:
        load_generate_config(ROOT / "configs" / config, [override])
    assert str(ROOT / "configs" / config) in str(error.value)


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 5\n")
    config = load_config(path, ["train.max_steps=50", "loss.divergence=jsd", "student.layers=[0,3,5]", "train.bf16=false"])
    assert config.train.max_steps == 50 and config.loss.divergence == "jsd"
    assert config.student.layers == [0, 3, 5] and config.train.bf16 is False


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("train:\n  max_stepz: 5\n", [], "train.max_stepz: unknown key"),
        ("train:\n  max_steps: many\n", [], "train.max_steps"),
        ("loss:\n  divergence: kl\n", [], "unknown divergence 'kl'"),
        ("", ["loss.temperature=-1"], "loss.temperature"),
        ("", ["nonsense.key=1"], "nonsense: unknown key"),
        ("", ["train.max_steps"], "must look like key=value"),
        ("- a\n- b\n", [], "top level must be a mapping"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, overrides, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(KdlmError) as error:
        load_config(path, overrides)
    assert expected in str(error.value)
    assert "bad.yaml" in str(error.value) or "key=value" in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(KdlmError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_show_lists_every_setting_with_value_default_and_help(tmp_path):
    from kdlm.config import RunConfig, describe_settings

    config = load_config(None, ["train.max_steps=7", "loss.divergence=jsd"])
    rows = {row["key"]: row for row in describe_settings(config)}
    expected_keys = {f"{section}.{name}" for section, sub in RunConfig.model_fields.items()
                     for name in sub.annotation.model_fields}
    assert set(rows) == expected_keys  # every leaf setting, nothing else
    assert rows["train.max_steps"]["value"] == "7" and rows["train.max_steps"]["default"] == "60"
    assert rows["loss.divergence"]["value"] == "'jsd'" and rows["loss.divergence"]["default"] == "'fkl'"
    assert rows["train.bf16"]["help"].startswith("bf16 autocast")


def test_trl_names_are_read_as_kdlm_settings_and_a_clash_is_refused():
    config = load_config(None, ["train.learning_rate=0.001", "train.gradient_accumulation_steps=4",
                                "train.save_steps=25", "train.per_device_train_batch_size=2",
                                "train.resume_from_checkpoint=true", "teacher.base_url=http://127.0.0.1:9/v1"])
    assert (config.train.lr, config.train.grad_accum, config.train.save_every, config.train.batch_size) == (0.001, 4, 25, 2)
    assert config.train.resume is True and config.teacher.api_base == "http://127.0.0.1:9/v1"
    with pytest.raises(KdlmError, match="learning_rate and lr name the same setting"):
        load_config(None, ["train.learning_rate=0.001", "train.lr=0.002"])
    from kdlm.generate import load_generate_config

    generate = load_generate_config(None, ["teacher.api_base=http://127.0.0.1:9/v1", "sampling.max_new_tokens=7"])
    assert generate.teacher.base_url == "http://127.0.0.1:9/v1" and generate.sampling.max_tokens == 7


def test_config_show_names_aliases_and_reads_every_kind_of_config(tmp_path):
    from typer.testing import CliRunner

    from kdlm.cli import app
    from kdlm.config import config_kind, describe_settings

    rows = {row["key"]: row for row in describe_settings(load_config(None))}
    assert "learning_rate" in rows["train.lr"]["help"]
    assert [config_kind(ROOT / "configs" / name) for name in ("quickstart.yaml", "generate.yaml", "bench_cpu.yaml")] == [
        "distill", "generate", "bench"]
    unlabeled = tmp_path / "g.yaml"
    unlabeled.write_text("prompts: builtin:quickstart\nsampling:\n  n: 3\n")
    assert config_kind(unlabeled) == "generate"
    result = CliRunner().invoke(app, ["config", "show", str(unlabeled), "--changed"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "sampling.n" in result.output and "3" in result.output and "sampling.temperature" not in result.output
    result = CliRunner().invoke(app, ["config-show", "train.max_steps=9", "--changed"], terminal_width=200)
    assert result.exit_code == 0 and "train.max_steps" in result.output and "train.lr" not in result.output


def test_distill_and_eval_need_no_command_extra_and_a_missing_one_is_named():
    import subprocess
    import sys

    code = ("import sys, kdlm.pipeline, kdlm.evaluate.suite, kdlm.api; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}).stdout.strip()
    assert out == "[]"  # kdlm[serve] and kdlm[api] serve their commands only
    from kdlm.errors import require_extra

    with pytest.raises(KdlmError, match=r"kdlm serve needs no_such_module_x: pip install 'kdlm\[serve\]'"):
        require_extra("serve", ("json", "no_such_module_x"), "kdlm serve")
