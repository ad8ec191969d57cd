"""train.strategy: FSDP2 and DeepSpeed ZeRO against one process, sharded checkpoints, and the refused setups.

The multi-process tests launch tests/train_script.py with `accelerate launch` on 2 CPU processes over gloo, as
test_train.py's DDP test does, and hold the losses and final weights to a single-process run of the same global
batch: rel 1e-4 on the losses, rtol 1e-4 / atol 1e-5 on every weight (fp32; the sums run in another order on two
processes, measured differences are about 1e-7 in the losses and 6e-7 in the weights).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from kdlm.config import LossConfig, TrainConfig, load_config
from kdlm.errors import KdlmError
from kdlm.train.strategy import deepspeed_plugin, make_accelerator, read_deepspeed_config
from tiny import tiny_llama, tiny_tokenizer

HERE = Path(__file__).parent
ROOT = HERE.parent
SCRIPT = str(HERE / "train_script.py")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{HERE}",
            "DS_ACCELERATOR": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # `--multi_gpu` starts torchrun; the script's CPU accelerator then runs over gloo (see test_train.py)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return subprocess.run([*launch, SCRIPT, *args], check=check, env=_env(), timeout=300, capture_output=not check,
                          text=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, micro-batch 4, 2 accumulation steps, 5 steps (global batch 8)."""
    folder = tmp_path_factory.mktemp("one") / "run"
    subprocess.run([sys.executable, SCRIPT, str(folder), "4", "2", "5"], check=True, env=_env(), timeout=300)
    return folder


