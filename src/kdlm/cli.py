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
