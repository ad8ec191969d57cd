"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint folder holds the trainable weights, optimizer and scheduler state, RNG states and the
step counter. `state.json` is written last, so a folder without it (a crash while saving) is
ignored by `latest_checkpoint`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from kdlm.errors import KdlmError

KEEP_LAST = 2


def _trainable_state(model) -> dict[str, torch.Tensor]:
    # Only what the optimizer changes: frozen weights come from the student's initialisation.
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in names}


def save_checkpoint(folder: Path, *, model, optimizer, scheduler, state: dict) -> Path:
    """Write `folder/step-N` (N = state["step"]) and prune older checkpoints."""
    path = folder / f"step-{state['step']:06d}"
    tmp = folder / f".tmp-step-{state['step']:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(_trainable_state(model), tmp / "model.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    for old in sorted(folder.glob("step-*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    complete = [path for path in sorted(folder.glob("step-*")) if (path / "state.json").exists()]
    return complete[-1] if complete else None


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint into live objects; returns its state dict (step, tokens, ...)."""
    weights = torch.load(path / "model.pt", weights_only=True)
    missing = set(_trainable_state(model)) - set(weights)
    if missing:
        raise KdlmError(
            f"checkpoint {path} does not match this student ({len(missing)} trainable tensors missing, "
            f"e.g. {sorted(missing)[0]}); start a new output_dir or set train.resume=false"
        )
    model.load_state_dict(weights, strict=False)
    states = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return json.loads((path / "state.json").read_text())
