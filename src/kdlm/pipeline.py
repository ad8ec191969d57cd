"""`kdlm distill`: data, student, teacher signal, training and the before/after table, in one run.

Each stage reuses what an earlier run left on disk (teacher answers, the teacher cache, checkpoints),
so a rerun or `train.resume=true` after a crash repeats no paid work.

With `teacher.cache` set, `distill` trains from a cache written by `kdlm cache-teacher` and never loads
the teacher's weights: the tokenizer is read alone, teacher answers must already be cached, and the
student is loaded (`student.init: model`, e.g. the folder `kdlm build-student` writes), since pruning
needs the teacher's weights. Only the closing evaluation table loads the teacher, after training and
only when `eval.enabled`.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console

from kdlm.config import RunConfig, dump_config
from kdlm.data import encode_records, load_records, split_heldout
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError, require_extra
from kdlm.evaluate.report import evaluate_models, write_model_card, write_report
from kdlm.generate.teacher_answers import answer_prompts
from kdlm.hub import push_folder
from kdlm.losses.logits import check_sampled_settings
from kdlm.models import (
    Widths,
    apply_lora,
    block_influence,
    build_pruned_student,
    build_random_student,
    build_width_pruned_student,
    check_prunable,
    check_vocab_compatible,
    default_device,
    describe_model,
    load_model,
    load_tokenizer,
    save_student,
    select_layers,
    target_parameter_count,
)
from kdlm.models.student_tokenizer import (
    init_embeddings_from_teacher,
    load_user_tokenizer,
    record_texts,
    resize_to_tokenizer,
    train_bpe_tokenizer,
)
from kdlm.precision import bf16_enabled, resolve_precision
from kdlm.teachers.cache import (
    IDENTITY_KEYS,
    cache_identity,
    check_cache,
    read_manifest,
    read_targets,
    write_cache,
)
from kdlm.train.checkpoint import config_record, prepare_output_dir
from kdlm.train.loop import TrainResult, train, write_history
from kdlm.train.methods import build_method, check_method_loss
from kdlm.train.rollouts import check_rollout_backend
from kdlm.train.strategy import accelerator_for
from kdlm.train.trackers import resolve_report_to
from kdlm.xtok.onpolicy import CrossTokenizerSamples
from kdlm.xtok.run import check_cross_settings, load_student_tokenizer, prepare_cross_data, teacher_view
from kdlm.xtok.target import CrossTokenizer

console = Console()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_seed(config: RunConfig) -> int:
    """The seed of everything data: held-out split, teacher answers, sampled cache targets."""
    return config.data.seed if config.data.seed is not None else config.train.seed


def prepare_data(config: RunConfig, teacher, tokenizer) -> tuple[list[dict], list[dict]]:
    """Load records, hold out a split by prompt, let the teacher answer prompts; returns tokenised (train, heldout)."""
    train_records, heldout_records = prepare_records(config, teacher, tokenizer)
    train_examples = encode_records(tokenizer, train_records, max_length=config.data.max_length)
    heldout_examples = encode_records(tokenizer, heldout_records, max_length=config.data.max_length) if heldout_records else []
    return train_examples, heldout_examples


def prepare_records(config: RunConfig, teacher, tokenizer) -> tuple[list[dict], list[dict]]:
    """The (train, heldout) records, with the teacher's answers when ``data.teacher_answers``."""
    records = load_records(config.data.train)
    train_records, heldout_records = split_heldout(records, config.data.heldout, seed=data_seed(config))
    if config.data.teacher_answers:
        kwargs = {
            "teacher_name": config.teacher.model,
            "max_new_tokens": config.data.answer_max_new_tokens,
            "temperature": config.data.answer_temperature,
            "top_p": config.data.answer_top_p,
            "seed": data_seed(config),
            "bf16": config.train.bf16,
        }
        train_records = _with_answers(teacher, tokenizer, train_records, config.data.samples_per_prompt, kwargs)
        heldout_records = _with_answers(teacher, tokenizer, heldout_records, 1, kwargs)
    return train_records, heldout_records


