"""What the server keeps between requests, in one object on `app.state.serve`: the backend, the queue's
load, the counters, the fault settings and the request log. Endpoints reach it through `get_state`."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from kdlm.serve.flow import Load

# The outcomes counted in `ServeState.counts`. received: completion requests that passed authentication
# and validation; the rest are their outcomes, and `rejected` the requests refused for their API key.
OUTCOMES = ("received", "answered", "client_gone", "429", "500", "stall", "rejected", "busy")


@dataclass
class Faults:
    """Faults injected before a completion request is served, each drawn at its rate."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_stall: float = 0.0
    retry_after_s: float = 1.0
    stall_s: float = 30.0  # then the request gets a 503; the client should have given up by then
    seed: int = 0


class RequestLog:
    """A JSONL file with one line per completion request: the fingerprint of its body and its outcome."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, fingerprint: str, status: str, received: float) -> None:
        if self.path is not None:
            entry = {"fingerprint": fingerprint, "status": status, "received": received, "time": time.time()}
            with self.path.open("a") as sink:
                sink.write(json.dumps(entry) + "\n")


@dataclass
class ServeState:
    """One server's state: its backend, its limits and what it has counted so far."""

    backend: object  # a ModelBackend or an EchoBackend (kdlm.serve.backends)
    load: Load
    api_key: str | None = None
    faults: Faults = field(default_factory=Faults)
    log: RequestLog = field(default_factory=lambda: RequestLog(None))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    # One thread tokenises, off the event loop: a long prompt does not stall other requests, and a
    # tokenizer is never called from two threads at once (fast tokenizers can refuse that).
    tokenizing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="kdlm-tokenize"))
    fault_draw: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.fault_draw = random.Random(self.faults.seed)

    def wait_estimate(self, rows: int) -> float:
        """Seconds until `rows` queued sequences are decoded, as the backend estimates it (else 1 s)."""
        estimate = getattr(self.backend, "wait_estimate", None)
        return estimate(rows) if estimate is not None else 1.0


def get_state(request: Request) -> ServeState:
    """The dependency that hands an endpoint its server's state."""
    return request.app.state.serve
