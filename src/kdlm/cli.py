"""The one entry point: `kdlm <verb> CONFIG.yaml key=value ...`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import typer
from rich.console import Console

from kdlm.errors import KdlmError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Knowledge distillation of large language models.")
console = Console(stderr=True)

CONFIG_HELP = "YAML config (its first line says how to run it). Omit for the defaults."
OVERRIDES_HELP = "Dotted overrides, e.g. train.max_steps=50 loss.divergence=jsd."


def _config(config: Path | None, overrides: list[str] | None):
    from kdlm.config import load_config

    if config is not None and "=" in str(config) and not Path(config).exists():
        overrides = [str(config), *(overrides or [])]  # `kdlm distill key=value` without a file
        config = None
    return load_config(config, overrides or [])


@app.command()
def distill(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Build the student, distill the teacher into it, and print the before/after table."""
    from kdlm.pipeline import distill as run
    from kdlm.train.interrupts import sigterm_raises

    with sigterm_raises():  # SIGTERM saves a checkpoint, like Ctrl-C
        report = run(_config(config, overrides))
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under `accelerate launch`
        console.print(f"done: student and report in {report['config']['train']['output_dir']}")


@app.command("eval")
def evaluate(
    targets: list[str] = typer.Argument(
        None, help="Model folders (a `kdlm distill` run folder means its student/), bundled:NAME or hub ids. "
        "A YAML config first (with eval.models=[...] overrides) runs the older held-out comparison instead."
    ),
    tasks: str = typer.Option(None, help="Comma-separated tasks (default: all): selfinst, rouge:PATH, gsm8k, svamp, pubmedqa, "
                              "legalbench[-NAME], wikitext-2, tinyshakespeare, ppl:PATH, fidelity, cost, lm-eval:TASK."),
    limit: int = typer.Option(None, help="Items per task (the first ones), to fit a time budget."),
    seeds: str = typer.Option(None, help="Comma-separated sampling seeds for ROUGE-L (default 10,20,30)."),
    shots: str = typer.Option(None, help="Comma-separated k for k-shot accuracy (default 0,3)."),
    max_new_tokens: int = typer.Option(None, help="New tokens per ROUGE-L answer (default 128)."),
    teacher: str = typer.Option(None, help="Teacher for fidelity and speed-up (default the bundled one; `none` to skip)."),
    out: str = typer.Option(None, "--out", "--output-dir",
                            help="Output folder for eval.json, eval.md and the result cache (default runs/eval)."),
    perturb: str = typer.Option(None, help="Comma-separated perturbations of every task's prompts, LEVEL[.OP]:RATE with LEVEL "
                                "char, word or sentence and RATE in [0, 1], e.g. char:0.05,word:0.1 (see docs/robustness.md)."),
    ood: str = typer.Option(None, help="Comma-separated out-of-distribution pairs IN->OUT, e.g. gsm8k->svamp,selfinst-seed->selfinst."),
    set_: list[str] = typer.Option(None, "--set", help="Any other setting, key=value (see kdlm.evaluate.suite.EvalSuiteConfig)."),
) -> None:
    """Evaluate models: ROUGE-L (sampled, several seeds), accuracy, perplexity, fidelity to the teacher, cost."""
    targets = targets or []
    if targets and (targets[0].endswith((".yaml", ".yml")) or "=" in targets[0]):
        from kdlm.pipeline import run_eval

        run_eval(_config(Path(targets[0]), targets[1:]))
        return
    from kdlm.evaluate.suite import EvalSuiteConfig, evaluate_suite

    settings: dict = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise KdlmError(f"--set {item!r} must look like key=value")
        import yaml

        settings[key.strip()] = yaml.safe_load(value)
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    for key, value in (("tasks", tasks and [t.strip() for t in tasks.split(",")]), ("limit", limit), ("seeds", seeds and ints(seeds)),
                       ("shots", shots and ints(shots)), ("max_new_tokens", max_new_tokens), ("output_dir", out),
                       ("perturb", perturb and [t.strip() for t in perturb.split(",")]), ("ood", ood and [t.strip() for t in ood.split(",")])):
        if value is not None:
            settings[key] = value
    if teacher is not None:
        settings["teacher"] = None if teacher.lower() == "none" else teacher
    try:
        config = EvalSuiteConfig.model_validate(settings)
    except Exception as exc:  # pydantic's message names the field
        raise KdlmError(f"bad eval setting: {exc}") from None
    evaluate_suite(targets, config)


