"""The offline teacher cache: round trip, size, crash + resume identity, refusals, sampled targets, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdlm.data import encode_records, load_records
from kdlm.data.tokenize import collate
from kdlm.errors import KdlmError
from kdlm.teachers.cache import (
    IDENTITY_KEYS,
    bytes_per_token,
    cache_identity,
    check_cache,
    id_dtype,
    read_targets,
    sample_counts,
    write_cache,
)
from kdlm.teachers.signals import teacher_logits
from tiny import save_tiny_teacher, tiny_tokenizer, trained_tiny_teacher, write_chat_jsonl

KDLM = [sys.executable, "-m", "kdlm.cli"]
SRC = str(Path(__file__).resolve().parents[1] / "src")  # subprocesses run this checkout's code


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher, tokenizer = trained_tiny_teacher(num_layers=2, steps=10)
    records = load_records(str(write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", count=20)))
    examples = encode_records(tokenizer, records, max_length=96)
    return teacher, tokenizer, examples


def identity(setup, kind="topk", top_k=8, samples=64, examples=None, tokenizer=None, per_shard=6, seed=0):
    teacher, default_tokenizer, default_examples = setup
    return cache_identity(
        kind=kind, teacher="tiny", tokenizer=tokenizer or default_tokenizer, vocab_size=teacher.config.vocab_size,
        examples=default_examples if examples is None else examples, top_k=top_k, samples=samples, seed=seed,
        bf16=False, examples_per_shard=per_shard,
    )


def write(setup, folder: Path, **kwargs) -> dict:
    teacher, tokenizer, examples = setup
    on_shard = kwargs.pop("on_shard", None)
    return write_cache(teacher, examples, folder, identity=identity(setup, **kwargs), pad_token_id=tokenizer.pad_token_id,
                       batch_size=4, on_shard=on_shard, show_progress=False)


def reference_logprobs(setup) -> list[torch.Tensor]:
    """fp32 teacher log-probs at each example's targets, one example at a time (no padding)."""
    teacher, tokenizer, examples = setup
    return [torch.log_softmax(teacher_logits(teacher, collate([e], tokenizer.pad_token_id), bf16=False), -1) for e in examples]


