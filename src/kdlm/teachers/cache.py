"""An offline teacher cache: the teacher runs once over the training set, training reads its targets.

Layout of a cache directory::

    manifest.json              what the cache was made from, and the shards written so far
    shard-00000.safetensors    examples [0, E), E = examples_per_shard, in dataset order
    shard-00001.safetensors    examples [E, 2E) ...

Every shard is written to a temporary name and renamed, and the manifest is rewritten (also by
rename) after each shard, so a crash loses at most the shard in flight. A rerun checks that the
manifest was made with the same settings, keeps the shards it lists (their sha256 must match) and
starts at the first missing one. Nothing in a shard depends on what ran before it in the same
process: batches are formed inside a shard, and sampling is seeded per example, so an interrupted and
resumed run writes byte-identical shards (tests/test_teacher_cache.py checks it).

Shard contents (safetensors; T = target tokens of the shard, "target" = a position whose label is not
-100, in the order of ``labels[1:]``, the order ``target_hidden_states`` uses):

- ``token_offsets`` int64 (E + 1,): the targets of the shard's example j are rows
  ``token_offsets[j]:token_offsets[j + 1]``.
- kind ``topk``: ``ids`` (T, k) uint16 (int32 when the vocabulary exceeds 65,536), the teacher's top-k
  ids in descending probability; ``logprobs`` (T, k) float16, their log-probabilities at temperature 1
  normalised over the full vocabulary; ``tail_logmass`` (T,) float32, the log of the missing mass,
  a log-sum-exp over the other V - k log-probs (-inf when k = V), so it is exact however small. Caches
  written before it existed hold ``kept_logmass`` = ``log Σ_k p`` instead; ``read_targets`` derives the
  tail from that, which resolves a missing mass down to about 1e-6 (fp32 rounding of the kept mass). A
  served teacher gives only its k log-probs, so its tail is derived the same way.
- kind ``sampled``: ``num_distinct`` (T,) uint16, how many distinct ids were drawn at each target;
  ``ids`` (D,) uint16/int32 and ``counts`` (D,) uint8 (uint16 when samples > 255), D = Σ num_distinct:
  per target, its distinct sampled ids (ascending) and how often each was drawn. Counts sum to
  ``samples`` (N) at every target. ``logprobs`` (D,) float16: the teacher's log p at each drawn id (T = 1);
  the importance weight count / (N · p) needs it for an unbiased value of any divergence (format 2; format
  1 caches lack it).

Why float16 and not bfloat16 for log-probs: they lie in [-30, 0] for any token worth keeping, well
inside fp16's range, and fp16 keeps 3 more mantissa bits. Measured on the bundled teacher (top-64,
quickstart data): max |error| 0.0078 nats for fp16 against 0.0625 for bf16 (see docs/teacher-cache.md).

Reader convention (``read_targets``), the interface of ``train(topk_targets=...)``: per example, ids
int64 and values float32, all (n_targets, k):

- ``topk``: a pair ``(ids, values)``; k = the cached top_k; ``values`` (n_targets, k+1) are the teacher's k
  log-probs and, last, ``tail_logmass`` (the loss's exact tail bucket). The k log-probs are shifted per row
  so that their mass is exactly 1 - exp(tail_logmass) in fp32, not that of the fp16-rounded values.
- ``sampled``: a triple ``(ids, log_weights, logprobs)``; k = the largest number of distinct ids at any
  target of the cache; ``log_weights`` are ``log(count / N)``, the random-sampling estimate of the teacher
  distribution at T = 1 (Sparse Logit Sampling, arXiv 2503.16870, proposal = the teacher itself, so the
  weight of an id is its empirical frequency; E[count / N] = p exactly), and ``logprobs`` the teacher's
  log p at the ids (``sampled_kd_loss_sums`` turns both into importance weights). The weights of a row sum
  to 1 (no tail). Rows with fewer distinct ids are padded on the right with the row's first id, log weight
  -inf (weight 0) and log-prob 0.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import Tensor

from kdlm.atomic import atomic_path
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError, os_error_behind
from kdlm.fingerprint import fingerprint
from kdlm.losses.logits import log_one_minus_exp, tail_logmass_from_kept
from kdlm.teachers.signals import teacher_logits

FORMAT_VERSION = 2  # 2: sampled shards also hold the teacher log-probs of the drawn ids
MANIFEST = "manifest.json"
KINDS = ("topk", "sampled")
VALUE_DTYPE = torch.float16
EXAMPLES_PER_SHARD = 128  # a crash loses at most this many examples (about 15 s of the bundled teacher on 2 cores)
# The settings that must agree for a cache to be reused; everything else in the manifest is bookkeeping.
IDENTITY_KEYS = (
    "format_version", "kind", "teacher", "tokenizer_fingerprint", "vocab_size", "top_k", "samples", "seed",
    "bf16", "data_fingerprint", "num_examples", "examples_per_shard",
)


def examples_fingerprint(examples: list[dict]) -> str:
    """Identifies a tokenised dataset (ids and labels), so that a cache is never used for other data."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(str(example["input_ids"]).encode())
        digest.update(str(example["labels"]).encode())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer by its token -> id map (added and special tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return fingerprint(vocab, ensure_ascii=False)  # a list of pairs: sorting keys changes nothing


def id_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


def cache_identity(
    *, kind: str, teacher: str, tokenizer, vocab_size: int, examples: list[dict], top_k: int = 0,
    samples: int = 0, seed: int = 0, bf16: bool = True, examples_per_shard: int = EXAMPLES_PER_SHARD,
) -> dict:
    """The manifest fields a cache must match to be reused (see ``IDENTITY_KEYS``)."""
    if kind not in KINDS:
        raise KdlmError(f"unknown cache kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "topk" and not 1 <= top_k <= vocab_size:
        raise KdlmError(f"teacher.top_k={top_k} must lie between 1 and the vocabulary size ({vocab_size})")
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "teacher": teacher,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "top_k": top_k if kind == "topk" else 0,
        "samples": samples if kind == "sampled" else 0,
        "seed": seed if kind == "sampled" else 0,  # top-k targets do not depend on it
        "bf16": bf16,
        "data_fingerprint": examples_fingerprint(examples),
        "num_examples": len(examples),
        "examples_per_shard": examples_per_shard,
    }


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KdlmError(f"{path} is not valid JSON ({exc}); delete the folder and run `kdlm cache-teacher` again") from None


def identity_differences(manifest: dict, identity: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> list[str]:
    """Human-readable lines, one per setting where the cache and the run disagree."""
    names = {
        "data_fingerprint": "training data (tokenised examples)",
        "tokenizer_fingerprint": "tokenizer",
        "num_examples": "number of training examples",
    }
    return [
        f"{names.get(key, key)}: cache has {manifest.get(key)!r}, this run needs {identity[key]!r}"
        for key in keys
        if manifest.get(key) != identity[key]
    ]


def check_cache(folder: Path, identity: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> dict:
    """Return the manifest of a complete cache made for `identity`; raise a KdlmError that says what differs.

    `keys` narrows the check; training passes every key but `examples_per_shard`, which does not change
    the targets.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    rebuild = f"write it with `kdlm cache-teacher CONFIG` using this run's config (teacher.cache={folder})"
    if manifest is None:
        raise KdlmError(f"teacher.cache={folder} holds no teacher cache (no {MANIFEST}); {rebuild}")
    differences = identity_differences(manifest, identity, keys)
    if differences:
        raise KdlmError(
            f"the teacher cache in {folder} was made for other settings:\n  " + "\n  ".join(differences)
            + f"\nDelete it (or choose another teacher.cache folder) and {rebuild}"
        )
    if not manifest.get("complete"):
        done = sum(shard["num_examples"] for shard in manifest["shards"])
        raise KdlmError(
            f"the teacher cache in {folder} is incomplete ({done} of {manifest['num_examples']} examples); "
            "finish it by running `kdlm cache-teacher CONFIG` again (it resumes)"
        )
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path, fsync=True) as tmp:
        try:
            write(tmp)
        except Exception as exc:  # a full disk inside safetensors: an OSError that names the file
            if isinstance(exc, OSError) or (error := os_error_behind(exc, tmp)) is None:
                raise
            raise error from None


def _save_manifest(folder: Path, manifest: dict) -> None:
    _write_atomically(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _example_seed(seed: int, example_index: int) -> int:
    """A per-example seed: the draws of an example do not depend on batching, sharding or resuming."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_index}".encode()).digest()[:8], "little") >> 1


def sample_counts(logprobs: Tensor, samples: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Draw `samples` ids per row from exp(logprobs) with replacement; distinct ids and their counts.

    Args:
        logprobs: (n, V) teacher log-probs.

    Returns:
        (num_distinct (n,), ids (D,), counts (D,)), int64; per row, ids ascending; counts sum to `samples`.
    """
    if logprobs.shape[0] == 0:  # an example without target tokens
        empty = torch.zeros(0, dtype=torch.int64, device=logprobs.device)
        return empty, empty, empty
    draws = torch.multinomial(logprobs.float().exp(), samples, replacement=True, generator=generator)
    draws, _ = draws.sort(dim=1)
    new = torch.ones_like(draws, dtype=torch.bool)
    new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    starts = new.flatten().nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([draws.numel()], device=starts.device)])
    return new.sum(dim=1), draws.flatten()[starts], ends - starts


def rest_logmass(logprobs: Tensor, ids: Tensor) -> Tensor:
    """(n, V) log-probs, (n, k) ids -> (n,) log of the mass outside the ids, -inf when they cover V.

    Summed directly, not as 1 - Σ_k p: that difference is lost to rounding once the tail is below ~1e-7.
    """
    return torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)


def _shard_tensors(
    teacher, examples: list[dict], first: int, *, kind: str, top_k: int, samples: int, seed: int,
    pad_token_id: int, batch_size: int, bf16: bool, ids_dtype: torch.dtype, on_examples: Callable[[int], None],
) -> dict[str, Tensor]:
    """Run the teacher over one shard's examples (global indices first, first+1, ...)."""
    per_example: list[dict[str, Tensor] | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))

    def topk_entry(values: Tensor, ids: Tensor, tail_logmass: Tensor) -> dict[str, Tensor]:
        return {
            "ids": ids.to(ids_dtype),
            "logprobs": values.clamp(min=torch.finfo(VALUE_DTYPE).min).to(VALUE_DTYPE),
            "tail_logmass": tail_logmass.float(),
        }

    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        if hasattr(teacher, "score_topk"):  # a served teacher (kdlm.teachers.api): only its top-k comes back
            for i, (values, ids) in zip(indices, teacher.score_topk([examples[i] for i in indices], top_k), strict=True):
                per_example[i] = topk_entry(values, ids, tail_logmass_from_kept(torch.logsumexp(values, -1), values.dtype))
            on_examples(len(indices))
            continue
        device = next(teacher.parameters()).device
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_token_id).items()}
        logprobs = torch.log_softmax(teacher_logits(teacher, batch, bf16=bf16), dim=-1)
        counts = (batch["labels"][:, 1:] != -100).sum(dim=1).tolist()
        for i, rows in zip(indices, logprobs.split(counts), strict=True):
            if kind == "topk":
                values, ids = rows.topk(top_k, dim=-1)
                per_example[i] = topk_entry(values.cpu(), ids.cpu(), rest_logmass(rows, ids).cpu())
            else:
                rows = rows.cpu()  # drawn on the CPU with a CPU generator: the same draws on every device
                generator = torch.Generator().manual_seed(_example_seed(seed, first + i))
                num_distinct, ids, draws = sample_counts(rows, samples, generator)
                row_of = torch.repeat_interleave(torch.arange(len(rows), device="cpu"), num_distinct)
                per_example[i] = {
                    "num_distinct": num_distinct.to(torch.uint16),
                    "ids": ids.to(ids_dtype),
                    "counts": draws.to(torch.uint8 if samples <= 255 else torch.uint16),
                    "logprobs": rows[row_of, ids].clamp(min=torch.finfo(VALUE_DTYPE).min).to(VALUE_DTYPE),
                }
        on_examples(len(indices))
    lengths = [sum(1 for label in example["labels"][1:] if label != -100) for example in examples]
    tensors = {"token_offsets": torch.tensor([0, *lengths], device="cpu").cumsum(0)}
    for name in per_example[0] if per_example else ():
        tensors[name] = torch.cat([item[name] for item in per_example]).contiguous()
    return tensors


