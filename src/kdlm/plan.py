"""`kdlm plan`: memory per device and time per step of a distill config, from the models' configs alone.

Nothing here loads weights: each model is built on the ``meta`` device from its config, which gives exact
parameter counts for any architecture. Memory is summed from the parts a training step holds:

- model states: fp32 weights, fp32 gradients and AdamW's two moments of the trainable parameters (16 bytes
  per trainable parameter, as in the ZeRO paper's mixed-precision accounting, arXiv 1910.02054), sharded by
  the strategy: ``ddp`` replicates all, ``zero2`` shards gradients and moments, ``fsdp`` (= ZeRO-3) shards all
  and gathers one decoder layer at a time; ``ddp`` on more than one device also holds its gradient buckets, a
  second fp32 copy of the gradients (PyTorch DDP's default ``gradient_as_bucket_view=False``, kept by Accelerate);
- activations saved for the backward pass: per token and layer about ``10 H + 4 H_kv + 5 I`` elements for a
  Llama-style block (H the width, H_kv the key/value width, I the MLP width) in fp32, 0.65 of that under bf16
  autocast (both measured on a 4-layer SmolLM2-shaped block with saved-tensor hooks: 59.6 KB and 38.5 KB per
  token and layer at H = 576); with activation checkpointing, one layer input per layer plus one full layer;
- the loss: dense logits (student and teacher, with their softmaxes and gradient) or the fused loss's one
  chunk of ~4 M logits plus the (V, H) fp32 weight gradient;
- the teacher: its weights in ``teacher.dtype`` when it is loaded (online signal, or answering and caching in
  this process), and during the caching phase its logits and log-softmax over a batch;
- under ``fsdp``, what the sharding itself holds (measured on a 2-process CPU run, ``benchmarks/plan_check.py
  --strategy fsdp``): the root unit (embeddings, final norm, lm_head) stays whole for the whole step, and FSDP2
  copies a unit's whole gradient into a flat reduce-scatter buffer;
- a fixed runtime overhead (Python, torch and transformers on a CPU; the CUDA context on a GPU).

Two phases outside the step can be higher under ``fsdp``: building the student (every process builds it whole,
then shards it: whole weights plus the shards) and the end of training, when every process gathers the whole
trained student back (``kdlm.train.strategy.unshard_in_place``: the gathered state dict and the plain copies made
from it, next to the sharded weights and AdamW moments that are still alive).

Time per step is FLOPs (6 per trainable parameter and token for the student, 2 per teacher parameter and token
for a live teacher, the lm_head at the target tokens) over a throughput: a measured matmul rate on the CPU, or
a fraction (MFU) of the GPU's published bf16 peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdlm.config import RunConfig
from kdlm.errors import KdlmError

GIB = 2**30
# Elements saved per token and decoder layer: 10 H + 4 H_kv + 5 I (see the module docstring).
ACTIVATION_BYTES = {False: 4.0, True: 2.6}  # per element: fp32, and the measured mix under bf16 autocast
CPU_OVERHEAD_BYTES = 0.45 * GIB  # python + torch + transformers + kdlm resident before any model (0.40 GiB measured)
CUDA_OVERHEAD_BYTES = 0.6 * GIB  # CUDA context and kernels
DEFAULT_MFU = 0.4
CPU_EFFICIENCY = 0.5  # share of a square matmul's rate that a CPU training step reaches (norms, softmax, small matmuls)
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                   "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}
STRATEGIES = ("ddp", "zero2", "fsdp", "fsdp-offload")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model."""

    params: int
    trainable: int
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    vocab: int
    largest_layer: int  # parameters of one decoder layer
    untied: bool = False  # a separate lm_head (not the input embedding)

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden


def shape_from_config(config, *, num_layers: int | None = None, trainable: str = "all", lora_r: int = 16) -> ModelShape:
    """Count a model's parameters by building it on the meta device from a transformers config."""
    from transformers import AutoModelForCausalLM

    config = config.__class__.from_dict(config.to_dict())
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_hidden = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    decoder = getattr(getattr(model, "model", model), "layers", None)
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in decoder), default=0) if decoder else 0
    if trainable == "lora":  # adapters on the attention and MLP projections of every layer
        count = layers * lora_r * (2 * (hidden + hidden) + 2 * (hidden + kv_hidden) + 3 * (hidden + intermediate))
    elif trainable == "no-embeddings":
        count = params - config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    else:
        count = params
    untied = not getattr(config, "tie_word_embeddings", True)
    return ModelShape(params, count, layers, hidden, kv_hidden, intermediate, config.vocab_size, largest, untied)


