"""What a training run keeps around its steps: the optimizer and schedule, resuming, checkpoints and logs.

``kdlm.train.loop.train`` reads as the step loop; the setup it needs (``TrainSetup``), the checkpointing
(``Checkpointer``) and the log writers (``TrainLog``) live here.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
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
from torch import nn

from kdlm.config import HintConfig, LossConfig, TrainConfig, flatten
from kdlm.train.checkpoint import (
    config_record,
    load_checkpoint,
    load_sharded_checkpoint,
    prepare_output_dir,
    save_checkpoint,
    save_sharded_checkpoint,
)
from kdlm.train.strategy import check_student, is_fsdp, is_sharded, release_freed_memory, wrap_units
from kdlm.train.trackers import close_trackers, log_metrics, open_trackers, resolve_report_to


def lr_lambda(config: TrainConfig):
    """Linear warmup over train.warmup_steps, then a cosine to train.min_lr_ratio at train.max_steps."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainSetup:
    """The optimizer and its schedule over the objective's trainable parameters, and where a resumed run starts."""

    objective: nn.Module  # prepared by Accelerate (DDP-wrapped on several processes)
    checkpointed: nn.Module  # the unwrapped objective: the student and the hint projections
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    settings: dict  # the config record every checkpoint carries
    start_step: int = 0
    tokens_seen: int = 0
    seconds_before: float = 0.0


