"""A student as HF weights (transformers, fp32 and bf16 autocast) and as GGUF files (llama.cpp): size and speed.

Per format: bytes on disk, greedy generation tokens/s at batch 1 on the same prompts (the first N
user-oriented Self-Instruct instructions in the model's chat template, each to `--max-new-tokens` new
tokens or end of text), and how far each GGUF file's greedy answers follow the HF fp32 model's: the share
of answer tokens before the first difference. Ratios are against HF fp32, measured in the same run.
GGUF files are written with `kdlm export` (checked against the HF model) unless they already exist.
llama.cpp is used through llama-cpp-python (`pip install llama-cpp-python`, a C++ build of several
minutes); without it only the HF rows and the file sizes are printed.

    OMP_NUM_THREADS=2 python benchmarks/gguf_speed.py runs/bench-frontier-half/runs/.../student --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdlm.export.run import export_gguf
from kdlm.models.loading import load_model
from kdlm.precision import cpu_flags, cpu_model

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "self-instruct-user-eval" / "user_oriented_instructions.jsonl"


def prompts(tokenizer, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()][:count]
    texts = [(row["instruction"] + ("\n\n" + row["instances"][0]["input"] if row["instances"][0].get("input") else "")) for row in rows]
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
            for text in texts]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@torch.no_grad()
def hf_generate(model, ids: list[int], max_new: int, eos: int, bf16: bool) -> list[int]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def llama_generate(llm, ids: list[int], max_new: int, eos: int) -> list[int]:
    llm.reset()
    new = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == eos:
            new.append(token)
            break
        new.append(token)
        if len(new) >= max_new:
            break
    return new


def timed(fn, prompt_ids: list[list[int]]) -> tuple[float, list[list[int]]]:
    outputs, started = [], time.perf_counter()
    for ids in prompt_ids:
        outputs.append(fn(ids))
    return time.perf_counter() - started, outputs


def follow(answers: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the reference's answer tokens produced before the first difference."""
    same = total = 0
    for ours, theirs in zip(answers, reference, strict=True):
        total += len(theirs)
        for a, b in zip(ours, theirs, strict=False):
            if a != b:
                break
            same += 1
    return same / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", type=Path, help="an HF student folder (a kdlm run's student/)")
    parser.add_argument("--quants", default="f16,q8_0")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra-buffers", action="store_true",
                        help="let llama.cpp use its extra CPU buffer types (AMX repacking); off by default (see below)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the rows (default: STUDENT/../gguf_speed.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(str(args.student))
    model.eval()
    eos = tokenizer.eos_token_id
    prompt_ids = prompts(tokenizer, args.prompts)
    hf_generate(model, prompt_ids[0], 8, eos, False)  # warm-up
    rows = []
    for name, bf16 in (("HF fp32", False), ("HF bf16 autocast", True)):
        seconds, answers = timed(lambda ids, bf16=bf16: hf_generate(model, ids, args.max_new_tokens, eos, bf16), prompt_ids)
        rows.append({"format": name, "bytes": folder_bytes(args.student), "seconds": seconds, "tokens": sum(map(len, answers)), "answers": answers})
    reference = rows[0]["answers"]
    try:
        import llama_cpp.llama_cpp as llama_lib
        from llama_cpp import Llama
    except ImportError:
        Llama = None
        print("llama-cpp-python is not installed: GGUF speed not measured")
    if Llama is not None and not args.extra_buffers:
        # llama.cpp's extra CPU buffer types (the AMX repack of Q8_0 weights) died with SIGILL on an AMX Xeon
        # (machine E, llama-cpp-python 0.3.36 built -march=native); the plain CPU backend (AVX-512) runs.
        default_params = llama_lib.llama_model_default_params

        def plain_cpu_params():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_lib.llama_model_default_params = plain_cpu_params
    for quant in args.quants.split(","):
        path = args.student.parent / f"{args.student.name}-{quant}.gguf"
        if not path.exists():
            export_gguf(str(args.student), out=str(path), quant=quant, check=True)
        row = {"format": f"GGUF {quant}", "bytes": path.stat().st_size}
        if Llama is not None:
            llm = Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024, n_batch=512, verbose=False)
            llama_generate(llm, prompt_ids[0], 8, eos)  # warm-up
            seconds, answers = timed(lambda ids, llm=llm: llama_generate(llm, ids, args.max_new_tokens, eos), prompt_ids)
            row.update(seconds=seconds, tokens=sum(map(len, answers)), answers=answers)
            del llm
        rows.append(row)
    base = rows[0]
    flags = cpu_flags() or set()
    print(f"{cpu_model()} ({', '.join(sorted(flags & {'avx512_bf16', 'amx_bf16'})) or 'no avx512_bf16/amx_bf16'}), "
          f"{args.threads} threads; {len(prompt_ids)} prompts, up to {args.max_new_tokens} new tokens each, greedy, batch 1")
    print("| format | size (MiB) | size vs HF | tokens/s | speed vs HF fp32 | greedy tokens as HF fp32's |\n|---|---|---|---|---|---|")
    for row in rows:
        speed = row["tokens"] / row["seconds"] if "seconds" in row else None
        base_speed = base["tokens"] / base["seconds"]
        row["tokens_per_s"] = speed
        row["follows_hf_fp32"] = follow(row["answers"], reference) if "answers" in row else None
        print(f"| {row['format']} | {row['bytes'] / 2**20:.1f} | {row['bytes'] / base['bytes']:.2f}x | "
              + (f"{speed:.1f} | {speed / base_speed:.2f}x | {row['follows_hf_fp32']:.1%} |" if speed else "n/a | n/a | n/a |"))
    out = args.out or args.student.parent / "gguf_speed.json"
    out.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads,
                               "rows": [{k: v for k, v in r.items() if k != "answers"} for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
