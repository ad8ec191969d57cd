"""Where kdlm keeps what it computes once per machine (converted models, the precision probe)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return the folder where kdlm keeps converted models: ``$KDLM_CACHE`` or ``~/.cache/kdlm``."""
    env = os.environ.get("KDLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdlm"
