"""Errors a user can cause: printed as one clear message, without a stack trace."""

from __future__ import annotations

import os
import re


class KdlmError(Exception):
    """A problem with the user's input (config, files, models, data) that says what to do.

    The CLI prints these as a single message and exits with status 2; anything else is a bug
    and keeps its traceback.
    """


def os_error_behind(exc: Exception, path) -> OSError | None:
    """The OSError behind a library's failed write, naming `path`, or None.

    safetensors reports a full disk as `SafetensorError: ... I/O error: No space left on device (os error 28)`:
    this gives the CLI an OSError to print as one line (`PATH: No space left on device`).
    """
    match = re.search(r"os error (\d+)", str(exc))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code), str(path))


def require_extra(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Raise a KdlmError naming the pip extra to install when one of `modules` is missing (`what` needs them)."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise KdlmError(f"{what} needs {', '.join(missing)}: pip install 'kdlm[{extra}]' (or 'kdlm[all]')")
