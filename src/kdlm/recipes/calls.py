"""Teacher (and student) calls for the recipes, through the generation engine.

A recipe is a deterministic function of its settings, its seed and the answers it gets back. Every
request goes through the engine (`kdlm.generate`): a fingerprint of (model, messages, sampling, sample
index), the SQLite answer cache, rate limits, retries with backoff, a progress bar. A rerun after a
crash or `kill -9` therefore replays the recipe from the cache, step by step, and sends only the
requests that had no answer yet; nothing is ever paid for twice.
"""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import dataclass
from pathlib import Path

from kdlm.atomic import write_jsonl
from kdlm.errors import KdlmError
from kdlm.generate.backends import Job, RefusedError, make_backend
from kdlm.generate.cache import Answer, AnswerCache
from kdlm.generate.config import GenerateConfig, SamplingSection, TeacherSection
from kdlm.generate.engine import RunStats, _run_jobs, console, fingerprint
from kdlm.generate.recipe_settings import RECIPES


@dataclass
class Request:
    messages: list[dict]
    sampling: SamplingSection
    sample: int = 0  # tells apart repeated requests with the same prompt (a re-asked referee, say)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class _NoteRefusals:
    """Passes calls through and remembers which requests the server refused (4xx other than 429)."""

    def __init__(self, inner, sampling: SamplingSection):
        self.inner = copy.copy(inner)  # the backends read their sampling settings at call time
        if hasattr(self.inner, "sampling"):
            self.inner.sampling = sampling
        if hasattr(self.inner, "config"):  # vLLM reads config.sampling
            self.inner.config = self.inner.config.model_copy(update={"sampling": sampling})
        self.refused: dict[str, str] = {}

    async def check(self) -> None:
        await self.inner.check()

    async def complete(self, job: Job) -> Answer:
        try:
            return await self.inner.complete(job)
        except RefusedError as error:
            self.refused[job.fingerprint] = str(error)
            raise


class Calls:
    """Batches of chat requests to one model (`teacher`), answered from the cache first.

    Args:
        config: the run's config (limits, progress; `config.teacher` unless `teacher` is given).
        cache: the shared answer cache.
        teacher: the model to call, when it is not `config.teacher` (Lion's student).
        backend: a ready backend (tests); built from `teacher` on first use otherwise.
    """

    def __init__(self, config: GenerateConfig, cache: AnswerCache, loop: asyncio.AbstractEventLoop,
                 teacher: TeacherSection | None = None, backend=None):
        self.config = config if teacher is None else config.model_copy(update={"teacher": teacher})
        self.cache, self.loop, self.backend = cache, loop, backend
        self.stats = RunStats()
        self.refused = 0

    def ask(self, requests: list[Request]) -> list[Answer | None]:
        """Answers in request order; None for a request the server refused (e.g. a prompt too long).

        Raises:
            KdlmError: requests that still failed after the retries (the answers so far are cached).
        """
        keys = [fingerprint(self.config.teacher.model, request.messages,
                            request.sampling.model_dump(exclude={"n"}), request.sample) for request in requests]
        known = self.cache.fingerprints()
        groups: dict[str, list[Job]] = {}
        samplings: dict[str, SamplingSection] = {}
        queued: set[str] = set()
        for request, key in zip(requests, keys, strict=True):
            if key in known or key in queued:
                continue
            queued.add(key)
            group = request.sampling.model_dump_json()
            samplings[group] = request.sampling
            # The seed comes from the fingerprint, as in the engine: a retry gets the same one.
            groups.setdefault(group, []).append(Job(len(queued) - 1, request.sample, request.messages, key,
                                                    int(key[:8], 16)))
        self.stats.cached += len(requests) - len(queued)
        refused: dict[str, str] = {}
        for group, jobs in groups.items():
            if self.backend is None:
                self.backend = make_backend(self.config)
            backend = _NoteRefusals(self.backend, samplings[group])
            config = self.config.model_copy(update={"sampling": samplings[group]})
            failed_before = self.stats.failed
            self.loop.run_until_complete(_run_jobs(config, backend, jobs, self.cache, self.stats))
            refused.update(backend.refused)
            gave_up = self.stats.failed - failed_before - len(backend.refused)
            if gave_up:
                raise KdlmError(
                    f"{gave_up} requests to {self.config.teacher.model} failed after "
                    f"{self.config.limits.max_retries} retries ({self.stats.errors[-1]}); the answers so far are "
                    "cached, and a rerun of the same command continues from them"
                )
        if refused:
            self.refused += len(refused)
            console.print(f"[yellow]warning:[/] {self.config.teacher.model} refused {len(refused)} requests "
                          f"(first: {next(iter(refused.values()))}); the recipe goes on without them",
                          highlight=False)
        return [None if key in refused else self.cache.get(key) for key in keys]

    def close(self) -> None:
        if self.backend is not None:
            self.loop.run_until_complete(self.backend.close())


