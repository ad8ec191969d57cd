"""The steps of the GPU check (benchmarks/gpu_check.py): each a function of the run's context that returns its
result as a JSON-able dict, raises ``Skip`` with the reason it cannot run here, or raises on a failure.

They run in a child process each (``gpu_check.py --step NAME``); imports of torch and kdlm stay inside them,
so that the driver starts no CUDA context of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ("tests/test_device.py", "tests/test_fused.py", "tests/test_losses.py")
# fp32 with TF32 off on both devices: only the order of floating-point sums differs (about 1e-6 relative).
REL_TOLERANCE = 1e-4
# Liger-Kernel's published memory of its chunked distillation JSD (LigerFusedLinearJSDLoss) against a torch
# reference, fwd+bwd, bf16, BT 8,192, H 4,096 (student H/2), V 128,256, on an NVIDIA H100 80GB HBM3
# (liger 0.4.2, 2024-12-03): github.com/linkedin/Liger-Kernel, benchmark/data/all_benchmark_data.csv,
# rows distill_jsd_loss / memory / full (added in commit aa2d23d, PR #425).
LIGER_PUBLISHED = {"liger_mb": 11109.6, "torch_mb": 68947.1, "ratio": 11109.6 / 68947.1,
                   "source": "linkedin/Liger-Kernel benchmark/data/all_benchmark_data.csv, distill_jsd_loss, "
                             "memory, full, BT=8192, H=4096, V=128256, bf16, NVIDIA H100 80GB HBM3, liger 0.4.2"}
# The columns of the quickstart's table (kdlm.evaluate.report) kept in the summary.
ROW_KEYS = ("model", "kl_to_teacher", "top1_agreement", "answer_perplexity", "forward_tokens_per_s",
            "generate_tokens_per_s", "peak_memory_mb")
PACKAGES = ("torch", "transformers", "accelerate", "pydantic", "typer", "peft", "datasets", "gguf", "fastapi",
            "trl", "liger-kernel", "triton", "pytest")
# SmolLM2-135M-Instruct's shape, for the stand-in teacher when the bundled one is not installed.
SMOLLM2_135M_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                      "num_key_value_heads": 3, "max_position_embeddings": 8192, "tie_word_embeddings": True,
                      "rope_theta": 100000.0}


class Skip(Exception):
    """A step that cannot run here; its message is the recorded reason."""


def _left(context: argparse.Namespace) -> float:
    left = context.deadline - time.monotonic()
    if left < 5:
        raise TimeoutError("no time left in this step's timeout")
    return left


# ---------------------------------------------------------------- step 1: environment


def step_environment(context: argparse.Namespace) -> dict:
    from importlib import metadata

    import torch

    from kdlm.precision import resolve_precision

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    devices = [{"name": torch.cuda.get_device_name(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
               for i in range(torch.cuda.device_count())] if cuda else []
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "cuda_available": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0, "devices": devices,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "precision_auto": resolve_precision("auto").describe(), "driver": _nvidia_smi(), "git_commit": _git_commit(),
        "packages": versions, "missing_packages": [name for name, version in versions.items() if version is None],
        "kdlm_imports": _kdlm_imports(),
    }


def _kdlm_imports() -> dict[str, str]:
    """Whether the kdlm modules the later steps use import here ("ok", or the error: a missing package)."""
    import importlib

    results = {}
    for module in ("kdlm.losses.fused", "kdlm.train.loop", "kdlm.models.decode", "kdlm.pipeline", "kdlm.cli"):
        try:
            importlib.import_module(module)
            results[module] = "ok"
        except Exception as err:  # a missing dependency on a bare image: recorded, the steps that need it fail
            results[module] = f"{type(err).__name__}: {err}"
    return results


def _git_commit() -> str | None:
    """The checkout's commit, when it is a git checkout (a copied tree may not be)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi failed: {err}"
    return proc.stdout.strip() or proc.stderr.strip()


