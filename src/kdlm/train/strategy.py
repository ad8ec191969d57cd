"""How the student is spread over processes: ``train.strategy`` = ddp | fsdp | deepspeed, all through Accelerate.

- ``ddp``: every process holds the whole student and its optimizer state; gradients are all-reduced.
- ``fsdp``: PyTorch FSDP2 (``fully_shard``) through Accelerate's ``FullyShardedDataParallelPlugin``: the student's
  weights, gradients and AdamW moments are sharded over the processes, each decoder layer one unit gathered for
  its forward and backward; ``train.fsdp_offload`` keeps the shards on the CPU.
- ``deepspeed``: DeepSpeed ZeRO through Accelerate's ``DeepSpeedPlugin``, with a JSON config
  (``configs/deepspeed/zero2.json``: gradients and optimizer state sharded; ``zero3.json``: the weights too).

The teacher is never wrapped: it is frozen, holds no optimizer state, and each process keeps a whole copy.

The fused loss reads the student's lm_head weight inside ``StudentObjective.forward``. Under FSDP2 the objective
is the root unit, and the root's own parameters (embeddings, final norm, lm_head) are gathered in full before
its forward runs and stay gathered until its backward has reduced their gradients, so the fused loss sees the
whole (V, H) weight and its weight gradient goes to that gathered weight, which FSDP then reduce-scatters to the
shards. This is "run the loss inside the forward"; no extra gather is made per step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from kdlm.errors import KdlmError

STRATEGIES = ("ddp", "fsdp", "deepspeed")


def accelerator_for(config, *, cpu: bool | None = None) -> Accelerator:
    """``make_accelerator`` with the settings of a ``TrainConfig``."""
    return make_accelerator(config.strategy, deepspeed_config=config.deepspeed_config, fsdp_offload=config.fsdp_offload,
                            batch_size=config.batch_size, grad_accum=config.grad_accum,
                            max_grad_norm=config.max_grad_norm, cpu=cpu)


def make_accelerator(strategy: str = "ddp", *, deepspeed_config: str | None = None, fsdp_offload: bool = False,
                     batch_size: int = 1, grad_accum: int = 1, max_grad_norm: float | None = None,
                     cpu: bool | None = None) -> Accelerator:
    """An Accelerator for ``train.strategy`` (a KdlmError names the fix for an unknown or unavailable one).

    ``batch_size``, ``grad_accum`` and ``max_grad_norm`` fill the DeepSpeed config's "auto" values.
    """
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    if strategy == "ddp":
        return Accelerator(cpu=cpu)
    if strategy == "fsdp":
        plugin = fsdp_plugin(offload=fsdp_offload)
        accelerator = Accelerator(cpu=cpu, fsdp_plugin=plugin)
        if cpu and accelerator.num_processes > 1:
            _fsdp_on_cpu(accelerator, plugin)
        return accelerator
    if strategy == "deepspeed":
        plugin = deepspeed_plugin(deepspeed_config, batch_size=batch_size, grad_accum=grad_accum,
                                  max_grad_norm=max_grad_norm)
        accelerator = Accelerator(cpu=cpu, deepspeed_plugin=plugin)
        if cpu and accelerator.num_processes > 1:
            _deepspeed_on_cpu(accelerator, plugin)
        return accelerator
    raise KdlmError(f"train.strategy={strategy!r} is not a strategy: use one of {', '.join(STRATEGIES)}")


def fsdp_plugin(*, offload: bool = False):
    """FSDP2, full shard; the wrap units are set per model in ``wrap_units`` (its decoder layer class)."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,  # full shard: a layer's weights are freed after its forward (ZeRO-3)
        auto_wrap_policy="transformer_based_wrap",
        cpu_offload=offload,
        state_dict_type="SHARDED_STATE_DICT",  # checkpoints: each process writes its own shards
        cpu_ram_efficient_loading=False,  # every process already holds the built student
    )


def _fsdp_on_cpu(accelerator: Accelerator, plugin) -> None:
    """Accelerate turns FSDP on only for accelerators (CPU processes get MULTI_CPU, i.e. DDP); FSDP2 itself runs on
    CPU tensors over gloo, so kdlm sets the state's type itself. Used by the CPU tests and CPU-only clusters."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    # AcceleratorState copies PartialState's fields each time it is built (Accelerate does so often): set both
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def _deepspeed_on_cpu(accelerator: Accelerator, plugin) -> None:
    """As ``_fsdp_on_cpu``, for DeepSpeed on its CPU accelerator (``DS_ACCELERATOR=cpu``, gloo)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    plugin.set_mixed_precision("no")
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = plugin


def wrap_units(accelerator: Accelerator, student: nn.Module) -> None:
    """Make the student's decoder layers the FSDP units (``_no_split_modules`` of transformers models)."""
    if not is_fsdp(accelerator):
        return
    names = list(getattr(student, "_no_split_modules", None) or [])
    if not names:
        raise KdlmError(f"train.strategy=fsdp: {type(student).__name__} names no decoder layer class "
                        "(_no_split_modules) to shard by; use train.strategy=ddp or deepspeed")
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = names


