"""Chain-of-thought distillation at equal budget: label-only fine-tuning vs Fine-tune-CoT vs Distilling
Step-by-Step, on synthetic multi-step arithmetic word problems, accuracy on held-out questions over seeds.

    nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cot.py --out runs/bench-cot

What runs (all through kdlm's own code paths):
1. A rule-based teacher (kdlm.recipes.arith.ArithTeacher) is served over the OpenAI-compatible API on
   loopback; it writes step-by-step rationales and slips on one step at `--error-rate`.
2. The CoT recipe (kdlm.recipes.cot.run, what `kdlm generate configs/cot.yaml` runs) asks it for
   `--samples` rationales per training question, keeps those whose answer equals the gold one,
   rationalizes the rest, and writes three training sets: label-only (gold answers), Fine-tune-CoT
   ("rationale --> answer END") and Distilling Step-by-Step ("[label] q" -> answer for every question,
   "[rationale] q" -> rationale, loss = a * mean label CE + (1 - a) * mean rationale CE). All three share
   one request cache.
3. For every method and seed a tiny student is trained from scratch with kdlm.train.loop.train for the
   same number of steps at the same batch size, then answers the held-out questions greedily; the
   answer is parsed as in the recipe (Fine-tune-CoT: after "-->"; the others: the number written).

The student: a 4-layer Llama (hidden 128, 0.9 M parameters) over a character-level vocabulary (the 256
bytes plus 3 special tokens, and a compact chat template). Why: it trains in minutes on one CPU core, a digit is a token (so
arithmetic is not hidden inside a large BPE vocabulary), and starting from random weights means whatever
it can do comes from the distillation data alone. The bundled 135M teacher pruned to a few layers would
be the other choice, but each of its layers (width 576) costs about 20x the multiply-adds of one of ours
per token, and its 49k-entry vocabulary adds 28 M more per target token: too slow for seeds x methods
on a shared 2-core machine.

"DSS (task means)" trains the records as the recipe writes them: each names its task, and the loop
(kdlm.train.tasks, what `kdlm distill` runs) takes label_weight * mean CE(label) + rationale_weight *
mean CE(rationale) per step, as the paper's code does. "DSS (per token)" drops the task names: every
target token counts once, times its record's weight (label answers are short, so the label task then
gets about a tenth of the loss).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kdlm.config import LossConfig, TrainConfig
from kdlm.data import encode_records, load_records
from kdlm.generate import GenerateConfig
from kdlm.recipes import cot
from kdlm.recipes.arith import ArithTeacher, make_dataset, worked_steps
from kdlm.recipes.tasks import accuracy, greedy_outputs
from kdlm.serve import ServerThread
from kdlm.train.loop import train

# A compact chat template of our own (2 special tokens per exchange rather than ChatML's ~30 bytes of
# role headers): the question after <|im_start|>, a newline, then the answer closed by <|im_end|>.
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|im_start|>' + message['content'] + '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
)
METHODS = {  # name -> (recipe format, DSS task balancing)
    "label-only": ("label_only", None),
    "Fine-tune-CoT": ("finetune_cot", None),
    "DSS (task means)": ("step_by_step", "means"),
    "DSS (per token)": ("step_by_step", "tokens"),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes as tokens (a BPE without merges) plus 3 special tokens, with a compact chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = TEMPLATE
    return fast


def student(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(config)


def write_task(path: Path, count: int, seed: int, limit: int, steps: tuple[int, int]) -> None:
    problems = make_dataset(count, seed, limit=limit, steps=steps)
    with path.open("w") as sink:
        for problem in problems:
            lines, _ = worked_steps(problem["start"], problem["operations"])
            sink.write(json.dumps({"question": problem["question"], "answer": problem["answer"],
                                   "rationale": " ".join(lines)}) + "\n")


def make_data(args, out: Path) -> tuple[dict[str, Path], dict]:
    """The recipe's training sets per format (one teacher run, one cache) and its counts."""
    task_file = out / "task.jsonl"
    write_task(task_file, args.train + args.heldout, args.data_seed, args.limit, (args.min_steps, args.max_steps))
    files, counts = {}, {}
    with ServerThread(ArithTeacher(args.error_rate)) as server:
        for fmt in ("label_only", "finetune_cot", "step_by_step"):
            config = GenerateConfig.model_validate({
                "output": str(out / f"{fmt}.jsonl"), "cache": str(out / "teacher.sqlite"), "progress": False,
                "teacher": {"model": "arith-teacher", "base_url": server.url},
                "sampling": {"n": args.samples, "temperature": 0.7, "max_tokens": 128},
                "limits": {"concurrency": 32},
                "recipe": {"name": "cot", "task": {"source": str(task_file), "format": "qa"}, "heldout": args.heldout,
                           "prompt": "zero_shot", "filter": "gold", "rationalize": True, "format": fmt,
                           "label_weight": args.label_weight, "rationale_weight": args.rationale_weight},
            })
            counts[fmt] = cot.run(config)
            files[fmt] = out / f"{fmt}.jsonl"
    return files, counts


