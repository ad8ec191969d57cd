"""method.rollout_backend=vllm: vLLM cannot run on the CPU test machine, so only its refusals are tested here;
the sampling path itself (kdlm.train.rollouts.VLLMRollouts) is untested (see docs/onpolicy.md)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kdlm.config import MethodConfig, load_config
from kdlm.errors import KdlmError
from kdlm.train.onpolicy import GKD
from kdlm.train.rollouts import check_rollout_backend
from tiny import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(),
                                reason="vLLM and a GPU are present: the refusals below do not happen")


def test_vllm_rollouts_without_vllm_name_the_install():
    with pytest.raises(KdlmError, match=r"needs (vLLM and )?a CUDA GPU"):
        check_rollout_backend(MethodConfig(name="gkd", rollout_backend="vllm"))
    tokenizer = tiny_tokenizer()
    student = tiny_llama(len(tokenizer))
    with pytest.raises(KdlmError, match="method.rollout_backend=local"):
        GKD(MethodConfig(name="gkd", rollout_backend="vllm"), student=student, teacher=student, tokenizer=tokenizer,
            max_steps=1)


def test_vllm_error_names_pip_install_when_missing():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: the missing-package message cannot appear")
    with pytest.raises(KdlmError, match="pip install vllm"):
        check_rollout_backend(MethodConfig(name="gkd", rollout_backend="vllm"))


def test_vllm_rollouts_refused_where_nothing_samples_the_student(tmp_path):
    with pytest.raises(KdlmError, match="method.name=offpolicy samples nothing"):
        check_rollout_backend(MethodConfig(name="offpolicy", rollout_backend="vllm"))
    with pytest.raises(KdlmError, match="use method.rollout_backend=local with minillm"):
        check_rollout_backend(MethodConfig(name="minillm", rollout_backend="vllm"))
    config = tmp_path / "run.yaml"
    config.write_text("method:\n  rollout_backend: sglang\n")
    with pytest.raises(KdlmError, match="rollout_backend"):
        load_config(config)


def test_local_rollouts_are_the_default():
    assert MethodConfig().rollout_backend == "local"
    check_rollout_backend(MethodConfig(name="gkd"))  # nothing to refuse