def setup_training(objective: nn.Module, accelerator: Accelerator, config: TrainConfig, *, method, settings: dict
                   ) -> TrainSetup:
    """AdamW and the warmup-cosine schedule; the last checkpoint of train.output_dir loaded when resuming."""
    output_dir = Path(config.output_dir)
    trainable = [param for param in objective.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    setup = TrainSetup(objective, objective, trainable, optimizer, scheduler, settings)
    last = prepare_output_dir(output_dir, settings, resume=config.resume, overwrite=config.overwrite,
                              clear=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    check_student(config.strategy, objective.student)
    sharded = is_sharded(accelerator)
    if sharded:  # FSDP / DeepSpeed: shard first, then load each process's shards (accelerator.load_state)
        wrap_units(accelerator, objective.student)
        setup.objective, setup.optimizer = accelerator.prepare(objective, optimizer)
        # fully_shard replaced the parameters by sharded ones; clipping needs exactly the prepared model's
        setup.trainable = list(setup.objective.parameters()) if is_fsdp(accelerator) else trainable
        release_freed_memory(accelerator)  # the whole student each process built before sharding it
    if last is not None:
        if sharded:
            state = load_sharded_checkpoint(last, accelerator=accelerator, scheduler=scheduler)
        else:
            state = load_checkpoint(last, model=objective, optimizer=optimizer, scheduler=scheduler)
        setup.start_step, setup.tokens_seen, setup.seconds_before = state["step"], state["tokens"], state["seconds"]
        if method is not None and "method_state" in state:  # generator, buffers, threshold: plain numbers and lists
            method.load_state_dict(state["method_state"])
        accelerator.print(f"resumed from {last} (step {setup.start_step})")
    elif config.resume:
        accelerator.print(f"warning: train.resume=true, but {output_dir / 'checkpoints'} holds no checkpoint: "
                          "training starts at step 1")
    if not sharded:
        setup.objective, setup.optimizer = accelerator.prepare(objective, optimizer)
    return setup


def settings_record(run_config: dict | None, config: TrainConfig, loss_config: LossConfig,
                    hint_config: HintConfig | None) -> dict:
    """The run's config as checkpoints record it: the whole run's, or else the train, loss and hint settings."""
    return config_record(run_config or {"train": config.model_dump(), "loss": loss_config.model_dump(),
                                        "hints": (hint_config or HintConfig()).model_dump()})


class Checkpointer:
    """Saves the step's state (model, optimizer, schedule, method, counters) to train.output_dir/checkpoints."""

    def __init__(self, setup: TrainSetup, accelerator: Accelerator, config: TrainConfig, *, method, run_state: dict | None):
        self.setup, self.accelerator, self.config = setup, accelerator, config
        self.method, self.run_state = method, run_state or {}
        self.folder = Path(config.output_dir) / "checkpoints"
        self.started = self.last_save = time.perf_counter()

    def seconds(self) -> float:
        """Training seconds so far, the runs before a resume included."""
        return self.setup.seconds_before + time.perf_counter() - self.started

    def save(self, reason: str, step: int, tokens_seen: int) -> None:
        setup = self.setup
        state = {"step": step, "tokens": tokens_seen, "seconds": self.seconds()}
        state.update(self.run_state)
        if self.method is not None:
            state["method_state"] = self.method.state_dict()
        if is_sharded(self.accelerator):  # every process writes its shards
            path = save_sharded_checkpoint(self.folder, accelerator=self.accelerator, scheduler=setup.scheduler,
                                           state=state, config=setup.settings)
            self.accelerator.print(f"checkpoint ({reason}): {path}")
        elif self.accelerator.is_main_process:
            path = save_checkpoint(self.folder, model=setup.checkpointed, optimizer=setup.optimizer,
                                   scheduler=setup.scheduler, state=state, config=setup.settings)
            self.accelerator.print(f"checkpoint ({reason}): {path}")
        self.accelerator.wait_for_everyone()
        self.last_save = time.perf_counter()

    def due(self, step: int) -> str | None:
        """Why a periodic checkpoint is due after this step, or None (every process gets the same answer)."""
        config, accelerator = self.config, self.accelerator
        if step >= config.max_steps:
            return None  # the end-of-training save follows
        if config.save_every and step % config.save_every == 0:
            return f"every {config.save_every} steps"
        if not config.save_every_minutes:
            return None
        due = torch.tensor(float(time.perf_counter() - self.last_save >= 60 * config.save_every_minutes))
        if accelerator.num_processes > 1:  # clocks differ between processes: save when any one of them says so
            due = accelerator.reduce(due.to(accelerator.device), reduction="sum").cpu()
        return f"every {config.save_every_minutes:g} min" if due.item() > 0 else None


class TrainLog:
    """train_log.csv, the trackers of train.report_to (kdlm.train.trackers) and the progress bar."""

    def __init__(self, accelerator: Accelerator, config: TrainConfig, *, start_step: int, run_config: dict | None):
        self.config, self.main = config, accelerator.is_main_process
        self.file, self.trackers = None, []
        if self.main:
            output_dir = Path(config.output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            self.file = output_dir / "train_log.csv"
            if start_step == 0 and self.file.exists():
                self.file.unlink()
            hparams = flatten(run_config) if run_config else None
            self.trackers = open_trackers(resolve_report_to(config.report_to), output_dir, output_dir.name, hparams)
        self.progress = Progress(
            TextColumn("[bold]train[/] {task.fields[info]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), disable=not self.main,
        )
        self.task = self.progress.add_task("train", total=config.max_steps, completed=start_step, info="")

    def __enter__(self) -> TrainLog:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.progress.__exit__(*exc)
        finally:
            close_trackers(self.trackers)

    def write(self, record: dict) -> None:
        """One step's record: to the CSV and trackers every train.log_every steps, to the progress bar always."""
        step = record["step"]
        if self.main and step % self.config.log_every == 0:
            new = not self.file.exists()
            with self.file.open("a", newline="") as handle:
                out = csv.DictWriter(handle, fieldnames=list(record))
                if new:
                    out.writeheader()
                out.writerow(record)
            log_metrics(self.trackers, record, step)
        info = f"loss {record['loss']:.3f} (kd {record['kd']:.3f} ce {record['ce']:.3f}) {record['tokens_per_s']:.0f} tok/s"
        self.progress.update(self.task, completed=step, info=info)