def read_deepspeed_config(path: str | None) -> dict:
    """The DeepSpeed JSON config at ``path`` (``train.deepspeed_config``), checked to name a ZeRO stage."""
    if not path:
        raise KdlmError("train.strategy=deepspeed needs train.deepspeed_config: configs/deepspeed/zero2.json or zero3.json")
    file = Path(path)
    if not file.is_file():
        raise KdlmError(f"train.deepspeed_config={path}: no such file (kdlm ships configs/deepspeed/zero2.json and zero3.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise KdlmError(f"train.deepspeed_config={path} is not valid JSON ({exc})") from None
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise KdlmError(f"train.deepspeed_config={path}: zero_optimization.stage must be 0-3, not {stage!r}")
    return config


def deepspeed_plugin(path: str | None, *, batch_size: int = 1, grad_accum: int = 1, max_grad_norm: float | None = None):
    """Accelerate's DeepSpeedPlugin from the JSON config (needs the optional ``deepspeed`` package); its "auto"
    values are kdlm's: the micro-batch, the accumulation steps and the clipping norm of ``train``."""
    config = read_deepspeed_config(path)
    filled = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": max_grad_norm or 0.0}
    config.update({key: value for key, value in filled.items() if config.get(key, "auto") == "auto"})
    from accelerate.utils import is_deepspeed_available

    if not is_deepspeed_available():
        raise KdlmError("train.strategy=deepspeed needs the deepspeed package: pip install 'kdlm[deepspeed]' "
                        "(or pip install deepspeed), or use train.strategy=fsdp")
    from accelerate import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=config)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is another (macOS, musl) or cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory(accelerator: Accelerator) -> bool:
    """Hand the C heap's freed memory back to the system, for sharded training on the CPU; whether it did.

    On the CPU, torch frees tensors into glibc's heap, which keeps the freed pages: a sharded process kept the whole
    student it built before sharding it, and each backward's freed buffers, so its resident memory grew from step to
    step above what it held (docs/plan.md: the plan was 27% under the measured peak without this, 17-24% with it). On a GPU the
    caching allocator holds device memory instead, and unsharded runs are left as they are.
    """
    trim = _malloc_trim() if is_sharded(accelerator) and accelerator.device.type == "cpu" else None
    if trim is None:
        return False
    trim(0)
    return True


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.state.distributed_type.value == "FSDP"


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.distributed_type.value == "DEEPSPEED"


def is_sharded(accelerator: Accelerator) -> bool:
    """FSDP or DeepSpeed: checkpoints go through ``accelerator.save_state`` (each process its own shards)."""
    return accelerator.state.distributed_type.value in ("FSDP", "DEEPSPEED")


def check_student(strategy: str, student: nn.Module) -> None:
    """Refuse what the sharded strategies cannot train here (the API's check; a config is refused at load)."""
    if strategy == "ddp":
        return
    if hasattr(student, "peft_config") or any(not p.requires_grad for p in student.parameters()):
        raise KdlmError(f"train.strategy={strategy} shards a whole student, and this one has frozen parameters (a LoRA "
                        "adapter, student.lora): LoRA's few trainable weights need no sharding, so use train.strategy=ddp "
                        "with LoRA, or drop student.lora to shard the full student")


def unshard_in_place(accelerator: Accelerator, objective: nn.Module, prepared: nn.Module) -> None:
    """After sharded training, the caller's student holds the whole trained weights as plain tensors."""
    if is_fsdp(accelerator):
        _unshard_fsdp(accelerator, objective)
    elif is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        # ZeRO-3 partitions each parameter in place and fetches it by module hooks: gather on every process,
        # copy, then drop the engine's hooks (ZeRO-2 keeps whole weights in the modules: nothing to do)
        with deepspeed.zero.GatheredParameters(list(objective.parameters()), modifier_rank=None):
            full = {name: param.detach().clone() for name, param in objective.named_parameters()}
        prepared.destroy()
        _replace_parameters(objective, full, accelerator.device)


def _unshard_fsdp(accelerator: Accelerator, objective: nn.Module) -> None:
    """After FSDP2 training: the whole trained weights back into plain tensors of the caller's modules.

    ``fully_shard`` changes the modules in place (DTensor shards, forward hooks, an ``FSDP...`` class); the
    caller's student is one of them. Every process gathers the full state dict, each FSDP module gets its
    original class back and loses FSDP's hooks, and each parameter becomes a plain one holding the full
    tensor, so that saving, evaluating and generating with the student work as after DDP.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    full = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    for module in objective.modules():
        if isinstance(module, FSDPModule):
            module.__class__ = next(base for base in type(module).__mro__ if not issubclass(base, FSDPModule))
            module._forward_pre_hooks.clear()
            module._forward_pre_hooks_with_kwargs.clear()
            module._forward_hooks.clear()
            module._forward_hooks_with_kwargs.clear()
    _replace_parameters(objective, full, accelerator.device)


def _replace_parameters(objective: nn.Module, full: dict, device) -> None:
    """Each parameter of ``objective`` becomes a plain one holding ``full[its name]`` (tied ones stay tied)."""
    seen: dict[int, nn.Parameter] = {}
    for module_name, module in objective.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in seen:  # tied weights (embeddings and lm_head) stay one parameter
                key = f"{module_name}.{name}" if module_name else name
                seen[id(param)] = nn.Parameter(full[key].detach().clone().to(device), requires_grad=param.requires_grad)
            module._parameters[name] = seen[id(param)]
