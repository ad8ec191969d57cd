"""The GPU check: one command that runs kdlm's device-sensitive parts on a CUDA GPU and writes a summary.

    bash benchmarks/gpu_check.sh                    # on a GPU machine: an 8-minute budget on one H100/H200
    bash benchmarks/gpu_check.sh --dry-run --out /tmp/gc   # the same plumbing on the CPU at tiny sizes (CI)

Writes ``gpu_check.json`` and ``gpu_check.md`` (and each step's log under ``logs/``) into ``--out``
(default runs/gpu_check) and, when the environment variable ``OUT`` is set, copies the JSON, the markdown and
the logs joined into one file there too. The steps, in the order they run:

1. environment: torch/CUDA versions, the GPUs, bf16 support, what ``bf16: auto`` resolves to, the versions of
   the packages the later steps need (a missing one is named here).
2. cuda_vs_cpu: one step of the training objective (``StudentObjective``: fused and dense loss, online and
   top-k teacher targets) of a tiny Llama on CUDA and on the CPU, same weights and batch, in fp32 with TF32
   off: losses and gradients must agree within a relative 1e-4 (``gpu_check_steps.REL_TOLERANCE``); greedy
   ``decode_batch`` must give the same token ids on both.
3. loss_memory: the loss forward+backward at 8,192 x 128,256 in bf16 (student hidden 2,048, teacher hidden
   4,096: Liger's distillation benchmark shape) through benchmarks/loss_memory.py: dense, kdlm's fused loss,
   TRL's generalized JSD and Liger's LigerFusedLinearJSDLoss (the last two when they import), with peak
   memory (torch.cuda.max_memory_allocated) beside Liger's published figure (16.1% of a torch reference on an
   H100; ``gpu_check_steps.LIGER_PUBLISHED`` cites it).
4. quickstart: ``kdlm distill configs/quickstart.yaml`` shortened (128 prompts, 64-token teacher answers,
   30 steps, 8 held-out prompts), bf16 auto, with the stage timings of its report.json. Its teacher:
   ``--teacher`` if given, else the bundled SmolLM2-135M-Instruct when installed, else a stand-in with random
   weights of SmolLM2-135M's shape (``--teacher-shape FOLDER``: a folder with config.json and tokenizer files,
   e.g. the bundled model's converted folder without its weights; default: tests/tiny.py's byte tokenizer).
   The bundled GGUF (98 MB) is too large to carry to a lent GPU machine (64 MiB per call), its tokenizer is
   not: ``mkdir shape && cp ~/.cache/kdlm/models/smollm2-135m-instruct/{config.json,tokenizer.json,
   tokenizer_config.json,chat_template.jinja,generation_config.json} shape/`` here, then ``--teacher-shape shape``.
5. tests: ``pytest tests/test_device.py tests/test_fused.py tests/test_losses.py``.
6. two_gpu: the shortened quickstart under ``accelerate launch --multi_gpu --num_processes 2`` when two GPUs
   are present (``train.strategy=fsdp`` where the config knows that setting), else skipped.

The parts that need the GPU most run first, so that a spent time budget (``--budget-s``) cuts the others.
Every step runs in its own process (a fresh CUDA context, its memory its own) under a timeout, inside a
try/except: a failure, a crash or a timeout is recorded and the next step runs. Each step ends ``ok``,
``skipped`` (with the reason) or ``failed`` (with the error). This script installs nothing: TRL and Liger
are measured only when already importable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from gpu_check_steps import ROW_KEYS, STEP_FUNCTIONS, Skip  # benchmarks/ is on sys.path when this file runs

ROOT = Path(__file__).resolve().parent.parent
STEPS = tuple(STEP_FUNCTIONS)
# Seconds each step may take on the GPU; the whole run is also held to --budget-s (default 450).
TIMEOUTS = {"environment": 60, "cuda_vs_cpu": 90, "loss_memory": 200, "quickstart": 240, "tests": 150, "two_gpu": 150}

# ---------------------------------------------------------------- the driver (parent process)


def main() -> int:
    args = parse_args()
    if args.step:
        return run_step_here(args)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    summary = {"schema": 1, "dry_run": args.dry_run, "started_utc": _now(), "budget_s": args.budget_s,
               "command": " ".join(sys.argv), "steps": {}}
    started = time.monotonic()
    for name in STEPS:
        print(f"[gpu_check] {name} ...", flush=True)
        reason = known_skip(name, args, summary["steps"])
        summary["steps"][name] = {"status": "skipped", "reason": reason} if reason else run_step(name, args, out, deadline)
        print(f"[gpu_check] {name}: {_status_line(summary['steps'][name])}", flush=True)
        write_outputs(summary, out)  # after every step: a run killed later keeps what it measured
    summary["finished_utc"], summary["seconds"] = _now(), round(time.monotonic() - started, 1)
    write_outputs(summary, out)
    print((out / "gpu_check.md").read_text())
    return 1 if any(step["status"] == "failed" for step in summary["steps"].values()) else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="Folder for gpu_check.json, gpu_check.md and logs.")
    parser.add_argument("--dry-run", action="store_true", help="The same steps on the CPU at tiny sizes.")
    parser.add_argument("--budget-s", type=float, default=450, help="Time budget of the whole run, in seconds.")
    parser.add_argument("--teacher", help="Teacher spec for the quickstart steps (default: bundled, else a stand-in).")
    parser.add_argument("--teacher-shape", help="Folder with config.json and tokenizer files for the stand-in teacher.")
    parser.add_argument("--only", type=lambda text: text.split(","), default=list(STEPS),
                        help=f"Comma-separated steps to run (default all: {','.join(STEPS)}); the others are recorded as skipped.")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--timeout-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(STEPS))
    if unknown:
        parser.error(f"--only: unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    return args


def known_skip(name: str, args: argparse.Namespace, steps: dict) -> str | None:
    """A skip that the environment step already decided (no process is started for it); the steps check again."""
    if name not in args.only:
        return "not selected with --only"
    environment = steps.get("environment", {}).get("result") or {}
    count = environment.get("device_count")
    if name == "two_gpu" and args.dry_run:
        return "dry run: no GPUs"
    if name == "two_gpu" and count is not None and count < 2:
        return f"{count} CUDA device(s) here; this step needs 2"
    if name in ("cuda_vs_cpu", "loss_memory", "quickstart") and not args.dry_run and count == 0:
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def run_step(name: str, args: argparse.Namespace, out: Path, deadline: float) -> dict:
    """One step in a child process (its own session, so that a timeout ends its children too)."""
    timeout = min(TIMEOUTS[name], deadline - time.monotonic())
    if timeout < 15:
        return {"status": "skipped", "reason": f"the time budget ({args.budget_s:.0f} s) is spent"}
    result_file = out / "steps" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out),
               "--timeout-s", f"{timeout:.0f}", "--budget-s", str(args.budget_s)]
    command += ["--dry-run"] * args.dry_run + _passed_on(args)
    started, cpu_before = time.monotonic(), _children_cpu_s()
    log = out / "logs" / f"{name}.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            error = None
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
        _end_group(proc)
    timing = {"seconds": round(time.monotonic() - started, 1), "cpu_s": round(_children_cpu_s() - cpu_before, 1)}
    if error is None and result_file.exists():
        return {**json.loads(result_file.read_text()), **timing}
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    error = error or f"exit status {proc.returncode} without a result; last log line: {tail[0][:300]}"
    return {"status": "failed", "error": error, **timing}


def _end_group(proc: subprocess.Popen) -> None:
    """End the step's process group: the step on a timeout, and always what it left running (e.g. the workers
    of an `accelerate launch` whose launcher was stopped), so that nothing holds the GPU into the next step."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of all finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _passed_on(args: argparse.Namespace) -> list[str]:
    passed = []
    for flag, value in (("--teacher", args.teacher), ("--teacher-shape", args.teacher_shape)):
        if value:
            passed += [flag, value]
    return passed


