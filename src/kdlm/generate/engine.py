"""The generation engine: prompts in, one chat record per (prompt, sample) out, resumable.

Every (prompt, sample) is one request with a fingerprint of (model, messages, sampling parameters,
sample index). Answers are committed to a SQLite cache as they arrive; a rerun sends only the
fingerprints the cache lacks, and the output JSONL is written from the cache at the end, in prompt
order, each record exactly once.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from kdlm.atomic import atomic_path
from kdlm.data import load_records
from kdlm.errors import KdlmError
from kdlm.fingerprint import fingerprint as _hash
from kdlm.generate.backends import BatchGenerateBackend, Job, RefusedError, TransientError, make_backend
from kdlm.generate.cache import Answer, AnswerCache
from kdlm.generate.config import GenerateConfig
from kdlm.generate.limits import RateLimiter
from kdlm.generate.lock import run_lock

console = Console(stderr=True)


@dataclass
class RunStats:
    prompts: int = 0
    records: int = 0  # prompts x samples
    cached: int = 0  # answered by an earlier run
    answered: int = 0  # answered in this run
    failed: int = 0
    retries: Counter = field(default_factory=Counter)  # by cause: "429", "500", "timeout", ...
    retry_after_capped: int = 0  # retries that waited backoff_max_s instead of a longer Retry-After
    prompt_tokens: int = 0  # this run
    completion_tokens: int = 0
    cost: float = 0.0  # this run, from config.prices
    total_cost: float = 0.0  # every record in the output, cached ones included
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**self.__dict__, "retries": dict(self.retries), "errors": self.errors[:5]}


def fingerprint(model: str, messages: list[dict], parameters: dict, sample: int) -> str:
    """The cache key of one request: the model, the prompt, every parameter that changes the answer, the sample."""
    return _hash({"model": model, "messages": messages, "parameters": parameters, "sample": sample}, length=32)


def sampling_parameters(config: GenerateConfig) -> dict:
    sampling = config.sampling
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
            "stop": sampling.stop, "seed": sampling.seed}


def build_jobs(config: GenerateConfig) -> tuple[list[Job], int]:
    """One job per (prompt, sample); returns the jobs and the number of prompts."""
    records = load_records(config.prompts, split=config.split)
    if config.limit:
        records = records[: config.limit]
    parameters = sampling_parameters(config)
    jobs = []
    for index, record in enumerate(records):
        if "messages" not in record:
            raise KdlmError(f"{config.prompts}: record {index + 1} is plain text; generation needs prompts "
                            '({"prompt": ...} or {"messages": [...]})')
        messages = record["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a reference answer is replaced by the teacher's
        for sample in range(config.sampling.n):
            key = fingerprint(config.teacher.model, messages, parameters, sample)
            # The request's seed comes from its fingerprint: samples differ, a retry gets the same one.
            jobs.append(Job(index, sample, messages, key, int(key[:8], 16)))
    return jobs, len(records)


def _cost(config: GenerateConfig, prompt_tokens: int, completion_tokens: int) -> float:
    price = config.prices.get(config.teacher.model)
    if price is None:
        return 0.0
    return (prompt_tokens * price.input_per_million + completion_tokens * price.output_per_million) / 1e6


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.2f} req/s")


def _retry_delay(error: TransientError, attempt: int, limits, stats: RunStats) -> float:
    """The server's Retry-After, at most backoff_max_s; without one, exponential backoff with jitter
    (so that retries do not arrive together)."""
    if error.retry_after is None:
        return min(limits.backoff_max_s, limits.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
    if error.retry_after <= limits.backoff_max_s:
        return error.retry_after
    stats.retry_after_capped += 1
    if stats.retry_after_capped == 1:  # once per run: a server that says it once says it to every request
        console.print(
            f"the server asked to wait {error.retry_after:g} s before retrying (Retry-After, {error.cause}); waiting "
            f"limits.backoff_max_s={limits.backoff_max_s:g} s instead (raise it to wait longer)", highlight=False,
        )
    return limits.backoff_max_s


async def _run_jobs(config: GenerateConfig, backend, jobs: list[Job], cache: AnswerCache, stats: RunStats) -> None:
    limits = config.limits
    concurrency = limits.concurrency
    if config.teacher.backend != "openai":  # a local backend needs a full batch of jobs in flight
        concurrency = max(concurrency, config.teacher.batch_size)
    gate = asyncio.Semaphore(concurrency)
    limiter = RateLimiter(limits.requests_per_minute, limits.tokens_per_minute, window_s=limits.window_s)
    progress = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[tokens]} tokens"),
                        console=console, disable=not config.progress)
    task = progress.add_task("generate", total=len(jobs), tokens=0)

    async def one(job: Job) -> None:
        estimate = len(json.dumps(job.messages)) / 4 + config.sampling.max_tokens
        async with gate:
            for attempt in range(limits.max_retries + 1):
                await limiter.acquire(estimate)
                try:
                    answer = await backend.complete(job)
                except TransientError as error:
                    if attempt == limits.max_retries:
                        stats.failed += 1
                        stats.errors.append(f"gave up after {attempt + 1} tries: {error}")
                        return
                    stats.retries[error.cause] += 1
                    await asyncio.sleep(_retry_delay(error, attempt, limits, stats))
                    continue
                except RefusedError as error:
                    stats.failed += 1
                    stats.errors.append(str(error))
                    return
                cache.put(job.fingerprint, answer)
                stats.answered += 1
                stats.prompt_tokens += answer.prompt_tokens
                stats.completion_tokens += answer.completion_tokens
                progress.update(task, advance=1, tokens=stats.prompt_tokens + stats.completion_tokens)
                return

    await backend.check()
    with progress:
        tasks = [asyncio.create_task(one(job)) for job in jobs]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for finished in done:
                if finished.exception() is not None:
                    raise finished.exception()
        finally:
            for pending in tasks:
                pending.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def answer_in_batches(backend: BatchGenerateBackend, jobs: list[Job], cache: AnswerCache, batch_size: int,
                      label: str = "teacher answers") -> None:
    """Answer `jobs` with a local model, `batch_size` at a time, committing each answer or failure to `cache`.

    The longest prompts go first (prompts of similar lengths pad little), in a fixed order, so that the same jobs
    give the same batches, hence the same answers. A prompt too long for the model's context is recorded as
    failed without being decoded.
    """
    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    with progress:
        task = progress.add_task(label, total=len(jobs))
        ready = []  # (job, rendered prompt)
        for job in sorted(jobs, key=lambda job: -len(str(job.messages))):
            text = backend.render(job)
            reason = backend.too_long(text)
            if reason is None:
                ready.append((job, text))
                continue
            cache.fail(job.fingerprint, reason)
            progress.advance(task)
        for start in range(0, len(ready), batch_size):
            batch = ready[start : start + batch_size]
            outcomes = backend.answer_batch([job for job, _ in batch], [text for _, text in batch])
            for (job, _), outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, Answer):
                    cache.put(job.fingerprint, outcome)
                else:
                    cache.fail(job.fingerprint, outcome)
            progress.advance(task, len(batch))


def write_records(config: GenerateConfig, jobs: list[Job], cache: AnswerCache, output: Path) -> tuple[int, float]:
    """Write one chat record per answered job, in prompt order, atomically; return (records, total cost)."""
    parameters = sampling_parameters(config)
    written, total_cost = 0, 0.0
    with atomic_path(output) as temporary, temporary.open("w", encoding="utf-8") as sink:
        for job in jobs:
            answer: Answer | None = cache.get(job.fingerprint)
            if answer is None:
                continue
            total_cost += _cost(config, answer.prompt_tokens, answer.completion_tokens)
            meta = {
                "teacher": config.teacher.model,
                "backend": config.teacher.backend,
                "fingerprint": job.fingerprint,
                "prompt_index": job.prompt_index,
                "sample": job.sample,
                "seed": job.seed,
                "parameters": parameters,
                "finish_reason": answer.finish_reason,
                "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens,
            }
            messages = job.messages + [{"role": "assistant", "content": answer.text}]
            sink.write(json.dumps({"messages": messages, "meta": meta}, ensure_ascii=False) + "\n")
            written += 1
    return written, total_cost


def _answer(config: GenerateConfig, backend, jobs: list[Job], cache: AnswerCache, stats: RunStats) -> None:
    async def run() -> None:
        try:
            await _run_jobs(config, backend, jobs, cache, stats)
        finally:
            await backend.close()

    asyncio.run(run())


def generate(config: GenerateConfig, backend=None) -> RunStats:
    """Answer every (prompt, sample) not yet in the cache, then write the output JSONL.

    Args:
        config: the run's settings.
        backend: a ready backend (tests pass a local one); built from `config.teacher` when None.

    Returns:
        The run's statistics (also printed).

    Raises:
        KdlmError: a missing or malformed prompt file, a refused API key, an unreachable server, another
            run on the same output or cache (named by its pid), or requests that failed for good (the
            others are in the output and the cache).
    """
    started = time.monotonic()
    jobs, num_prompts = build_jobs(config)
    output = Path(config.output)
    cache_path = Path(config.cache) if config.cache else output.with_suffix(".sqlite")
    stats = RunStats(prompts=num_prompts, records=len(jobs))
    with run_lock(output, cache_path) as stale:
        for pid in stale:
            console.print(f"took over the lock of run {pid}, which is no longer running", highlight=False)
        cache = AnswerCache(cache_path)
        try:
            known = cache.fingerprints()
            missing = [job for job in jobs if job.fingerprint not in known]
            stats.cached = len(jobs) - len(missing)
            if missing:
                _answer(config, backend or make_backend(config), missing, cache, stats)
            written, stats.total_cost = write_records(config, jobs, cache, output)
        finally:
            cache.close()
    stats.cost = _cost(config, stats.prompt_tokens, stats.completion_tokens)
    stats.seconds = time.monotonic() - started
    retries = sum(stats.retries.values())
    capped = f", {stats.retry_after_capped} with Retry-After capped" if stats.retry_after_capped else ""
    console.print(
        f"{written} records in {output} ({stats.cached} from the cache, {stats.answered} new, {stats.failed} failed, "
        f"{retries} retries{capped}); {stats.prompt_tokens} prompt + {stats.completion_tokens} completion tokens, "
        f"cost {stats.cost:.4f} (all records: {stats.total_cost:.4f}); {stats.seconds:.1f} s",
        highlight=False,
    )
    if stats.failed:
        raise KdlmError(
            f"{stats.failed} of {len(missing)} requests failed (first: {stats.errors[0]}); the {written} answered "
            "records are saved, and a rerun sends only the missing ones"
        )
    return stats
