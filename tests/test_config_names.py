"""One name per concept across commands (docs/layout.md, "Config names"): where two commands named the same
setting differently, each accepts the other's name as an alias; giving both names is refused."""

from __future__ import annotations

import pytest
import typer.main
from pydantic import ValidationError

from kdlm.cli import app
from kdlm.config import EvalConfig, MethodConfig, RunConfig, TeacherConfig, TrainConfig, describe_settings
from kdlm.evaluate.suite import EvalSuiteConfig
from kdlm.generate.sections import SamplingSection, TeacherSection


def test_perplexity_length_reads_both_names():
    assert EvalConfig(perplexity_max_tokens=512).text_max_tokens == 512  # distill's eval section
    assert EvalSuiteConfig(text_max_tokens=512).perplexity_max_tokens == 512  # kdlm eval
    assert EvalSuiteConfig(perplexity_max_tokens=256).perplexity_max_tokens == 256
    assert "text_max_tokens" not in EvalSuiteConfig(text_max_tokens=512).model_dump()  # dumps keep the one name
    with pytest.raises(ValidationError, match="keep one"):
        EvalConfig(perplexity_max_tokens=512, text_max_tokens=256)
    with pytest.raises(ValidationError, match="keep one"):
        EvalSuiteConfig(perplexity_max_tokens=512, text_max_tokens=256)


def test_sample_length_reads_both_names():
    assert MethodConfig(max_tokens=24).max_new_tokens == 24  # on-policy samples, as generate's sampling names it
    assert SamplingSection(max_new_tokens=24).max_tokens == 24  # generate, as transformers names it
    with pytest.raises(ValidationError, match="keep one"):
        MethodConfig(max_tokens=24, max_new_tokens=32)


def test_aliases_reach_through_a_whole_config_and_config_show():
    config = RunConfig.model_validate({"method": {"max_tokens": 12}, "eval": {"perplexity_max_tokens": 64},
                                       "teacher": {"base_url": "http://127.0.0.1:9/v1"}})
    assert (config.method.max_new_tokens, config.eval.text_max_tokens) == (12, 64)
    assert config.teacher.api_base == "http://127.0.0.1:9/v1"
    dumped = config.model_dump()
    assert "max_tokens" not in dumped["method"] and "perplexity_max_tokens" not in dumped["eval"]
    help_of = {row["key"]: row["help"] for row in describe_settings(config)}
    assert "also read as max_tokens" in help_of["method.max_new_tokens"]
    assert "also read as perplexity_max_tokens" in help_of["eval.text_max_tokens"]


def test_existing_aliases_still_hold():
    assert TeacherConfig(base_url="http://x/v1").api_base == "http://x/v1"
    assert TeacherSection(api_base="http://x/v1").base_url == "http://x/v1"
    assert TrainConfig(per_device_train_batch_size=3, learning_rate=0.01).batch_size == 3


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_output_dir_flag_is_the_out_flag(command):
    """`--output-dir` (the config key's name) and `--out` are one option of kdlm eval and kdlm analyze."""
    cli = typer.main.get_command(app)
    sub = cli.commands[command]
    args = ["teacher", "student"] if command == "analyze" else ["model"]
    for flag in ("--out", "--output-dir"):
        context = sub.make_context(command, [*args, flag, "runs/x"])
        assert context.params["out"] == "runs/x"
