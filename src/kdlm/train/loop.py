"""The training loop: one readable function on Hugging Face Accelerate.

Objective per optimizer step (shared/METHODS.md §1):
    L = [(1 - w) * sum CE + w * sum D(teacher || student)] / (number of target tokens in the global batch)
Records with a `weight` (a recipe's task weight) multiply each of their target tokens' loss (CE, and the
divergence when a white-box teacher is used) by that weight; the denominator stays the number of target
tokens. Records with a `task` are averaged per task instead (kdlm.train.tasks: Distilling Step-by-Step's
sum of weighted per-task means).
The sums run over the micro-batches of the step on every process; the denominator is counted from
the schedule itself, so gradient accumulation and data parallelism give the same gradient as one big
batch. The teacher is frozen, in eval mode, without gradients; with `teacher.signal: topk` it does
not run at all.

A micro-batch's loss is ``LossStep`` (teacher target, then ``kdlm.train.objective.StudentObjective``), giving
``LossTerms``; ``StepSums`` adds them up over the step and makes the logged record. The optimizer setup,
resuming, checkpoints and logs are in ``kdlm.train.session``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from kdlm.config import HintConfig, LossConfig, TrainConfig
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.models.forward import _unwrap
from kdlm.precision import bf16_enabled
from kdlm.train.hints import HintObjective, use_eager_attention
from kdlm.train.interrupts import Terminated
from kdlm.train.objective import LossTerms, StudentObjective, run_teacher
from kdlm.train.order import run_schedule
from kdlm.train.session import Checkpointer, TrainLog, TrainSetup, settings_record, setup_training
from kdlm.train.strategy import accelerator_for, is_deepspeed, is_sharded, release_freed_memory, unshard_in_place
from kdlm.train.tasks import has_tasks, task_scaled
from kdlm.xtok.target import CrossTokenizer

__all__ = ["LossTerms", "StudentObjective", "TrainResult", "run_teacher", "train", "write_history"]


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)


@dataclass
class MicroBatch:
    """One process's micro-batch: its tensors on the device, its examples, and their indices in the data."""

    tensors: dict[str, Tensor]
    examples: list[dict]
    indices: list[int]