def test_topk_round_trip_ids_values_and_missing_mass(setup, tmp_path):
    write(setup, tmp_path / "c", top_k=8)
    targets = read_targets(tmp_path / "c")
    references = reference_logprobs(setup)
    assert len(targets) == len(references) == len(setup[2])
    exact_rows = 0
    for (ids, values), reference in zip(targets, references, strict=True):
        assert ids.dtype == torch.int64 and values.dtype == torch.float32
        assert ids.shape == (len(reference), 8) and values.shape == (len(reference), 9)  # k log-probs, then the tail
        top_values, top_ids = reference.topk(9, dim=-1)
        # ids exact wherever the reference has no near-tie at the cut (batched and single runs differ by ~1e-6)
        clear = (top_values[:, :-1] - top_values[:, 1:]).min(dim=-1).values > 1e-4
        assert torch.equal(ids[clear], top_ids[clear, :8])
        exact_rows += int(clear.sum())
        # values: fp16 rounding (half an ulp is 2^-11 relative) plus the per-row mass correction
        expected = reference.gather(-1, ids)
        assert torch.all((values[:, :8] - expected).abs() <= expected.abs() * 2**-10 + 1e-5)
        # the tail column is the log of the missing mass, summed over the other tokens (exact in log space)
        outside = reference.double().scatter(-1, ids, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(values[:, 8].double(), outside, rtol=0, atol=1e-4)
        # and the k values carry the rest of the mass: the k+1 buckets sum to 1
        torch.testing.assert_close(values.logsumexp(-1), torch.zeros(len(values)), rtol=0, atol=1e-6)
    assert exact_rows > 400  # the check above did compare ids


def test_a_cache_written_before_tail_logmass_still_reads(setup, tmp_path):
    """Old shards hold kept_logmass (log Σ_k p) instead: the tail is derived from it, to fp32 resolution."""
    manifest = write(setup, tmp_path / "c", top_k=8)
    new_targets = read_targets(tmp_path / "c")
    for shard in manifest["shards"]:
        path = tmp_path / "c" / shard["file"]
        tensors = load_file(str(path))
        tail = tensors.pop("tail_logmass").double()
        tensors["kept_logmass"] = torch.log1p(-tail.exp()).float()  # what the old writer stored
        save_file(tensors, str(path), metadata={"kind": "topk"})
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    old_targets = read_targets(tmp_path / "c")
    for (old_ids, old_values), (new_ids, new_values) in zip(old_targets, new_targets, strict=True):
        assert torch.equal(old_ids, new_ids) and old_values.shape == new_values.shape
        torch.testing.assert_close(old_values[:, :8], new_values[:, :8], rtol=0, atol=1e-5)
        new_mass, old_mass = new_values[:, 8].exp(), old_values[:, 8].exp()  # tails below ~1e-6 read as empty
        torch.testing.assert_close(old_mass, new_mass, rtol=0, atol=2e-6)


@pytest.mark.parametrize("top_k", [8, 32, 64, 128])
def test_topk_bytes_per_token(setup, tmp_path, top_k):
    manifest = write(setup, tmp_path / "c", top_k=top_k)
    shard = load_file(str(tmp_path / "c" / manifest["shards"][0]["file"]))
    assert shard["ids"].dtype == torch.uint16 and shard["logprobs"].dtype == torch.float16
    # 2 B id + 2 B log-prob per entry, 4 B tail log-mass per token, plus offsets and headers (small)
    assert 4 * top_k + 4 < bytes_per_token(manifest) < 4 * top_k + 4 + 10
    assert manifest["id_dtype"] == "uint16" and manifest["value_dtype"] == "float16"


def test_ids_widen_to_int32_past_65536():
    assert id_dtype(65_536) == torch.uint16 and id_dtype(65_537) == torch.int32


def test_top_k_beyond_the_vocabulary_is_a_clear_error(setup):
    with pytest.raises(KdlmError, match="top_k=1000"):
        identity(setup, top_k=1000)


def test_sampling_a_row_free_example_gives_empty_counts():
    num_distinct, ids, counts = sample_counts(torch.zeros(0, 5), 8, torch.Generator().manual_seed(0))
    assert num_distinct.numel() == ids.numel() == counts.numel() == 0


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_crash_then_resume_is_byte_identical_to_a_straight_run(setup, tmp_path, kind):
    straight = write(setup, tmp_path / "straight", kind=kind)
    assert len(straight["shards"]) == 4 and straight["complete"]

    class Crash(Exception):
        pass

    def crash_after_second_shard(index):
        if index == 1:
            raise Crash

    folder = tmp_path / "resumed"
    with pytest.raises(Crash):
        write(setup, folder, kind=kind, on_shard=crash_after_second_shard)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    with pytest.raises(KdlmError, match="incomplete"):
        check_cache(folder, identity(setup, kind=kind))
    # what a kill during shard 3 leaves: a half-written temporary file and a shard the manifest does not list
    (folder / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")
    (folder / "shard-00002.safetensors").write_bytes(b"garbage")

    resumed = write(setup, folder, kind=kind)
    (folder / "shard-00002.safetensors.tmp").unlink(missing_ok=True)
    assert resumed == straight
    assert _digests(folder) == _digests(tmp_path / "straight")
    for resumed_target, straight_target in zip(read_targets(folder), read_targets(tmp_path / "straight"), strict=True):
        assert len(resumed_target) == (2 if kind == "topk" else 3)
        assert all(torch.equal(a, b) for a, b in zip(resumed_target, straight_target, strict=True))


def test_resume_refuses_an_altered_shard(setup, tmp_path):
    def crash(index):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write(setup, tmp_path / "c", on_shard=crash)
    (tmp_path / "c" / "shard-00000.safetensors").write_bytes(b"changed")
    with pytest.raises(KdlmError, match="altered"):
        write(setup, tmp_path / "c")


def test_mismatched_cache_is_refused_with_what_differs(setup, tmp_path):
    folder = tmp_path / "c"
    write(setup, folder, top_k=8)
    check_cache(folder, identity(setup, top_k=8))  # the same settings pass
    examples = setup[2]
    with pytest.raises(KdlmError, match="training data") as error:
        check_cache(folder, identity(setup, examples=examples[:-1] + [examples[0]]))
    assert "kdlm cache-teacher" in str(error.value)
    with pytest.raises(KdlmError, match="top_k: cache has 8, this run needs 16"):
        check_cache(folder, identity(setup, top_k=16))
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(KdlmError, match="tokenizer"):
        check_cache(folder, identity(setup, tokenizer=other))
    with pytest.raises(KdlmError, match="kind: cache has 'topk'"):
        check_cache(folder, identity(setup, kind="sampled"))
    with pytest.raises(KdlmError, match="other settings"):
        write(setup, folder, top_k=16)  # the writer never mixes settings in one folder
    with pytest.raises(KdlmError, match="no teacher cache"):
        check_cache(tmp_path / "empty", identity(setup))
    # the shard size does not change the targets: training may skip that key
    keys = tuple(key for key in IDENTITY_KEYS if key != "examples_per_shard")
    check_cache(folder, identity(setup, per_shard=5), keys)


def test_sampled_counts_are_an_unbiased_estimate_of_the_teacher():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(20) * 2, dim=0)
    rows, samples = 4000, 32
    logprobs = probs.log().expand(rows, -1)
    num_distinct, ids, counts = sample_counts(logprobs, samples, torch.Generator().manual_seed(1))
    row_of = torch.repeat_interleave(torch.arange(rows), num_distinct)
    weights = torch.zeros(rows, 20, dtype=torch.float64)
    weights.index_put_((row_of, ids), counts.double() / samples)
    assert torch.all(weights.sum(-1) == 1)  # counts sum to N in every row
    assert torch.all((weights > 0).sum(-1) == num_distinct)  # ids are distinct within a row
    # mean of count/N over independent rows -> p; 5 standard errors of a binomial(N, p) / N mean
    stderr = (probs * (1 - probs) / (samples * rows)).sqrt().double()
    assert torch.all((weights.mean(0) - probs.double()).abs() < 5 * stderr + 1e-12)


def test_sampled_cache_reads_as_padded_log_weights(setup, tmp_path):
    manifest = write(setup, tmp_path / "c", kind="sampled", samples=64)
    targets = read_targets(tmp_path / "c")
    width = manifest["max_distinct"]
    assert 1 < width <= 64
    shard = load_file(str(tmp_path / "c" / "shard-00000.safetensors"))
    assert shard["counts"].dtype == torch.uint8 and shard["ids"].dtype == torch.uint16
    assert shard["logprobs"].dtype == torch.float16 and shard["logprobs"].shape == shard["ids"].shape
    references = reference_logprobs(setup)
    for (ids, values, logprobs), reference in zip(targets, references, strict=True):
        assert ids.shape == values.shape == logprobs.shape == (len(reference), width)
        assert torch.allclose(values.exp().sum(-1), torch.ones(len(reference)), atol=1e-6)
        padded = values == float("-inf")
        assert torch.equal(ids[padded], ids[:, :1].expand_as(ids)[padded])  # padding repeats the first id
        counts = (values.exp() * 64).round()
        assert torch.all(counts[~padded] >= 1)
        # every draw is an id the teacher gives real probability to, stored with its log-prob (fp16 rounding)
        expected = reference.gather(-1, ids)[~padded]
        assert torch.all(expected > math.log(1e-6))
        assert torch.all((logprobs[~padded] - expected).abs() <= expected.abs() * 2**-11 + 1e-6)
        assert torch.all(logprobs[padded] == 0)
    # the per-token sampled frequencies track the teacher (averaged over all target tokens)
    sampled = torch.cat([torch.zeros_like(r).scatter_add_(-1, i, v.exp()) for (i, v, _), r in zip(targets, references, strict=True)])
    teacher = torch.cat(references).exp()
    assert (sampled - teacher).abs().sum(-1).mean() < 0.6  # total variation of a 64-draw estimate, not of noise


# ---- the real CLI: cache-teacher, then distill from the cache with the teacher's weights gone ----

def run_cli(*args, cwd: Path, check_ok: bool = True):
    env = {**os.environ, "KDLM_CACHE": str(cwd / "kdlm-cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*KDLM, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check_ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def cli_args(root: Path, output: str) -> list[str]:
    return [
        f"teacher.model={root / 'teacher'}", f"data.train={root / 'chat.jsonl'}", "data.heldout=4",
        "data.teacher_answers=false", "data.max_length=96", "student.num_layers=2", "train.batch_size=4",
        "train.max_steps=12", "train.lr=3e-3", f"train.output_dir={root / output}", "teacher.top_k=16",
        f"teacher.cache={root / 'cache'}",
    ]


def test_cli_cache_teacher_then_distill_without_the_teacher_weights(tmp_path):
    save_tiny_teacher(tmp_path / "teacher")
    write_chat_jsonl(tmp_path / "chat.jsonl", count=24)
    args = cli_args(tmp_path, "run")
    out = run_cli("cache-teacher", *args, cwd=tmp_path)
    assert "B/token" in out.stdout + out.stderr
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "topk" and manifest["top_k"] == 16
    assert manifest["num_examples"] == 20
    run_cli("build-student", *args, "student.layers=[0,3]", cwd=tmp_path)

    # From here on the teacher's weights cannot be loaded: only its tokenizer and config remain.
    weights = list((tmp_path / "teacher").glob("*.safetensors"))
    assert weights
    for path in weights:
        path.unlink()
    student = ["student.init=model", f"student.model={tmp_path / 'run' / 'student-init'}"]
    out = run_cli("distill", *args, *student, "eval.enabled=false", cwd=tmp_path)
    assert "teacher not loaded" in out.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 12 and "load_teacher_s" not in report["timings"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["kd"] < 0.8 * history[0]["kd"]  # it trained on the cached targets
    assert (tmp_path / "run" / "student" / "config.json").is_file()

    def refused(*extra) -> str:  # in-process: the same code path as the CLI, without a second interpreter start
        from kdlm.config import load_config
        from kdlm.pipeline import distill

        with pytest.raises(KdlmError) as error:
            # overwrite: past the check of the used folder, to the refusal under test (which deletes nothing)
            distill(load_config(None, [*args, *student, "eval.enabled=false", "train.overwrite=true", *extra]))
        return str(error.value)

    assert "top_k: cache has 16, this run needs 8" in refused("teacher.top_k=8")
    assert "training data" in refused("data.heldout=5")
    assert "kdlm build-student" in refused("student.init=prune")
    assert "'akl' has no unbiased estimate" in refused("teacher.cache_kind=sampled", "loss.divergence=akl")
    assert "drawn at T=1" in refused("teacher.cache_kind=sampled", "loss.temperature=2")


def test_cli_sampled_cache_then_distill_from_it_without_the_teacher_weights(tmp_path):
    save_tiny_teacher(tmp_path / "teacher")
    write_chat_jsonl(tmp_path / "chat.jsonl", count=24)
    args = cli_args(tmp_path, "run") + ["teacher.cache_kind=sampled", "teacher.samples=16"]
    run_cli("cache-teacher", *args, cwd=tmp_path)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["kind"] == "sampled" and manifest["samples"] == 16 and manifest["complete"]
    for ids, log_weights, _ in read_targets(tmp_path / "cache"):
        assert torch.equal((log_weights.exp() * 16).round().sum(-1), torch.full((len(ids),), 16.0))
    run_cli("build-student", *args, "student.init=random", cwd=tmp_path)  # far from the teacher: a clear KL to close
    for path in (tmp_path / "teacher").glob("*.safetensors"):
        path.unlink()
    student = ["student.init=model", f"student.model={tmp_path / 'run' / 'student-init'}"]
    out = run_cli("distill", *args, *student, "eval.enabled=false", "loss.fused=true", cwd=tmp_path)
    assert "teacher not loaded" in out.stdout and "sampled" in out.stdout
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 12 and all(math.isfinite(h["kd"]) for h in history)
    # the kd column is an unbiased estimate of KL(teacher || student): it falls as the student learns
    first, last = sum(h["kd"] for h in history[:3]) / 3, sum(h["kd"] for h in history[-3:]) / 3
    assert last < 0.8 * first
    shutil.rmtree(tmp_path / "cache")


WRITER = """
import sys, time
from pathlib import Path
from kdlm.data import encode_records, load_records
from kdlm.models import load_model
from kdlm.teachers.cache import cache_identity, write_cache

root, folder = Path(sys.argv[1]), Path(sys.argv[2])
teacher, tokenizer = load_model(str(root / "teacher"))
examples = encode_records(tokenizer, load_records(str(root / "chat.jsonl")), max_length=96)
identity = cache_identity(kind="sampled", teacher="tiny", tokenizer=tokenizer, vocab_size=teacher.config.vocab_size,
                          examples=examples, samples=32, seed=3, bf16=True, examples_per_shard=3)
write_cache(teacher, examples, folder, identity=identity, pad_token_id=tokenizer.pad_token_id, batch_size=2,
            on_shard=lambda index: time.sleep(0.3), show_progress=False)
"""


def writer(root: Path, folder: Path, script: str = WRITER, *extra: str) -> subprocess.Popen:
    """The cache writer as a process of its own, on the tiny teacher and chat data in `root`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, str(root), str(folder), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """A teacher, its data, and the cache an uninterrupted writer leaves in ROOT/straight."""
    root = tmp_path_factory.mktemp("writer")
    save_tiny_teacher(root / "teacher", num_layers=2)
    write_chat_jsonl(root / "chat.jsonl", count=24)
    straight = writer(root, root / "straight")
    assert straight.wait() == 0, straight.stdout.read()
    return root


def test_sigkill_mid_run_then_rerun_gives_the_straight_run_files(straight_run, tmp_path):
    """The issue's criterion with a real process: SIGKILL the writer once shards exist, run it again, compare."""
    import signal
    import time

    killed = writer(straight_run, tmp_path / "killed")
    manifest = tmp_path / "killed" / "manifest.json"
    while killed.poll() is None and (not manifest.exists() or len(json.loads(manifest.read_text())["shards"]) < 2):
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    left = json.loads(manifest.read_text())
    assert 2 <= len(left["shards"]) < 8 and not left["complete"]  # it died mid-run (8 shards in all)
    resumed = writer(straight_run, tmp_path / "killed")
    assert resumed.wait() == 0, resumed.stdout.read()
    leftovers = {p.name for p in (tmp_path / "killed").glob("*.tmp")}
    assert _digests(tmp_path / "killed").keys() - leftovers == _digests(straight_run / "straight").keys()
    assert {k: v for k, v in _digests(tmp_path / "killed").items() if k not in leftovers} == _digests(straight_run / "straight")


def test_hint_losses_with_a_cache_are_refused_before_any_work(tmp_path):
    """Hints need the teacher's hidden states at every step: a cached run cannot give them, and says so."""
    from kdlm.config import load_config
    from kdlm.pipeline import distill

    config = load_config(None, [f"train.output_dir={tmp_path / 'run'}", f"teacher.cache={tmp_path / 'cache'}",
                                "teacher.signal=topk", "hints.hidden_weight=0.5"])
    with pytest.raises(KdlmError, match="hint losses .* teacher.cache"):
        distill(config)
    assert not (tmp_path / "run").exists()


# Stops the writer inside the write of shard 2 (the third of 8), then waits for the test's SIGKILL: "torn" after
# half the shard's bytes reached its temporary file, "renamed" after the rename but before the manifest lists it.
STOPPING_WRITER = """
import os, sys, time
from pathlib import Path
import kdlm.teachers.cache as cache
point, signal_file = sys.argv[3], Path(sys.argv[2]).parent / "stopped"
target = Path(sys.argv[2]) / "shard-00002.safetensors"
real_save, real_replace = cache.save_file, os.replace

def stop():
    signal_file.write_text(point)
    time.sleep(3600)

def save_file(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    if point == "torn" and Path(path).name == target.name + ".tmp":
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        stop()

def replace(source, destination):
    real_replace(source, destination)
    if point == "renamed" and Path(destination) == target:
        stop()

cache.save_file, os.replace = save_file, replace
""" + WRITER.replace("on_shard=lambda index: time.sleep(0.3), ", "")


@pytest.mark.parametrize("point", ["torn", "renamed"])
def test_sigkill_inside_a_shard_write_then_rerun_gives_the_straight_run_files(straight_run, tmp_path, point):
    import signal
    import time

    folder, straight = tmp_path / "killed", straight_run / "straight"
    killed = writer(straight_run, folder, STOPPING_WRITER, point)
    while not (tmp_path / "stopped").exists():  # no deadline: polls for the writer's own signal
        assert killed.poll() is None, killed.stdout.read()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    listed = [shard["file"] for shard in json.loads((folder / "manifest.json").read_text())["shards"]]
    assert listed == ["shard-00000.safetensors", "shard-00001.safetensors"]  # shard 2 was in flight
    if point == "torn":
        tmp = folder / "shard-00002.safetensors.tmp"
        assert tmp.stat().st_size < (straight / "shard-00002.safetensors").stat().st_size
    else:
        assert (folder / "shard-00002.safetensors").read_bytes() == (straight / "shard-00002.safetensors").read_bytes()
    resumed = writer(straight_run, folder)
    assert resumed.wait() == 0, resumed.stdout.read()
    files = {name: digest for name, digest in _digests(folder).items() if not name.endswith(".tmp")}
    assert files == _digests(straight)
