"""Write files so that a crash, a full disk or Ctrl-C never leaves a half-written one: a temporary file
beside the target, then one rename (atomic on POSIX and Windows within a file system)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False, per_process: bool = False,
                suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``NAME.tmp``); on success it replaces ``path``, on any error it is
    removed (a SIGKILL can leave it; the next write of ``path`` overwrites it).

    ``per_process`` puts the process id in the temporary name, for files that several processes may write at
    once (the last rename wins, no bytes mix). ``fsync`` flushes the bytes to disk before the rename.
    ``suffix`` ends the temporary name, for readers that go by the extension (a GGUF file read back to check it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}{suffix}" if per_process else f"{path.name}{suffix}")
    try:
        yield temporary
        if fsync:
            with temporary.open("rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, *, per_process: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_path(path, per_process=per_process) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Replace ``path`` with one JSON object per line (non-ASCII kept) atomically; returns the number of rows."""
    count = 0
    with atomic_path(path) as temporary, temporary.open("w", encoding="utf-8") as sink:
        for row in rows:
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
