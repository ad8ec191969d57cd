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

    report = run(_config(config, overrides))
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under `accelerate launch`
        console.print(f"done: student and report in {report['config']['train']['output_dir']}")


@app.command("eval")
def evaluate(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " Models: eval.models=[runs/a/student,...]"),
) -> None:
    """Compare the teacher and the models in eval.models on the config's held-out teacher answers."""
    from kdlm.pipeline import run_eval

    run_eval(_config(config, overrides))


@app.command("build-student")
def build_student(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Build the student (pruned, random or loaded) and save it without training."""
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
    if settings.recipe is not None:  # a recipe module drives the engine through its stages
        import importlib

        name = str(settings.recipe.get("name", ""))
        try:
            module = importlib.import_module(f"kdlm.recipes.{name}") if name.isidentifier() else None
        except ModuleNotFoundError:
            module = None
        if not hasattr(module, "run"):
            raise KdlmError(f"recipe.name: unknown recipe {name!r}; see the modules of kdlm.recipes (e.g. cot, icl)")
        module.run(settings)
        return
    run(settings)


@app.command()
def serve(
    model: str = typer.Argument(..., help="bundled:NAME, a HF folder, a .gguf file, a hub id, or `echo` (a stub)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000),
    api_key: str = typer.Option(None, envvar="KDLM_API_KEY", help="Require `Authorization: Bearer KEY`."),
    name: str = typer.Option(None, help="Model id clients send (default: MODEL)."),
    dtype: str = typer.Option("float32", help="float32, or bfloat16 autocast (about 2x faster on CPU)."),
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
) -> None:
    """Serve a model through an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from kdlm.serve import Faults, build_backend, run_server

    if threads:
        import torch

        torch.set_num_threads(threads)
    backend = build_backend(model, name=name, dtype=dtype, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                            latency_ms=latency_ms)
    faults = Faults(rate_429=fault_429, rate_500=fault_500, rate_stall=fault_stall, retry_after_s=retry_after,
                    stall_s=stall_s)
    console.print(f"serving {backend.name!r} at http://{host}:{port}/v1", highlight=False)
    run_server(backend, host=host, port=port, api_key=api_key, faults=faults, request_log=request_log)

@app.command("cache-teacher")
def cache_teacher(
    config: Path = typer.Argument(None, help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " Folder: teacher.cache=runs/cache"),
) -> None:
    """Run the teacher once over the training data and store its targets (top-k or sampled); resumable."""
    from kdlm.pipeline import run_cache_teacher

    run_cache_teacher(_config(config, overrides))


def main() -> None:
    try:
        # Without standalone mode typer returns an exit code instead of exiting (130 on Ctrl-C).
        result = app(standalone_mode=False)
        if isinstance(result, int) and result != 0:
            if result == 130:
                console.print("[yellow]interrupted[/]: finished work (answers, checkpoints) is saved")
            sys.exit(result)
    except KdlmError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print("[yellow]interrupted[/]: progress up to the last completed step is saved")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: a missing argument, an unknown option
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
