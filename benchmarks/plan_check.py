"""`kdlm plan` against measured peak memory: the planner's estimate next to a real training process.

    python benchmarks/plan_check.py                       # quickstart shapes: bundled teacher, 15-layer student
    python benchmarks/plan_check.py --batches 4 8 --length 384
    python benchmarks/plan_check.py --strategy fsdp --processes 2   # a 2-process FSDP run on CPU (gloo)
    python benchmarks/plan_check.py --strategy ddp --processes 2    # the same run under DDP, as a contrast

Each configuration runs in a fresh process that does what `kdlm distill` holds in memory: the teacher loaded
(fp32), a pruned student, the teacher's top-k targets computed over the batch (the cache phase) or the live
teacher at every step, then three optimizer steps (AdamW state allocated) of the loop's own objective. Every
token is a target, as the planner assumes (its upper bound). Measured: the process's peak resident memory
(ru_maxrss). Planned: ``Plan.peak_gib`` (the highest of the step and the phases) from ``kdlm.plan.make_plan``.

``--strategy fsdp|ddp --processes N`` instead launches ``kdlm.train.loop.train`` itself under ``accelerate launch``
on N CPU processes over gloo (as tests/test_strategy.py does): a randomly initialised Llama student of about 113 M
parameters built from a config (nothing downloaded), a 2-layer live teacher of the same vocabulary (so that the
student's model states dominate), micro-batches of 2 x 64 tokens, 3 optimizer steps. Each rank reports its peak
resident memory after building the models, after the last optimizer step, and at the end of ``train`` (which,
under FSDP, gathers the whole trained student back into every process); the planner's per-device estimate is
``make_plan`` for the same config with the same strategy and N devices.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

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
    return {"planned_gib": plan.peak_gib, "parts": plan.parts_gib}


FSDP_STUDENT = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 14,
                "num_attention_heads": 12, "num_key_value_heads": 4, "tie_word_embeddings": True}
FSDP_TEACHER = {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
FSDP_BATCH, FSDP_LENGTH, FSDP_STEPS = 2, 64, 3


def sharded_config(folder: Path, strategy: str):
    """The RunConfig of the sharded run: student and teacher from config-only folders, a live teacher."""
    from kdlm.config import RunConfig

    return RunConfig.model_validate({
        "teacher": {"model": str(folder / "teacher"), "signal": "online"},
        "student": {"init": "model", "model": str(folder / "student")},
        "data": {"max_length": FSDP_LENGTH},
        "train": {"batch_size": FSDP_BATCH, "bf16": False, "strategy": strategy, "max_steps": FSDP_STEPS,
                  "output_dir": str(folder / f"run-{strategy}")},
    })


def sharded_child(folder: Path, strategy: str) -> None:
    """One rank of the sharded run (under accelerate launch): train, and write this rank's peak memory.

    (Sharded training on the CPU hands the C heap's freed memory back after sharding and after each optimizer step,
    kdlm.train.strategy.release_freed_memory: what is measured is what the run holds, less what glibc kept.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdlm.config import LossConfig
    from kdlm.train.loop import train
    from kdlm.train.strategy import accelerator_for

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    config = sharded_config(folder, strategy)
    accelerator = accelerator_for(config.train, cpu=True)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig.from_pretrained(folder / "student"))
    teacher = LlamaForCausalLM(LlamaConfig.from_pretrained(folder / "teacher"))
    generator = torch.Generator().manual_seed(accelerator.process_index)
    examples = []
    for _ in range(2 * FSDP_STEPS * FSDP_BATCH * accelerator.num_processes):
        ids = torch.randint(3, FSDP_STUDENT["vocab_size"], (FSDP_LENGTH,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    peaks = {"built": peak()}
    steps = {}

    def after_step(step: int) -> None:
        steps[step] = peak()

    train(student, examples, train_config=config.train, loss_config=LossConfig(kd_weight=0.7), pad_token_id=0,
          vocab_size=FSDP_STUDENT["vocab_size"], teacher=teacher, accelerator=accelerator,
          on_step=after_step)
    peaks.update({"trained": steps[FSDP_STEPS], "end": peak(), "rank": accelerator.process_index,
                  "distributed_type": accelerator.distributed_type.value,
                  "student_params": sum(p.numel() for p in student.parameters())})
    (folder / f"peak-{strategy}-{accelerator.process_index}.json").write_text(json.dumps(peaks))


def sharded_main(strategy: str, processes: int, folder: Path) -> None:
    """Launch the sharded run on ``processes`` CPU processes and print each rank's peak next to the plan."""
    import os
    import socket

    from transformers import LlamaConfig

    from kdlm.plan import config_shapes, make_plan

    for name, fields in (("student", FSDP_STUDENT), ("teacher", FSDP_TEACHER)):
        LlamaConfig(**fields).save_pretrained(folder / name)
    config = sharded_config(folder, strategy)
    student, teacher = config_shapes(config)
    plan = make_plan(config, student, teacher, devices=processes, device_memory_gib=24, strategy=strategy,
                     micro_batch=FSDP_BATCH, bf16=False, gpu=False, flops_per_second=1e10)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    subprocess.run([*launch, __file__, "--sharded-child", str(folder), strategy], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    print(f"student {student.params / 1e6:.1f} M parameters, {processes} processes, {strategy}"
          ", micro-batch "
          f"{FSDP_BATCH} x {FSDP_LENGTH}, {FSDP_STEPS} steps; plan parts (GiB): "
          + ", ".join(f"{k} {v:.3f}" for k, v in plan.parts_gib.items())
          + f"; step total {plan.total_gib:.2f}, build phase {plan.build_phase_gib:.2f}, gather phase {plan.gather_phase_gib:.2f}")
    print("| strategy | rank | planned step (GiB) | measured peak after build | after last step | at end of train | "
          "planned peak (GiB) | planned peak / measured peak |")
    print("|---|---|---|---|---|---|---|---|")
    for rank in range(processes):
        peaks = json.loads((folder / f"peak-{strategy}-{rank}.json").read_text())
        print(f"| {peaks['distributed_type']} | {rank} | {plan.total_gib:.2f} | {peaks['built']:.2f} | "
              f"{peaks['trained']:.2f} | {peaks['end']:.2f} | {plan.peak_gib:.2f} | {plan.peak_gib / peaks['end']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--strategy", choices=["fsdp", "ddp"], help="launch a multi-process run with this strategy")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--sharded-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sharded_child:
        sharded_child(Path(args.sharded_child[0]), args.sharded_child[1])
        return
    if args.strategy:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            sharded_main(args.strategy, args.processes, Path(folder))
        return
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
