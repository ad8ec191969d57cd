"""Seconds per training step of each on-policy method on the quickstart shape, next to off-policy KD.

    nice python benchmarks/onpolicy_step.py                 # 3 steps per method, median of steps 2-3
    nice python benchmarks/onpolicy_step.py --steps 4 --max-new-tokens 32

Bundled teacher (30 layers), the quickstart's 15-layer student (its influence-chosen layers), batch 8 of
the quickstart's training examples (the teacher's cached answers; run the quickstart once first), bf16
autocast, the real training loop (``kdlm.train.loop.train``) with each method's object, checkpoints
skipped. Every method gets a fresh copy of the same student and the same first examples. "vs online" is
the ratio to the off-policy step with the live teacher, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

QUICKSTART_LAYERS = [0, 1, 8, 10, 11, 18, 19, 20, 21, 22, 23, 24, 27, 28, 29]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="steps per method; the time is the median after the first")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", nargs="*", help="run only these rows (by name)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import kdlm.train.loop as loop
    from kdlm.config import LossConfig, MethodConfig, TrainConfig, load_config
    from kdlm.data.tokenize import collate
    from kdlm.models import build_pruned_student, load_model
    from kdlm.pipeline import prepare_data
    from kdlm.teachers.signals import teacher_logits
    from kdlm.train.methods import build_method

    loop.save_checkpoint = lambda *a, **k: None  # a checkpoint per row would time the disk, not the step
    config = load_config("configs/quickstart.yaml")
    teacher, tokenizer = load_model(config.teacher.model)
    teacher.eval().requires_grad_(False)
    started = time.perf_counter()
    train_examples, _ = prepare_data(config, teacher, tokenizer)  # cached answers after one quickstart run
    print(f"data ready in {time.perf_counter() - started:.1f} s ({len(train_examples)} examples)")
    examples = train_examples[: args.batch * (args.steps + 1)]
    vocab = teacher.config.vocab_size
    topk = []
    for start in range(0, len(examples), args.batch):
        batch = collate(examples[start : start + args.batch], tokenizer.pad_token_id)
        logprobs = torch.log_softmax(teacher_logits(teacher, batch, bf16="auto"), dim=-1)
        values, ids = logprobs.topk(config.teacher.top_k, dim=-1)
        counts = [sum(1 for label in example["labels"][1:] if label != -100) for example in examples[start : start + args.batch]]
        for piece_ids, piece_values in zip(ids.split(counts), values.split(counts), strict=True):
            topk.append((piece_ids, piece_values))

    common = {"max_new_tokens": args.max_new_tokens}
    rows = [
        ("offpolicy, cached top-64 (quickstart)", "fkl", None, True),
        ("offpolicy, live teacher", "jsd", None, False),
        ("gkd, lmbda 1 (student samples)", "jsd", MethodConfig(name="gkd", lmbda=1.0, **common), False),
        ("gkd, seq_kd (teacher samples)", "jsd", MethodConfig(name="gkd", lmbda=0.0, seq_kd=True, **common), False),
        ("distillm, threshold 1, buffer 8", "srkl", MethodConfig(name="distillm", init_threshold=1.0, capacity=8, eval_every=10**6, **common), False),
        ("minillm, teacher_mix 0.2", "rkl", MethodConfig(name="minillm", temperature=1.0, **common), False),
        ("imitkd, half the sequences sampled", "fkl", MethodConfig(name="imitkd", data_start=0.5, data_end=0.5, **common), False),
    ]
    if args.only:
        rows = [row for row in rows if any(name in row[0] for name in args.only)]
    print(f"batch {args.batch}, up to {args.max_new_tokens} new tokens per sample, bf16 autocast, {torch.get_num_threads()} threads")
    print("| method | s/step | vs online | tokens trained per step | samples per step |")
    print("|---|---|---|---|---|")
    online = None
    for name, divergence, method_config, cached in rows:
        student = build_pruned_student(teacher, QUICKSTART_LAYERS)
        loss = LossConfig(divergence=divergence)
        with tempfile.TemporaryDirectory() as output_dir:
            train_config = TrainConfig(output_dir=output_dir, max_steps=args.steps, batch_size=args.batch, lr=1e-3,
                                       warmup_steps=0, bf16="auto", length_grouped=False)
            method = None
            if method_config is not None:
                method = build_method(method_config, student=student, teacher=teacher, tokenizer=tokenizer, loss_config=loss,
                                      max_steps=args.steps, seed=0, bf16="auto", vocab_size=vocab, batch_size=args.batch,
                                      val_examples=examples[:2])
            result = loop.train(student, examples, train_config=train_config, loss_config=loss,
                                pad_token_id=tokenizer.pad_token_id, vocab_size=vocab,
                                teacher=None if cached else teacher, topk_targets=topk if cached else None, method=method)
        ends = [record["seconds"] for record in result.history]
        durations = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
        seconds = statistics.median(durations[1:] or durations)
        tokens = statistics.mean(_step_tokens(result.history))
        samples = (result.history[-1].get("generated", 0) / len(result.history)) if method else 0
        online = seconds if name.startswith("offpolicy, live") else online
        ratio = f"{seconds / online:.2f}x" if online else "-"
        print(f"| {name} | {seconds:.2f} | {ratio} | {tokens:.0f} | {samples:.1f} |", flush=True)
        del student, method


def _step_tokens(history: list[dict]):
    previous = 0
    for record in history:
        yield record["tokens"] - previous
        previous = record["tokens"]


if __name__ == "__main__":
    main()
