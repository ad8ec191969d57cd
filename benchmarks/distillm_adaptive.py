"""DistiLLM's adaptive parts acting in a short run: the threshold rising and replayed batches trained.

    PYTHONPATH=src:tests nice python benchmarks/distillm_adaptive.py            # about 10 s on 1 CPU thread
    PYTHONPATH=src:tests nice python benchmarks/distillm_adaptive.py --lr 0.01  # the threshold stays put

Tiny models of the test suite (tests/tiny.py: a 2-layer teacher fitted to a small corpus, a random 2-layer
student), 20 chat records (4 set aside for the held-out cross-entropy), batch 4, the real training loop with
``kdlm.train.onpolicy.DistiLLM``. The held-out cross-entropy is measured before step 1 and every
``--eval-every`` steps; the threshold rises by 0.1 each time it reaches its reference plus ``--loss-eps``.
At ``--lr 0.2`` the student overshoots, its cross-entropy on the held-out answers worsens, and the
threshold climbs; the replay buffer (capacity 4) fills with fresh samples, then serves draws.
Prints the log columns of each step (those of train_log.csv).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--loss-eps", type=float, default=0.0)
    parser.add_argument("--init-threshold", type=float, default=0.3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from kdlm.config import LossConfig, MethodConfig, TrainConfig
    from kdlm.data import encode_records, load_records
    from kdlm.train.loop import train
    from kdlm.train.methods import build_method
    from tiny import tiny_llama, trained_tiny_teacher, write_chat_jsonl

    teacher, tokenizer = trained_tiny_teacher(num_layers=2, steps=30)
    with tempfile.TemporaryDirectory() as folder:
        data = write_chat_jsonl(Path(folder) / "chat.jsonl", count=24)
        examples = encode_records(tokenizer, load_records(str(data)), max_length=96)[:18]
        train_examples, val = examples[:-4], examples[-4:]
        student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
        method_config = MethodConfig(name="distillm", init_threshold=args.init_threshold, loss_eps=args.loss_eps,
                                     capacity=4, eval_every=args.eval_every, max_new_tokens=8, temperature=1.0)
        loss = LossConfig(divergence="srkl")
        method = build_method(method_config, student=student, teacher=teacher, tokenizer=tokenizer, loss_config=loss,
                              max_steps=args.steps, seed=0, bf16=False, vocab_size=len(tokenizer), batch_size=4,
                              val_examples=val)
        config = TrainConfig(output_dir=folder, max_steps=args.steps, batch_size=4, lr=args.lr, warmup_steps=0, bf16=False)
        result = train(student, train_examples, train_config=config, loss_config=loss, pad_token_id=tokenizer.pad_token_id,
                       vocab_size=len(tokenizer), teacher=teacher, method=method)
    columns = ["step", "loss", "val_loss", "threshold", "batches_fresh", "batches_replay", "batches_data", "buffer"]
    print(" | ".join(columns))
    for record in result.history:
        cells = [f"{record[c]:.3f}" if isinstance(record[c], float) and math.isfinite(record[c]) and c != "threshold"
                 else "-" if isinstance(record[c], float) and not math.isfinite(record[c]) else str(round(record[c], 2))
                 for c in columns]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