def chat_record(prompt: str, answer: str, meta: dict) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "meta": meta}


class Session:
    """What a recipe run holds: the cache, one event loop, the teacher's calls, and its statistics."""

    def __init__(self, config: GenerateConfig, backend=None):
        self.config = config
        self.output = Path(config.output)
        self.cache = AnswerCache(Path(config.cache) if config.cache else self.output.with_suffix(".sqlite"))
        self.loop = asyncio.new_event_loop()
        self.teacher = Calls(config, self.cache, self.loop, backend=backend)
        self.others: list[Calls] = []
        self.counts: dict[str, int] = {}

    def calls(self, teacher: TeacherSection, backend=None) -> Calls:
        calls = Calls(self.config, self.cache, self.loop, teacher=teacher, backend=backend)
        self.others.append(calls)
        return calls

    def count(self, key: str, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount

    def finish(self, rows: list[dict], name: str) -> dict:
        """Write the output records and OUTPUT.stats.json; print one summary line; return the stats."""
        write_jsonl(self.output, rows)
        every = [self.teacher, *self.others]
        stats = {
            "recipe": name,
            "records": len(rows),
            "requests_cached": sum(calls.stats.cached for calls in every),
            "requests_sent": sum(calls.stats.answered for calls in every),
            "requests_refused": sum(calls.refused for calls in every),
            "prompt_tokens": sum(calls.stats.prompt_tokens for calls in every),
            "completion_tokens": sum(calls.stats.completion_tokens for calls in every),
            **dict(sorted(self.counts.items())),
        }
        self.output.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        console.print(
            f"{name}: {len(rows)} records in {self.output} ({stats['requests_cached']} answers from the cache, "
            f"{stats['requests_sent']} new requests)", highlight=False,
        )
        return stats

    def close(self) -> None:
        try:
            for calls in [self.teacher, *self.others]:
                calls.close()
        finally:
            self.loop.run_until_complete(_cancel_pending())
            self.loop.close()
            self.cache.close()


async def _cancel_pending() -> None:
    """Stop the tasks left in the loop (e.g. the local backend's batching worker) before it closes."""
    pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def run_recipe(config: GenerateConfig, backend=None) -> dict:
    """`kdlm generate` with a `recipe:` section: run `kdlm.recipes.<recipe.name>` with its typed settings
    (kdlm.generate.recipe_settings, validated when the config was read)."""
    import importlib

    if config.recipe is None:
        raise KdlmError(f"the config of {config.output} has no recipe section (recipe.name: one of {', '.join(RECIPES)})")
    module = importlib.import_module(f"kdlm.recipes.{config.recipe.name}")
    if config.recipe.name in ("cot", "icl"):  # these run the engine once per stage, on the whole config
        return module.run(config)
    session = Session(config, backend=backend)
    try:
        return module.run(session, config.recipe)
    finally:
        session.close()
