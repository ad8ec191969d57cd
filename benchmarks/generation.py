"""Generation throughput: the engine against a fixed-latency server, and local batched decoding.

1. `kdlm serve echo --latency-ms L` answers every request after L ms; `kdlm generate`'s engine sends
   `rounds x concurrency` requests at concurrency 1, 8, 32. Ideal rate = concurrency / latency;
   the table shows the achieved rate over the ideal (how much the client and server add).
2. The bundled teacher decodes the same prompts one at a time and as one batch (the server's and the
   transformers backend's `decode_batch`); the table shows generated tokens per second of each.

    python benchmarks/generation.py --out runs/bench-generation
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def start_echo_server(latency_ms: float) -> tuple[subprocess.Popen, str]:
    from kdlm.serve import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "kdlm.cli", "serve", "echo", "--port", str(port),
                               "--latency-ms", str(latency_ms)], env=env)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            httpx.get(url + "/models")
            return server, url
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the echo server did not start")


def engine_rate(url: str, concurrency: int, requests: int, folder: Path) -> float:
    """Requests per second achieved by the engine (fresh cache, progress bar off)."""
    from kdlm.generate import GenerateConfig, generate

    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / f"prompts-{concurrency}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i} of the benchmark"}) + "\n"
                               for i in range(requests)))
    config = GenerateConfig.model_validate({
        "prompts": str(prompts), "output": str(folder / f"out-{concurrency}.jsonl"), "progress": False,
        "teacher": {"model": "echo", "base_url": url}, "sampling": {"max_tokens": 8},
        "limits": {"concurrency": concurrency},
    })
    started = time.perf_counter()
    stats = generate(config)
    elapsed = time.perf_counter() - started
    assert stats.answered == requests
    return requests / elapsed


def local_tokens_per_second(batch_size: int, single_prompts: int, max_tokens: int, bf16: bool) -> dict:
    from kdlm.data import load_records
    from kdlm.models import load_model
    from kdlm.models.decode import Row, decode_batch

    model, tokenizer = load_model("bundled:smollm2-135m-instruct")
    records = load_records("builtin:quickstart")[:batch_size]

    def row(record: dict) -> Row:
        text = tokenizer.apply_chat_template(record["messages"][:1], tokenize=False, add_generation_prompt=True)
        # Greedy, and no stop on EOS would be fairer still; greedy answers of 32 tokens rarely end sooner.
        return Row(tokenizer(text, add_special_tokens=False)["input_ids"], max_tokens=max_tokens, temperature=0)

    rows = [row(record) for record in records]
    decode_batch(model, tokenizer, rows[:1], bf16=bf16)  # warm-up
    started = time.perf_counter()
    singles = [decode_batch(model, tokenizer, [one], bf16=bf16)[0] for one in rows[:single_prompts]]
    single_rate = sum(len(result.token_ids) for result in singles) / (time.perf_counter() - started)
    started = time.perf_counter()
    batched = decode_batch(model, tokenizer, rows, bf16=bf16)
    batch_rate = sum(len(result.token_ids) for result in batched) / (time.perf_counter() - started)
    return {"batch_size": batch_size, "single_tok_s": single_rate, "batch_tok_s": batch_rate,
            "speedup": batch_rate / single_rate, "max_tokens": max_tokens, "bf16": bf16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-generation"))
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=16, help="Requests per level = rounds x concurrency.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per concurrency; the median is reported.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--single-prompts", type=int, default=4, help="Prompts timed one at a time.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="Local decoding under bf16 autocast.")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for local decoding (0: torch's default). On a 2-core machine shared "
                        "with other jobs, 1 thread was 14x faster than 2 (measured), which spin-wait on each other.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"load_average": os.getloadavg()[0], "engine": []}

    if not args.skip_engine:
        server, url = start_echo_server(args.latency_ms)
        try:
            with tempfile.TemporaryDirectory() as folder:
                engine_rate(url, 4, 8, Path(folder) / "warm-up")  # imports and first connections, not timed
                for concurrency in args.concurrency:
                    # The median of a few runs: on a small shared machine one run can lose 10% to a neighbour.
                    rates = sorted(engine_rate(url, concurrency, args.rounds * concurrency, Path(folder) / str(i))
                                   for i in range(args.repeats))
                    rate = rates[len(rates) // 2]
                    ideal = concurrency / (args.latency_ms / 1000)
                    results["engine"].append({"concurrency": concurrency, "requests": args.rounds * concurrency,
                                              "rate": rate, "ideal": ideal, "efficiency": rate / ideal})
        finally:
            server.terminate()
            server.wait()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.skip_local:
        results["local"] = local_tokens_per_second(args.batch_size, args.single_prompts, args.max_tokens, args.bf16)

    lines = []
    if results["engine"]:
        lines += [f"| concurrency | requests | achieved req/s (median of {args.repeats}) | ideal req/s "
                  f"({args.latency_ms:g} ms latency) | achieved / ideal |", "|---|---|---|---|---|"]
    for row in results["engine"]:
        lines.append(f"| {row['concurrency']} | {row['requests']} | {row['rate']:.2f} | {row['ideal']:.1f} | "
                     f"{row['efficiency']:.1%} |")
    if "local" in results:
        local = results["local"]
        import torch

        lines += ["| bundled teacher, greedy, {max_tokens} new tokens{bf16}, {threads} torch threads | tokens/s |".format(
            max_tokens=local["max_tokens"], bf16=", bf16" if local["bf16"] else ", fp32",
            threads=torch.get_num_threads()), "|---|---|",
            f"| one prompt at a time | {local['single_tok_s']:.1f} |",
            f"| batch of {local['batch_size']} | {local['batch_tok_s']:.1f} |",
            f"| speed-up | {local['speedup']:.1f}x |"]
    lines.append(f"\nload average at the start: {results['load_average']:.1f}")
    table = "\n".join(lines).replace("|\n| bundled", "|\n\n| bundled")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
