"""The teacher answers prompts once; the answers are cached on disk and reused by every later run.

The cache is a JSONL file per (teacher, generation settings) with one line per answered
(prompt, sample index), appended as batches finish: a crash or Ctrl-C loses at most the batch in
flight, and a rerun generates only what is missing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdlm.errors import KdlmError
from kdlm.models.loading import cache_dir
from kdlm.precision import Bf16Setting, bf16_enabled


def fingerprint(payload: dict) -> str:
    """A short stable hash of a JSON-serialisable payload."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
    cached: dict[str, str] = {}
    if cache_file.exists():
        for line in cache_file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that answer is generated again
            cached[entry["key"]] = entry["answer"]

    jobs = []  # (output index, key, prompt messages, sample index)
    outputs: list[dict | None] = []
    for record in records:
        messages = _prompt_messages(record)
        for sample in range(samples_per_prompt):
            key = fingerprint({"messages": messages, "sample": sample, **settings})
            outputs.append({"messages": messages, "key": key})
            if key not in cached:
                jobs.append((len(outputs) - 1, key, messages, sample))

    if jobs and model is None:
        raise KdlmError(
            f"{len(jobs)} of {len(outputs)} teacher answers are not cached ({cache_file}) and the teacher is not "
            "loaded (training from teacher.cache); write them with `kdlm cache-teacher CONFIG` first, "
            "or set data.teacher_answers=false"
        )
    if jobs:
        _generate(model, tokenizer, jobs, cached, cache_file, settings, batch_size)
    results = []
    for item in outputs:
        answer = cached[item["key"]]
        results.append(
            {
                "messages": item["messages"] + [{"role": "assistant", "content": answer}],
                "meta": {"teacher": teacher_name, "fingerprint": item["key"]},
            }
        )
    return results


@torch.no_grad()
def _generate(model, tokenizer, jobs, cached, cache_file, settings, batch_size) -> None:
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batched generation needs left padding
    do_sample = settings["temperature"] > 0
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
            # Longest prompts first so that a batch holds prompts of similar length.
            order = sorted(jobs, key=lambda job: -len(str(job[2])))
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                texts = [
                    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                    for _, _, messages, _ in batch
                ]
                inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                # One seed per batch derived from its first key: reruns reproduce the same answers.
                torch.manual_seed(int(batch[0][1], 16) % (2**31) + settings["seed"])
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
                for (_, key, _, _), tokens in zip(batch, new_tokens, strict=True):
                    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    cached[key] = answer
                    sink.write(json.dumps({"key": key, "answer": answer}) + "\n")
                sink.flush()
                progress.advance(task, len(batch))
    finally:
        tokenizer.padding_side = padding_side