def run_step_here(args: argparse.Namespace) -> int:
    """In the child: run one step inside try/except and write its result as JSON."""
    out = Path(args.out)
    context = argparse.Namespace(**vars(args), deadline=time.monotonic() + args.timeout_s - 5, out_path=out)
    try:
        record = {"status": "ok", "result": STEP_FUNCTIONS[args.step](context)}
    except Skip as skip:
        record = {"status": "skipped", "reason": str(skip)}
    except Exception as err:  # the point of the check: record any failure and let the next step run
        traceback.print_exc()
        record = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]}
    (out / "steps").mkdir(parents=True, exist_ok=True)
    (out / "steps" / f"{args.step}.json").write_text(json.dumps(record, indent=2, default=str))
    return 0


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ---------------------------------------------------------------- outputs


def write_outputs(summary: dict, out: Path) -> None:
    """gpu_check.json and gpu_check.md in ``out``, and copies (plus the logs in one file) in $OUT if it is set."""
    text = json.dumps(summary, indent=2, default=str)
    try:
        markdown = render_markdown(summary)
    except Exception as err:  # the JSON must be written whatever the markdown does
        markdown = f"# kdlm GPU check\n\nThe summary could not be rendered ({type(err).__name__}: {err}); see gpu_check.json.\n"
    targets = [out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu_check.json").write_text(text)
        (folder / "gpu_check.md").write_text(markdown)
    if len(targets) > 1:
        logs = [f"===== {log.name}\n{log.read_text(errors='replace')[-200_000:]}" for log in sorted((out / "logs").glob("*.log"))]
        (targets[1] / "gpu_check_logs.txt").write_text("\n".join(logs))


def _status_line(step: dict) -> str:
    detail = step.get("reason") or step.get("error") or ""
    return f"{step['status']}{f' ({detail})' if detail else ''}, {step.get('seconds', 0):.1f} s"


def render_markdown(summary: dict) -> str:
    steps = summary["steps"]
    lines = [f"# kdlm GPU check{' (dry run, CPU)' if summary['dry_run'] else ''}", "",
             f"Started {summary['started_utc']}; command `{summary['command']}`.", ""]
    environment = steps.get("environment", {}).get("result")
    if environment:
        gpus = ", ".join(f"{d['name']} ({d['memory_gib']} GiB, sm {d['capability']})" for d in environment["devices"]) or "none"
        lines += [f"Commit {environment.get('git_commit') or 'unknown'}; "
                  f"torch {environment['torch']}, CUDA {environment['cuda_runtime']}, GPUs: {gpus}; "
                  f"bf16 supported: {environment['bf16_supported']}; {environment['precision_auto']}.",
                  f"Missing packages: {', '.join(environment['missing_packages']) or 'none'}.",
                  "kdlm imports: " + "; ".join(f"{module} {status}" for module, status in environment.get("kdlm_imports", {}).items()) + ".",
                  ""]
    lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, step in steps.items():
        detail = _md(step.get("reason") or step.get("error") or "")[:300]
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', '')} | {detail} |")
    lines += _markdown_cuda_vs_cpu(steps.get("cuda_vs_cpu", {})) + _markdown_loss(steps.get("loss_memory", {}))
    for name in ("quickstart", "two_gpu"):
        lines += _markdown_distill(name, steps.get(name, {}))
    return "\n".join(lines) + "\n"


def _markdown_cuda_vs_cpu(step: dict) -> list[str]:
    result = step.get("result")
    if not result:
        return []
    lines = ["", f"## One training step on {result['device']} against the CPU (tolerance: {result['tolerance']})", "",
             "| case | loss (CPU) | max rel. error of losses | rel. L2 error of gradients | ok |", "|---|---|---|---|---|"]
    for name, case in result["objective"].items():
        lines.append(f"| {name} | {case['loss_cpu']:.6f} | {case['max_rel_error_values']:.1e} | "
                     f"{case['rel_l2_error_grads']:.1e} | {case['ok']} |")
    decode = result["decode"]
    lines += ["", f"Greedy decode_batch: same token ids on both: {decode['same_token_ids']} ({decode['tokens']} tokens; "
              f"smallest top-1/top-2 logit gap {decode['min_top1_top2_logit_gap']:.3f})."]
    return lines


def _markdown_loss(step: dict) -> list[str]:
    result = step.get("result")
    if not result:
        return []
    lines = ["", f"## Loss forward+backward, {result['tokens']:,} x {result['vocab']:,}, {result['dtype']}, "
             f"{result['device']} (hidden {result['student_hidden']:,} / {result['teacher_hidden']:,}; "
             f"memory: {result['memory_metric']})", "",
             "| variant | peak memory (MB) | vs dense | time (ms) | vs dense | loss, grad-norm rel. diff vs dense |",
             "|---|---|---|---|---|---|"]
    for name, variant in result["variants"].items():
        if variant["status"] != "ok":
            lines.append(f"| {name} | {variant['status']}: {_md(variant.get('reason') or variant.get('error'))} | | | | |")
            continue
        memory = variant.get("peak_mb", variant["peak_growth_mb"])
        ratio = lambda value: f"{value:.2f}x" if value is not None else "-"  # noqa: E731
        lines.append(f"| {name} | {memory:,.0f} | {ratio(variant.get('memory_vs_dense'))} | {variant['seconds'] * 1e3:,.1f} | "
                     f"{ratio(variant.get('time_vs_dense'))} | {variant['loss_rel_diff']:.0e}, {variant['grad_norm_rel_diff']:.0e} |")
    published = result["liger_published"]
    lines += ["", f"Published by Liger (H100): {published['liger_mb']:,.0f} MB against {published['torch_mb']:,.0f} MB "
              f"for a torch reference, {published['ratio']:.1%} ({published['source']})."]
    return lines


def _md(text: str) -> str:
    """Text for a markdown table cell: one line, no column separators."""
    return str(text).replace("|", "/").replace("\n", " ")


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown_distill(name: str, step: dict) -> list[str]:
    result = step.get("result")
    if not result:
        return []
    lines = ["", f"## {name}: {result['steps']} steps, bf16 {result['bf16']}, {result['wall_s']} s in all", "",
             f"Teacher: {result['teacher']}.", f"Command: `{result['command']}`", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in result["timings_s"].items()]
    if result["rows"]:
        lines += ["", "| " + " | ".join(ROW_KEYS) + " |", "|" + "---|" * len(ROW_KEYS)]
        lines += ["| " + " | ".join(_cell(row.get(key)) for key in ROW_KEYS) + " |" for row in result["rows"]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
