"""The teacher answers prompts once; the answers are cached on disk and reused by every later run.

The answers go through the generation engine (`kdlm.generate`): each (prompt, sample) is a request keyed
by the engine's fingerprint (teacher, messages, sampling parameters, sample index) in a SQLite cache,
`cache_dir()/answers/<settings fingerprint>.sqlite`, where each answer is committed as it is decoded: a
crash or Ctrl-C loses at most the batch in flight, and a rerun generates only what is missing. The local
teacher decodes with `BatchGenerateBackend` (one `generate` call per batch, seeded by its first request),
which gives the answers earlier kdlm versions gave for the same settings.

A prompt the teacher cannot answer (longer than its context, or one whose generation raises) is
recorded as failed with its reason in the cache's `failures` table and left out of training; the
others are answered, and the count is reported at the end. A failed prompt is not tried again under
the same settings (delete its row to retry).

Answers cached by kdlm before the SQLite cache (`<settings fingerprint>.jsonl` beside it) are imported
on first use, so that upgrading pays for no answer twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from kdlm.errors import KdlmError
from kdlm.fingerprint import fingerprint
from kdlm.generate.backends import BatchGenerateBackend, Job
from kdlm.generate.cache import Answer, AnswerCache
from kdlm.generate.engine import answer_in_batches
from kdlm.generate.engine import fingerprint as request_fingerprint
from kdlm.paths import cache_dir
from kdlm.precision import Bf16Setting, bf16_enabled

__all__ = ["answer_prompts", "fingerprint"]


def _prompt_messages(record: dict) -> list[dict]:
    messages = record["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


def _jobs(records: list[dict], samples_per_prompt: int, settings: dict) -> list[tuple[Job, str]]:
    """One (job, legacy key) per (prompt, sample), in input order.

    The legacy key, a hash of the prompt, the sample index and `settings`, was the cache key before the SQLite
    cache; the batch seed is still derived from it, so that the same settings give the same answers.
    """
    parameters = {"max_tokens": settings["max_new_tokens"], "temperature": settings["temperature"],
                  "top_p": settings["top_p"], "seed": settings["seed"], "bf16": settings["bf16"],
                  "decoder": "generate, one seed per batch"}
    jobs = []
    for index, record in enumerate(records):
        messages = _prompt_messages(record)
        for sample in range(samples_per_prompt):
            legacy = fingerprint({"messages": messages, "sample": sample, **settings})
            key = request_fingerprint(settings["teacher"], messages, parameters, sample)
            jobs.append((Job(index, sample, messages, key, int(legacy, 16) % (2**31) + settings["seed"]), legacy))
    return jobs


def _import_legacy(cache: AnswerCache, legacy_file: Path, jobs: list[tuple[Job, str]]) -> None:
    """Copy the answers and failures of an older kdlm's JSONL cache into `cache` (lines cut by a crash are skipped)."""
    by_legacy = {legacy: job.fingerprint for job, legacy in jobs}
    for line in legacy_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        key = by_legacy.get(entry.get("key")) if isinstance(entry, dict) else None
        if key is not None and "answer" in entry:
            cache.put(key, Answer(entry["answer"], None, 0, 0))
        elif key is not None and "failed" in entry:
            cache.fail(key, entry["failed"])


def answer_prompts(
    model,
    tokenizer,
    records: list[dict],
    *,
    teacher_name: str,
    samples_per_prompt: int = 1,
    max_new_tokens: int = 192,
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 32,
    seed: int = 0,
    bf16: Bf16Setting = "auto",
    cache_file: Path | None = None,
) -> list[dict]:
    """Return chat records whose last message is the teacher's answer, generating only uncached ones.

    Args:
        model: the teacher (a causal LM); None when every answer must come from the cache.
        tokenizer: its tokenizer, with a chat template.
        records: records with `messages` (the last assistant turn, if any, is replaced).
        teacher_name: identifies the teacher in the cache key (its spec string).
        samples_per_prompt: answers per prompt; sample i of a prompt is a request of its own.
        temperature: 0 means greedy decoding.
        bf16: generate under bf16 autocast: True, False or "auto" (where the hardware runs it fast, see
            kdlm.precision); the resolved value is part of the cache key, since it changes the answers.
        cache_file: the SQLite cache; defaults to `cache_dir()/answers/<settings fingerprint>.sqlite`.

    Returns:
        One record per answered (prompt, sample), in input order, each with `meta.fingerprint` (its cache key).
    """
    settings = {"teacher": teacher_name, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed, "bf16": bf16_enabled(bf16, model.device if model is not None else None)}
    legacy_file = cache_dir() / "answers" / f"{fingerprint(settings)}.jsonl"
    cache_file = Path(cache_file) if cache_file is not None else legacy_file.with_suffix(".sqlite")
    jobs = _jobs(records, samples_per_prompt, settings)
    new = not cache_file.exists()
    cache = AnswerCache(cache_file)
    try:
        if new and legacy_file.exists():
            _import_legacy(cache, legacy_file, jobs)
        known = cache.fingerprints() | set(cache.failures())
        missing = [job for job, _ in jobs if job.fingerprint not in known]
        if missing and model is None:
            raise KdlmError(
                f"{len(missing)} of {len(jobs)} teacher answers are not cached ({cache_file}) and the teacher is not "
                "loaded (training from teacher.cache); write them with `kdlm cache-teacher CONFIG` first, "
                "or set data.teacher_answers=false"
            )
        if missing:
            backend = BatchGenerateBackend(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                           top_p=top_p, bf16=settings["bf16"])
            answer_in_batches(backend, missing, cache, batch_size)
        answers = {job.fingerprint: cache.get(job.fingerprint) for job, _ in jobs}
        failures = cache.failures()
    finally:
        cache.close()
    results = [
        {"messages": job.messages + [{"role": "assistant", "content": answers[job.fingerprint].text}],
         "meta": {"teacher": teacher_name, "fingerprint": job.fingerprint}}
        for job, _ in jobs if answers[job.fingerprint] is not None
    ]
    _report_failures([failures[job.fingerprint] for job, _ in jobs if answers[job.fingerprint] is None], len(jobs),
                     cache_file)
    return results


def _report_failures(reasons: list[str], total: int, cache_file: Path) -> None:
    if not reasons:
        return
    message = (f"{len(reasons)} of {total} teacher answers failed (the first: {reasons[0]}); the reasons are in the "
               f"failures table of {cache_file}, where deleting a row retries it")
    if len(reasons) == total:
        raise KdlmError(f"all {message}")
    Console(stderr=True, soft_wrap=True).print(f"[yellow]warning:[/] {message}. Those prompts are left out.", highlight=False)
