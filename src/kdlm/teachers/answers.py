"""The teacher answers prompts once; the answers are cached on disk and reused by every later run.

The cache is a JSONL file per (teacher, generation settings) with one line per answered
(prompt, sample index), appended as batches finish: a crash or Ctrl-C loses at most the batch in
flight, and a rerun generates only what is missing. A kill in the middle of an append leaves a last
line without its newline; it is cut off before the next append, so no line is glued onto it.

A prompt the teacher cannot answer (longer than its context, or one whose generation raises) is
recorded as failed with its reason, `{"key": ..., "failed": "..."}`, and left out of training; the
others are answered, and the count is reported at the end. A failed prompt is not tried again under
the same settings (delete its line to retry).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdlm.errors import KdlmError
from kdlm.models.loading import cache_dir
from kdlm.precision import Bf16Setting, bf16_enabled


def fingerprint(payload: dict) -> str:
    """A short stable hash of a JSON-serialisable payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def repair_torn_tail(path: Path) -> int:
    """Cut a last line left without its newline (a kill during an append); returns the bytes removed."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("rb+") as handle:
        handle.truncate(keep)
    return len(data) - keep


def read_answers(cache_file: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(answers, failures) by key, from a cache file whose torn last line, if any, is cut first."""
    answers: dict[str, str] = {}
    failures: dict[str, str] = {}
    if repair_torn_tail(cache_file):
        Console(stderr=True, soft_wrap=True).print(f"{cache_file}: cut off a last line left incomplete by a crash", highlight=False)
    if cache_file.exists():
        for line in cache_file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash in an older kdlm: that answer is generated again
            if "answer" in entry:
                answers[entry["key"]] = entry["answer"]
            elif "failed" in entry:
                failures[entry["key"]] = entry["failed"]
    return answers, failures


def _prompt_messages(record: dict) -> list[dict]:
    messages = record["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


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
        samples_per_prompt: answers per prompt; sample i of a prompt is seeded independently.
        temperature: 0 means greedy decoding.
        bf16: generate under bf16 autocast: True, False or "auto" (where the hardware runs it fast, see
            kdlm.precision); the resolved value is part of the cache key, since it changes the answers.
        cache_file: defaults to `cache_dir()/answers/<settings fingerprint>.jsonl`.

    Returns:
        One record per (prompt, sample), in input order, each with `meta.fingerprint`.
    """
    settings = {
        "teacher": teacher_name,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "bf16": bf16_enabled(bf16, model.device if model is not None else None),
    }
    if cache_file is None:
        cache_file = cache_dir() / "answers" / f"{fingerprint(settings)}.jsonl"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cached, failed = read_answers(cache_file)

    jobs = []  # (output index, key, prompt messages, sample index)
    outputs: list[dict | None] = []
    for record in records:
        messages = _prompt_messages(record)
        for sample in range(samples_per_prompt):
            key = fingerprint({"messages": messages, "sample": sample, **settings})
            outputs.append({"messages": messages, "key": key})
            if key not in cached and key not in failed:
                jobs.append((len(outputs) - 1, key, messages, sample))

    if jobs and model is None:
        raise KdlmError(
            f"{len(jobs)} of {len(outputs)} teacher answers are not cached ({cache_file}) and the teacher is not "
            "loaded (training from teacher.cache); write them with `kdlm cache-teacher CONFIG` first, "
            "or set data.teacher_answers=false"
        )
    if jobs:
        _generate(model, tokenizer, jobs, cached, failed, cache_file, settings, batch_size)
    results = []
    for item in outputs:
        answer = cached.get(item["key"])
        if answer is None:
            continue  # failed: reported below
        results.append(
            {
                "messages": item["messages"] + [{"role": "assistant", "content": answer}],
                "meta": {"teacher": teacher_name, "fingerprint": item["key"]},
            }
        )
    _report_failures(outputs, cached, failed, cache_file)
    return results


def _report_failures(outputs: list[dict], cached: dict, failed: dict, cache_file: Path) -> None:
    reasons = [failed[item["key"]] for item in outputs if item["key"] not in cached]
    if not reasons:
        return
    message = (f"{len(reasons)} of {len(outputs)} teacher answers failed (the first: {reasons[0]}); the reasons are in "
               f"{cache_file}, where deleting a failed line retries it")
    if len(reasons) == len(outputs):
        raise KdlmError(f"all {message}")
    Console(stderr=True, soft_wrap=True).print(f"[yellow]warning:[/] {message}. Those prompts are left out.", highlight=False)


def _too_long(tokenizer, text: str, max_new_tokens: int, context: int | None) -> str | None:
    """Why a rendered prompt cannot be answered within the teacher's context, or None."""
    if not context:
        return None
    num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if num_tokens + max_new_tokens <= context:
        return None
    return (f"the prompt has {num_tokens} tokens, and with data.answer_max_new_tokens={max_new_tokens} the answer "
            f"would exceed the teacher's context of {context} tokens")


@torch.no_grad()
def _answer(model, tokenizer, texts: list[str], first_key: str, settings: dict) -> list[str]:
    """The teacher's answers to rendered prompts, decoded together."""
    do_sample = settings["temperature"] > 0
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    # One seed per batch derived from its first key: reruns reproduce the same answers.
    torch.manual_seed(int(first_key, 16) % (2**31) + settings["seed"])
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=settings["bf16"]):
        generated = model.generate(
            **inputs,
            max_new_tokens=settings["max_new_tokens"],
            do_sample=do_sample,
            temperature=settings["temperature"] if do_sample else None,
            top_p=settings["top_p"] if do_sample else None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new_tokens]