# ---------------------------------------------------------------- step 2: the same step on CUDA and on the CPU


def _device(context: argparse.Namespace) -> str:
    import torch

    if context.dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise Skip("no CUDA device (torch.cuda.is_available() is False)")
    return "cuda"


def step_cuda_vs_cpu(context: argparse.Namespace) -> dict:
    """The training objective and greedy decoding on ``device`` and on the CPU (in a dry run: CPU against CPU)."""
    import copy

    import torch

    from kdlm.config import LossConfig
    from kdlm.data import encode_records
    from kdlm.data.tokenize import collate

    device = _device(context)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    teacher = tiny_llama(len(tokenizer), num_layers=3, seed=1)
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2).train()
    records = [{"messages": [{"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": "an answer " * (1 + i % 3)}]} for i in range(4)]
    batch = collate(encode_records(tokenizer, records, max_length=64), tokenizer.pad_token_id)
    cases = {}
    for fused in (True, False):
        for target in ("online", "topk"):
            loss = LossConfig(divergence="jsd", kd_weight=0.8, fused=fused)
            on_cpu = _objective_step(copy.deepcopy(student), teacher, batch, loss, target, len(tokenizer), "cpu")
            on_device = _objective_step(copy.deepcopy(student), copy.deepcopy(teacher), batch, loss, target,
                                        len(tokenizer), device)
            cases[f"{'fused' if fused else 'dense'}-{target}"] = _compare(on_cpu, on_device)
    decode = _compare_greedy(tokenizer, device)
    failed = [name for name, case in cases.items() if not case["ok"]] + ([] if decode["ok"] else ["greedy decode"])
    if failed:
        raise AssertionError(f"{device} differs from the CPU beyond rel {REL_TOLERANCE:g} in: {', '.join(failed)}; "
                             f"details: {json.dumps({'objective': cases, 'decode': decode})[:1500]}")
    return {"device": device, "tolerance": f"relative {REL_TOLERANCE:.0e}; fp32, TF32 off", "objective": cases,
            "decode": decode}


def _objective_step(student, teacher, batch, loss, target_kind: str, vocab: int, device: str):
    """One micro-batch of the training objective on ``device``: (total, kd, ce, count) and the student's gradients."""
    import copy

    import torch

    from kdlm.teachers.signals import teacher_logits
    from kdlm.train.loop import StudentObjective, run_teacher

    student, teacher = student.to(device), teacher.to(device)
    batch = {key: value.to(device) for key, value in batch.items()}
    objective = StudentObjective(student, loss, vocab)
    target, states = run_teacher(teacher, batch, vocab, bf16=False, online=target_kind == "online", hints=None)
    if target_kind == "topk":  # taken on the CPU for both runs: a near-tie at rank k must not swap an id
        cpu_batch = {key: value.cpu() for key, value in batch.items()}
        top = teacher_logits(copy.deepcopy(teacher).cpu(), cpu_batch, bf16=False).log_softmax(-1).topk(8, dim=-1)
        target = (top.indices.to(device), top.values.to(device))
    student.zero_grad(set_to_none=True)
    total, kd, ce, _, count = objective(batch, target, loss.kd_weight, states)
    total.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    values = torch.stack([total.detach(), kd.detach(), ce.detach(), count.float()])
    return values.double().cpu(), grads.double().cpu()


def _compare(on_cpu, on_device) -> dict:
    (values_cpu, grads_cpu), (values_device, grads_device) = on_cpu, on_device
    value_error = float(((values_device - values_cpu).abs() / values_cpu.abs().clamp_min(1e-12)).max())
    grad_error = float((grads_device - grads_cpu).norm() / grads_cpu.norm().clamp_min(1e-12))
    return {"loss_cpu": float(values_cpu[0]), "loss_device": float(values_device[0]),
            "max_rel_error_values": value_error, "rel_l2_error_grads": grad_error,
            "ok": value_error <= REL_TOLERANCE and grad_error <= REL_TOLERANCE}