def write_cache(
    teacher,
    examples: list[dict],
    folder: Path,
    *,
    identity: dict,
    pad_token_id: int,
    batch_size: int = 8,
    on_shard: Callable[[int], None] | None = None,
    show_progress: bool = True,
) -> dict:
    """Write (or finish) the teacher cache of `examples` in `folder`; returns the final manifest.

    Args:
        teacher: the teacher causal LM, or a served teacher (``kdlm.teachers.api.ApiTeacher``, top-k only).
        examples: tokenised examples (`input_ids`, `labels`), in the order training indexes them.
        identity: from ``cache_identity`` (kind, k or samples, seed, fingerprints, shard size).
        pad_token_id: pads the teacher's batches.
        batch_size: teacher batch; batches never cross a shard, so resuming does not change them.
        on_shard: called with the shard index after each shard is committed (tests use it to crash).

    Raises:
        KdlmError: the folder holds a cache made with other settings, or a listed shard was altered.
    """
    if hasattr(teacher, "score_topk") and identity["kind"] != "topk":
        raise KdlmError(
            "a served teacher gives only its top log-probs, but sampled targets draw from the whole distribution; "
            "use teacher.cache_kind=topk with teacher.api_base"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    if manifest is not None:
        differences = identity_differences(manifest, identity)
        if differences:
            raise KdlmError(
                f"{folder} already holds a teacher cache made with other settings:\n  " + "\n  ".join(differences)
                + "\nDelete the folder or choose another teacher.cache, then run again"
            )
        for shard in manifest["shards"]:
            path = folder / shard["file"]
            if not path.is_file() or _sha256(path) != shard["sha256"]:
                raise KdlmError(f"{path} is missing or altered; delete {folder} and run `kdlm cache-teacher` again")
    else:
        manifest = {**identity, "source": getattr(teacher, "base_url", "model"), "value_dtype": "float16", "id_dtype": str(id_dtype(identity["vocab_size"])).split(".")[1],
                    "complete": False, "num_tokens": 0, "max_distinct": 0, "shards": []}
        _save_manifest(folder, manifest)

    kind, per_shard = identity["kind"], identity["examples_per_shard"]
    num_shards = math.ceil(len(examples) / per_shard)
    done = len(manifest["shards"])
    columns = (TextColumn(f"teacher {kind} cache"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("cache", total=len(examples), completed=min(done * per_shard, len(examples)))
        for index in range(done, num_shards):
            first = index * per_shard
            shard_examples = examples[first : first + per_shard]
            tensors = _shard_tensors(
                teacher, shard_examples, first, kind=kind, top_k=identity["top_k"], samples=identity["samples"],
                seed=identity["seed"], pad_token_id=pad_token_id, batch_size=batch_size, bf16=identity["bf16"],
                ids_dtype=id_dtype(identity["vocab_size"]), on_examples=lambda n: progress.advance(task, n),
            )
            path = folder / _shard_name(index)
            _write_atomically(path, lambda tmp, tensors=tensors: save_file(tensors, str(tmp), metadata={"kind": kind}))
            num_tokens = int(tensors["token_offsets"][-1])
            manifest["shards"].append({
                "file": path.name, "first_example": first, "num_examples": len(shard_examples),
                "num_tokens": num_tokens, "bytes": path.stat().st_size, "sha256": _sha256(path),
            })
            manifest["num_tokens"] += num_tokens
            if kind == "sampled" and num_tokens:
                manifest["max_distinct"] = max(manifest["max_distinct"], int(tensors["num_distinct"].int().max()))
            manifest["complete"] = index == num_shards - 1
            _save_manifest(folder, manifest)
            if on_shard is not None:
                on_shard(index)
    if num_shards == 0 and not manifest["complete"]:
        manifest["complete"] = True
        _save_manifest(folder, manifest)
    return manifest


def bytes_per_token(manifest: dict) -> float:
    """Shard bytes on disk per target token (headers and offsets included)."""
    return sum(shard["bytes"] for shard in manifest["shards"]) / max(1, manifest["num_tokens"])


def read_targets(folder: Path, manifest: dict | None = None) -> list[tuple[Tensor, ...]]:
    """Per example, `(ids, values)` (top-k) or `(ids, log_weights, logprobs)` (sampled); see the module docstring.

    Raises:
        KdlmError: no manifest, an incomplete cache, or a shard whose sha256 does not match the manifest.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if manifest is None or not manifest.get("complete"):
        raise KdlmError(f"{folder} holds no complete teacher cache; run `kdlm cache-teacher CONFIG`")
    width = max(1, manifest["max_distinct"]) if manifest["kind"] == "sampled" else manifest["top_k"]
    targets: list[tuple[Tensor, Tensor]] = []
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.is_file() or _sha256(path) != shard["sha256"]:
            raise KdlmError(f"{path} is missing or does not match its sha256 in the manifest; rebuild the cache")
        tensors = load_file(str(path))
        columns = _topk_rows(tensors) if manifest["kind"] == "topk" else _sampled_rows(tensors, manifest["samples"], width)
        offsets = tensors["token_offsets"].tolist()
        for start, end in zip(offsets[:-1], offsets[1:], strict=True):
            targets.append(tuple(column[start:end] for column in columns))
    return targets


def _topk_rows(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    values = tensors["logprobs"].float()
    if "tail_logmass" in tensors:
        tail = tensors["tail_logmass"]
        kept = log_one_minus_exp(tail)
    else:  # a cache written before tail_logmass: the tail is known down to the fp32 rounding of the kept mass
        kept = tensors["kept_logmass"]
        tail = tail_logmass_from_kept(kept, torch.float32)
    # Give the row back the exact fp32 kept mass; the k fp16-rounded values alone would blur it.
    values = values + (kept - torch.logsumexp(values, dim=-1)).unsqueeze(-1)
    return tensors["ids"].to(torch.int64), torch.cat([values, tail.unsqueeze(-1)], dim=-1)


def _sampled_rows(tensors: dict[str, Tensor], samples: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    num_distinct = tensors["num_distinct"].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(num_distinct.numel()), num_distinct)
    row_starts = torch.cumsum(num_distinct, 0) - num_distinct
    columns = torch.arange(rows.numel()) - row_starts[rows]
    flat_ids = tensors["ids"].to(torch.int64)
    ids = torch.zeros(num_distinct.numel(), width, dtype=torch.int64)
    if num_distinct.numel():
        ids[:] = flat_ids[row_starts.clamp(max=max(0, flat_ids.numel() - 1))].unsqueeze(1)  # pad with the first id
    values = torch.full((num_distinct.numel(), width), float("-inf"))
    logprobs = torch.zeros(num_distinct.numel(), width)
    ids[rows, columns] = flat_ids
    values[rows, columns] = (tensors["counts"].to(torch.float64) / samples).log().float()
    logprobs[rows, columns] = tensors["logprobs"].float()
    return ids, values, logprobs