def _with_answers(teacher, tokenizer, records: list[dict], samples: int, kwargs: dict) -> list[dict]:
    """Chat records get the teacher's answers (replacing any given response); text records pass through."""
    chats = [r for r in records if "messages" in r]
    texts = [r for r in records if "messages" not in r]
    answered = answer_prompts(teacher, tokenizer, chats, samples_per_prompt=samples, **kwargs) if chats else []
    return answered + texts


def build_student(
    config: RunConfig, teacher, tokenizer, train_examples: list[dict], kept_layers: list[int] | None,
    teacher_vocab_size: int | None = None, cross: bool = False,
):
    """The student before training, and the teacher layers it keeps (for pruned students).

    `teacher` may be None when `student.init` is `model`; `teacher_vocab_size` then stands for its config.
    """
    cfg = config.student
    if cfg.init == "model":
        if not cfg.model:
            raise KdlmError("student.init=model needs student.model (a folder, .gguf file or hub id)")
        student, student_tokenizer = load_model(cfg.model, device=teacher.device if teacher is not None else None)
    else:
        _check_built_from_teacher(config, teacher)
        student_tokenizer = tokenizer
        student, kept_layers = student_from_teacher(config, teacher, tokenizer, train_examples, kept_layers)
    teacher_vocab_size = teacher.config.vocab_size if teacher is not None else teacher_vocab_size
    if cross:  # loss.cross_tokenizer: the student keeps its own vocabulary (kdlm.xtok)
        vocab_size = student.config.vocab_size
    else:
        vocab_size = check_vocab_compatible(tokenizer, student_tokenizer, teacher_vocab_size, student.config.vocab_size)
    if cfg.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    if cfg.lora is not None:
        student = apply_lora(student, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules)
    return student, kept_layers, vocab_size


def _check_built_from_teacher(config: RunConfig, teacher) -> None:
    """Refuse a student.init=prune/random build that this run cannot do (no teacher weights, another tokenizer)."""
    cfg = config.student
    if teacher is None:
        raise KdlmError(
            f"student.init={cfg.init} builds the student from the teacher's weights, which a run from teacher.cache "
            "does not load. Build it once with `kdlm build-student CONFIG`, then train with student.init=model "
            "student.model=<train.output_dir>/student-init"
        )
    if cfg.tokenizer:
        raise KdlmError(
            f"student.tokenizer={cfg.tokenizer} gives the student another vocabulary: build it once with "
            "`kdlm build-student CONFIG`, then train it across tokenizers with student.init=model "
            "student.model=<train.output_dir>/student-init loss.cross_tokenizer=hybrid (or uld)"
        )
    width_pruning = cfg.width is not None or cfg.target_params is not None
    if width_pruning and cfg.init != "prune":
        raise KdlmError(f"student.width and student.target_params need student.init=prune, not {cfg.init}.")


