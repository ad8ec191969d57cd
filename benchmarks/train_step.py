"""Peak memory and time of one quickstart training step with the fused loss and with the dense one.

    python benchmarks/train_step.py                # bundled teacher, 15-layer pruned student, batch 8 x 384
    python benchmarks/train_step.py --batch 4 --length 256

The step is the training loop's own objective (``StudentObjective``: decoder, then the loss) forward and
backward under `bf16: auto` (bf16 autocast where the CPU runs it fast), for the two teacher signals of kdlm distill: ``topk`` (cached top-64
targets) and ``online`` (the live teacher's hidden states, projected chunk by chunk when fused). Every
configuration runs in a fresh process; memory is the growth of peak RSS over the loaded models and batch.
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

from kdlm.precision import bf16_enabled, resolve_precision


def child(signal: str, fused: bool, batch_size: int, length: int, steps: int) -> dict:
    from kdlm.config import LossConfig
    from kdlm.models import build_pruned_student, load_model
    from kdlm.teachers.signals import teacher_logits
    from kdlm.train.loop import StudentObjective, run_teacher

    teacher, tokenizer = load_model("bundled:smollm2-135m-instruct")
    teacher.eval().requires_grad_(False)
    student = build_pruned_student(teacher, list(range(0, 30, 2)))
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
    labels = input_ids.clone()
    labels[:, : length // 3] = -100  # a prompt, outside the loss
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    objective = StudentObjective(student, LossConfig(fused=fused), vocab)
    topk = None
    if signal == "topk":
        logprobs = torch.log_softmax(teacher_logits(teacher, batch, bf16="auto"), dim=-1)
        values, ids = logprobs.topk(64, dim=-1)
        topk = (ids, values)
        del logprobs
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        target = topk
        if signal == "online":
            target, _ = run_teacher(teacher, batch, vocab, bf16="auto", online=True, hints=None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_enabled("auto")):
            total, _, _, _, count = objective(batch, target, 1.0)
        (total / count).backward()
        student.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return {"peak_growth_mb": peak, "seconds": statistics.median(seconds[1:] or seconds), "tokens": int(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3, help="steps per process; time is the median after the first")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        signal, fused = args.child
        print(json.dumps(child(signal, fused == "fused", args.batch, args.length, args.steps)))
        return
    precision = resolve_precision("auto", "cpu").describe()
    print(f"batch {args.batch} x {args.length} tokens, {precision}, 2/3 of each sequence in the loss")
    print("| teacher signal | loss | peak memory growth (MB) | vs dense | step fwd+bwd (s) | vs dense |")
    print("|---|---|---|---|---|---|")
    for signal in ("topk", "online"):
        results = {}
        for mode in ("dense", "fused"):
            command = [sys.executable, __file__, "--child", signal, mode, "--batch", str(args.batch),
                       "--length", str(args.length), "--steps", str(args.steps)]
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        dense = results["dense"]
        for mode, result in results.items():
            print(f"| {signal} | {mode} | {result['peak_growth_mb']:,.0f} | {result['peak_growth_mb'] / dense['peak_growth_mb']:.2f}x "
                  f"| {result['seconds']:.2f} | {result['seconds'] / dense['seconds']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