def _compare_greedy(tokenizer, device: str) -> dict:
    """Greedy decode_batch on both devices with a tiny teacher fitted to tests/tiny.py's corpus (peaked logits,
    so near-ties are rare); the smallest top-1/top-2 logit gap along the CPU's path is recorded to tell a
    near-tie from a bug."""
    import copy

    import torch

    from kdlm.models.decode import Row, decode_batch
    from tiny import trained_tiny_teacher

    model, _ = trained_tiny_teacher(num_layers=2, steps=30 if device != "cpu" else 5)
    prompts = [tokenizer(text)["input_ids"] for text in ("the quick brown", "what is the capital", "water boils at")]

    def rows():
        return [Row(prompt_ids=ids, max_tokens=16, temperature=0.0, top_p=1.0, seed=i) for i, ids in enumerate(prompts)]

    on_cpu = [r.token_ids for r in decode_batch(model, tokenizer, rows(), bf16=False)]
    on_device = [r.token_ids for r in decode_batch(copy.deepcopy(model).to(device), tokenizer, rows(), bf16=False)]
    gaps = []
    with torch.no_grad():
        for ids, generated in zip(prompts, on_cpu, strict=True):
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1]
            top2 = logits.topk(2, dim=-1).values
            gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
    return {"same_token_ids": on_cpu == on_device, "ok": on_cpu == on_device, "tokens": sum(map(len, on_cpu)),
            "min_top1_top2_logit_gap": min(gaps), "cpu": on_cpu, "device": on_device}


# ---------------------------------------------------------------- step 3: the loss at Llama-3's vocabulary


def step_loss_memory(context: argparse.Namespace) -> dict:
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import loss_memory

    device = _device(context)
    tokens, vocab, student_hidden, teacher_hidden = (256, 1024, 64, 128) if context.dry_run else (8192, 128256, 2048, 4096)
    options = ("--device", device, "--dtype", "bf16", "--student-hidden", str(student_hidden),
               "--teacher-hidden", str(teacher_hidden))
    variants = {}
    for variant, package in (("dense", None), ("fused", None), ("trl", "trl"), ("liger", "liger_kernel")):
        if package and importlib.util.find_spec(package) is None:
            variants[variant] = {"status": "skipped", "reason": f"{package} is not installed"}
            continue
        if context.dry_run:  # in this process: two fewer starts of torch, the same measuring code
            result = loss_memory.run_variant(variant, tokens, vocab, device, "bf16", student_hidden, teacher_hidden)
        else:  # a fresh process per variant: its own CUDA memory and peak
            result = loss_memory.measure(variant, tokens, vocab, min(120.0, _left(context)), options)
        variants[variant] = _variant_record(result)
    _add_ratios(variants)
    for required in ("dense", "fused"):
        if variants[required]["status"] != "ok":
            raise RuntimeError(f"{required}: {variants[required].get('error')}")
    memory = "torch.cuda.max_memory_allocated (inputs included)" if device == "cuda" else "growth of peak RSS"
    return {"device": device, "dtype": "bf16", "tokens": tokens, "vocab": vocab, "student_hidden": student_hidden,
            "teacher_hidden": teacher_hidden, "divergence": "JSD(beta=0.5), summed over target tokens",
            "memory_metric": memory, "variants": variants, "liger_published": LIGER_PUBLISHED}


def _variant_record(result: dict) -> dict:
    if "error" not in result:
        return {"status": "ok", **result}
    if result["error"].startswith(("ModuleNotFoundError", "ImportError")):
        return {"status": "skipped", "reason": f"does not import: {result['error']}"}
    return {"status": "failed", "error": result["error"]}