@app.command()
def analyze(
    teacher: str = typer.Argument(..., help="The teacher: a model folder, bundled:NAME or a hub id."),
    student: str = typer.Argument(..., help="The student: a model folder or a `kdlm distill` run folder (its student/)."),
    data: str = typer.Option(None, help="JSONL of prompts (prompt, instruction or messages; optional category). "
                             "Default: the Self-Instruct user-oriented instructions."),
    out: str = typer.Option("runs/analyze", "--out", "--output-dir",
                            help="Output folder for report.html, analyze.md and analyze.json."),
    limit: int = typer.Option(8, min=1, help="Prompts analysed (the first ones)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens of each greedy answer."),
) -> None:
    """What the student lost: per-layer CKA against the teacher, where the divergence sits, the prompts that differ most."""
    from kdlm.evaluate.analyze import AnalyzeConfig
    from kdlm.evaluate.analyze import analyze as run
    from kdlm.evaluate.suite import resolve_model

    config = AnalyzeConfig(data=data, output_dir=out, limit=limit, max_new_tokens=max_new_tokens)
    run(teacher, resolve_model(student)[1], config)
    console.print(f"done: {Path(out) / 'report.html'}")


@app.command()
def bench(
    config: Path = typer.Argument(..., help="Bench YAML (configs/bench_cpu.yaml, configs/bench_gpu.yaml)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. seeds=\\[0] methods=\\[sft,fkl] distill.train.max_steps=10."),
) -> None:
    """Run a grid of methods x seeds as `kdlm distill` runs (finished runs are skipped), evaluate, report."""
    from kdlm.bench import load_bench_config, run_bench
    from kdlm.train.interrupts import sigterm_raises

    bench_config, root = load_bench_config(config, overrides or [])
    with sigterm_raises():  # SIGTERM saves the running distill's checkpoint, like Ctrl-C
        run_bench(bench_config, root)
    console.print(f"done: {Path(bench_config.output_dir) / 'report.html'}")


@app.command("app")
def run_application(
    config: Path = typer.Argument(..., help="App config: configs/apps/healthcare.yaml, education.yaml or law.yaml."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides by section, e.g. generate.sampling.n=2 "
                                          "distill.train.max_steps=5 eval.limit=20 steps=[eval]."),
    check: bool = typer.Option(False, "--check", help="Validate the config and write the step configs and commands.sh only."),
) -> None:
    """A domain application end to end: teacher rationales (generate), distillation, domain evaluation, report."""
    from kdlm.apps import load_app_config, run_app, write_plan
    from kdlm.train.interrupts import sigterm_raises

    settings = load_app_config(config, overrides or [])
    if check:
        write_plan(settings)
        console.print(f"valid; step configs and commands in {settings.output_dir}")
        return
    with sigterm_raises():
        report = run_app(settings)
    console.print(f"done: {report}")


