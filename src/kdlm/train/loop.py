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
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

from kdlm.config import HintConfig, LossConfig, TrainConfig, flatten
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.losses import kd_loss_sums, sampled_kd_loss_sums, topk_kd_loss_sums
from kdlm.losses.fused import TeacherHidden, TeacherLogits, fused_kd_loss, sparse_target
from kdlm.models.forward import (
    _unwrap,
    decoder_outputs,
    lm_head_weight,
    logit_transform,
    plain_lm_head,
    project,
    target_mask,
)
from kdlm.precision import bf16_enabled
from kdlm.train.checkpoint import config_record, load_checkpoint, prepare_output_dir, save_checkpoint
from kdlm.train.hints import HintObjective, capture_projections, use_eager_attention
from kdlm.train.interrupts import Terminated
from kdlm.train.order import run_schedule
from kdlm.train.tasks import has_tasks, task_scaled
from kdlm.train.trackers import close_trackers, log_metrics, open_trackers, resolve_report_to
from kdlm.xtok.target import CrossTokenizer, CrossTokenizerTarget, cross_tokenizer_forward


class StudentObjective(nn.Module):
    """Wraps the student so that DDP sees the whole loss computation inside one forward.

    With ``loss.fused`` (and a plain lm_head) the loss runs from hidden states chunk by chunk and no
    (tokens, vocabulary) logits exist; otherwise the student's logits are projected, then the dense loss.
    """

    def __init__(self, student: nn.Module, loss: LossConfig, vocab_size: int, hints: HintObjective | None = None,
                 cross: CrossTokenizer | None = None):
        super().__init__()
        self.cross = cross  # teacher and student tokenizers differ (kdlm.xtok): its own loss path
        self.cross_stats: dict = {}
        self.student = student
        self.loss = loss
        self.vocab_size = vocab_size
        self.fused = loss.fused and plain_lm_head(student) is not None
        self.hints = hints

    def forward(self, batch: dict[str, Tensor], teacher_target, kd_weight: float, teacher_states: dict | None = None,
                method_loss: Callable | None = None):
        """(weighted objective sum, divergence sum, CE sum, hint sum, number of target tokens) for one micro-batch.

        ``teacher_target``: None (cross-entropy only), a (ids, logprobs) top-k pair, an (ids, log_weights,
        logprobs) sampled triple, dense teacher logits, or a ``TeacherHidden``. ``teacher_states``: the teacher's hidden states / attentions for the hint terms.
        ``method_loss``: a training method's own objective (MiniLLM), called here so that DDP sees it.
        """
        if method_loss is not None:
            return method_loss(self, batch, teacher_target)
        if isinstance(teacher_target, CrossTokenizerTarget):
            return cross_tokenizer_forward(self, batch, teacher_target, kd_weight)
        mask = target_mask(batch["labels"])
        target_ids = batch["labels"][:, 1:][mask]
        hint_sum = batch["input_ids"].new_zeros((), dtype=torch.float32)
        if self.hints is None:
            outputs = decoder_outputs(self.student, batch["input_ids"], batch["attention_mask"])
        else:
            hints = self.hints
            store, handles = capture_projections(self.student, [s for s, _ in hints.attention_pairs], hints.projection_names)
            try:
                outputs = decoder_outputs(self.student, batch["input_ids"], batch["attention_mask"],
                                          hidden_states=hints.needs_hidden, attentions=hints.needs_attention_probs)
            finally:
                for handle in handles:
                    handle.remove()
            if hints.needs_hidden:
                hint_sum = hints.config.hidden_weight * hints.hidden_sum(outputs.hidden_states, teacher_states["hidden_states"], mask)
            if hints.needs_attention:
                student_states = {"attentions": outputs.attentions, "projections": store, "attention_mask": batch["attention_mask"],
                                  "num_kv_heads": _num_kv_heads(self.student)}
                hint_sum = hint_sum + hints.config.attention_weight * hints.attention_sum(student_states, teacher_states, mask)
        hidden = outputs.last_hidden_state[:, :-1][mask]
        if "weights" in batch:  # per-example loss weights (records with "weight" or "task")
            token_weights = batch["weights"][:, None].expand(mask.shape)[mask]
            total, kd, ce, count = self._weighted_loss(hidden, target_ids, teacher_target, kd_weight, token_weights)
        else:
            total, kd, ce, count = self._logit_loss(hidden, target_ids, teacher_target, kd_weight)
        return total + hint_sum, kd, ce, hint_sum.detach(), count

    def _weighted_loss(self, hidden: Tensor, target_ids: Tensor, teacher_target, kd_weight: float, token_weights: Tensor):
        """``_logit_loss`` with each token's terms times its weight: one call per distinct weight (a step holds
        a few, one per task), so every loss path (dense, fused, top-k, sampled, online) is weighted alike."""
        sums = [hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
        for value in token_weights.unique().tolist():
            rows = (token_weights == value).nonzero().squeeze(-1)
            parts = self._logit_loss(hidden[rows], target_ids[rows], _rows_of(teacher_target, rows), kd_weight)[:3]
            sums = [total + value * part for total, part in zip(sums, parts, strict=True)]
        return (*sums, _count(target_ids))

    def _logit_loss(self, hidden: Tensor, target_ids: Tensor, teacher_target, kd_weight: float):
        options = {
            "divergence": self.loss.divergence,
            "temperature": self.loss.temperature,
            "scale_by_t2": self.loss.scale_by_t2,
            "beta": self.loss.beta,
            "alpha": self.loss.alpha,
            "lam": self.loss.lam,
            "akl_alpha": self.loss.akl_alpha,
        }
        count = _count(target_ids)
        if self.fused:
            if isinstance(teacher_target, tuple):
                teacher_target = sparse_target(*teacher_target)
            elif isinstance(teacher_target, Tensor):
                teacher_target = TeacherLogits(teacher_target)
            total, kd, ce, _ = fused_kd_loss(
                hidden, plain_lm_head(self.student)[: self.vocab_size], target_ids, teacher_target,
                kd_weight=kd_weight, ce_weight=1 - kd_weight, chunk_rows=self.loss.chunk_rows,
                student_transform=logit_transform(self.student), **options,
            )
            return total, kd, ce, count
        student_logits = project(self.student, hidden)[:, : self.vocab_size]
        if isinstance(teacher_target, TeacherHidden):  # dense path with a live teacher: its full logits
            teacher_target = teacher_target.transform(teacher_target.hidden @ teacher_target.weight.T)
        if teacher_target is None:  # plain fine-tuning (kd_weight 0): cross-entropy only
            ce = nn.functional.cross_entropy(student_logits.float(), target_ids, reduction="sum")
            return ce, ce.new_zeros(()), ce, count
        if isinstance(teacher_target, tuple):
            sparse_loss = topk_kd_loss_sums if len(teacher_target) == 2 else sampled_kd_loss_sums
            kd, ce, _ = sparse_loss(student_logits, *teacher_target, target_ids, **options)
        else:
            kd, ce, _ = kd_loss_sums(student_logits, teacher_target, target_ids, **options)
        return (1 - kd_weight) * ce + kd_weight * kd, kd, ce, count


def _rows_of(teacher_target, rows: Tensor):
    """The teacher target restricted to some target rows (None, a cached tuple, dense logits or hidden states)."""
    if teacher_target is None:
        return None
    if isinstance(teacher_target, tuple):
        return tuple(tensor[rows] for tensor in teacher_target)
    if isinstance(teacher_target, TeacherHidden):
        return TeacherHidden(teacher_target.hidden[rows], teacher_target.weight, teacher_target.transform)
    return teacher_target[rows]


def _count(target_ids: Tensor) -> Tensor:
    """The number of target tokens, as a tensor on their device (summed across processes later)."""
    return torch.tensor(target_ids.numel(), device=target_ids.device)


def _num_kv_heads(model) -> int:
    config = _unwrap(model).config
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def run_teacher(teacher: nn.Module, batch: dict[str, Tensor], vocab_size: int, *, bf16: bool, online: bool,
                hints: HintObjective | None) -> tuple[TeacherHidden | None, dict | None]:
    """One teacher forward (no gradients): the online logit target and/or the states the hint terms need."""
    device = batch["input_ids"].device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_enabled(bf16, device)):
        store, handles = capture_projections(teacher, [t for _, t in hints.attention_pairs], hints.projection_names) if hints else ({}, [])
        try:
            outputs = decoder_outputs(teacher, batch["input_ids"], batch["attention_mask"],
                                      hidden_states=bool(hints and hints.needs_hidden),
                                      attentions=bool(hints and hints.needs_attention_probs))
        finally:
            for handle in handles:
                handle.remove()
    target = None
    if online:
        hidden = outputs.last_hidden_state[:, :-1][target_mask(batch["labels"])]
        target = TeacherHidden(hidden, lm_head_weight(teacher)[:vocab_size].detach(), logit_transform(teacher))
    states = None
    if hints is not None:
        states = {"hidden_states": outputs.hidden_states, "attentions": outputs.attentions, "projections": store,
                  "attention_mask": batch["attention_mask"], "num_kv_heads": _num_kv_heads(teacher)}
    return target, states


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def _lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


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
            ones (``prepare_step``), supply its own loss (``loss``) and log fields (``after_step``).
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
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    use_kd = loss_config.kd_weight > 0
    if use_kd and teacher is None and topk_targets is None:
        raise KdlmError("kd_weight > 0 needs a teacher or cached teacher targets")
    output_dir = Path(config.output_dir)
    checkpoints = output_dir / "checkpoints"
    per_task = has_tasks(examples)
    if per_task and method is not None:
        raise KdlmError(f"records with a \"task\" (per-task means) train off-policy only, not with {type(method).__name__}: "
                        "drop the records' task field or set method.name=offpolicy")

    hints = None
    if hint_config is not None and hint_config.enabled:
        if teacher is None:
            raise KdlmError("hint terms (hints.hidden_weight / hints.attention_weight) need the live teacher")
        kept = (run_state or {}).get("kept_layers")
        hints = HintObjective(hint_config, _unwrap(student).config, _unwrap(teacher).config, kept)
        if hints.needs_attention_probs:
            use_eager_attention(student)
            use_eager_attention(teacher)
    # The objective holds the student and the hint projections: both train, both go into checkpoints.
    objective = StudentObjective(student, loss_config, vocab_size, hints, cross_tokenizer)
    trainable = [param for param in objective.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    checkpointed = objective
    start_step, tokens_seen, seconds_before = 0, 0, 0.0
    settings = config_record(run_config or {"train": config.model_dump(), "loss": loss_config.model_dump(),
                                          "hints": (hint_config or HintConfig()).model_dump()})
    last = prepare_output_dir(output_dir, settings, resume=config.resume, overwrite=config.overwrite,
                              clear=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if last is not None:
        state = load_checkpoint(last, model=checkpointed, optimizer=optimizer, scheduler=scheduler)
        start_step, tokens_seen, seconds_before = state["step"], state["tokens"], state["seconds"]
        if method is not None and "method_state" in state:  # generator, buffers, threshold: plain numbers and lists
            method.load_state_dict(state["method_state"])
        accelerator.print(f"resumed from {last} (step {start_step})")
    elif config.resume:
        accelerator.print(f"warning: train.resume=true, but {checkpoints} holds no checkpoint: training starts at step 1")
    objective, optimizer = accelerator.prepare(objective, optimizer)
    if teacher is not None:
        teacher.eval().requires_grad_(False).to(accelerator.device)
    student.train()

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config.batch_size * world
    if world > 1 and len(examples) < global_batch:
        raise KdlmError(f"{world} processes x train.batch_size={config.batch_size} need at least {global_batch} training "
                        f"examples, and there are {len(examples)}: launch fewer processes, lower train.batch_size or add data")
    schedule = run_schedule(
        [len(example["input_ids"]) for example in examples],
        global_batch=global_batch,
        num_batches=config.max_steps * config.grad_accum,
        seed=config.seed,
        length_grouped=config.length_grouped,
    )
    device_type = accelerator.device.type
    use_bf16 = bf16_enabled(config.bf16, accelerator.device)
    history: list[dict] = []
    log_file, trackers = _open_logs(output_dir, accelerator, resumed=start_step > 0, report_to=config.report_to,
                                    run_config=run_config)
    step = start_step
    started = last_save = time.perf_counter()

    def save(reason: str) -> None:
        nonlocal last_save
        state = {"step": step, "tokens": tokens_seen, "seconds": seconds_before + time.perf_counter() - started}
        state.update(run_state or {})
        if method is not None:
            state["method_state"] = method.state_dict()
        if accelerator.is_main_process:
            path = save_checkpoint(checkpoints, model=checkpointed, optimizer=optimizer, scheduler=scheduler,
                                   state=state, config=settings)
            accelerator.print(f"checkpoint ({reason}): {path}")
        accelerator.wait_for_everyone()
        last_save = time.perf_counter()

    def save_due() -> str | None:
        """Why a periodic checkpoint is due after this step, or None (every process gets the same answer)."""
        if step >= config.max_steps:
            return None  # the end-of-training save follows
        if config.save_every and step % config.save_every == 0:
            return f"every {config.save_every} steps"
        if not config.save_every_minutes:
            return None
        due = torch.tensor(float(time.perf_counter() - last_save >= 60 * config.save_every_minutes))
        if world > 1:  # clocks differ between processes: save when any one of them says so
            due = accelerator.reduce(due.to(accelerator.device), reduction="sum").cpu()
        return f"every {config.save_every_minutes:g} min" if due.item() > 0 else None

    progress = Progress(
        TextColumn("[bold]train[/] {task.fields[info]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
    )
    kd_weight = loss_config.kd_weight if use_kd else 0.0
    try:
        with progress:
            task = progress.add_task("train", total=config.max_steps, completed=start_step, info="")
            while step < config.max_steps:
                if config.max_minutes and (time.perf_counter() - started + seconds_before) > 60 * config.max_minutes:
                    accelerator.print(f"time budget of {config.max_minutes} min reached at step {step}")
                    break
                step_started = time.perf_counter()
                micro_batches = schedule[step * config.grad_accum : (step + 1) * config.grad_accum]
                step_tokens = sum(_num_targets(examples[i]) for batch in micro_batches for i in batch)
                local_indices = [indices[rank * config.batch_size : (rank + 1) * config.batch_size] for indices in micro_batches]
                local_examples = [[examples[i] for i in local] for local in local_indices]
                if per_task:  # Distilling Step-by-Step: each task's mean over the step (kdlm.train.tasks)
                    local_examples = task_scaled([examples[i] for b in micro_batches for i in b], local_examples, step_tokens)
                if method is not None:  # on-policy: responses may be replaced by generated ones
                    local_examples = method.prepare_step(step, local_examples)
                    count = torch.tensor(float(sum(_num_targets(e) for batch in local_examples for e in batch)))
                    step_tokens = int(accelerator.reduce(count.to(accelerator.device), reduction="sum").item())
                sums = torch.zeros(4)  # kd, ce, hint, tokens (this process)
                for index, local in enumerate(local_indices):
                    batch = {k: v.to(accelerator.device) for k, v in collate(local_examples[index], pad_token_id).items()}
                    target, teacher_states = None, None
                    online = use_kd and topk_targets is None
                    if use_kd and cross_tokenizer is not None:  # the teacher reads its own tokens (kdlm.xtok)
                        target = (cross_tokenizer.cached_target([topk_targets[i] for i in local], local_examples[index],
                                                                accelerator.device) if topk_targets is not None else
                                  cross_tokenizer.teacher_target(teacher, local_examples[index], accelerator.device,
                                                                 bf16=config.bf16))
                    elif online or hints is not None:
                        target, teacher_states = run_teacher(teacher, batch, vocab_size, bf16=config.bf16, online=online, hints=hints)
                    if use_kd and topk_targets is not None and cross_tokenizer is None:
                        target = tuple(  # (ids, logprobs) top-k or (ids, log_weights, logprobs) sampled
                            torch.cat([topk_targets[i][j] for i in local]).to(accelerator.device)
                            for j in range(len(topk_targets[0]))
                        )
                    last_micro = index == len(micro_batches) - 1
                    with accelerator.no_sync(objective) if not last_micro else nullcontext():
                        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
                            total, kd, ce, hint, count = objective(batch, target, kd_weight, teacher_states,
                                                                   method.loss if method is not None else None)
                        loss = total * (world / max(step_tokens, 1))
                        accelerator.backward(loss)
                    sums += torch.stack([t.detach().float().cpu() for t in (kd, ce, hint, count)])
                totals = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
                kd_mean, ce_mean, hint_mean = (totals[:3] / totals[3]).tolist()
                if not all(math.isfinite(value) for value in (kd_mean, ce_mean, hint_mean)):
                    optimizer.zero_grad(set_to_none=True)
                    save("last good step before a non-finite loss")
                    raise KdlmError(
                        f"non-finite loss at step {step + 1} (kd {kd_mean}, ce {ce_mean}, hint {hint_mean}); the last good step is "
                        "saved. Lower train.lr, or set train.bf16=false, then resume with train.resume=true"
                    )
                grad_norm = None
                if config.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm).item()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += step_tokens
                step_seconds = time.perf_counter() - step_started
                record = {
                    "step": step,
                    "loss": (1 - kd_weight) * ce_mean + kd_weight * kd_mean + hint_mean,
                    "kd": kd_mean if use_kd else float("nan"),
                    "ce": ce_mean,
                    "hint": hint_mean if hints is not None else float("nan"),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                    "tokens": tokens_seen,
                    "tokens_per_s": step_tokens / step_seconds,
                    "seconds": seconds_before + time.perf_counter() - started,
                }
                if method is not None:
                    record.update(method.after_step(step))
                if cross_tokenizer is not None and cross_tokenizer.mode == "hybrid":  # this process's groups
                    stats, checkpointed.cross_stats = checkpointed.cross_stats, {}
                    record["mapped_mass"] = stats.get("mapped_mass", 0.0) / max(stats.get("groups", 0), 1)
                history.append(record)
                if accelerator.is_main_process and step % config.log_every == 0:
                    _log(record, log_file, trackers)
                info = f"loss {record['loss']:.3f} (kd {kd_mean:.3f} ce {ce_mean:.3f}) {record['tokens_per_s']:.0f} tok/s"
                progress.update(task, completed=step, info=info)
                if (reason := save_due()) is not None:
                    save(reason)
                if on_step is not None:
                    on_step(step)
    except KeyboardInterrupt as interrupt:
        optimizer.zero_grad(set_to_none=True)
        save("terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted")
        accelerator.print(f"interrupted at step {step}: continue with train.resume=true")
        raise
    finally:
        close_trackers(trackers)
    save("end of training")
    seconds = seconds_before + time.perf_counter() - started
    student.eval()
    return TrainResult(steps=step, tokens=tokens_seen, seconds=seconds, history=history)


def _open_logs(output_dir: Path, accelerator: Accelerator, resumed: bool, report_to, run_config: dict | None):
    """train_log.csv (always) and the trackers of train.report_to (kdlm.train.trackers), on the main process."""
    if not accelerator.is_main_process:
        return None, []
    output_dir.mkdir(parents=True, exist_ok=True)
    log_file = output_dir / "train_log.csv"
    if not resumed and log_file.exists():
        log_file.unlink()
    hparams = flatten(run_config) if run_config else None
    return log_file, open_trackers(resolve_report_to(report_to), output_dir, output_dir.name, hparams)


def _log(record: dict, log_file: Path, trackers: list) -> None:
    new = not log_file.exists()
    with log_file.open("a", newline="") as handle:
        out = csv.DictWriter(handle, fieldnames=list(record))
        if new:
            out.writeheader()
        out.writerow(record)
    log_metrics(trackers, record, record["step"])


def write_history(history: list[dict], path: Path) -> None:
    path.write_text(json.dumps(history, indent=1))