def _add_ratios(variants: dict) -> None:
    """Memory, time, loss and gradient norm of each variant relative to dense."""
    dense = variants["dense"]
    if dense["status"] != "ok":
        return
    key = "peak_mb" if "peak_mb" in dense else "peak_growth_mb"
    for result in variants.values():
        if result["status"] != "ok":
            continue
        result["memory_vs_dense"] = result[key] / dense[key] if dense[key] > 0 else None
        result["time_vs_dense"] = result["seconds"] / dense["seconds"]
        result["loss_rel_diff"] = abs(result["value"] - dense["value"]) / abs(dense["value"])
        result["grad_norm_rel_diff"] = abs(result["grad_norm"] - dense["grad_norm"]) / abs(dense["grad_norm"])


# ---------------------------------------------------------------- steps 4 and 6: the quickstart, 1 and 2 GPUs


def quickstart_overrides(context: argparse.Namespace, teacher: str, output_dir: Path) -> list[str]:
    prompts = _prompt_subset(context.out_path / "quickstart_prompts.jsonl", 16 if context.dry_run else 128)
    overrides = [f"teacher.model={teacher}", f"data.train={prompts}", f"train.output_dir={output_dir}",
                 "train.bf16=auto"]
    if context.dry_run:  # tiny sizes: a 4-layer teacher, a 2-layer student, 2 steps
        return overrides + ["student.num_layers=2", "train.max_steps=2", "train.batch_size=2", "data.heldout=2",
                            "data.max_length=128", "data.answer_max_new_tokens=8", "teacher.top_k=8",
                            "eval.generation_tokens=4", "eval.batch_size=2"]
    return overrides + ["train.max_steps=30", "data.heldout=8", "data.answer_max_new_tokens=64"]


def _prompt_subset(path: Path, count: int) -> Path:
    """The first ``count`` prompts of the built-in quickstart set, as a JSONL file."""
    from importlib import resources

    lines = (resources.files("kdlm.data") / "builtin" / "quickstart.jsonl").read_text().splitlines()
    path.write_text("\n".join(lines[:count]) + "\n")
    return path


def resolve_teacher(context: argparse.Namespace) -> tuple[str, str]:
    """(teacher spec, what it is): --teacher, the tiny teacher in a dry run, the bundled one, or a stand-in."""
    if context.teacher:
        return context.teacher, "given with --teacher"
    sys.path.insert(0, str(ROOT / "tests"))
    if context.dry_run:
        from tiny import save_tiny_teacher

        folder = context.out_path / "tiny_teacher"
        if not (folder / "config.json").exists():
            save_tiny_teacher(folder, num_layers=4)
        return str(folder), "tests/tiny.py's fitted 4-layer Llama (dry run)"
    from kdlm.errors import KdlmError
    from kdlm.models import ensure_bundled

    try:
        return str(ensure_bundled("smollm2-135m-instruct")), "the bundled SmolLM2-135M-Instruct"
    except (KdlmError, ImportError, OSError) as err:  # not installed, or its GGUF reader (gguf) is missing
        missing = f"{type(err).__name__}: {err}"
    folder = write_standin_teacher(context.out_path / "standin_teacher", context.teacher_shape)
    shape = context.teacher_shape or "SmolLM2-135M's layers, tests/tiny.py's byte tokenizer"
    return str(folder), f"STAND-IN with random weights ({shape}); bundled teacher unavailable: {missing}"