@app.command("build-student")
def build_student(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Build the student (pruned, random or loaded) and save it without training.

    student.tokenizer=bpe:N (or a tokenizer folder) gives it its own vocabulary (docs/student-tokenizer.md).
    """
    from kdlm.pipeline import run_build_student

    run_build_student(_config(config, overrides))


@app.command()
def generate(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. sampling.n=4 limits.concurrency=16."),
) -> None:
    """Have a teacher answer prompts (API or local), resumably, into a JSONL of chat records."""
    from kdlm.generate import generate as run
    from kdlm.generate import load_generate_config

    if config is not None and "=" in str(config) and not Path(config).exists():
        overrides, config = [str(config), *(overrides or [])], None
    settings = load_generate_config(config, overrides or [])
    if settings.recipe is not None:  # a multi-step recipe (self-instruct, evol-instruct, lion, ...)
        from kdlm.recipes.calls import run_recipe

        run_recipe(settings)
    else:
        run(settings)


@app.command()
def serve(
    model: str = typer.Argument(..., help="bundled:NAME, a HF folder, a .gguf file, a hub id, or `echo` (a stub)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000),
    api_key: str = typer.Option(None, envvar="KDLM_API_KEY", help="Require `Authorization: Bearer KEY`."),
    name: str = typer.Option(None, help="Model id clients send (default: MODEL)."),
    dtype: str = typer.Option("auto", help="auto (bf16 autocast only where the hardware runs it fast), float32 or bfloat16."),
    max_batch: int = typer.Option(32, help="Most sequences decoded together in one batch."),
    batch_wait_ms: float = typer.Option(5.0, help="How long to gather concurrent requests into one batch."),
    latency_ms: float = typer.Option(0.0, help="echo only: seconds/1000 each answer takes."),
    fault_429: float = typer.Option(0.0, help="Fraction of requests answered 429 (with Retry-After)."),
    fault_500: float = typer.Option(0.0, help="Fraction of requests answered 500."),
    fault_stall: float = typer.Option(0.0, help="Fraction of requests that stall, then get a 503."),
    retry_after: float = typer.Option(1.0, help="Retry-After seconds sent with an injected 429."),
    stall_s: float = typer.Option(30.0, help="How long an injected stall lasts."),
    request_log: Path = typer.Option(None, help="Append one JSONL line per completion request (fingerprint, outcome)."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default; 1 on a small machine shared with other jobs)."),
    max_body_mb: float = typer.Option(4.0, min=0.001, help="Largest request body in MB (2**20 bytes); larger ones get a 413 unread."),
    max_queue: int = typer.Option(512, min=1, help="Sequences (n per prompt) queued or decoding at once; more get a 429 with Retry-After."),
    allowed_hosts: str = typer.Option(
        None, help="Comma-separated names accepted in the Host header (default: localhost, 127.0.0.1, ::1 and --host); "
        "`*` accepts any. Guards a keyless local server against DNS rebinding."),
) -> None:
    """Serve a model through an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from kdlm.errors import require_extra

    require_extra("serve", ("fastapi", "uvicorn", "openai"), "kdlm serve")
    from kdlm.serve import Faults, build_backend, run_server

    if threads:
        import torch

        torch.set_num_threads(threads)
    backend = build_backend(model, name=name, dtype=dtype, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                            latency_ms=latency_ms)
    faults = Faults(rate_429=fault_429, rate_500=fault_500, rate_stall=fault_stall, retry_after_s=retry_after,
                    stall_s=stall_s)
    console.print(f"serving {backend.name!r} at http://{host}:{port}/v1", highlight=False)
    hosts = [name.strip() for name in allowed_hosts.split(",") if name.strip()] if allowed_hosts else None
    run_server(backend, host=host, port=port, api_key=api_key, faults=faults, request_log=request_log,
               max_body_bytes=int(max_body_mb * 2**20), max_queue=max_queue, allowed_hosts=hosts)

@app.command()
def export(
    student: str = typer.Argument(..., help="Student HF folder (a `kdlm distill` run folder means its student/)."),
    format_: str = typer.Option("gguf", "--format", help="Output format: gguf (llama.cpp, Ollama)."),
    quant: str = typer.Option("q8_0", help="f16, q8_0 or q4_0; K-quants (q4_k_m) need llama.cpp's llama-quantize on the f16 file."),
    out: str = typer.Option(None, help="Output .gguf file (default: STUDENT-QUANT.gguf next to the student folder)."),
    check: bool = typer.Option(True, help="Load the file back with transformers and compare logits with the student before keeping it."),
) -> None:
    """Export a Llama-family student as one GGUF file, checked against the HF student (docs/export.md)."""
    from kdlm.export.run import FORMATS, export_gguf
    from kdlm.train.interrupts import sigterm_raises

    if format_.lower() not in FORMATS:
        raise KdlmError(f"--format {format_!r} is not known; pick one of {', '.join(FORMATS)}")
    with sigterm_raises():  # SIGTERM unwinds like Ctrl-C, so the partial file is removed
        result = export_gguf(student, out=out, quant=quant, check=check, log=lambda line: console.print(line, highlight=False))
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(result["tensor_types"].items()))
    console.print(f"done: {result['path']} ({result['bytes'] / 2**20:.1f} MiB; tensors: {types})", highlight=False)


