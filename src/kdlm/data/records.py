"""Load training records from JSONL/JSON/TXT files, Hugging Face datasets or the builtin sets.

Every record is normalised to one of two shapes:

- chat: `{"messages": [{"role": ..., "content": ...}, ...]}`. The last message, when it comes from
  the assistant, is the response the student learns; a record whose last message is not from the
  assistant is *prompt-only*, to be answered by the teacher first.
- plain text: `{"text": str}`, for language modelling (every token is a target).

Either may carry `"weight"`: a number >= 0 that multiplies the loss of each of its target tokens
(default 1), e.g. the rationale task of Distilling Step-by-Step; and `"task"`: a task name. When any
record has a task, the training objective is per-task normalised: the sum over tasks of the mean
(record-weighted) loss over that task's target tokens in the optimizer step (kdlm.train.tasks), so a
task of short answers is not drowned by one of long rationales.

Simple extra keys of a record (strings, numbers, booleans) are kept under `"meta"`.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path

from kdlm.errors import KdlmError

ROLES = ("system", "user", "assistant")
ACCEPTED_SHAPES = (
    '{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}, '
    '{"prompt": str, "response"|"completion": str}, {"prompt": str}, '
    '{"prompt": [messages], "completion": [messages]} (TRL\'s conversational form), '
    '{"instruction": str, "input": str, "output": str} (input and output optional), {"text": str}'
)
_SHAPE_KEYS = {"messages", "prompt", "response", "completion", "instruction", "input", "output", "text", "meta", "weight", "task"}


def load_records(source: str, *, split: str = "train") -> list[dict]:
    """Load and normalise the records of a data source.

    Args:
        source: a `.jsonl` file (one record per line), a `.json` file (a list of records), a `.txt`
            file (each paragraph, separated by blank lines, is a `{"text"}` record),
            `hf:NAME[:CONFIG]` (a Hugging Face dataset) or `builtin:NAME` (a set shipped with kdlm).
        split: the split of a Hugging Face dataset; ignored for files.

    Returns:
        The normalised records, in source order.

    Raises:
        KdlmError: the source is missing, malformed, holds a record of an unknown shape, or is empty.
    """
    if source.startswith("hf:"):
        return _load_hf(source, split)
    if source.startswith("builtin:"):
        return _load_builtin(source.removeprefix("builtin:"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise KdlmError(
            f"data file not found: {path}; give a .jsonl/.json/.txt path, hf:NAME or builtin:NAME"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _parse_jsonl(path.read_text(encoding="utf-8"), str(path))
    elif suffix == ".json":
        records = _parse_json_list(path.read_text(encoding="utf-8"), str(path))
    elif suffix == ".txt":
        records = _split_paragraphs(path.read_text(encoding="utf-8"))
    else:
        raise KdlmError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json or .txt")
    return _non_empty(records, str(path))


def split_heldout(records: list[dict], num_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `num_heldout` distinct prompts (with all their records) for evaluation.

    Splitting by prompt rather than by record keeps a prompt that appears several times (e.g. with
    several teacher answers) entirely on one side, so the held-out prompts are never trained on.

    Args:
        records: normalised records.
        num_heldout: distinct prompts to hold out; 0 holds out nothing.
        seed: the same records and seed always give the same split.

    Returns:
        (train, heldout), each in the input order.

    Raises:
        KdlmError: fewer than `num_heldout + 1` distinct prompts, so nothing would be left to train on.
    """
    if num_heldout < 0:
        raise KdlmError(f"data.heldout must be 0 or more, got {num_heldout}")
    keys = [_prompt_key(record) for record in records]
    distinct = list(dict.fromkeys(keys))
    if num_heldout >= len(distinct):
        raise KdlmError(
            f"cannot hold out {num_heldout} prompts from {len(distinct)} distinct prompts: "
            "lower data.heldout or add training data"
        )
    random.Random(seed).shuffle(distinct)
    held = set(distinct[:num_heldout])
    train = [record for record, key in zip(records, keys, strict=True) if key not in held]
    heldout = [record for record, key in zip(records, keys, strict=True) if key in held]
    return train, heldout


def is_prompt_only(record: dict) -> bool:
    """True for a chat record whose last message is not the assistant's (the teacher must answer it)."""
    return "messages" in record and record["messages"][-1]["role"] != "assistant"