def write_standin_teacher(folder: Path, shape_folder: str | None) -> Path:
    """A teacher with random weights: the shape (and tokenizer) of ``shape_folder``, else SmolLM2-135M's layers
    with the byte tokenizer of tests/tiny.py. Its timings are the real model's; its answers are noise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if (folder / "config.json").exists():
        return folder
    if shape_folder:
        config, tokenizer = AutoConfig.from_pretrained(shape_folder), AutoTokenizer.from_pretrained(shape_folder)
    else:
        from tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), eos_token_id=2, pad_token_id=2, bos_token_id=1,
                             **SMOLLM2_135M_SHAPE)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def step_quickstart(context: argparse.Namespace) -> dict:
    _device(context)
    teacher, teacher_note = resolve_teacher(context)
    output_dir = context.out_path / "quickstart"
    shutil.rmtree(output_dir, ignore_errors=True)
    overrides = quickstart_overrides(context, teacher, output_dir)
    command = [sys.executable, "-m", "kdlm.cli", "distill", "configs/quickstart.yaml", *overrides]
    return {"teacher": teacher_note, **_run_distill(context, command, output_dir)}


def step_two_gpu(context: argparse.Namespace) -> dict:
    import torch

    from kdlm.config import TrainConfig

    if context.dry_run:
        raise Skip("dry run: no GPUs")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        raise Skip(f"{count} CUDA device(s) here; this step needs 2")
    teacher, teacher_note = resolve_teacher(context)
    output_dir = context.out_path / "two_gpu"
    shutil.rmtree(output_dir, ignore_errors=True)
    overrides = quickstart_overrides(context, teacher, output_dir) + ["train.max_steps=10", "train.batch_size=4",
                                                                      "eval.enabled=false"]
    strategy = "ddp"
    if "strategy" in TrainConfig.model_fields:
        strategy = "fsdp"
        overrides.append("train.strategy=fsdp")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    command = [*launch, "-m", "kdlm.cli", "distill", "configs/quickstart.yaml", *overrides]
    return {"teacher": teacher_note, "strategy": strategy, **_run_distill(context, command, output_dir)}


def _error_text(stderr: str) -> str:
    """kdlm's one-line error (rich wraps it over several lines), else the last line of a traceback."""
    lines = [line.strip() for line in stderr.strip().splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    text = " ".join(lines[starts[-1]:]) if starts else (lines[-1] if lines else "(no output)")
    return text[:600]


def _run_distill(context: argparse.Namespace, command: list[str], output_dir: Path) -> dict:
    """Run a `kdlm distill` command (its answers cached under the --out folder) and read its report.json."""
    env = {**os.environ, "KDLM_CACHE": str(context.out_path / "kdlm_cache"), "COLUMNS": "250"}  # errors on one line
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=_left(context))
    seconds = round(time.monotonic() - started, 1)
    print(proc.stdout[-20000:], proc.stderr[-20000:], sep="\n")
    if proc.returncode != 0:
        raise RuntimeError(f"kdlm distill failed (exit status {proc.returncode}): {_error_text(proc.stderr)}")
    report = json.loads((output_dir / "report.json").read_text())
    rows = [{key: row.get(key) for key in ROW_KEYS} for row in report.get("rows", [])]
    return {"command": " ".join(command), "wall_s": seconds, "bf16": report["config"]["train"]["bf16"],
            "timings_s": report.get("timings", {}), "steps": report.get("steps"), "target_tokens": report.get("tokens"),
            "rows": rows}


# ---------------------------------------------------------------- step 5: the device-sensitive tests


def step_tests(context: argparse.Namespace) -> dict:
    import importlib.util

    junit = context.out_path / "tests.xml"
    # A dry run runs one cheap test of the three files (the plumbing: pytest, its junit report, the counts).
    selection = ["tests/test_losses.py", "-k", "identical_inputs"] if context.dry_run else list(TEST_FILES)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection, f"--junitxml={junit}"]
    if not context.dry_run and importlib.util.find_spec("xdist") is not None:  # the GPU machine's 16 cores
        command += ["-n", str(min(8, os.cpu_count() or 1))]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=_left(context))
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n")
    if not junit.exists():
        raise RuntimeError(f"pytest wrote no report (exit status {proc.returncode}): {proc.stderr.strip()[-300:]}")
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    if failed or proc.returncode != 0:
        raise AssertionError(f"pytest: {summary}; failed: {', '.join(failed[:20]) or '(see logs/tests.log)'}")
    return {"command": " ".join(command[2:]), "summary": summary, **counts}


STEP_FUNCTIONS = {"environment": step_environment, "cuda_vs_cpu": step_cuda_vs_cpu, "loss_memory": step_loss_memory,
                  "quickstart": step_quickstart, "tests": step_tests, "two_gpu": step_two_gpu}
