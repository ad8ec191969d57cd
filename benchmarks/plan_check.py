"""`kdlm plan` against measured peak memory: the planner's estimate next to a real training process.

    python benchmarks/plan_check.py                       # quickstart shapes: bundled teacher, 15-layer student
    python benchmarks/plan_check.py --batches 4 8 --length 384

Each configuration runs in a fresh process that does what `kdlm distill` holds in memory: the teacher loaded
(fp32), a pruned student, the teacher's top-k targets computed over the batch (the cache phase) or the live
teacher at every step, then three optimizer steps (AdamW state allocated) of the loop's own objective. Every
token is a target, as the planner assumes (its upper bound). Measured: the process's peak resident memory
(ru_maxrss). Planned: ``max(training total, cache phase)`` from ``kdlm.plan.make_plan`` for the same config.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def run_config(batch: int, length: int, signal: str, fused: bool):
    from kdlm.config import RunConfig

    return RunConfig.model_validate({
        "teacher": {"signal": signal},
        "student": {"num_layers": 15, "layers": "evenly"},
        "data": {"max_length": length},
        "train": {"batch_size": batch, "bf16": False},
        "loss": {"fused": fused},
    })


def child(batch: int, length: int, signal: str, fused: bool) -> dict:
    from kdlm.models import build_pruned_student, load_model
    from kdlm.teachers.signals import teacher_logits
    from kdlm.train.loop import StudentObjective, run_teacher

    config = run_config(batch, length, signal, fused)
    teacher, _ = load_model(config.teacher.model)
    teacher.eval().requires_grad_(False)
    student = build_pruned_student(teacher, [round(i * 29 / 14) for i in range(15)]).train()
    vocab = teacher.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    batch_tensors = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    target = None
    if signal == "topk":
        logprobs = torch.log_softmax(teacher_logits(teacher, batch_tensors, bf16=False), dim=-1)
        values, ids = logprobs.topk(config.teacher.top_k, dim=-1)
        target = (ids, values)
        del logprobs
    objective = StudentObjective(student, config.loss, vocab)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(3):
        if signal == "online":
            target, _ = run_teacher(teacher, batch_tensors, vocab, bf16=False, online=True, hints=None)
        total, _, _, _, count = objective(batch_tensors, target, 1.0)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def planned(batch: int, length: int, signal: str, fused: bool) -> dict:
    from kdlm.plan import config_shapes, make_plan

    config = run_config(batch, length, signal, fused)
    student, teacher = config_shapes(config)
    plan = make_plan(config, student, teacher, devices=1, device_memory_gib=24, strategy="ddp", micro_batch=batch,
                     bf16=False, gpu=False, flops_per_second=1e10)
    return {"planned_gib": max(plan.total_gib, plan.cache_phase_gib), "parts": plan.parts_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch, length, signal, mode = args.child
        print(json.dumps(child(int(batch), int(length), signal, mode == "fused")))
        return
    from kdlm.precision import cpu_model

    print(f"{cpu_model()}, fp32, bundled teacher -> 15-layer student, every token a target")
    print("| batch x length | teacher signal | loss | planned peak (GiB) | measured peak (GiB) | planned / measured |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        for signal, mode in (("topk", "fused"), ("topk", "dense"), ("online", "fused")):
            command = [sys.executable, __file__, "--child", str(batch), str(args.length), signal, mode]
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak_gib"]
            plan = planned(batch, args.length, signal, mode == "fused")["planned_gib"]
            print(f"| {batch} x {args.length} | {signal} | {mode} | {plan:.2f} | {measured:.2f} | {plan / measured:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
