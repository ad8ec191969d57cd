"""SIGTERM handled like Ctrl-C: the training loop saves a checkpoint, then the CLI exits with 143.

Schedulers (Slurm, Kubernetes), `timeout` and `kill` send SIGTERM, and Python's default for it is to
die at once, losing everything since the last checkpoint. Turning it into `Terminated`, a subclass of
KeyboardInterrupt, sends it down the paths that already save on Ctrl-C.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM

_received = False


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def received_sigterm() -> bool:
    """Whether a SIGTERM arrived while `sigterm_raises` was active."""
    return _received


def _raise_terminated(signum, frame) -> None:
    global _received
    _received = True
    # A second SIGTERM must not cut the checkpoint now being written; SIGKILL still ends the process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"received signal {signum} (SIGTERM)")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread; the old handler comes back after."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
