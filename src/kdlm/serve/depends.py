"""What a /v1 request passes before its endpoint runs, as FastAPI dependencies: the API key
(`authorize`), then, for a completion request with a valid body, the admission (`chat_call`,
`completion_call`): the model check, an injected fault if one is drawn, and a place in the queue.

Faults are drawn inside the admission, not in a dependency of their own: FastAPI runs a route's
dependencies before it validates the body, and a fault must be drawn for valid requests only (an
invalid one gets its 400, and the fault sequence of a seed stays the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import Depends, Request

from kdlm.serve.flow import ApiError, ClientGone, Ticket, until_gone
from kdlm.serve.schemas import BaseRequest, ChatRequest, CompletionRequest
from kdlm.serve.state import ServeState, get_state


async def authorize(request: Request, state: ServeState = Depends(get_state)) -> None:
    """With an API key set, refuse (401) a request without `Authorization: Bearer <key>`."""
    # A dependency rather than an HTTP middleware: starlette's middleware wrapper hides a client's
    # disconnect from the handler, and the request log needs to see it.
    if state.api_key is not None:
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            state.counts["rejected"] += 1
            message = "invalid API key: send `Authorization: Bearer <key>` with the key the server was started with"
            raise ApiError(401, message, "invalid_api_key")


class Call:
    """One completion request on its way: its body, fingerprint, arrival time and admission."""

    def __init__(self, request: Request, state: ServeState, body: BaseRequest, fingerprint: str):
        self.request, self.state, self.body, self.fingerprint = request, state, body, fingerprint
        self.received = time.time()
        self.ticket: Ticket = state.load.open()

    def outcome(self, status: str) -> None:
        self.state.counts[status] += 1
        self.state.log.write(self.fingerprint, status, self.received)

    async def finish(self) -> None:
        self.outcome("client_gone" if await self.request.is_disconnected() else "answered")

    async def until_gone(self, work):
        try:
            return await until_gone(self.request, work)
        except ClientGone:
            self.outcome("client_gone")
            raise


async def inject_fault(call: Call) -> None:
    """Answer 429 or 500, or stall, at the server's fault rates (kdlm.serve.state.Faults)."""
    faults = call.state.faults
    draw = call.state.fault_draw.random()
    if draw < faults.rate_429:
        call.outcome("429")
        raise ApiError(429, "rate limit reached (injected fault)", "rate_limit_exceeded",
                       headers={"Retry-After": f"{faults.retry_after_s:g}"})
    if draw < faults.rate_429 + faults.rate_500:
        call.outcome("500")
        raise ApiError(500, "internal error (injected fault)", "server_error")
    if draw < faults.rate_429 + faults.rate_500 + faults.rate_stall:
        call.outcome("stall")
        await until_gone(call.request, asyncio.sleep(faults.stall_s))  # ends early if the client gives up
        raise ApiError(503, "stalled (injected fault)", "stalled")


@contextlib.asynccontextmanager
async def admission(request: Request, state: ServeState, body: BaseRequest, rows: int) -> AsyncIterator[Call]:
    """The checks every completion request goes through, then its admission, held until it ends."""
    call = Call(request, state, body, hashlib.sha256(await request.body()).hexdigest()[:16])
    try:
        state.counts["received"] += 1
        name = state.backend.name
        if body.model != name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {name!r}",
                           "model_not_found", "model")
        await inject_fault(call)
        try:
            state.load.admit(call.ticket, rows, state.wait_estimate)
        except ApiError as error:
            if error.status == 429:
                call.outcome("busy")
            raise
        yield call
    finally:
        if not call.ticket.kept:  # a streamed answer releases it when it ends
            call.ticket.release()


# One per body type: FastAPI validates the body a dependency declares before it calls the dependency.
# Used with scope="function", so that the admission ends when the endpoint returns, before the answer is sent.
async def chat_call(request: Request, body: ChatRequest, state: ServeState = Depends(get_state)) -> AsyncIterator[Call]:
    """A /v1/chat/completions request, admitted."""
    async with admission(request, state, body, body.rows()) as call:
        yield call


async def completion_call(request: Request, body: CompletionRequest,
                          state: ServeState = Depends(get_state)) -> AsyncIterator[Call]:
    """A /v1/completions request, admitted."""
    async with admission(request, state, body, body.rows()) as call:
        yield call
