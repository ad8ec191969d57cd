"""What the server runs behind the API: a local model behind a batching scheduler, or an echo stub.

Both turn a prompt and its sampling settings into a stream of events, one per piece of text of one
choice: `(choice index, new text, logprob entry or None, finish reason or None)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kdlm.events import Event, token_entry

if TYPE_CHECKING:  # torch is imported when a model backend is built, not by the echo stub
    from kdlm.models.decode import Row
    from kdlm.serve.scoring import ScoredToken


@dataclass
class Params:
    """Sampling settings of one request (already validated)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0


@dataclass
class _Job:
    rows: list[Row]
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False


class BatchScheduler:
    """Gathers concurrent requests for a few milliseconds and decodes them as one batch.

    One worker runs batches one after another in a thread (the event loop keeps accepting requests
    meanwhile); requests that arrive during a batch form the next one. `batches` counts the batched
    decodes run, `requests` the requests served: fewer batches than requests means batching worked.

    A request whose consumer stops listening (its client disconnected or timed out) is cancelled: a
    queued one never enters a batch, and the rows of a running one leave the decoder at its next step,
    so that an abandoned request stops costing decode steps (`steps`, `active_rows` in `stats()`).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 32, wait_ms: float = 5.0, bf16: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.wait_s, self.bf16 = max_batch, wait_ms / 1000, bf16
        self.batches = self.requests = self.rows = 0
        self.steps = self.tokens = self.cancelled_rows = self.queued_rows = 0
        self.seconds_per_batch = 0.0  # of the last batch: what a refused client is told to wait per batch ahead
        self._running: list[bool] = []  # one flag per row of the running batch: still decoding
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, rows: list[Row]) -> AsyncIterator[Event]:
        if self._loop is not asyncio.get_running_loop():  # first use, or a new event loop (a second asyncio.run)
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        job = _Job(rows, asyncio.Queue(), asyncio.get_running_loop())
        self.requests += 1
        self.queued_rows += len(rows)
        self._queue.put_nowait(job)
        finished = False
        try:
            while True:
                event = await job.events.get()
                if event is None:
                    finished = True
                    return
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                yield event
        finally:
            if not finished:  # the consumer left early: cancelled, or closed the stream
                job.cancelled = True
                for row in rows:
                    row.cancelled = True

    async def _next_batch(self) -> list[_Job]:
        """The next jobs to decode together: the first one waiting, and whatever joins within wait_s."""
        assert self._queue is not None
        batch: list[_Job] = []
        deadline = None
        while sum(len(job.rows) for job in batch) < self.max_batch:
            try:
                if deadline is None:
                    job = await self._queue.get()
                else:
                    job = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            self.queued_rows -= len(job.rows)
            if job.cancelled:  # its client left while it waited: it never costs a step
                self.cancelled_rows += len(job.rows)
                continue
            batch.append(job)
            deadline = deadline or time.monotonic() + self.wait_s
        return batch

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            rows, owners = [], []  # owners[i]: (job, choice index) of batch row i
            for job in batch:
                for choice, row in enumerate(job.rows):
                    rows.append(row)
                    owners.append((job, choice))
            running = self._running = [True] * len(rows)

            def on_delta(i: int, text: str, entry: dict | None, finish: str | None, owners=owners, running=running) -> None:
                job, choice = owners[i]
                self.tokens += entry is not None
                if finish is not None:
                    running[i] = False
                    self.cancelled_rows += finish == "cancelled"
                job.loop.call_soon_threadsafe(job.events.put_nowait, (choice, text, entry, finish))

            self.batches += 1
            self.rows += len(rows)
            started = time.monotonic()
            from kdlm.models.decode import decode_batch

            try:
                await asyncio.to_thread(decode_batch, self.model, self.tokenizer, rows, on_delta, self.bf16,
                                        self._count_step)
                ending = None
            except Exception as error:  # a failed batch fails its requests, not the server
                ending = error
            self.seconds_per_batch = time.monotonic() - started
            self._running = []
            for job in batch:
                job.events.put_nowait(ending)
                if ending is not None:
                    job.events.put_nowait(None)

    def _count_step(self) -> None:
        self.steps += 1

    def wait_estimate(self, rows_ahead: int) -> float:
        """Seconds until `rows_ahead` queued rows are decoded, at the pace of the last batch."""
        return self.seconds_per_batch * -(-rows_ahead // self.max_batch)

    def stats(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "rows": self.rows, "steps": self.steps,
                "tokens": self.tokens, "active_rows": sum(self._running), "queued_rows": self.queued_rows,
                "cancelled_rows": self.cancelled_rows}


class ModelBackend:
    """A local causal LM: prompts are tokenised here and decoded by the batching scheduler."""

    def __init__(self, name: str, model, tokenizer, **scheduler_options):
        self.name, self.tokenizer = name, tokenizer
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.scheduler = BatchScheduler(model, tokenizer, **scheduler_options)
        # No token covers more characters than the longest string in the vocabulary (byte-level BPE:
        # one character per byte, at least one per decoded character), so a text longer than
        # context x that many characters cannot fit, and is refused before the tokenizer sees it.
        self.chars_per_token = max((len(token) for token in tokenizer.get_vocab()), default=1)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def check_chars(self, num_chars: int, params: Params) -> str | None:
        """A message for a prompt of `num_chars` characters too long to fit whatever its tokens, else None."""
        if not self.max_positions:
            return None
        room = max(0, self.max_positions - params.max_tokens)
        if num_chars > room * self.chars_per_token:
            return (
                f"the prompt ({num_chars} characters) cannot fit the model's context of {self.max_positions} tokens "
                f"with max_tokens ({params.max_tokens}): {room} tokens hold at most {room * self.chars_per_token} "
                f"characters here (its longest token has {self.chars_per_token})"
            )
        return None

    def wait_estimate(self, rows_ahead: int) -> float:
        return self.scheduler.wait_estimate(rows_ahead)

    def check_length(self, prompt_ids: list[int], params: Params) -> str | None:
        """A message for a request that cannot fit the model's context, else None."""
        if not prompt_ids:
            return "the prompt is empty"
        if self.max_positions and len(prompt_ids) + params.max_tokens > self.max_positions:
            return (
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_positions} tokens"
            )
        return None

    def stream(self, prompt_ids: list[int], params: Params) -> AsyncIterator[Event]:
        from kdlm.models.decode import Row

        rows = [
            Row(
                prompt_ids,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=None if params.seed is None else params.seed + choice,
                stop=params.stop,
                top_logprobs=params.top_logprobs,
            )
            for choice in range(params.n)
        ]
        return self.scheduler.submit(rows)

    def stats(self) -> dict:
        return self.scheduler.stats()

    @property
    def vocab_size(self) -> int:
        return self.scheduler.model.config.vocab_size

    def model_info(self) -> dict:
        """kdlm's additions to the /v1/models entry: what a client needs to check token alignment."""
        from kdlm.teachers.cache import tokenizer_fingerprint

        return {"vocab_size": self.vocab_size, "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer)}

    async def score(self, prompts: list[list[int]], top_logprobs: int) -> list[list[ScoredToken]]:
        """Score prompts in one forward pass, in a thread (beside the decoding worker; inference only)."""
        from kdlm.serve.scoring import score_prompts

        return await asyncio.to_thread(score_prompts, self.scheduler.model, prompts, top_logprobs, self.scheduler.bf16)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


class EchoBackend:
    """Answers after a fixed latency by echoing the prompt's words: for benchmarks and fault tests.

    A "token" is a word; the answer is the prompt's words cut to max_tokens, so it is deterministic.
    """

    def __init__(self, latency_ms: float = 0.0, name: str = "echo"):
        self.name, self.latency_s = name, latency_ms / 1000
        self.requests = 0

    def encode_chat(self, messages: list[dict]) -> list[str]:
        return " ".join(message["content"] for message in messages).split() or [""]

    def encode_text(self, prompt: str) -> list[str]:
        return prompt.split() or [""]

    def check_length(self, prompt_ids: list, params: Params) -> str | None:
        return None

    def check_chars(self, num_chars: int, params: Params) -> str | None:
        return None

    def wait_estimate(self, rows_ahead: int) -> float:
        return self.latency_s  # requests do not queue here: all of them wait out the latency together

    async def stream(self, prompt_ids: list[str], params: Params) -> AsyncIterator[Event]:
        self.requests += 1
        await asyncio.sleep(self.latency_s)
        words = prompt_ids[: params.max_tokens]
        finish = "length" if len(prompt_ids) > params.max_tokens else "stop"
        for choice in range(params.n):
            for i, word in enumerate(words):
                text = word if i == 0 else " " + word
                entry = token_entry(text, 0.0)
                if params.top_logprobs:
                    entry["top_logprobs"] = [token_entry(text, 0.0)]
                yield choice, text, entry, finish if i == len(words) - 1 else None
            if not words:
                yield choice, "", None, finish

    def stats(self) -> dict:
        return {"requests": self.requests, "batches": self.requests, "rows": self.requests}
