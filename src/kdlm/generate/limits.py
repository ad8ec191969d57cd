"""Requests-per-minute and tokens-per-minute limits, shared by every request of a run."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class RateLimiter:
    """Spaces requests evenly (requests_per_minute) and keeps the tokens of the last 60 s under a cap.

    Tokens are counted before a request is sent, from an estimate, because the limit must hold
    before the answer (and its true token count) exists.
    """

    def __init__(
        self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None, window_s: float = 60.0
    ):
        # window_s is the minute; only tests shorten it.
        self.window_s = window_s
        self.interval = window_s / requests_per_minute if requests_per_minute else 0.0
        self.tokens_per_minute = tokens_per_minute
        self._next_at = 0.0
        self._window: deque[tuple[float, float]] = deque()  # (time sent, tokens)
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: float = 0.0) -> None:
        async with self._lock:  # one request at a time through the gate keeps the spacing exact
            if self.interval:
                wait = self._next_at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._next_at = time.monotonic() + self.interval
            if self.tokens_per_minute:
                tokens = min(tokens, self.tokens_per_minute)  # a request larger than the cap still goes alone
                while True:
                    now = time.monotonic()
                    while self._window and self._window[0][0] <= now - self.window_s:
                        self._window.popleft()
                    if sum(used for _, used in self._window) + tokens <= self.tokens_per_minute:
                        break
                    await asyncio.sleep(self._window[0][0] + self.window_s - now)
                self._window.append((time.monotonic(), tokens))