def normalise_record(raw: object, where: str) -> dict:
    """Normalise one raw record; `where` (e.g. "data.jsonl:3") prefixes any error message."""
    if not isinstance(raw, dict):
        raise KdlmError(
            f"{where}: a record must be a JSON object, got {type(raw).__name__}; accepted: {ACCEPTED_SHAPES}"
        )
    if "messages" in raw:
        record = {"messages": _check_messages(raw["messages"], where)}
    elif "prompt" in raw and _is_messages(raw["prompt"]):  # TRL's conversational prompt/completion
        completion = raw.get("completion") or []
        if not isinstance(completion, list):
            raise KdlmError(f'{where}: "completion" must be a list of messages when "prompt" is one, got {type(completion).__name__}')
        record = {"messages": _check_messages(raw["prompt"] + completion, where)}
    elif "prompt" in raw and "completion" in raw:  # TRL's standard prompt/completion
        record = {"messages": _turns(_string(raw, "prompt", where), _optional_string(raw, "completion", where))}
    elif "prompt" in raw:
        record = {"messages": _turns(_string(raw, "prompt", where), _optional_string(raw, "response", where))}
    elif "instruction" in raw:
        prompt = _string(raw, "instruction", where)
        extra = _optional_string(raw, "input", where)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        record = {"messages": _turns(prompt, _optional_string(raw, "output", where))}
    elif "text" in raw:
        record = {"text": _string(raw, "text", where)}
    else:
        keys = ", ".join(sorted(map(str, raw))) or "none"
        raise KdlmError(f"{where}: unknown record shape (keys: {keys}); accepted: {ACCEPTED_SHAPES}")
    if raw.get("weight") is not None:  # a per-record loss weight (e.g. a recipe's task weight)
        weight = raw["weight"]
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0 or weight == float("inf"):
            raise KdlmError(f'{where}: "weight" must be a finite number >= 0 (it multiplies the record\'s loss), got {weight!r}')
        record["weight"] = float(weight)
    if raw.get("task") is not None:  # a task name: the loss is averaged per task (kdlm.train.tasks)
        if not isinstance(raw["task"], str) or not raw["task"]:
            raise KdlmError(f'{where}: "task" must be a non-empty string (a task name, e.g. "label"), got {raw["task"]!r}')
        record["task"] = raw["task"]
    meta = dict(raw["meta"]) if isinstance(raw.get("meta"), dict) else {}
    meta.update({key: value for key, value in raw.items() if key not in _SHAPE_KEYS and _is_simple(value)})
    if meta:
        record["meta"] = meta
    return record


def _parse_jsonl(text: str, name: str) -> list[dict]:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{line_number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise KdlmError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        records.append(normalise_record(raw, where))
    return records


def _parse_json_list(text: str, name: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise KdlmError(
            f"{name}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from None
    if not isinstance(data, list):
        raise KdlmError(
            f"{name}: a .json data file must hold a list of records; use .jsonl for one record per line"
        )
    return [normalise_record(raw, f"{name}: record {index + 1}") for index, raw in enumerate(data)]


def _split_paragraphs(text: str) -> list[dict]:
    paragraphs = (paragraph.strip() for paragraph in re.split(r"\n[ \t\r\f\v]*\n", text))
    return [{"text": paragraph} for paragraph in paragraphs if paragraph]


def _load_hf(source: str, split: str) -> list[dict]:
    name, _, config = source.removeprefix("hf:").partition(":")
    if not name:
        raise KdlmError(f"{source!r}: write hf:NAME or hf:NAME:CONFIG, e.g. hf:openai/gsm8k:main")
    import datasets  # imported here: loading it is slow and only hf: sources need it

    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # offline, unknown name/config/split: all user-fixable
        raise KdlmError(
            f"could not load the Hugging Face dataset {name!r} (config {config or None!r}, split {split!r}): "
            f"{error}. Check the name and your connection, or convert it to a local JSONL file"
        ) from None
    return _non_empty(
        [normalise_record(row, f"{source} row {index + 1}") for index, row in enumerate(dataset)], source
    )


def _load_builtin(name: str) -> list[dict]:
    folder = resources.files("kdlm.data") / "builtin"
    resource = folder / f"{name}.jsonl"
    if not name or not resource.is_file():
        available = sorted(
            entry.name.removesuffix(".jsonl") for entry in folder.iterdir() if entry.name.endswith(".jsonl")
        )
        raise KdlmError(f"unknown builtin data set {name!r}; available: {', '.join(available)}")
    label = f"builtin:{name}"
    return _non_empty(_parse_jsonl(resource.read_text(encoding="utf-8"), label), label)


def _non_empty(records: list[dict], name: str) -> list[dict]:
    if not records:
        raise KdlmError(f"no records in {name}; add at least one record ({ACCEPTED_SHAPES})")
    return records


def _check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise KdlmError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    checked = []
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise KdlmError(
                f'{where}: message {index + 1} must be {{"role": one of {", ".join(ROLES)}, "content": str}}, '
                f"got {json.dumps(message)[:120]}"
            )
        checked.append({"role": message["role"], "content": message["content"]})
    if not any(message["role"] == "user" for message in checked):
        raise KdlmError(f'{where}: "messages" needs at least one "user" message')
    return checked


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _turns(prompt: str, response: str | None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _string(raw: dict, key: str, where: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise KdlmError(
            f'{where}: "{key}" must be a string, got {type(value).__name__}; accepted: {ACCEPTED_SHAPES}'
        )
    return value


def _optional_string(raw: dict, key: str, where: str) -> str | None:
    return None if raw.get(key) is None else _string(raw, key, where)


def _is_simple(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _prompt_key(record: dict) -> str:
    if "text" in record:
        return json.dumps(record["text"])
    messages = record["messages"]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return json.dumps(messages, sort_keys=True)
