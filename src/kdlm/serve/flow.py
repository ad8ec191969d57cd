"""How a completion request flows through the server: admitted against a bounded queue, cancelled when its
client leaves.

- `Load` counts the requests and rows (sequences: n per prompt) admitted and not answered yet, and
  refuses a request past `max_rows` with a 429 and a Retry-After estimated from the decoder's pace:
  a client backs off instead of piling up work no one will wait for.
- `until_gone` runs a request's work unless its client disconnects (or times out) first; then the
  work is cancelled, which takes its rows out of the batched decoder (`BatchScheduler.submit`).
- `TrackedStream` is a streaming answer that releases its admission and closes its event source
  when it ends, however it ends (finished, client gone, server shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

RETRY_AFTER_MAX_S = 60


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nothing is sent."""


class Ticket:
    """One completion request from its arrival to its end; `rows` once it is admitted to the queue."""

    def __init__(self, load: Load):
        self.load, self.rows, self.released = load, 0, False
        self.kept = False  # handed to a streamed answer, which releases it when it ends

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.load.requests -= 1
            self.load.rows -= self.rows


class Load:
    """Completion requests not yet ended (`requests`) and the rows admitted among them (`rows`); refuses
    rows past `max_rows`."""

    def __init__(self, max_rows: int):
        self.max_rows, self.requests, self.rows = max_rows, 0, 0

    def open(self) -> Ticket:
        self.requests += 1
        return Ticket(self)

    def admit(self, ticket: Ticket, rows: int, wait_estimate: Callable[[int], float]) -> None:
        """Admit a request of `rows` sequences, or raise a 429 (queue full) or a 400 (larger than the queue)."""
        if rows > self.max_rows:
            raise ApiError(400, f"this request asks for {rows} sequences (n x prompts); this server decodes at "
                                f"most {self.max_rows} at once (`kdlm serve --max-queue`)", "invalid_request", "n")
        if self.rows + rows > self.max_rows:
            wait = min(RETRY_AFTER_MAX_S, max(1, math.ceil(wait_estimate(self.rows))))
            raise ApiError(429, f"the server is busy: {self.rows} sequences queued or decoding, at most {self.max_rows} "
                                f"(`kdlm serve --max-queue`); retry after {wait} s", "server_busy",
                           headers={"Retry-After": str(wait)})
        ticket.rows = rows
        self.rows += rows


async def _disconnected(request: Request) -> None:
    # After the body is read, the server's receive() returns only when the client disconnects.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_gone(request: Request, work: Awaitable):
    """The result of `work`, or ClientGone (with `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # this handler is cancelled (server shutdown): leave nothing running
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone


class TrackedStream(StreamingResponse):
    """A streaming answer that calls `on_close` and closes its body iterator when it ends, however it ends."""

    def __init__(self, content, on_close: Callable[[], None], **options):
        super().__init__(content, **options)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # its generators' `finally` cancel what is still decoding
            self.on_close()
