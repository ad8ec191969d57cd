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