def _answer_or_fail(model, tokenizer, batch: list[tuple], settings: dict) -> list[tuple[str | None, str | None]]:
    """(answer, None) or (None, reason) per (key, text) job; a batch that raises is retried one prompt at a time."""
    try:
        return [(answer, None) for answer in _answer(model, tokenizer, [t for _, t in batch], batch[0][0], settings)]
    except (RuntimeError, ValueError, IndexError) as exc:
        if len(batch) == 1:
            lines = str(exc).strip().splitlines()
            return [(None, f"{type(exc).__name__}: {lines[0] if lines else 'no message'}")]
    return [_answer_or_fail(model, tokenizer, [job], settings)[0] for job in batch]


def _generate(model, tokenizer, jobs, cached, failed, cache_file, settings, batch_size) -> None:
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batched generation needs left padding
    context = getattr(model.config, "max_position_embeddings", None)
    try:
        with (
            Progress(
                TextColumn("teacher answers"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
            ) as progress,
            cache_file.open("a") as sink,
        ):
            task = progress.add_task("answers", total=len(jobs))
            ready = []  # (key, rendered prompt)
            for _, key, messages, _ in sorted(jobs, key=lambda job: -len(str(job[2]))):  # similar lengths together
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                reason = _too_long(tokenizer, text, settings["max_new_tokens"], context)
                if reason is None:
                    ready.append((key, text))
                    continue
                failed[key] = reason
                sink.write(json.dumps({"key": key, "failed": reason}) + "\n")
                progress.advance(task)
            sink.flush()
            for start in range(0, len(ready), batch_size):
                batch = ready[start : start + batch_size]
                for (key, _), (answer, reason) in zip(batch, _answer_or_fail(model, tokenizer, batch, settings), strict=True):
                    if answer is not None:
                        cached[key] = answer
                        sink.write(json.dumps({"key": key, "answer": answer}) + "\n")
                    else:
                        failed[key] = reason
                        sink.write(json.dumps({"key": key, "failed": reason}) + "\n")
                sink.flush()
                progress.advance(task, len(batch))
    finally:
        tokenizer.padding_side = padding_side