def read_config(spec: str):
    """A model's transformers config from its spec (bundled:NAME, HF folder, .gguf file, hub id); no weights."""
    from transformers import AutoConfig

    from kdlm.models.loading import BUNDLED_PREFIX, ensure_bundled

    try:
        if spec.startswith(BUNDLED_PREFIX):
            return AutoConfig.from_pretrained(ensure_bundled(spec[len(BUNDLED_PREFIX):]))
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(spec)
    except KdlmError:
        raise
    except (OSError, ValueError) as error:
        raise KdlmError(f"cannot read the config of {spec!r} ({str(error).splitlines()[0]}); give a local HF folder "
                        "or a hub id already in the local cache") from None


@dataclass
class Plan:
    strategy: str
    devices: int
    device_memory_gib: float
    micro_batch: int
    tokens_per_micro_batch: int
    parts_gib: dict[str, float]
    total_gib: float
    cache_phase_gib: float
    checkpointed_total_gib: float
    step_seconds: float
    flops_per_step: float
    fits: bool
    build_phase_gib: float = 0.0
    gather_phase_gib: float = 0.0

    @property
    def peak_gib(self) -> float:
        """The highest of the step, the cache phase and the sharded strategies' build and gather phases."""
        return max(self.total_gib, self.cache_phase_gib, self.build_phase_gib, self.gather_phase_gib)

    def as_dict(self) -> dict:
        return asdict(self)


def model_states_bytes(shape: ModelShape, strategy: str, world: int) -> dict[str, float]:
    """fp32 weights, fp32 gradients and AdamW moments per device, sharded as the strategy shards them."""
    weights, grads, moments = 4.0 * shape.params, 4.0 * shape.trainable, 8.0 * shape.trainable
    if strategy == "zero2":
        grads, moments = grads / world, moments / world
    elif strategy in ("fsdp", "fsdp-offload"):
        gathered = 2 * 4.0 * shape.largest_layer  # the layer in use and the next one, prefetched
        weights, grads, moments = weights / world + gathered, grads / world, moments / world
        if strategy == "fsdp-offload":
            weights, grads, moments = gathered, 0.0, 0.0  # sharded states live in host memory
    return {"student weights": weights, "gradients": grads, "optimizer": moments}


def root_unit_params(shape: ModelShape) -> int:
    """Parameters of FSDP's root unit: the embeddings, and the lm_head when untied (the final norm is negligible)."""
    return shape.embedding * (2 if shape.untied else 1)


def sharding_bytes(shape: ModelShape, strategy: str, fused: bool) -> float:
    """What FSDP2 holds beyond the shards and the two gathered layers of ``model_states_bytes``.

    The root unit (embeddings, final norm, lm_head) is gathered before the objective's forward and stays whole
    until its backward (kdlm.train.strategy's docstring); each unit's whole gradient is copied into a flat
    reduce-scatter buffer, at most the largest unit's; the root's whole gradient lives from the loss's backward to
    the end of the backward (the fused loss already counts it as its (V, H) weight gradient).
    """
    if strategy not in ("fsdp", "fsdp-offload"):  # with offload too: the gathered units are on the device
        return 0.0
    root = root_unit_params(shape)
    held = 4.0 * root + 4.0 * max(root, shape.largest_layer)
    return held + (0.0 if fused else 4.0 * root)


def sharded_phases_bytes(shape: ModelShape, strategy: str, world: int, runtime: float) -> tuple[float, float]:
    """(build, gather) memory of the phases outside the step under a sharded strategy (0 for ddp).

    Build: each process builds the whole fp32 student and then shards it, the whole weights alive next to the
    shards. Gather (end of training): the sharded weights and AdamW moments are still alive when every process
    gathers the whole state dict and makes plain fp32 copies of it (``unshard_in_place``).
    """
    if strategy not in ("fsdp", "fsdp-offload"):
        return 0.0, 0.0
    whole = 4.0 * shape.params
    build = runtime + whole + whole / world
    if strategy == "fsdp-offload":  # the shards and moments live in host memory
        return build, runtime + 2 * whole
    return build, runtime + whole / world + 8.0 * shape.trainable / world + 2 * whole