class LossStep:
    """``loss_step(batch) -> LossTerms``: the teacher target of a micro-batch, then the student's objective."""

    def __init__(self, objective: nn.Module, *, teacher: nn.Module | None, topk_targets: list | None, kd_weight: float,
                 vocab_size: int, bf16: bool | str, hints: HintObjective | None, cross_tokenizer: CrossTokenizer | None, method,
                 accelerator: Accelerator):
        self.objective, self.teacher, self.topk_targets = objective, teacher, topk_targets
        self.kd_weight, self.vocab_size, self.bf16, self.hints = kd_weight, vocab_size, bf16, hints
        self.cross_tokenizer, self.method_loss = cross_tokenizer, method.loss if method is not None else None
        self.device = accelerator.device
        self.use_bf16 = bf16_enabled(bf16, accelerator.device)

    def __call__(self, batch: MicroBatch) -> LossTerms:
        target, teacher_states = self.teacher_target(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            return self.objective(batch.tensors, target, self.kd_weight, teacher_states, self.method_loss)

    def teacher_target(self, batch: MicroBatch):
        """(teacher target, teacher states for the hint terms): cached, from the live teacher, or None."""
        use_kd, cached, cross = self.kd_weight > 0, self.topk_targets, self.cross_tokenizer
        if use_kd and cross is not None:  # the teacher reads its own tokens (kdlm.xtok)
            if cached is not None:
                return cross.cached_target([cached[i] for i in batch.indices], batch.examples, self.device), None
            return cross.teacher_target(self.teacher, batch.examples, self.device, bf16=self.bf16), None
        target, states = None, None
        if (use_kd and cached is None) or self.hints is not None:
            target, states = run_teacher(self.teacher, batch.tensors, self.vocab_size, bf16=self.bf16,
                                         online=use_kd and cached is None, hints=self.hints)
        if use_kd and cached is not None:  # (ids, logprobs) top-k or (ids, log_weights, logprobs) sampled
            target = tuple(torch.cat([cached[i][j] for i in batch.indices]).to(self.device) for j in range(len(cached[0])))
        return target, states


class StepSums:
    """The step's LossTerms summed over its micro-batches and processes, and the step's logged record."""

    def __init__(self):
        self.sums = torch.zeros(4)  # kd, ce, hint, tokens (this process)
        self.method: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.has = {"kd": True, "ce": True, "hint": True}

    def add(self, terms: LossTerms) -> None:
        parts = [terms.kd, terms.ce, terms.hint]
        for name, part in zip(("kd", "ce", "hint"), parts, strict=True):
            self.has[name] = part is not None
        zero = terms.count.new_zeros((), dtype=torch.float32)
        self.sums += torch.stack([(zero if t is None else t).detach().float().cpu() for t in (*parts, terms.count)])
        for name, value in terms.method.items():
            self.method[name] = self.method.get(name, 0.0) + value
        self.weights.update(terms.weights)

    def means(self, accelerator: Accelerator, kd_weight: float) -> tuple[dict[str, float], dict[str, float]]:
        """(every term's mean per target token of the step, every loss term's weight), summed over processes."""
        totals = accelerator.reduce(self.sums.to(accelerator.device), reduction="sum").cpu()
        kd, ce, hint = (totals[:3] / totals[3]).tolist()
        means = {name: value for name, value in (("ce", ce), ("kd", kd), ("hint", hint)) if self.has[name]}
        weights = {name: weight for name, weight in (("ce", 1 - kd_weight), ("kd", kd_weight), ("hint", 1.0))
                   if self.has[name]}
        if self.method:
            names = list(self.method)
            method = torch.tensor([self.method[name] for name in names], dtype=torch.float64)
            method = accelerator.reduce(method.to(accelerator.device), reduction="sum").cpu().tolist()
            means.update({name: value / max(totals[3].item(), 1) for name, value in zip(names, method, strict=True)})
            weights.update(self.weights)
        return means, weights


def step_record(step: int, means: dict[str, float], weights: dict[str, float], *, use_kd: bool, hints: bool,
                lr: float, grad_norm: float | None, counters: dict) -> dict:
    """The logged record of a step: ``loss`` is the weighted sum of the logged terms; kd, ce or hint where the run
    has no such term is NaN. ``counters``: tokens, throughput and time, logged after the learning rate."""
    loss = 0.0
    for name, weight in weights.items():
        loss += weight * means[name]
    nan = float("nan")
    record = {"step": step, "loss": loss, "kd": means.get("kd", nan) if use_kd else nan, "ce": means.get("ce", nan),
              "hint": means.get("hint", nan) if hints else nan, "lr": lr,
              "grad_norm": grad_norm if grad_norm is not None else nan, **counters}
    record.update({name: value for name, value in means.items() if name not in ("kd", "ce", "hint")})
    return record


def _num_targets(example: dict) -> int:
    return sum(1 for label in example["labels"][1:] if label != -100)


def train(
    student: nn.Module,
    examples: list[dict],
    *,
    train_config: TrainConfig,
    loss_config: LossConfig,
    pad_token_id: int,
    vocab_size: int,
    teacher: nn.Module | None = None,
    topk_targets: list[tuple[Tensor, ...]] | None = None,
    accelerator: Accelerator | None = None,
    run_state: dict | None = None,
    on_step: Callable[[int], None] | None = None,
    hint_config: HintConfig | None = None,
    method=None,
    run_config: dict | None = None,
    cross_tokenizer: CrossTokenizer | None = None,
) -> TrainResult:
    """Train `student` in place on tokenised `examples`; checkpoints go to `output_dir/checkpoints`.

    Args:
        student: the model to train (its trainable parameters are the ones with requires_grad).
        examples: tokenised examples with `input_ids` and `labels` lists.
        pad_token_id: used to pad micro-batches.
        vocab_size: the shared teacher/student vocabulary; logits beyond it are dropped.
        teacher: the online teacher, needed when kd_weight > 0 and no `topk_targets` are given.
        topk_targets: per example (ids, logprobs) top-k or (ids, log_weights, logprobs) sampled targets,
            from `kdlm.teachers.cache.read_targets`.
        run_state: extra JSON-serialisable facts stored in every checkpoint (e.g. kept layers).
        on_step: called with the step number after each optimizer step (tests use it to interrupt).
        hint_config: hidden-state / attention terms; they need the live ``teacher`` (also with top-k targets).
        method: an on-policy method (``kdlm.train.onpolicy``): it may replace a step's examples by generated
            ones (``prepare_step``), supply its own loss (``loss``, giving ``LossTerms`` with its own named terms)
            and log fields (``after_step``).
        run_config: the whole run's config (``RunConfig.model_dump(mode="json")``), recorded in every checkpoint;
            resuming under other settings is refused (``kdlm.train.checkpoint.MAY_CHANGE``). Default: the
            train, loss and hint settings.
        cross_tokenizer: the student's tokenizer differs from the teacher's (``loss.cross_tokenizer``): each example
            also carries the teacher's tokens and the alignment (``kdlm.xtok.data.encode_pairs``), and the
            teacher (or ``topk_targets``, in the teacher's tokens) is read at the aligned groups.

    Raises:
        KdlmError: on a non-finite loss (after saving the last good step) or a bad setup.
        KeyboardInterrupt: after saving a checkpoint of the last completed step (also on SIGTERM, as
            ``Terminated``, under ``kdlm.train.interrupts.sigterm_raises``).
    """
    config = train_config
    accelerator = accelerator or accelerator_for(config)
    run = prepare_run(student, examples, accelerator, config, loss_config, pad_token_id=pad_token_id,
                      vocab_size=vocab_size, teacher=teacher, topk_targets=topk_targets, run_state=run_state,
                      hint_config=hint_config, method=method, run_config=run_config, cross_tokenizer=cross_tokenizer)
    setup = run.setup
    step, tokens_seen, history = setup.start_step, setup.tokens_seen, []
    with TrainLog(accelerator, config, start_step=step, run_config=run_config) as log:
        checkpoints = Checkpointer(setup, accelerator, config, method=method, run_state=run_state)
        try:
            while step < config.max_steps:
                if config.max_minutes and checkpoints.seconds() > 60 * config.max_minutes:
                    accelerator.print(f"time budget of {config.max_minutes} min reached at step {step}")
                    break
                step_started = time.perf_counter()
                micro_batches, step_tokens = run.batches.of_step(step)
                means, weights = run.backward(micro_batches, step_tokens).means(accelerator, run.kd_weight)
                grad_norm = _optimizer_step(setup, accelerator, config, means, checkpoints, step, tokens_seen)
                step, tokens_seen = step + 1, tokens_seen + step_tokens
                counters = {"tokens": tokens_seen, "tokens_per_s": step_tokens / (time.perf_counter() - step_started),
                            "seconds": checkpoints.seconds()}
                record = step_record(step, means, weights, use_kd=run.use_kd, hints=run.hints is not None,
                                     lr=setup.scheduler.get_last_lr()[0], grad_norm=grad_norm, counters=counters)
                history.append(_with_method_fields(record, step, method, cross_tokenizer, setup.checkpointed))
                log.write(record)
                if (reason := checkpoints.due(step)) is not None:
                    checkpoints.save(reason, step, tokens_seen)
                if on_step is not None:
                    on_step(step)
        except KeyboardInterrupt as interrupt:
            _save_interrupted(interrupt, setup, checkpoints, accelerator, step, tokens_seen)
            raise
    _finish(student, setup, checkpoints, accelerator, step, tokens_seen)
    return TrainResult(steps=step, tokens=tokens_seen, seconds=checkpoints.seconds(), history=history)


@dataclass
class PreparedRun:
    """What the step loop drives: the optimizer setup, the loss of a micro-batch and each step's micro-batches."""

    setup: TrainSetup
    loss_step: LossStep
    batches: StepBatches
    hints: HintObjective | None
    use_kd: bool
    kd_weight: float
    accelerator: Accelerator
    deepspeed: bool
    loss_scale: float

    def backward(self, micro_batches: list[MicroBatch], step_tokens: int) -> StepSums:
        """Backward over the step's micro-batches (gradients synced at the last one); their summed terms."""
        accelerator, sums = self.accelerator, StepSums()
        for index, batch in enumerate(micro_batches):
            last_micro = index == len(micro_batches) - 1
            if self.deepspeed:  # DeepSpeed steps its optimizer at the backward it is told ends the step
                accelerator.gradient_state._set_sync_gradients(last_micro)
            with accelerator.no_sync(self.setup.objective) if not last_micro else nullcontext():
                terms = self.loss_step(batch)
                accelerator.backward(terms.total * (self.loss_scale / max(step_tokens, 1)))
            sums.add(terms)
        return sums


def prepare_run(student: nn.Module, examples: list[dict], accelerator: Accelerator, config: TrainConfig,
                loss_config: LossConfig, *, pad_token_id: int, vocab_size: int, teacher: nn.Module | None,
                topk_targets: list | None, run_state: dict | None, hint_config: HintConfig | None, method,
                run_config: dict | None, cross_tokenizer: CrossTokenizer | None) -> PreparedRun:
    """Check the inputs, build the objective, set up the optimizer (resuming), freeze the teacher and schedule
    the steps: everything ``train`` needs before its first step."""
    use_kd = loss_config.kd_weight > 0
    _check_inputs(examples, accelerator, config, use_kd=use_kd, teacher=teacher, topk_targets=topk_targets, method=method)
    hints = _hint_objective(hint_config, student, teacher, run_state)
    # The objective holds the student and the hint projections: both train, both go into checkpoints.
    objective = StudentObjective(student, loss_config, vocab_size, hints, cross_tokenizer)
    setup = setup_training(objective, accelerator, config, method=method,
                           settings=settings_record(run_config, config, loss_config, hint_config))
    if teacher is not None:  # frozen and never wrapped: every process holds a whole copy, no optimizer state
        teacher.eval().requires_grad_(False).to(accelerator.device)
        if is_sharded(accelerator) and bf16_enabled(config.bf16, accelerator.device):
            teacher.to(torch.bfloat16)  # sharded runs are the large ones: halve the replicated teacher
    student.train()
    kd_weight = loss_config.kd_weight if use_kd else 0.0
    loss_step = LossStep(setup.objective, teacher=teacher, topk_targets=topk_targets, kd_weight=kd_weight,
                         vocab_size=vocab_size, bf16=config.bf16, hints=hints, cross_tokenizer=cross_tokenizer,
                         method=method, accelerator=accelerator)
    batches = StepBatches(examples, accelerator, config, pad_token_id, method)
    # DDP and FSDP average gradients over processes; DeepSpeed also divides each micro-batch's by grad_accum
    deepspeed = is_deepspeed(accelerator)
    loss_scale = accelerator.num_processes * (config.grad_accum if deepspeed else 1)
    return PreparedRun(setup, loss_step, batches, hints, use_kd, kd_weight, accelerator, deepspeed, loss_scale)


def _save_interrupted(interrupt: KeyboardInterrupt, setup: TrainSetup, checkpoints: Checkpointer,
                      accelerator: Accelerator, step: int, tokens_seen: int) -> None:
    """Ctrl-C or SIGTERM: drop the partial step's gradients and save the last completed step."""
    setup.optimizer.zero_grad(set_to_none=True)
    checkpoints.save("terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted", step, tokens_seen)
    accelerator.print(f"interrupted at step {step}: continue with train.resume=true")


def _finish(student: nn.Module, setup: TrainSetup, checkpoints: Checkpointer, accelerator: Accelerator, step: int,
            tokens_seen: int) -> None:
    """The end-of-training checkpoint; a sharded student gathered back whole; the student in eval mode."""
    checkpoints.save("end of training", step, tokens_seen)
    if is_sharded(accelerator):  # the caller saves, evaluates and samples a plain student
        unshard_in_place(accelerator, setup.checkpointed, setup.objective)
    student.eval()


def _check_inputs(examples: list[dict], accelerator: Accelerator, config: TrainConfig, *, use_kd: bool, teacher,
                  topk_targets, method) -> None:
    """Refuse a setup the loop cannot train (a KdlmError naming the setting)."""
    if use_kd and teacher is None and topk_targets is None:
        raise KdlmError("kd_weight > 0 needs a teacher or cached teacher targets")
    if has_tasks(examples) and method is not None:
        raise KdlmError(f"records with a \"task\" (per-task means) train off-policy only, not with {type(method).__name__}: "
                        "drop the records' task field or set method.name=offpolicy")
    if method is not None and is_sharded(accelerator):
        raise KdlmError(f"{type(method).__name__} samples from the student between steps, which a sharded student "
                        "cannot do here: use train.strategy=ddp for on-policy methods")
    world, global_batch = accelerator.num_processes, config.batch_size * accelerator.num_processes
    if world > 1 and len(examples) < global_batch:
        raise KdlmError(f"{world} processes x train.batch_size={config.batch_size} need at least {global_batch} training "
                        f"examples, and there are {len(examples)}: launch fewer processes, lower train.batch_size or add data")


def _hint_objective(hint_config: HintConfig | None, student: nn.Module, teacher: nn.Module | None,
                    run_state: dict | None) -> HintObjective | None:
    """The hidden-state / attention terms of ``hints:`` (None when off); attention terms need eager attention."""
    if hint_config is None or not hint_config.enabled:
        return None
    if teacher is None:
        raise KdlmError("hint terms (hints.hidden_weight / hints.attention_weight) need the live teacher")
    kept = (run_state or {}).get("kept_layers")
    hints = HintObjective(hint_config, _unwrap(student).config, _unwrap(teacher).config, kept)
    if hints.needs_attention_probs:
        use_eager_attention(student)
        use_eager_attention(teacher)
    return hints


class StepBatches:
    """Each step's micro-batches for this process (run_schedule's order), and the step's target tokens."""

    def __init__(self, examples: list[dict], accelerator: Accelerator, config: TrainConfig, pad_token_id: int, method):
        self.examples, self.accelerator, self.config = examples, accelerator, config
        self.pad_token_id, self.method = pad_token_id, method
        self.per_task = has_tasks(examples)
        self.schedule = run_schedule(
            [len(example["input_ids"]) for example in examples],
            global_batch=config.batch_size * accelerator.num_processes,
            num_batches=config.max_steps * config.grad_accum,
            seed=config.seed,
            length_grouped=config.length_grouped,
        )

    def of_step(self, step: int) -> tuple[list[MicroBatch], int]:
        config, examples, accelerator = self.config, self.examples, self.accelerator
        rank, size = accelerator.process_index, config.batch_size
        micro_batches = self.schedule[step * config.grad_accum : (step + 1) * config.grad_accum]
        step_tokens = sum(_num_targets(examples[i]) for batch in micro_batches for i in batch)
        local_indices = [indices[rank * size : (rank + 1) * size] for indices in micro_batches]
        local_examples = [[examples[i] for i in local] for local in local_indices]
        if self.per_task:  # Distilling Step-by-Step: each task's mean over the step (kdlm.train.tasks)
            local_examples = task_scaled([examples[i] for b in micro_batches for i in b], local_examples, step_tokens)
        if self.method is not None:  # on-policy: responses may be replaced by generated ones
            local_examples = self.method.prepare_step(step, local_examples)
            count = torch.tensor(float(sum(_num_targets(e) for batch in local_examples for e in batch)))
            step_tokens = int(accelerator.reduce(count.to(accelerator.device), reduction="sum").item())
        return [MicroBatch({k: v.to(accelerator.device) for k, v in collate(batch, self.pad_token_id).items()}, batch, local)
                for batch, local in zip(local_examples, local_indices, strict=True)], step_tokens


def _optimizer_step(setup: TrainSetup, accelerator: Accelerator, config: TrainConfig, means: dict[str, float],
                    checkpoints: Checkpointer, step: int, tokens_seen: int) -> float | None:
    """Clip, step and zero the gradients; the gradient norm (None unclipped). A non-finite term saves the last
    good step and raises."""
    if not all(math.isfinite(value) for value in means.values()):
        setup.optimizer.zero_grad(set_to_none=True)
        checkpoints.save("last good step before a non-finite loss", step, tokens_seen)
        terms = ", ".join(f"{name} {value}" for name, value in means.items())
        raise KdlmError(f"non-finite loss at step {step + 1} ({terms}); the last good step is saved. Lower train.lr, "
                        "or set train.bf16=false, then resume with train.resume=true")
    grad_norm = None
    if config.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(setup.trainable, config.max_grad_norm)  # DeepSpeed: its own, a float
        grad_norm = float(grad_norm) if grad_norm is not None else None
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    release_freed_memory(accelerator)
    return grad_norm


def _with_method_fields(record: dict, step: int, method, cross_tokenizer: CrossTokenizer | None,
                        objective: StudentObjective) -> dict:
    """The record plus the method's own log fields and, for a hybrid cross-tokenizer run, the mapped mass."""
    if method is not None:
        record.update(method.after_step(step))
    if cross_tokenizer is not None and cross_tokenizer.mode == "hybrid":  # this process's groups
        stats, objective.cross_stats = objective.cross_stats, {}
        record["mapped_mass"] = stats.get("mapped_mass", 0.0) / max(stats.get("groups", 0), 1)
    return record


def write_history(history: list[dict], path: Path) -> None:
    path.write_text(json.dumps(history, indent=1))