def student_from_teacher(config: RunConfig, teacher, tokenizer, train_examples: list[dict],
                         kept_layers: list[int] | None):
    """(student, kept layers) of student.init random or prune: depth pruning by the kept layers, then width."""
    cfg = config.student
    num_teacher_layers = teacher.config.num_hidden_layers
    width_pruning = cfg.width is not None or cfg.target_params is not None
    if width_pruning:
        check_prunable(teacher)  # before any calibration pass: a family it cannot prune fails at once
    num_layers = cfg.num_layers or (num_teacher_layers if width_pruning else max(1, num_teacher_layers // 2))
    if cfg.init == "random":
        torch.manual_seed(config.train.seed)
        return build_random_student(teacher.config, num_hidden_layers=num_layers), kept_layers
    batch = None
    if cfg.layers == "influence" or width_pruning:
        if not train_examples:
            raise KdlmError("student.init=prune needs calibration text (data.train) for layer influence and width importance.")
        batch = collate(train_examples[: cfg.calibration_samples], tokenizer.pad_token_id)
    if kept_layers is None:
        influence = None
        if cfg.layers == "influence":
            influence = block_influence(teacher, batch["input_ids"].to(teacher.device),
                                        batch["attention_mask"].to(teacher.device))
        kept_layers = select_layers(
            num_teacher_layers, num_layers, cfg.layers, influence=influence, keep_first_last=cfg.keep_first_last
        )
    student = build_pruned_student(teacher, kept_layers)
    if width_pruning:
        target = None
        if cfg.target_params is not None:
            target = target_parameter_count(cfg.target_params, describe_model(teacher)["parameters"])
        widths = Widths(**(cfg.width.model_dump() if cfg.width else {}))
        student = build_width_pruned_student(student, batch["input_ids"], batch["attention_mask"], widths, target)
    return student, kept_layers


def teacher_cache_folder(config: RunConfig) -> Path:
    """`teacher.cache`, or the run's own cache under train.output_dir."""
    return Path(config.teacher.cache) if config.teacher.cache else Path(config.train.output_dir) / "teacher_cache"


def teacher_cache_identity(config: RunConfig, tokenizer, vocab_size: int, train_examples: list[dict]) -> dict:
    """What a teacher cache for this config and these tokenised examples must have been made with."""
    teacher = config.teacher
    return cache_identity(
        kind=teacher.cache_kind, teacher=teacher.model, tokenizer=tokenizer, vocab_size=vocab_size,
        examples=train_examples, top_k=teacher.top_k, samples=teacher.samples, seed=data_seed(config),
        bf16=bf16_enabled(config.train.bf16),  # resolved: a cache records the precision it was computed in
    )


def _check_cache_exists(config: RunConfig) -> None:
    """`teacher.cache` must name a cache before anything loads: a typo in the path is the likely mistake."""
    folder = config.teacher.cache
    if folder and read_manifest(Path(folder)) is None:
        where = "the folder does not exist" if not Path(folder).exists() else "the folder holds no manifest.json"
        raise KdlmError(
            f"teacher.cache={folder}: there is no teacher cache there ({where}). Write one with "
            f"`kdlm cache-teacher CONFIG teacher.cache={folder}` (same teacher, data and top_k settings as this run), "
            "or unset teacher.cache to run the teacher during training"
        )


def _check_signal(config: RunConfig) -> None:
    teacher = config.teacher
    check_cross_settings(config)
    check_method_loss(config.method, config.loss)  # before any model is loaded
    if config.method.name != "offpolicy" and (teacher.signal != "online" or teacher.cache):
        raise KdlmError(
            f"method.name={config.method.name} scores the student's own samples, which needs the live teacher at every "
            "step: set teacher.signal=online (and leave teacher.cache unset)"
        )
    if teacher.cache and teacher.signal == "online":
        raise KdlmError("teacher.cache holds cached targets, but teacher.signal=online; set teacher.signal=topk")
    if teacher.api_base and not teacher.cache:
        raise KdlmError(
            "teacher.api_base: fill a cache from the server first with `kdlm cache-teacher CONFIG teacher.cache=FOLDER`, "
            "then train from it with teacher.cache=FOLDER (the served teacher is not queried during training)"
        )
    if teacher.cache and config.hints.enabled:
        raise KdlmError(
            "hint losses (hints.hidden_weight, hints.attention_weight) need the teacher's hidden states at every "
            "step, but teacher.cache trains without loading the teacher; drop teacher.cache or set the hint weights to 0"
        )
    if teacher.signal == "topk" and teacher.cache_kind == "sampled" and config.loss.kd_weight > 0:
        problem = check_sampled_settings(config.loss.divergence, config.loss.temperature)
        if problem:
            raise KdlmError(f"teacher.cache_kind=sampled: {problem} (loss.divergence, loss.temperature)")


def check_teacher_fits(config: RunConfig, device: torch.device) -> None:
    """Refuse, before loading it, a teacher whose weights alone exceed the memory the device has free."""
    import psutil

    from kdlm.plan import read_config, shape_from_config

    try:
        params = shape_from_config(read_config(config.teacher.model)).params
    except Exception:  # noqa: BLE001 - a config we cannot read here is load_model's to report, with its own message
        return
    need = params * (2 if config.teacher.dtype == "bfloat16" else 4)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if need > 0.95 * free:
        raise KdlmError(
            f"the teacher {config.teacher.model} needs {need / 2**30:.1f} GiB for its weights in {config.teacher.dtype}, "
            f"and the {device.type} device has {free / 2**30:.1f} GiB free: set teacher.dtype=bfloat16, write its top-k "
            "cache on a machine that holds it (kdlm cache-teacher) and train with teacher.cache, or serve it and use "
            "teacher.api_base (`kdlm plan CONFIG` shows what fits where)"
        )


def with_precision(config: RunConfig, device: torch.device | str | None = None) -> RunConfig:
    """A copy of ``config`` whose ``train.bf16`` is a resolved bool (``auto`` asks the hardware); says which and why."""
    precision = resolve_precision(config.train.bf16, device)
    console.print(precision.describe(), highlight=False)
    return config.model_copy(update={"train": config.train.model_copy(update={"bf16": precision.bf16})})


@dataclass
class DistillRun:
    """What the phases of `distill` hand on to each other (one run, filled in phase by phase)."""

    config: RunConfig
    accelerator: Accelerator
    output_dir: Path
    run_config: dict  # config.model_dump(mode="json") before precision is resolved: recorded in checkpoints
    timings: dict[str, float] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # the teacher's
    teacher: torch.nn.Module | None = None
    tokenizer: object = None  # the teacher's
    student_tokenizer: object = None
    train_examples: list[dict] = field(default_factory=list)
    heldout_examples: list[dict] = field(default_factory=list)
    teacher_examples: list[dict] = field(default_factory=list)  # train_examples in the teacher's tokens
    manifest: dict | None = None  # the teacher cache's
    student: torch.nn.Module | None = None
    kept_layers: list[int] | None = None
    vocab_size: int = 0
    evaluate: bool = False
    rows_before: list[dict] = field(default_factory=list)
    method: object = None
    topk_targets: list | None = None

    @property
    def use_kd(self) -> bool:
        return self.config.loss.kd_weight > 0

    @property
    def from_cache(self) -> bool:  # train without ever loading the teacher's weights
        return self.config.teacher.cache is not None

    @property
    def cross(self) -> bool:  # the student has its own tokenizer (kdlm.xtok)
        return self.config.loss.cross_tokenizer != "off"


def distill(config: RunConfig, on_step: Callable[[int, torch.nn.Module], None] | None = None) -> dict:
    """Run the whole job; returns the report (also written to output_dir/report.json and report.md).

    Args:
        on_step: called after each optimizer step with (step, student), e.g. to evaluate along the way
            (kdlm bench); it must leave the student in train mode.
    """
    run = start_run(config)
    load_teacher_and_data(run)
    build_student_phase(run)
    evaluate_before(run)
    run.method = build_training_method(run)
    teacher_signal(run)
    result = train_phase(run, on_step)
    report = save_and_evaluate(run, result)
    if run.config.train.push_to_hub and run.accelerator.is_main_process:  # last: a failed push loses nothing
        console.print(f"pushed the student to {push_folder(run.output_dir / 'student', run.config.train.push_to_hub)}")
    return report


def start_run(config: RunConfig) -> DistillRun:
    """Check the settings, seed, and claim the output folder (config.yaml written); nothing is loaded yet."""
    _check_signal(config)
    _check_cache_exists(config)
    check_rollout_backend(config.method)  # vllm missing or no GPU: refused before anything loads
    resolve_report_to(config.train.report_to)  # an uninstalled tracker stops here, before any model loads
    seed_everything(config.train.seed)
    accelerator = accelerator_for(config.train)
    output_dir = Path(config.train.output_dir)
    run_config = config.model_dump(mode="json")  # the API key masked
    # Before config.yaml is overwritten: a reused folder or a changed config on resume is refused here;
    # train.overwrite deletes the old checkpoints only once training starts.
    prepare_output_dir(output_dir, config_record(run_config), resume=config.train.resume,
                       overwrite=config.train.overwrite, clear=False)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, output_dir / "config.yaml")
    config = with_precision(config, accelerator.device)  # config.yaml keeps "auto"; the run uses the resolved value
    dtype = torch.bfloat16 if config.teacher.dtype == "bfloat16" else torch.float32
    return DistillRun(config, accelerator, output_dir, run_config, dtype=dtype)


def load_teacher_and_data(run: DistillRun) -> None:
    """The teacher (or only its tokenizer, from a cache), the student's tokenizer and the tokenised data; with
    `teacher.cache`, the cache is checked against the data before anything is built."""
    config, accelerator = run.config, run.accelerator
    started = time.perf_counter()
    with accelerator.main_process_first():  # the first process converts/caches; the others reuse
        if run.from_cache:
            run.teacher, run.tokenizer = None, load_tokenizer(config.teacher.model)
        else:
            check_teacher_fits(config, accelerator.device)
            run.teacher, run.tokenizer = load_model(config.teacher.model, dtype=run.dtype, device=accelerator.device)
        run.timings["load_tokenizer_s" if run.from_cache else "load_teacher_s"] = time.perf_counter() - started
        started = time.perf_counter()
        run.student_tokenizer = load_student_tokenizer(config) if run.cross else run.tokenizer
        if run.cross:
            run.train_examples, run.heldout_examples = prepare_cross_data(
                config, *prepare_records(config, run.teacher, run.tokenizer), run.tokenizer, run.student_tokenizer)
        else:
            run.train_examples, run.heldout_examples = prepare_data(config, run.teacher, run.tokenizer)
    run.timings["data_s"] = time.perf_counter() - started
    console.print(f"data: {len(run.train_examples)} training and {len(run.heldout_examples)} held-out examples")

    # the cache is in the teacher's tokens
    run.teacher_examples = teacher_view(run.train_examples) if run.cross else run.train_examples
    if run.from_cache:  # check the cache before building anything: a mismatch is the likeliest user error
        folder = teacher_cache_folder(config)
        found = read_manifest(folder) or {}
        identity = teacher_cache_identity(config, run.tokenizer, found.get("vocab_size", 0), run.teacher_examples)
        run.manifest = check_cache(folder, identity, tuple(key for key in IDENTITY_KEYS if key != "examples_per_shard"))
        console.print(f"teacher cache: {folder} ({run.manifest['kind']}, {run.manifest['num_tokens']} tokens); "
                      "teacher not loaded")


def build_student_phase(run: DistillRun) -> None:
    """The student before training; a resumed run keeps the teacher layers its first start chose (run.json)."""
    config, run_file = run.config, run.output_dir / "run.json"
    previous = json.loads(run_file.read_text()) if config.train.resume and run_file.exists() else {}
    started = time.perf_counter()
    run.student, run.kept_layers, run.vocab_size = build_student(
        config, run.teacher, run.tokenizer, run.train_examples, previous.get("kept_layers"),
        teacher_vocab_size=run.manifest["vocab_size"] if run.manifest else None, cross=run.cross,
    )
    run.timings["build_student_s"] = time.perf_counter() - started
    if run.kept_layers is not None:
        console.print(f"student keeps teacher layers {run.kept_layers} ({config.student.layers})")
    if run.accelerator.is_main_process:
        run_file.write_text(json.dumps({"kept_layers": run.kept_layers}))


def evaluate_before(run: DistillRun) -> None:
    """Whether the closing table is made, and its rows before training (teacher, untrained student)."""
    config = run.config
    run.evaluate = bool(config.eval.enabled and run.accelerator.is_main_process and run.heldout_examples)
    if run.cross and run.evaluate:
        console.print("cross-tokenizer run: the teacher-vs-student table needs a shared vocabulary and is skipped")
        run.evaluate = False
    if run.evaluate and not config.train.resume and run.teacher is not None:
        run.rows_before = evaluate_models(
            {"teacher": (run.teacher, None), "student before": (run.student, None)}, run.teacher, run.tokenizer,
            run.heldout_examples, config.eval, run.vocab_size,
        )


def build_training_method(run: DistillRun):
    """The on-policy method object (None for offpolicy); DistiLLM's validation examples leave the training set."""
    config = run.config
    method_val = []
    if config.method.name == "distillm":  # DistiLLM's validation loss: training examples set aside, never trained on
        if len(run.train_examples) <= config.method.val_examples:
            raise KdlmError(f"method.val_examples={config.method.val_examples} leaves no training examples; lower it")
        method_val = run.train_examples[-config.method.val_examples :]
        run.train_examples = run.train_examples[: -config.method.val_examples]
    pt_examples = None
    if config.method.name != "offpolicy" and config.method.pt_data:  # L_PT's separate corpus (distillm, minillm)
        pt_examples = encode_records(run.tokenizer, load_records(config.method.pt_data), max_length=config.data.max_length)
    examples_per_step = config.train.batch_size * config.train.grad_accum * run.accelerator.num_processes
    method = build_method(
        config.method, student=run.student, teacher=run.teacher, tokenizer=run.student_tokenizer, loss_config=config.loss,
        max_steps=config.train.max_steps, seed=config.train.seed, bf16=config.train.bf16, vocab_size=run.vocab_size,
        batch_size=config.train.batch_size, val_examples=method_val, pt_examples=pt_examples,
        steps_per_epoch=len(run.train_examples) // examples_per_step,
    )
    if run.cross and method is not None:  # GKD: student samples are re-tokenised for the teacher (kdlm.xtok.onpolicy)
        method = CrossTokenizerSamples(method, run.student_tokenizer, run.tokenizer, config.data.max_length)
    return method


def teacher_signal(run: DistillRun) -> None:
    """With `teacher.signal: topk`, the cached teacher targets (the run's own cache is written here if needed)."""
    config, accelerator = run.config, run.accelerator
    started = time.perf_counter()
    if run.use_kd and config.teacher.signal == "topk":
        folder = teacher_cache_folder(config)
        with accelerator.main_process_first():
            if run.manifest is None:  # the run's own cache: (re)written here with the loaded teacher
                identity = teacher_cache_identity(config, run.tokenizer, run.teacher.config.vocab_size, run.teacher_examples)
                found = read_manifest(folder)
                if found is not None and any(found.get(key) != identity[key] for key in IDENTITY_KEYS):
                    shutil.rmtree(folder)  # made for other data or settings; it is this run's private cache
                run.manifest = write_cache(
                    run.teacher, run.teacher_examples, folder, identity=identity, pad_token_id=run.tokenizer.pad_token_id,
                    batch_size=config.train.batch_size, show_progress=accelerator.is_main_process,
                )
            run.topk_targets = read_targets(folder, run.manifest)
    run.timings["teacher_signal_s"] = time.perf_counter() - started


def train_phase(run: DistillRun, on_step: Callable[[int, torch.nn.Module], None] | None) -> TrainResult:
    """Train the student (kdlm.train.loop.train) with the live teacher only where a term needs it."""
    config, student, manifest = run.config, run.student, run.manifest
    cached = run.topk_targets is not None
    cross_tokenizer = None
    if run.cross:
        cross_tokenizer = CrossTokenizer(config.loss.cross_tokenizer, run.student_tokenizer, run.tokenizer, run.vocab_size,
                                         manifest["vocab_size"] if manifest else run.teacher.config.vocab_size)
    result = train(
        student, run.train_examples, train_config=config.train, loss_config=config.loss,
        pad_token_id=run.student_tokenizer.pad_token_id, vocab_size=run.vocab_size,
        teacher=run.teacher if (run.use_kd and not cached) or config.hints.enabled or run.method else None,
        topk_targets=run.topk_targets, accelerator=run.accelerator,
        run_state={"kept_layers": run.kept_layers, "targets_kind": manifest["kind"] if cached else None},
        hint_config=config.hints, method=run.method,
        on_step=(lambda step: on_step(step, student)) if on_step else None, run_config=run.run_config,
        cross_tokenizer=cross_tokenizer,
    )
    run.timings["train_s"] = result.seconds
    return result


def save_and_evaluate(run: DistillRun, result: TrainResult) -> dict:
    """Save the student, history.json, the before/after table, report and model card (main process)."""
    config, accelerator = run.config, run.accelerator
    report: dict = {"config": config.model_dump(), "timings": run.timings, "steps": result.steps, "tokens": result.tokens}
    if accelerator.is_main_process:
        student_dir = run.output_dir / "student"
        save_student(run.student, run.student_tokenizer, student_dir)
        write_history(result.history, run.output_dir / "history.json")
        if run.evaluate:
            report["rows"] = run.rows_before + evaluate_after(run, student_dir)
        write_report(report, run.output_dir)
        write_model_card(student_dir, report, run.kept_layers)
    accelerator.wait_for_everyone()
    return report


def evaluate_after(run: DistillRun, student_dir: Path) -> list[dict]:
    """The table's rows after training; a run from the cache loads the teacher now, for the table only."""
    config, device = run.config, run.accelerator.device
    models = {}
    teacher = run.teacher
    if teacher is None:
        run.student, run.topk_targets = None, None
        gc.collect()
        teacher, _ = load_model(config.teacher.model, dtype=run.dtype, device=device)
        models["teacher"] = (teacher, None)
        if not config.train.resume:
            models["student before"] = (load_model(config.student.model, device=device)[0], None)
    trained, _ = load_model(str(student_dir), device=device)
    models["student after"] = (trained, student_dir)
    return evaluate_models(models, teacher, run.tokenizer, run.heldout_examples, config.eval, run.vocab_size)


def run_cache_teacher(config: RunConfig) -> dict:
    """`kdlm cache-teacher`: run the teacher once over the training data and write its targets; resumable.

    Writes to `teacher.cache` (or train.output_dir/teacher_cache); returns the manifest.
    """
    if config.teacher.signal == "online":
        raise KdlmError("kdlm cache-teacher writes cached targets; set teacher.signal=topk")
    config = with_precision(config)
    dtype = torch.bfloat16 if config.teacher.dtype == "bfloat16" else torch.float32
    started = time.perf_counter()
    if config.teacher.api_base:  # a served teacher: its tokenizer here, its top-k log-probs over the API
        require_extra("api", ("openai",), "a teacher behind an API (teacher.api_base)")
        from kdlm.teachers.api import ApiTeacher

        tokenizer = load_tokenizer(config.teacher.model)
        key = config.teacher.api_key
        teacher = ApiTeacher(config.teacher.api_base, config.teacher.model, tokenizer,
                             api_key=key.get_secret_value() if key else os.environ.get(config.teacher.api_key_env))
        vocab_size = teacher.check_tokenizer()
        train_examples, _ = prepare_data(config, None, tokenizer)  # teacher answers must be cached already
    else:
        teacher, tokenizer = load_model(config.teacher.model, dtype=dtype, device=default_device())
        vocab_size = teacher.config.vocab_size
        train_examples, _ = prepare_data(config, teacher, tokenizer)  # also answers held-out prompts: distill needs them
    folder = teacher_cache_folder(config)
    identity = teacher_cache_identity(config, tokenizer, vocab_size, train_examples)
    manifest = write_cache(
        teacher, train_examples, folder, identity=identity, pad_token_id=tokenizer.pad_token_id,
        batch_size=config.train.batch_size,
    )
    size = sum(shard["bytes"] for shard in manifest["shards"])
    console.print(
        f"teacher cache ({manifest['kind']}): {len(train_examples)} examples, {manifest['num_tokens']} target tokens, "
        f"{len(manifest['shards'])} shards, {size / 2**20:.1f} MiB ({size / max(1, manifest['num_tokens']):.1f} B/token) "
        f"in {time.perf_counter() - started:.1f} s -> {folder}"
    )
    return manifest


def run_eval(config: RunConfig) -> list[dict]:
    """`kdlm eval`: the teacher and each model of eval.models on the config's held-out teacher answers."""
    if not config.eval.models:
        raise KdlmError("nothing to evaluate: set eval.models=[path/to/student,...]")
    config = with_precision(config)
    teacher, tokenizer = load_model(config.teacher.model, device=default_device())
    _, heldout_records = prepare_records(config, teacher, tokenizer)
    heldout = encode_records(tokenizer, heldout_records, max_length=config.data.max_length) if heldout_records else []
    if not heldout:
        raise KdlmError("data.heldout is 0: no held-out examples to evaluate on")
    models = {"teacher": (teacher, None)}
    vocab_size = teacher.config.vocab_size
    others = {}  # models with another tokenizer: bits per byte and top-1 on 1:1-aligned tokens (kdlm.evaluate.xvocab)
    for spec in config.eval.models:
        model, model_tokenizer = load_model(spec, device=default_device())
        try:
            vocab_size = min(vocab_size, check_vocab_compatible(tokenizer, model_tokenizer, teacher.config.vocab_size, model.config.vocab_size))
        except KdlmError as exc:
            console.print(f"{spec}: another tokenizer than the teacher's ({exc}); scored by bits per byte and top-1 "
                          "agreement on 1:1-aligned tokens")
            others[spec] = model_tokenizer
        models[spec] = (model, Path(spec) if Path(spec).is_dir() else None)
    rows = evaluate_models(models, teacher, tokenizer, heldout, config.eval, vocab_size, records=heldout_records, tokenizers=others)
    write_report({"rows": rows, "config": config.model_dump()}, Path(config.train.output_dir) / "eval")
    return rows


def run_build_student(config: RunConfig) -> Path:
    """`kdlm build-student`: build and save the student without training; prints its size."""
    if config.student.tokenizer and config.student.init == "model":
        raise KdlmError(
            "student.tokenizer gives a student built from the teacher (student.init prune or random) its own "
            "vocabulary; a student loaded with student.init=model keeps its tokenizer: unset one of the two"
        )
    config = with_precision(config)
    teacher, tokenizer = load_model(config.teacher.model, device=default_device())
    student_tokenizer = tokenizer
    own_tokenizer = bool(config.student.tokenizer)
    if own_tokenizer:  # before pruning and any teacher answers: a missing path or a too small bpe:N fails at once
        started = time.perf_counter()
        student_tokenizer = make_student_tokenizer(config, tokenizer)
        console.print(f"student tokenizer: {len(student_tokenizer)} tokens in {time.perf_counter() - started:.1f} s")
        # lora and frozen embeddings are training settings; the student is built plain and saved merged anyway
        config = config.model_copy(update={"student": config.student.model_copy(
            update={"tokenizer": None, "lora": None, "freeze_embeddings": False})})
    cfg = config.student
    calibrate = cfg.init == "prune" and (cfg.layers == "influence" or cfg.width is not None or cfg.target_params is not None)
    train_examples, _ = prepare_data(config, teacher, tokenizer) if calibrate else ([], [])
    student, kept_layers, _ = build_student(config, teacher, tokenizer, train_examples, None)
    if own_tokenizer:
        _student_vocabulary(student, config.student.init, teacher, tokenizer, student_tokenizer)
    folder = Path(config.train.output_dir) / "student-init"
    save_student(student, student_tokenizer, folder)
    info = describe_model(student, folder)
    widths = {key: getattr(student.config, key) for key in ("hidden_size", "intermediate_size", "num_attention_heads")}
    console.print(f"student: {info} kept layers {kept_layers} widths {widths} -> {folder} "
                  f"(teacher: {describe_model(teacher)['parameters']} parameters)")
    return folder


def _student_vocabulary(student, init: str, teacher, tokenizer, student_tokenizer) -> None:
    """Give the built student the rows of its own tokenizer: from the teacher's embeddings when pruned."""
    if init == "prune":
        started = time.perf_counter()
        fallback = init_embeddings_from_teacher(student, teacher, tokenizer, student_tokenizer)
        console.print(
            f"embeddings from the teacher's in {time.perf_counter() - started:.1f} s "
            f"({fallback} rows the teacher cannot spell take its mean row)"
        )
    else:  # random: the new rows stay random too
        resize_to_tokenizer(student, student_tokenizer)


def make_student_tokenizer(config: RunConfig, teacher_tokenizer):
    """The tokenizer of `student.tokenizer`: bpe:N trained on student.tokenizer_text (or data.train), or a path."""
    cfg = config.student
    if not cfg.tokenizer.startswith("bpe:"):
        return load_user_tokenizer(cfg.tokenizer, teacher_tokenizer, cfg.tokenizer_chat_template)
    texts = [text for source in cfg.tokenizer_text or [config.data.train] for text in record_texts(load_records(source))]
    return train_bpe_tokenizer(teacher_tokenizer, texts, int(cfg.tokenizer[4:]))
