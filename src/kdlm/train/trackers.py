"""Where training metrics go besides train_log.csv (always written): Accelerate's trackers.

`train.report_to` (TRL's name) lists them: tensorboard (the default), wandb, mlflow, or `none`; `auto` adds
W&B and MLflow to TensorBoard where they are installed and configured (WANDB_API_KEY or WANDB_MODE;
MLFLOW_TRACKING_URI), so that a laptop run never stops at a login prompt.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from kdlm.errors import KdlmError

KNOWN = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def resolve_report_to(report_to: str | list[str]) -> list[str]:
    """The trackers a `train.report_to` setting names; raises for an unknown or uninstalled one."""
    if report_to == "none" or report_to == []:
        return []
    if report_to == "auto":
        chosen = ["tensorboard"]
        if _installed("wandb") and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
            chosen.append("wandb")
        if _installed("mlflow") and os.environ.get("MLFLOW_TRACKING_URI"):
            chosen.append("mlflow")
        return [name for name in chosen if _installed(PACKAGES[name])]
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    for name in names:
        if name not in KNOWN:
            raise KdlmError(f"train.report_to: unknown tracker {name!r}; choose from {', '.join(KNOWN)}, auto or none")
        if not _installed(PACKAGES[name]):
            raise KdlmError(f"train.report_to: {name} is not installed (pip install {PACKAGES[name]}), "
                            "or leave it out of train.report_to")
    return names


def open_trackers(names: list[str], output_dir: Path, run_name: str, config: dict | None = None) -> list:
    """Started Accelerate trackers for `names`, logging under output_dir (TensorBoard: output_dir/tensorboard)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    trackers = []
    for name in names:
        if name == "tensorboard":
            tracker = TensorBoardTracker("tensorboard", output_dir)
        elif name == "wandb":
            tracker = WandBTracker(run_name, dir=str(output_dir))
        else:
            tracker = MLflowTracker(experiment_name=run_name, logging_dir=str(output_dir / "mlruns"))
        tracker.start()
        if config and name != "tensorboard":  # TensorBoard's hparams want flat scalars; the CSV and config.yaml keep them
            tracker.store_init_configuration(config)
        trackers.append(tracker)
    return trackers


def log_metrics(trackers: list, record: dict, step: int) -> None:
    """The finite numbers of one log record, as train/NAME."""
    values = {f"train/{key}": value for key, value in record.items()
              if key != "step" and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}
    for tracker in trackers:
        tracker.log(values, step=step)


def close_trackers(trackers: list) -> None:
    for tracker in trackers:
        tracker.finish()


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None
