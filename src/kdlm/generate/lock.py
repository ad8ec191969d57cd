"""One run at a time per output: a second `kdlm generate` on the same files would pay for every answer twice.

The lock is an `flock` on `PATH.lock`, which holds the pid of the run that has it. The kernel drops an
flock when its process ends, however it ends (kill -9 included), so a lock left by a dead run is simply
taken over; the pid in the file only names the holder in the refusal. Within one process the lock is
re-entrant (a recipe runs the engine once per stage on a shared cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from kdlm.errors import KdlmError

_held: dict[Path, list] = {}  # lock path -> [open file, depth], for the locks this process holds


def _lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


def _acquire(target: Path) -> str | None:
    """Take the lock of `target`; return the pid a dead holder left in it, if any."""
    path = _lock_path(target).resolve()
    if path in _held:
        _held[path][1] += 1
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown: it has not written it yet"
            handle.close()
            raise KdlmError(
                f"{target} is in use by another `kdlm generate` run (pid {holder}; lock file {path}): two runs on "
                "the same files would pay for every answer twice. Wait for that run to end, or stop it"
            ) from None
        try:  # a run that just ended removes its lock file: make sure the file locked is still the one there
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()
    handle.seek(0)
    previous = handle.read().strip()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[path] = [handle, 1]
    return previous or None


def _release(target: Path) -> None:
    path = _lock_path(target).resolve()
    entry = _held[path]
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before unlocking, so that a waiting run never locks a file that is gone
        entry[0].close()


@contextlib.contextmanager
def run_lock(*targets: Path) -> Iterator[list[str]]:
    """Hold the locks of `targets` (the output, the cache) for the block; yields the pids of dead
    runs whose locks were taken over. Raises KdlmError naming the pid of a live run that holds one."""
    taken: list[Path] = []
    stale: list[str] = []
    try:
        for target in dict.fromkeys(Path(target).resolve() for target in targets):
            previous = _acquire(target)
            taken.append(target)
            if previous:
                stale.append(previous)
        yield stale
    finally:
        for target in reversed(taken):
            _release(target)
