"""Train a tiny student on tiny data; run directly or under `accelerate launch` (tests/test_train.py, test_strategy.py).

Arguments: OUTPUT_DIR BATCH_SIZE GRAD_ACCUM STEPS [STRATEGY [resume [DEEPSPEED_CONFIG [NUM_EXAMPLES [SAVE_EVERY]]]]].
"""

from __future__ import annotations

import json
import sys

import torch

from kdlm.config import LossConfig, TrainConfig
from kdlm.data import encode_records, load_records

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from tiny import tiny_llama, tiny_tokenizer, write_chat_jsonl  # noqa: E402


def main(output_dir: str, batch_size: int, grad_accum: int, steps: int, strategy: str = "ddp", resume: str = "",
         deepspeed_config: str = "configs/deepspeed/zero2.json", num_examples: str = "24",
         save_every: str = "0") -> None:
    from pathlib import Path

    from kdlm.train.loop import train
    from kdlm.train.strategy import accelerator_for

    tokenizer = tiny_tokenizer()
    teacher = tiny_llama(len(tokenizer), num_layers=4, seed=1)
    student = tiny_llama(len(tokenizer), num_layers=2, seed=2)
    config = TrainConfig(output_dir=output_dir, max_steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                         lr=3e-3, warmup_steps=1, bf16=False, length_grouped=True, strategy=strategy,
                         resume=resume == "resume", save_every=int(save_every), deepspeed_config=str(Path(__file__).parents[1] / deepspeed_config))
    accelerator = accelerator_for(config, cpu=True)
    data = write_chat_jsonl(Path(f"{output_dir}-data-{accelerator.process_index}.jsonl"), count=int(num_examples))
    examples = encode_records(tokenizer, load_records(str(data)), max_length=128)
    result = train(student, examples, train_config=config, loss_config=LossConfig(divergence="jsd", kd_weight=0.7),
                   pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), teacher=teacher, accelerator=accelerator)
    if accelerator.is_main_process:
        torch.save(student.state_dict(), output_dir + "/final.pt")
        (Path(output_dir) / "world_size").write_text(str(accelerator.num_processes))
        (Path(output_dir) / "distributed_type").write_text(accelerator.distributed_type.value)
        (Path(output_dir) / "losses.json").write_text(json.dumps([r["loss"] for r in result.history]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:])