config_app = typer.Typer(no_args_is_help=True, help="Inspect configs: `kdlm config show CONFIG`.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    changed: bool = typer.Option(False, help="Only the settings whose value differs from the default."),
    kind: str = typer.Option("auto", help="distill, generate or bench (auto: from the file's top-level keys)."),
) -> None:
    """Every setting of a distill, generate or bench config: its value, default, type and help."""
    from rich.table import Table

    from kdlm.config import config_kind, describe_settings

    kind = config_kind(config) if kind == "auto" else kind
    if kind == "generate":
        from kdlm.generate.config import load_generate_config

        settings = load_generate_config(config, overrides or [])
    elif kind == "bench":
        from kdlm.bench.config import load_bench_config

        if config is None:
            raise KdlmError("kdlm config show --kind bench needs a bench config file")
        settings = load_bench_config(config, overrides or [])[0]
    elif kind == "distill":
        settings = _config(config, overrides)
    else:
        raise KdlmError(f"--kind {kind!r}: choose auto, distill, generate or bench")
    table = Table(show_lines=False, title=f"{config or 'defaults'} ({kind} config)")
    for column in ("key", "value", "default", "type", "help"):
        table.add_column(column, overflow="fold")
    for row in describe_settings(settings):
        if not changed or row["value"] != row["default"]:
            table.add_row(*row.values())
    Console().print(table)


app.command("config-show", hidden=True)(config_show)  # the name before `kdlm config show`


@app.command()
def plan(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    gpus: int = typer.Option(0, help="Plan for this many GPUs (0: this machine: its GPUs if any, else its CPU)."),
    gpu_memory: float = typer.Option(80.0, help="GiB per GPU when --gpus is given."),
    gpu_name: str = typer.Option("H100", help="GPU model for the time estimate when --gpus is given."),
    mfu: float = typer.Option(0.4, help="Model FLOPs utilisation assumed on a GPU."),
    json_out: Path = typer.Option(None, "--json", help="Also write the plan as JSON here."),
) -> None:
    """Memory per device and time per step of a distill config, from the models' configs (no weights loaded)."""
    from kdlm.plan import run_plan

    run_plan(_config(config, overrides), gpus=gpus, gpu_memory=gpu_memory, gpu_name=gpu_name, mfu=mfu, json_out=json_out)


@app.command("cache-teacher")
def cache_teacher(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " Folder: teacher.cache=runs/cache"),
) -> None:
    """Run the teacher once over the training data and store its targets (top-k or sampled); resumable."""
    from kdlm.pipeline import run_cache_teacher

    run_cache_teacher(_config(config, overrides))


def _os_error(exc: OSError) -> str:
    """One line naming the path and the cause: `runs/x/config.yaml: Permission denied`."""
    cause = exc.strerror or str(exc)
    paths = [str(path) for path in (exc.filename, exc.filename2) if path is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


def _interrupted(saved: str) -> None:
    """Exit 143 after SIGTERM (under `sigterm_raises`), 130 after Ctrl-C, saying what was kept."""
    from kdlm.train.interrupts import EXIT_CODE, received_sigterm

    if received_sigterm():
        console.print(f"[yellow]terminated[/] (SIGTERM): {saved}")
        sys.exit(EXIT_CODE)
    console.print(f"[yellow]interrupted[/]: {saved}")
    sys.exit(130)


def main() -> None:
    try:
        # Without standalone mode typer returns an exit code instead of exiting (130 on Ctrl-C and SIGTERM).
        result = app(standalone_mode=False)
        if isinstance(result, int) and result != 0:
            if result == 130:
                _interrupted("finished work (answers, checkpoints) is saved")
            sys.exit(result)
    except KdlmError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # lines unbroken: grep finds them
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _interrupted("progress up to the last completed step is saved")
    except OSError as exc:  # a read-only folder, a full disk: the path and the cause, no traceback
        console.print(f"[bold red]error:[/] {_os_error(exc)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: a missing argument, an unknown option
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
