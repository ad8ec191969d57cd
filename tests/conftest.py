"""Shared test helpers: what a test needs but this checkout may lack (../shared/data, the bundled teacher, a
headless browser). Outside CI a missing piece skips with a message saying how to get it; in CI (CI=true),
where .ci/run installs everything the suite claims, it fails: a skip there would pass a claim unchecked."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip with `reason`, or fail with it in CI."""
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def shared_data() -> Path:
    """The data sets folder ../shared/data beside this checkout (see shared/data/README.md)."""
    folder = ROOT.parent / "shared" / "data"
    if not folder.is_dir():
        missing(f"{folder} is missing: the data set tests need ../shared/data beside this checkout")
    return folder


def until(condition, what: str, timeout_s: float = 120.0):
    """Poll `condition` until it returns a true value (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)
    return value