def _assert_same_run(reference: Path, other: Path, *, steps: slice = slice(None)) -> None:
    losses = json.loads((other / "losses.json").read_text())
    assert losses == pytest.approx(json.loads((reference / "losses.json").read_text())[steps], rel=1e-4)
    weights_1, weights_2 = torch.load(reference / "final.pt"), torch.load(other / "final.pt")
    assert set(weights_1) == set(weights_2)
    for name in weights_1:
        assert type(weights_2[name]) is torch.Tensor, name  # plain tensors: the student was unsharded
        torch.testing.assert_close(weights_1[name], weights_2[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_resume(one_process, tmp_path):
    """FSDP2 full shard (decoder layers as units, the fused loss on the gathered lm_head) equals one process; then,
    its step-5 checkpoint deleted (as if killed after the step-3 one), a resume from the sharded step-3 checkpoint
    (accelerator.load_state) trains steps 4-5 as the uninterrupted run did."""
    folder = tmp_path / "fsdp"
    args = [str(folder), "2", "2", "5", "fsdp", "", "configs/deepspeed/zero2.json", "24", "3"]  # checkpoint every 3
    _launch(*args)
    assert (folder / "distributed_type").read_text() == "FSDP"
    assert len(json.loads((folder / "losses.json").read_text())) == 5
    _assert_same_run(one_process, folder)
    shards = folder / "checkpoints" / "step-000005" / "sharded"
    assert sorted(p.name for p in (shards / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    shutil.rmtree(folder / "checkpoints" / "step-000005")
    (folder / "final.pt").unlink()
    args[5] = "resume"
    _launch(*args)
    _assert_same_run(one_process, folder, steps=slice(3, 5))


def _deepspeed_available() -> bool:
    from accelerate.utils import is_deepspeed_available

    return is_deepspeed_available()


@pytest.mark.slow
@pytest.mark.skipif(not _deepspeed_available(), reason="deepspeed is an optional extra: pip install 'kdlm[deepspeed]'")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_processes_match_one(one_process, tmp_path, stage):
    """DeepSpeed ZeRO-2 / ZeRO-3 on its CPU accelerator (gloo), with the shipped configs, equals one process."""
    folder = tmp_path / stage
    _launch(str(folder), "2", "2", "5", "deepspeed", "", f"configs/deepspeed/{stage}.json")
    assert (folder / "distributed_type").read_text() == "DEEPSPEED"
    _assert_same_run(one_process, folder)
    assert (folder / "checkpoints" / "step-000005" / "sharded" / "pytorch_model").is_dir()


@pytest.mark.slow
def test_more_processes_than_examples_is_refused(tmp_path):
    result = _launch(str(tmp_path / "few"), "1", "1", "2", "fsdp", "", "configs/deepspeed/zero2.json", "1", check=False)
    assert result.returncode != 0
    assert "2 processes x train.batch_size=1 need at least 2 training examples, and there are 1: launch fewer " \
           "processes" in result.stderr + result.stdout


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_shipped_deepspeed_configs_are_valid(name):
    path = ROOT / "configs" / "deepspeed" / f"{name}.json"
    config = read_deepspeed_config(str(path))
    assert config["zero_optimization"]["stage"] == int(name[-1])
    if not _deepspeed_available():
        pytest.skip("deepspeed not installed: the plugin construction is not checked")
    plugin = deepspeed_plugin(str(path), batch_size=4, grad_accum=2, max_grad_norm=0.5)
    assert plugin.zero_stage == int(name[-1])
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 2
    assert plugin.deepspeed_config["gradient_clipping"] == 0.5


def test_bad_deepspeed_config_is_refused(tmp_path):
    with pytest.raises(KdlmError, match="no such file"):
        read_deepspeed_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    with pytest.raises(KdlmError, match="zero_optimization.stage must be 0-3"):
        read_deepspeed_config(str(bad))
    bad.write_text("{not json")
    with pytest.raises(KdlmError, match="not valid JSON"):
        read_deepspeed_config(str(bad))


def test_deepspeed_missing_names_the_install(monkeypatch):
    # deepspeed may be installed here; the check reads accelerate's availability flag, so hide it
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_deepspeed_available", lambda: False)
    with pytest.raises(KdlmError, match=r"pip install 'kdlm\[deepspeed\]'"):
        make_accelerator("deepspeed", deepspeed_config=str(ROOT / "configs" / "deepspeed" / "zero2.json"))


def test_unknown_strategy_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  strategy: zero9\n")
    with pytest.raises(KdlmError, match="unknown strategy 'zero9': use ddp, fsdp or deepspeed"):
        load_config(config)
    with pytest.raises(KdlmError, match="train.strategy='zero9' is not a strategy"):
        make_accelerator("zero9")


def test_sharded_lora_student_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("student:\n  lora: {r: 4}\ntrain:\n  strategy: fsdp\n")
    with pytest.raises(KdlmError, match="use train.strategy=ddp with LoRA, or drop student.lora"):
        load_config(config)
    # the Python API: train() refuses a student with frozen parameters under a sharded strategy
    from kdlm.models.student import apply_lora
    from kdlm.train.loop import train

    tokenizer = tiny_tokenizer()
    student = apply_lora(tiny_llama(len(tokenizer)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    examples = [{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]}] * 4
    with pytest.raises(KdlmError, match="train.strategy=fsdp shards a whole student"):
        train(student, examples, train_config=TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, strategy="fsdp"),
              loss_config=LossConfig(kd_weight=0.0), pad_token_id=2, vocab_size=len(tokenizer),
              accelerator=Accelerator(cpu=True))  # one process: the check reads train.strategy


def test_sharded_onpolicy_method_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  signal: online\nmethod:\n  name: gkd\ntrain:\n  strategy: deepspeed\n")
    with pytest.raises(KdlmError, match="use train.strategy=ddp for on-policy methods"):
        load_config(config)


def test_multi_node_launch_files_parse():
    """The 2 x 8 GPU launch config is one Accelerate reads (it was never run here: no GPUs, no cluster)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / "2x8.yaml"))
    assert (config.num_machines, config.num_processes, config.distributed_type.value) == (2, 16, "MULTI_GPU")
    sbatch = ROOT / "configs" / "slurm" / "distill.sbatch"
    assert subprocess.run(["bash", "-n", str(sbatch)], check=False).returncode == 0
    assert "configs/accelerate/2x8.yaml" in sbatch.read_text()


def test_checkpoints_written_before_the_strategy_setting_resume_as_ddp():
    from kdlm.train.checkpoint import config_differences

    assert config_differences({"train.lr": 0.1}, {"train.lr": 0.1, "train.strategy": "ddp"}) == []
    assert config_differences({"train.lr": 0.1}, {"train.lr": 0.1, "train.strategy": "fsdp"}) == [
        "train.strategy: checkpoint has 'ddp', this run has 'fsdp'"]


def _resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_sharded_cpu_training_hands_freed_heap_memory_back():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from kdlm.train.strategy import _malloc_trim, release_freed_memory

    if _malloc_trim() is None:
        pytest.skip("not glibc: no malloc_trim")
    # an unsharded run is left alone, and so is a sharded one on a GPU
    assert release_freed_memory(Accelerator(cpu=True)) is False
    on_gpu = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.FSDP), device=torch.device("cuda"))
    assert release_freed_memory(on_gpu) is False
    # 200 MB of small tensors come from the C heap, which keeps their pages once they are freed
    sharded = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.FSDP), device=torch.device("cpu"))
    _malloc_trim()(0)  # start from a trimmed heap, whatever earlier tests in this process freed
    before = _resident_mb()
    held = [torch.ones(512) for _ in range(100_000)]
    assert _resident_mb() - before > 150
    del held
    kept = _resident_mb()
    assert kept - before > 100, "glibc returned the freed heap by itself: nothing left to test"
    assert release_freed_memory(sharded) is True
    assert _resident_mb() < kept - 100
