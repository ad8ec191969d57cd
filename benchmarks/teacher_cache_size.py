"""Bytes per target token and write time of the teacher cache on the quickstart data, and the accuracy of
fp16 against bf16 log-probs. Run: PYTHONPATH=src python benchmarks/teacher_cache_size.py [--out DIR]"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from kdlm.config import load_config
from kdlm.data.tokenize import collate
from kdlm.models import load_model
from kdlm.pipeline import prepare_data, teacher_cache_identity
from kdlm.teachers.cache import bytes_per_token, write_cache
from kdlm.teachers.signals import teacher_logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/cache-size")
    args = parser.parse_args()
    config = load_config("configs/quickstart.yaml")
    teacher, tokenizer = load_model(config.teacher.model)
    train_examples, _ = prepare_data(config, teacher, tokenizer)

    # Rounding error of the cached log-probs against fp32, on the top-64 of the first 64 examples.
    errors = {torch.float16: 0.0, torch.bfloat16: 0.0}
    for start in range(0, 64, 8):
        batch = collate(train_examples[start : start + 8], tokenizer.pad_token_id)
        values = torch.log_softmax(teacher_logits(teacher, batch, bf16=config.train.bf16), -1).topk(64, -1).values
        for dtype in errors:
            errors[dtype] = max(errors[dtype], (values.to(dtype).float() - values).abs().max().item())
    print(f"max |log-prob error| on top-64: fp16 {errors[torch.float16]:.4f}, bf16 {errors[torch.bfloat16]:.4f}")

    settings = [("topk", {"teacher.top_k": k}) for k in (8, 32, 64, 128)]
    settings += [("sampled", {"teacher.samples": n}) for n in (16, 64)]
    print("| kind | k or N | bytes/token | MiB | seconds |")
    print("|---|---|---|---|---|")
    for kind, overrides in settings:
        run = load_config("configs/quickstart.yaml", [f"teacher.cache_kind={kind}", *(f"{k}={v}" for k, v in overrides.items())])
        folder = Path(args.out) / f"{kind}-{next(iter(overrides.values()))}"
        shutil.rmtree(folder, ignore_errors=True)
        identity = teacher_cache_identity(run, tokenizer, teacher.config.vocab_size, train_examples)
        started = time.perf_counter()
        manifest = write_cache(teacher, train_examples, folder, identity=identity, pad_token_id=tokenizer.pad_token_id,
                               batch_size=run.train.batch_size, show_progress=False)
        seconds = time.perf_counter() - started
        size = sum(shard["bytes"] for shard in manifest["shards"])
        extra = f" (max {manifest['max_distinct']} distinct ids)" if kind == "sampled" else ""
        print(f"| {kind} | {next(iter(overrides.values()))} | {bytes_per_token(manifest):.1f}{extra} | "
              f"{size / 2**20:.1f} | {seconds:.1f} |")
    print(f"{len(train_examples)} examples, {manifest['num_tokens']} target tokens")


if __name__ == "__main__":
    main()