def activation_bytes(shape: ModelShape, tokens: int, bf16: bool, checkpointing: bool) -> float:
    per_layer = (10 * shape.hidden + 4 * shape.kv_hidden + 5 * shape.intermediate) * ACTIVATION_BYTES[bf16]
    if checkpointing:
        return tokens * (shape.layers * shape.hidden * ACTIVATION_BYTES[bf16] + per_layer)
    return tokens * shape.layers * per_layer


def loss_bytes(student: ModelShape, teacher: ModelShape | None, target_tokens: int, fused: bool, chunk_rows: int | None) -> float:
    """Logit buffers of the loss: dense holds (N, V) logits of each model with softmaxes and a gradient."""
    if fused:
        rows = chunk_rows or max(1, (1 << 22) // student.vocab)
        return 10 * 4.0 * min(rows, target_tokens) * student.vocab + 4.0 * student.vocab * student.hidden
    buffers = 4 + (2 if teacher is not None else 0)  # student logits, log-softmax, softmax, gradient (+ teacher's)
    return buffers * 4.0 * target_tokens * student.vocab


def step_flops(student: ModelShape, teacher: ModelShape | None, tokens: int) -> float:
    """FLOPs of one step over ``tokens`` tokens, every one a target (an upper bound).

    The decoder costs 2 per parameter and token forward, 2 backward through the activations and 2 more for the
    weights' gradients where they train; embedding lookups cost nothing; the lm_head (V x H) runs at targets.
    """
    decoder = student.params - student.embedding * (2 if student.untied else 1)
    trainable_share = min(1.0, student.trainable / max(student.params, 1))
    flops = (4.0 + 2.0 * trainable_share) * (decoder + student.embedding) * tokens
    if teacher is not None:
        flops += 2.0 * (teacher.params - teacher.embedding * (1 if teacher.untied else 0)) * tokens
    return flops


def make_plan(config: RunConfig, student: ModelShape, teacher: ModelShape, *, devices: int, device_memory_gib: float,
              strategy: str, micro_batch: int, bf16: bool, gpu: bool, flops_per_second: float) -> Plan:
    """Memory per device and time per step of one configuration."""
    tokens = micro_batch * config.data.max_length
    live_teacher = config.teacher.signal == "online" or config.method.name != "offpolicy" or config.hints.enabled
    loaded_teacher = config.teacher.cache is None and not config.teacher.api_base
    teacher_dtype_bytes = 2.0 if config.teacher.dtype == "bfloat16" else 4.0
    parts = model_states_bytes(student, strategy, devices)
    parts["activations"] = activation_bytes(student, tokens, bf16, checkpointing=False)
    parts["loss buffers"] = loss_bytes(student, teacher if live_teacher else None, tokens, config.loss.fused, config.loss.chunk_rows)
    if strategy == "ddp" and devices > 1:  # DDP's reducer all-reduces flat buckets holding a copy of every gradient
        parts["gradient buckets"] = 4.0 * student.trainable
    if strategy in ("fsdp", "fsdp-offload"):
        parts["sharding buffers"] = sharding_bytes(student, strategy, config.loss.fused)
    parts["teacher weights"] = teacher_dtype_bytes * teacher.params if loaded_teacher else 0.0
    if live_teacher:  # the teacher's forward keeps only its last hidden states at the target rows
        parts["teacher activations"] = tokens * (teacher.hidden + teacher.intermediate + teacher.hidden) * 4.0
    parts["runtime"] = CUDA_OVERHEAD_BYTES if gpu else CPU_OVERHEAD_BYTES
    total = sum(parts.values())
    checkpointed = total - parts["activations"] + activation_bytes(student, tokens, bf16, checkpointing=True)
    cache_phase = 0.0
    if config.teacher.signal == "topk" and loaded_teacher:  # kdlm writes the cache in this process first
        cache_phase = parts["runtime"] + parts["teacher weights"] + 2 * 4.0 * tokens * teacher.vocab
    global_tokens = tokens * config.train.grad_accum * devices
    flops = step_flops(student, teacher if live_teacher else None, global_tokens)
    seconds = flops / (flops_per_second * devices)
    build, gather = sharded_phases_bytes(student, strategy, devices, parts["runtime"])
    budget = device_memory_gib * GIB
    fits = max(total, cache_phase, build, gather) <= 0.9 * budget
    return Plan(strategy, devices, device_memory_gib, micro_batch, tokens, {k: v / GIB for k, v in parts.items()},
                total / GIB, cache_phase / GIB, checkpointed / GIB, seconds, flops, fits, build / GIB, gather / GIB)


def recommend(config: RunConfig, student: ModelShape, teacher: ModelShape, *, devices: int, device_memory_gib: float,
              bf16: bool, gpu: bool, flops_per_second: float) -> tuple[Plan, list[str]]:
    """The cheapest strategy that fits the config's micro-batch (or the smallest that fits at all), and advice."""
    def plan(strategy, batch):
        return make_plan(config, student, teacher, devices=devices, device_memory_gib=device_memory_gib,
                         strategy=strategy, micro_batch=batch, bf16=bf16, gpu=gpu, flops_per_second=flops_per_second)

    batch = config.train.batch_size
    candidates = ("ddp",) if devices == 1 else STRATEGIES
    chosen = next((p for p in (plan(s, batch) for s in candidates) if p.fits), None)
    notes = []
    if chosen is None:
        smallest = next((p for p in (plan(s, 1) for s in candidates) if p.fits), None)
        if smallest is None:
            fallback = plan(candidates[-1], 1)
            notes.append(f"does not fit in {device_memory_gib:g} GiB per device even at micro-batch 1 "
                         f"({fallback.total_gib:.1f} GiB with {fallback.strategy}): train a LoRA adapter (student.lora), "
                         "keep fewer layers, use more devices, or cache the teacher elsewhere (kdlm cache-teacher)")
            return fallback, notes
        largest = _largest_batch(lambda b: plan(smallest.strategy, b))
        notes.append(f"train.batch_size={batch} does not fit; use train.batch_size={largest} "
                     f"train.grad_accum={math.ceil(batch * config.train.grad_accum / largest)} (same sequences per step)")
        chosen = plan(smallest.strategy, largest)
    else:
        largest = _largest_batch(lambda b: plan(chosen.strategy, b))
        if largest > batch:
            notes.append(f"micro-batches up to {largest} fit (the config uses {batch}; a larger one trains faster per "
                         "token where the device is not yet saturated)")
    notes.insert(0, f"strategy: {chosen.strategy}" + ("" if devices > 1 else " (one device: no sharding)"))
    notes.append(_signal_note(config, teacher, chosen, device_memory_gib))
    return chosen, notes


def _largest_batch(plan_at, limit: int = 256) -> int:
    """The largest power-of-two micro-batch whose plan fits (1 if none does)."""
    best = 1
    while best * 2 <= limit and plan_at(best * 2).fits:
        best *= 2
    return best


def _signal_note(config: RunConfig, teacher: ModelShape, plan: Plan, device_memory_gib: float) -> str:
    if config.method.name != "offpolicy":
        return f"teacher signal: online (method.name={config.method.name} scores the student's own samples)"
    weights = (2.0 if config.teacher.dtype == "bfloat16" else 4.0) * teacher.params / GIB
    if weights > 0.5 * device_memory_gib:
        return (f"teacher signal: its weights ({weights:.1f} GiB) crowd the device: write a top-k cache once "
                "(`kdlm cache-teacher`, on a machine that holds the teacher, or from an API with teacher.api_base), "
                "then train with teacher.cache")
    return ("teacher signal: topk (cached once; the step never runs the teacher: "
            f"{2.0 * teacher.params * plan.tokens_per_micro_batch / 1e12:.2f} TFLOP less per micro-batch than online)")


def throughput(bf16: bool, gpu_name: str | None, mfu: float) -> tuple[float, str]:
    """FLOP/s of one device: the GPU's bf16 peak times MFU, or a matmul measured on this CPU (all threads)."""
    if gpu_name is not None:
        peak = next((tflops for key, tflops in GPU_PEAK_TFLOPS.items() if key.lower() in gpu_name.lower()), None)
        if peak is None:
            peak = 312.0
            gpu_name += " (unknown: A100's 312 TFLOP/s assumed)"
        return peak * 1e12 * mfu, f"{gpu_name}: {peak:g} TFLOP/s bf16 peak x MFU {mfu:g}"
    from kdlm.precision import cpu_model, probe_matmul_seconds

    fp32_s, bf16_s = probe_matmul_seconds(size=1024, repeats=3)
    seconds = bf16_s if bf16 else fp32_s
    rate = 2 * 1024**3 / seconds
    return rate * CPU_EFFICIENCY, (f"{cpu_model()}, {torch.get_num_threads()} threads: {rate / 1e9:.0f} GFLOP/s measured "
                                   f"({'bf16' if bf16 else 'fp32'} matmul), {CPU_EFFICIENCY:g} of it assumed in training")


def config_shapes(config: RunConfig) -> tuple[ModelShape, ModelShape]:
    """(student, teacher) shapes of a distill config."""
    teacher_config = read_config(config.teacher.model)
    teacher = shape_from_config(teacher_config)
    cfg = config.student
    trainable = "lora" if cfg.lora else ("no-embeddings" if cfg.freeze_embeddings else "all")
    lora_r = cfg.lora.r if cfg.lora else 16
    if cfg.init == "model":
        if not cfg.model:
            raise KdlmError("student.init=model needs student.model")
        return shape_from_config(read_config(cfg.model), trainable=trainable, lora_r=lora_r), teacher
    layers = len(cfg.layers) if isinstance(cfg.layers, list) else cfg.num_layers
    if cfg.init == "prune" and (cfg.width is not None or cfg.target_params is not None):
        from kdlm.models.width import Widths, planned_config

        widths = Widths(**(cfg.width.model_dump() if cfg.width else {}))
        student_config = planned_config(teacher_config, layers or teacher.layers, widths, cfg.target_params, teacher.params)
        return shape_from_config(student_config, trainable=trainable, lora_r=lora_r), teacher
    return shape_from_config(teacher_config, num_layers=layers, trainable=trainable, lora_r=lora_r), teacher


def run_plan(config: RunConfig, *, gpus: int = 0, gpu_memory: float = 80.0, gpu_name: str = "H100", mfu: float = DEFAULT_MFU,
             json_out: Path | None = None) -> dict:
    """`kdlm plan`: print the plan of a config on --gpus GPUs, or on this machine; returns it as a dict."""
    import psutil
    from rich.console import Console
    from rich.table import Table

    from kdlm.precision import resolve_precision

    student, teacher = config_shapes(config)
    if gpus > 0:
        devices, memory, name, gpu = gpus, gpu_memory, gpu_name, True
        bf16 = config.train.bf16 if isinstance(config.train.bf16, bool) else True
    elif torch.cuda.is_available():
        devices, gpu = torch.cuda.device_count(), True
        name = torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(0).total_memory / GIB
        bf16 = resolve_precision(config.train.bf16, "cuda").bf16
    else:
        devices, gpu, name = 1, False, None
        memory = psutil.virtual_memory().total / GIB
        bf16 = resolve_precision(config.train.bf16, "cpu").bf16
    rate, rate_note = throughput(bf16, name, mfu)
    best, notes = recommend(config, student, teacher, devices=devices, device_memory_gib=memory, bf16=bf16, gpu=gpu,
                            flops_per_second=rate)
    console = Console()
    where = f"{devices} x {name} ({memory:.0f} GiB each)" if gpu else f"this CPU ({memory:.0f} GiB of memory)"
    console.print(f"student {student.params / 1e6:,.1f} M parameters ({student.trainable / 1e6:,.1f} M trainable, "
                  f"{student.layers} layers); teacher {teacher.params / 1e6:,.1f} M; on {where}; "
                  f"{'bf16 autocast' if bf16 else 'fp32'}", highlight=False)
    table = Table(title=f"memory per device (at most): {best.strategy}, micro-batch {best.micro_batch} x "
                        f"{config.data.max_length} tokens (data.max_length)")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part, gib in best.parts_gib.items():
        table.add_row(part, f"{gib:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{best.total_gib:.2f}[/]")
    table.add_row("total with activation checkpointing", f"{best.checkpointed_total_gib:.2f}")
    if best.cache_phase_gib:
        table.add_row("teacher cache phase (before training)", f"{best.cache_phase_gib:.2f}")
    if best.build_phase_gib:
        table.add_row("building and sharding the student (before training)", f"{best.build_phase_gib:.2f}")
        table.add_row("gathering the trained student (end of training)", f"{best.gather_phase_gib:.2f}")
    console.print(table)
    console.print(f"time per optimizer step: at most {best.step_seconds:.3g} s ({best.flops_per_step / 1e12:.2f} TFLOP; {rate_note})",
                  highlight=False)
    for note in notes:
        console.print(f"- {note}", highlight=False)
    result = {**best.as_dict(), "notes": notes, "throughput": rate_note, "bf16": bf16,
              "student": asdict(student), "teacher": asdict(teacher)}
    if json_out is not None:
        import json

        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
    return result
