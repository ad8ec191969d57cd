"""bf16 autocast only where the hardware runs it fast: the decision, its reason, and what a run records."""

from __future__ import annotations

import pytest
import torch

from kdlm.config import load_config
from kdlm.errors import KdlmError
from kdlm.precision import (
    bf16_enabled,
    cpu_flags,
    cpu_model,
    decide_from_flags,
    probe_matmul_seconds,
    resolve_precision,
)


@pytest.mark.parametrize(("flags", "fast"), [
    ({"avx2", "avx512f", "avx512_bf16"}, True),   # AMD Zen 4, Intel Cooper Lake
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, True),  # Intel Sapphire Rapids
    ({"avx2", "avx512f", "avx512bw"}, False),  # Skylake / Cascade Lake Xeon: bf16 emulated, ~6x slower
    ({"avx2", "fma"}, False),  # AMD Zen 1-3
])
def test_x86_flags_decide(flags, fast):
    decision = decide_from_flags("x86_64", flags, "Some CPU")
    assert decision.bf16 is fast
    assert "Some CPU" in decision.reason and ("lacks" in decision.reason) is not fast


def test_flags_do_not_decide_on_other_architectures_or_without_flags():
    assert decide_from_flags("aarch64", {"bf16", "asimd"}, "Neoverse") is None  # the probe decides there
    assert decide_from_flags("x86_64", None, "unknown") is None


def test_explicit_settings_pass_through_and_bad_ones_are_refused():
    assert bf16_enabled(True) is True and bf16_enabled(False) is False
    assert resolve_precision(False).reason.endswith("was set")
    with pytest.raises(ValueError, match="true, false or auto"):
        bf16_enabled("yes")


def test_auto_on_this_machine_follows_its_cpu_and_never_picks_the_slower_precision():
    """The decision on the real CPU agrees with its flags, and with a timing whenever the timing is decisive."""
    decision = resolve_precision("auto", "cpu")
    assert cpu_model() in decision.reason
    flags = cpu_flags()
    if flags is not None and torch.device("cpu").type == "cpu" and decide_from_flags("x86_64", flags, "") is not None:
        assert decision.bf16 == any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
    fp32_s, bf16_s = probe_matmul_seconds(size=384, repeats=3)
    if fp32_s / bf16_s < 0.6:  # bf16 clearly slower here (emulated): auto must not pick it
        assert decision.bf16 is False
    if fp32_s / bf16_s > 1.8:  # bf16 clearly faster: auto must pick it
        assert decision.bf16 is True


def test_the_config_accepts_auto_and_names_the_key_on_a_bad_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 1\n")
    assert load_config(path).train.bf16 == "auto"  # the default
    assert load_config(path, ["train.bf16=true"]).train.bf16 is True
    assert load_config(path, ["train.bf16=auto"]).train.bf16 == "auto"
    with pytest.raises(KdlmError, match="train.bf16"):
        load_config(path, ["train.bf16=sometimes"])