def run_method(name: str, files: dict[str, Path], heldout: list[dict], tokenizer, seed: int, args, out: Path) -> dict:
    fmt, balance = METHODS[name]
    records = load_records(str(files[fmt]))
    if balance == "tokens":  # without task names the loop pools the weighted CE over all target tokens
        records = [{key: value for key, value in record.items() if key != "task"} for record in records]
    examples = encode_records(tokenizer, records, max_length=256)
    model = student(len(tokenizer), seed)
    config = TrainConfig(output_dir=str(out / "runs" / f"{fmt}-{balance}-{seed}"), max_steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, warmup_steps=20, bf16="auto", seed=seed, log_every=50)
    started = time.perf_counter()
    result = train(model, examples, train_config=config, loss_config=LossConfig(kd_weight=0),
                   pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    train_s = time.perf_counter() - started
    recipe = cot.CotSettings(task={"source": "-", "format": "qa"}, format=fmt)
    prompts = [cot.student_prompt(example["question"], recipe) for example in heldout]
    outputs = greedy_outputs(model.eval(), tokenizer, prompts, max_new_tokens=8 if fmt != "finetune_cot" else 96,
                             batch_size=100)
    score = accuracy(outputs, [example["answer"] for example in heldout], "number")
    return {"method": name, "seed": seed, "accuracy": score, "train_s": train_s, "examples": len(examples),
            "final_loss": result.history[-1]["loss"], "sample_output": outputs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench-cot")
    parser.add_argument("--train", type=int, default=2000, help="Training questions.")
    parser.add_argument("--heldout", type=int, default=200, help="Held-out questions (never trained on).")
    parser.add_argument("--limit", type=int, default=9, help="Largest starting number and amount in a problem.")
    parser.add_argument("--min-steps", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--error-rate", type=float, default=0.2, help="Teacher slips (removed by the filter).")
    parser.add_argument("--samples", type=int, default=2, help="Teacher rationales per question.")
    parser.add_argument("--steps", type=int, default=1200, help="Optimizer steps, the same for every method.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--label-weight", type=float, default=0.5, help="a of Distilling Step-by-Step.")
    parser.add_argument("--rationale-weight", type=float, default=0.5, help="1 - a of Distilling Step-by-Step.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=["label-only", "Fine-tune-CoT", "DSS (task means)"],
                        choices=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    files, counts = make_data(args, out)
    heldout = [{"question": json.loads(line)["prompt"], "answer": json.loads(line)["meta"]["gold"]}
               for line in open(out / "finetune_cot.heldout.jsonl")]
    tokenizer = char_tokenizer()
    rows = []
    for seed in args.seeds:  # seeds outermost: a cut-short run still compares every method
        for name in args.methods:
            row = run_method(name, files, heldout, tokenizer, seed, args, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "counts": counts, "rows": rows}, indent=1))

    data = counts["finetune_cot"]
    print(f"\nteacher: {data['samples']} rationales for {data['questions']} questions ({args.error_rate:.0%} slip rate); "
          f"{data['kept']} distinct correct ones kept for {data['questions_kept']} questions ({data['rationalized']} by rationalization); "
          f"{len(heldout)} held-out questions; {args.steps} steps x batch {args.batch_size} per run; "
          f"total {time.perf_counter() - started:.0f} s\n")
    print("| method | training records | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | spread (sd) | train s/run |")
    print("|---|---|" + "---|" * len(args.seeds) + "---|---|---|")
    for name in args.methods:
        mine = [row for row in rows if row["method"] == name]
        scores = [row["accuracy"] for row in mine]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"| {name} | {mine[0]['examples']} | " + " | ".join(f"{s:.1%}" for s in scores)
              + f" | {statistics.mean(scores):.1%} | {spread:.1%} | {statistics.mean(r['train_s'] for r in mine):.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
