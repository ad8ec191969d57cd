"""Peak memory and time of one distillation loss forward+backward: dense, chunked, fused, and two peers.

    python benchmarks/loss_memory.py                      # the issue's three shapes, fp32, JSD(beta=0.5)
    python benchmarks/loss_memory.py --shapes 256x32000 --repeats 2   # a quick look
    python benchmarks/loss_memory.py --device cuda --dtype bf16 --shapes 8192x128256   # on a GPU

(benchmarks/gpu_check.py runs the CUDA form at Liger's shape: 8,192 x 128,256, hidden 2,048 and 4,096.)

Every variant computes the same generalized JSD (beta 0.5, T = 1) between a student (hidden 1,024) and a
teacher (hidden 2,048) whose logits come from their last hidden states and lm_head weights, then the
gradients with respect to the student's hidden states and lm_head weight:

- dense: both (N, V) logits, then ``kdlm.losses.kd_loss_sums`` (what most KD code does).
- chunked-upcast: torchtune's style: the logits are produced chunk by chunk and each chunk is upcast and
  scored separately, but autograd keeps every chunk's buffers until the backward pass.
- fused: ``kdlm.losses.fused.fused_kd_loss``: one chunk of logits at a time, forward and backward.
- trl: TRL's ``generalized_jsd_loss`` on dense logits (reduction "sum").
- liger: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``compiled=False`` on CPU; weight_hard_loss 0, so the
  JSD term alone; it returns the mean over tokens, multiplied back to a sum here).

Every measurement is one forward+backward in a fresh process; peak memory is the growth of the process's
peak RSS over the inputs (tracemalloc does not see torch's CPU allocations). On CUDA: a warm-up pass, then
the median time of three passes and torch.cuda.max_memory_allocated. Repeats are interleaved across
variants (dense, fused, ..., dense, fused, ...) and the table shows medians. The value
column checks that every variant computed the same loss (relative difference to dense).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("dense", "chunked-upcast", "fused", "trl", "liger")
STUDENT_HIDDEN, TEACHER_HIDDEN = 1024, 2048
TORCHTUNE_CHUNKS = 8  # torchtune's default num_output_chunks


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def make_inputs(tokens: int, vocab: int, seed: int = 0, *, student_hidden: int = STUDENT_HIDDEN,
                teacher_hidden: int = TEACHER_HIDDEN, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """In-place scaling, so that no transient copy raises the peak before the baseline is read.

    The values are drawn on the CPU in fp32 whatever ``device`` and ``dtype`` (the same inputs everywhere),
    then moved; labels stay int64.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(tokens, student_hidden, generator=gen),
        torch.randn(vocab, student_hidden, generator=gen).div_(student_hidden**0.5),
        torch.randn(tokens, teacher_hidden, generator=gen),
        torch.randn(vocab, teacher_hidden, generator=gen).div_(teacher_hidden**0.5),
    ]
    if device != "cpu" or dtype != torch.float32:
        tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    tensors[0].requires_grad_(True)  # the student's hidden states and lm_head weight get gradients
    tensors[1].requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[: tokens // 16] = -100  # a prompt-like masked prefix
    return (*tensors, labels.to(device))


def step(variant: str, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
         liger_compiled: bool = False) -> float:
    """One forward+backward; returns the JSD summed over the target tokens.

    ``liger_compiled``: Liger's own default (torch.compile of its chunk function) is for CUDA; on the CPU it is off.
    """
    from kdlm.losses import kd_loss_sums

    if variant == "dense":
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        loss, _, _ = kd_loss_sums(student_hidden @ student_weight.T, teacher_logits, labels, divergence="jsd", beta=0.5)
    elif variant == "chunked-upcast":
        loss = 0.0
        for hidden, t_hidden, chunk_labels in zip(
            student_hidden.chunk(TORCHTUNE_CHUNKS), teacher_hidden.chunk(TORCHTUNE_CHUNKS),
            labels.chunk(TORCHTUNE_CHUNKS), strict=True,
        ):
            with torch.no_grad():
                teacher_logits = t_hidden @ teacher_weight.T
            chunk_loss, _, _ = kd_loss_sums(hidden @ student_weight.T, teacher_logits, chunk_labels, divergence="jsd", beta=0.5)
            loss = loss + chunk_loss
    elif variant == "fused":
        from kdlm.losses.fused import TeacherHidden, fused_kd_loss

        loss, _, _, _ = fused_kd_loss(student_hidden, student_weight, labels, TeacherHidden(teacher_hidden, teacher_weight),
                                      divergence="jsd", beta=0.5)
    elif variant == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        student_logits = student_hidden @ student_weight.T
        # TRL's beta weights the student in the mixture's log (log1p(-beta) on the student side): 0.5 is symmetric.
        loss = GKDTrainer.generalized_jsd_loss(student_logits[None], teacher_logits[None], labels[None], beta=0.5,
                                               reduction="sum")
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5,
                                         compiled=liger_compiled)
        mean = liger(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
        loss = mean * (labels != -100).sum()
    else:
        raise ValueError(variant)
    loss.backward()
    return float(loss.detach())


def _import(variant: str) -> None:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import kdlm.losses.fused  # noqa: F401

    if variant == "trl":
        import trl.experimental.gkd.gkd_trainer  # noqa: F401
    if variant == "liger":
        import liger_kernel.chunked_loss  # noqa: F401


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_variant(variant: str, tokens: int, vocab: int, device: str = "cpu", dtype: str = "fp32",
                student_hidden: int = STUDENT_HIDDEN, teacher_hidden: int = TEACHER_HIDDEN) -> dict:
    """In this (fresh) process: inputs, then one forward+backward pass (on CUDA: a warm-up pass, then three)."""
    _import(variant)  # imports are not part of the step
    inputs = make_inputs(tokens, vocab, student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                         device=device, dtype=DTYPES[dtype])
    if device == "cuda":
        return _run_cuda(variant, inputs)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    value = step(variant, *inputs)
    seconds = time.perf_counter() - started
    return {"peak_growth_mb": peak_rss_mb() - baseline, "seconds": seconds, "value": value,
            "grad_norm": float(inputs[1].grad.float().norm())}


def _run_cuda(variant: str, inputs, timed_runs: int = 3) -> dict:
    """Peak allocated memory (torch.cuda.max_memory_allocated, the metric of Liger's benchmarks) and the median
    time of ``timed_runs`` passes, after one warm-up pass (kernel selection, Liger's torch.compile)."""
    step(variant, *inputs, liger_compiled=True)
    seconds = []
    for _ in range(timed_runs):
        for tensor in inputs[:2]:
            tensor.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        started = time.perf_counter()
        value = step(variant, *inputs, liger_compiled=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mb": peak / 2**20, "peak_growth_mb": (peak - baseline) / 2**20, "inputs_mb": baseline / 2**20,
            "seconds": statistics.median(seconds), "value": value, "grad_norm": float(inputs[1].grad.float().norm())}


def measure(variant: str, tokens: int, vocab: int, timeout: float, options: tuple[str, ...] = ()) -> dict:
    """One variant in a fresh process; ``options``: --device/--dtype/--student-hidden/--teacher-hidden flags."""
    command = [sys.executable, __file__, "--child", variant, str(tokens), str(vocab), *options]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {"error": "out of memory (killed)" if killed else lines[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_shape(variants: list[str], tokens: int, vocab: int, repeats: int, timeout: float,
                  options: tuple[str, ...] = ()) -> dict[str, dict]:
    """Repeats interleaved across variants (a, b, c, a, b, c, ...), so that a slow spell of the machine
    falls on all of them; a variant that fails once is not run again."""
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    failed: dict[str, dict] = {}
    for _ in range(repeats):
        for variant in variants:
            if variant in failed:
                continue
            result = measure(variant, tokens, vocab, timeout, options)
            if "error" in result:
                failed[variant] = result
            else:
                runs[variant].append(result)
    summary = {}
    for variant in variants:
        if variant in failed and not runs[variant]:
            summary[variant] = failed[variant]
            continue
        results = runs[variant]
        summary[variant] = {
            "peak_growth_mb": statistics.median(r["peak_growth_mb"] for r in results),
            "seconds": statistics.median(r["seconds"] for r in results),
            "value": results[0]["value"],
            "grad_norm": results[0]["grad_norm"],
        }
    return summary


def child_options(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--device", args.device, "--dtype", args.dtype, "--student-hidden", str(args.student_hidden),
            "--teacher-hidden", str(args.teacher_hidden))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1024x128256", "2048x128256", "4096x49152"],
                        help="TOKENSxVOCAB")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--student-hidden", type=int, default=STUDENT_HIDDEN)
    parser.add_argument("--teacher-hidden", type=int, default=TEACHER_HIDDEN)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, tokens, vocab = args.child
        print(json.dumps(run_variant(variant, int(tokens), int(vocab), args.device, args.dtype,
                                     args.student_hidden, args.teacher_hidden)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.dtype}, JSD(beta=0.5), "
          f"student hidden {args.student_hidden}, teacher hidden {args.teacher_hidden}, median of {args.repeats}")
    print("| tokens x vocab | variant | peak memory growth (MB) | vs dense | time (s) | vs dense | loss, grad vs dense |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        tokens, vocab = (int(x) for x in shape.split("x"))
        results = measure_shape(args.variants, tokens, vocab, args.repeats, args.timeout, child_options(args))
        dense = results.get("dense")
        dense = None if dense is None or "error" in dense else dense
        for variant, result in results.items():
            if "error" in result:
                print(f"| {tokens:,} x {vocab:,} | {variant} | {result['error']} | | | | |", flush=True)
                continue
            memory_ratio = f"{result['peak_growth_mb'] / dense['peak_growth_mb']:.2f}x" if dense else "-"
            time_ratio = f"{result['seconds'] / dense['seconds']:.2f}x" if dense else "-"
            value = "-"
            if dense:
                value = ", ".join(f"{abs(result[key] - dense[key]) / abs(dense[key]):.0e}" for key in ("value", "grad_norm"))
            print(f"| {tokens:,} x {vocab:,} | {variant} | {result['peak_growth_mb']:,.0f} | {memory_ratio} | "
                  f"{result['seconds']:.2f} | {time_ratio} | {value} |", flush=True)

if __name__ == "__main__":
    main()
