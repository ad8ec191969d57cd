"""A SQLite cache of answers keyed by the request's fingerprint: a rerun sends only what is missing.

Each answer is committed as soon as it arrives (WAL journal), so a crash, Ctrl-C or kill -9 loses at
most the requests in flight, and never an answer that was paid for. A request that can never be answered
under its settings (a prompt longer than a local teacher's context) is recorded in a second table,
`failures`, with its reason, so that a rerun does not try it again; deleting its row retries it.

`fingerprint` (from `kdlm.fingerprint`, re-exported here) is the hash that the answer caches, the evaluation
results, the benchmark runs and the checkpoints are keyed with.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from kdlm.fingerprint import fingerprint

__all__ = ["Answer", "AnswerCache", "fingerprint"]


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class AnswerCache:
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(path, isolation_level=None)  # autocommit: one write, one commit
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process, not a power cut
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS answers (fingerprint TEXT PRIMARY KEY, text TEXT NOT NULL, "
            "finish_reason TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
        )
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS failures (fingerprint TEXT PRIMARY KEY, reason TEXT NOT NULL, created REAL)"
        )

    def get(self, fingerprint: str) -> Answer | None:
        row = self.connection.execute(
            "SELECT text, finish_reason, prompt_tokens, completion_tokens FROM answers WHERE fingerprint = ?",
            (fingerprint,),
        ).fetchone()
        return None if row is None else Answer(*row)

    def fingerprints(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT fingerprint FROM answers")}

    def put(self, fingerprint: str, answer: Answer) -> None:
        self.connection.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
            (fingerprint, answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens, time.time()),
        )

    def fail(self, fingerprint: str, reason: str) -> None:
        """Record that the request `fingerprint` cannot be answered, and why."""
        self.connection.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (fingerprint, reason, time.time()))

    def failures(self) -> dict[str, str]:
        """The reason of every recorded failure, by fingerprint."""
        return dict(self.connection.execute("SELECT fingerprint, reason FROM failures"))

    def __len__(self) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self.connection.close()
