"""Peak memory and time of one distillation loss forward+backward: dense, chunked, fused, and two peers.

    python benchmarks/loss_memory.py                      # the issue's three shapes, fp32, JSD(beta=0.5)
    python benchmarks/loss_memory.py --shapes 256x32000 --repeats 2   # a quick look

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
peak RSS over the inputs (tracemalloc does not see torch's CPU allocations). Repeats are interleaved across
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


def make_inputs(tokens: int, vocab: int, seed: int = 0):
    """In-place scaling, so that no transient copy raises the peak before the baseline is read."""
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, STUDENT_HIDDEN, generator=gen).requires_grad_(True)
    student_weight = torch.randn(vocab, STUDENT_HIDDEN, generator=gen).div_(STUDENT_HIDDEN**0.5).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, TEACHER_HIDDEN, generator=gen)
    teacher_weight = torch.randn(vocab, TEACHER_HIDDEN, generator=gen).div_(TEACHER_HIDDEN**0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[: tokens // 16] = -100  # a prompt-like masked prefix
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def step(variant: str, student_hidden, student_weight, teacher_hidden, teacher_weight, labels) -> float:
    """One forward+backward; returns the JSD summed over the target tokens."""
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

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False)
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


def run_variant(variant: str, tokens: int, vocab: int) -> dict:
    """In this (fresh) process: inputs, then one forward+backward pass."""
    _import(variant)  # imports are not part of the step
    inputs = make_inputs(tokens, vocab)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    value = step(variant, *inputs)
    seconds = time.perf_counter() - started
    return {"peak_growth_mb": peak_rss_mb() - baseline, "seconds": seconds, "value": value,
            "grad_norm": float(inputs[1].grad.norm())}


def measure(variant: str, tokens: int, vocab: int, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", variant, str(tokens), str(vocab)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        return {"error": "out of memory (killed)" if killed else proc.stderr.strip().splitlines()[-1][:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_shape(variants: list[str], tokens: int, vocab: int, repeats: int, timeout: float) -> dict[str, dict]:
    """Repeats interleaved across variants (a, b, c, a, b, c, ...), so that a slow spell of the machine
    falls on all of them; a variant that fails once is not run again."""
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    failed: dict[str, dict] = {}
    for _ in range(repeats):
        for variant in variants:
            if variant in failed:
                continue
            result = measure(variant, tokens, vocab, timeout)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1024x128256", "2048x128256", "4096x49152"],
                        help="TOKENSxVOCAB")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, tokens, vocab = args.child
        print(json.dumps(run_variant(variant, int(tokens), int(vocab))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, JSD(beta=0.5), "
          f"student hidden {STUDENT_HIDDEN}, teacher hidden {TEACHER_HIDDEN}, median of {args.repeats}")
    print("| tokens x vocab | variant | peak memory growth (MB) | vs dense | time (s) | vs dense | loss, grad vs dense |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        tokens, vocab = (int(x) for x in shape.split("x"))
        results = measure_shape(args.variants, tokens, vocab, args.repeats, args.timeout)
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
