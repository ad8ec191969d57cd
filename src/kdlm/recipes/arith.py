"""A synthetic multi-step arithmetic task and a rule-based teacher that solves it step by step.

The bundled teacher (SmolLM2-135M) cannot do arithmetic, so chain-of-thought recipes are tested and
measured against this stand-in for a strong teacher: a solver behind kdlm's own OpenAI-compatible
server (`kdlm.serve.ServerThread(ArithTeacher())`), reached through the same client as any API. It reads
the last word problem in the conversation, writes one line per operation and ends with `Answer: N`.
At `error_rate` it slips on one step on purpose (a wrong result that the next steps carry on), so that
the correctness filter has something to remove; whether a request slips is decided by its seed, so a
request always gets the same answer (as a cache requires).

Problems come from a fixed template family: someone has some items, then gains or loses some in
2-3 further steps, and the question asks how many are left. Results stay between 0 and 99.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections import Counter
from collections.abc import AsyncIterator

NAMES = ["Ann", "Ben", "Cy", "Dee", "Eli", "Fay", "Gus", "Ida", "Jo", "Kim", "Lu", "Max", "Ned", "Ola", "Pam"]
ITEMS = ["pens", "cups", "eggs", "figs", "hats", "keys", "maps", "nuts", "pins", "toys"]
# Each operation: (sign, sentence template). The sentence names only the amount, as word problems do.
GAIN = ["gets {n} more", "finds {n} more", "buys {n} more"]
LOSS = ["gives away {n}", "loses {n}", "sells {n}"]
START = re.compile(r"(\w+) has (\d+) (\w+)\.")
STEP = re.compile(r"(gets|finds|buys|gives away|loses|sells) (\d+)")
GAIN_VERBS = {"gets", "finds", "buys"}
NUMBERS = re.compile(r"-?\d+")


def make_problem(rng: random.Random, steps: tuple[int, int] = (2, 3), limit: int = 20) -> dict:
    """One problem: {"question", "answer" (int), "operations" [(sign, amount)], "start"}."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = start = rng.randint(2, limit)
    operations, sentences = [], []
    for _ in range(rng.randint(*steps)):
        if value > 0 and (rng.random() < 0.5 or value + 1 > 99):
            amount = rng.randint(1, min(value, limit))
            sign, template = -1, rng.choice(LOSS)
        else:
            amount = rng.randint(1, min(limit, 99 - value))
            sign, template = 1, rng.choice(GAIN)
        value += sign * amount
        operations.append((sign, amount))
        sentences.append(template.format(n=amount) + ".")
    text = f"{name} has {start} {item}. " + " ".join(f"{name} {s}" for s in sentences)
    question = f"{text} How many {item} now?"  # short: the benchmark's character-level student reads every byte
    return {"question": question, "answer": value, "operations": operations, "start": start}


def make_dataset(count: int, seed: int, **options) -> list[dict]:
    """`count` distinct problems (distinct question texts), reproducible from `seed`."""
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < count:
        problem = make_problem(rng, **options)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
    return problems


def worked_steps(start: int, operations: list[tuple[int, int]], slip_at: int | None = None,
                 slip: int = 0) -> tuple[list[str], int]:
    """The step lines ("7 + 5 = 12.") and the final value; `slip_at` adds `slip` to that step's result."""
    lines, value = [], start
    for index, (sign, amount) in enumerate(operations):
        result = value + sign * amount + (slip if index == slip_at else 0)
        lines.append(f"{value} {'+' if sign > 0 else '-'} {amount} = {result}.")
        value = result
    return lines, value


def parse_problem(text: str) -> tuple[int, list[tuple[int, int]]] | None:
    """(start, operations) of the last problem stated in `text`, or None when there is none."""
    starts = list(START.finditer(text))
    if not starts:
        return None
    last = starts[-1]
    rest = text[last.end() :].split("?")[0]
    operations = [(1 if verb in GAIN_VERBS else -1, int(amount)) for verb, amount in STEP.findall(rest)]
    return (int(last.group(2)), operations) if operations else None


class ArithTeacher:
    """A kdlm.serve backend that answers arithmetic word problems with a step-by-step rationale.

    What it writes depends on the last user message:
    - one that holds a problem: step lines, then `Answer: N`; a rationalization prompt (one that gives
      the correct answer) is explained without a slip;
    - one without a problem that follows a problem and a rationale (the second stage of Fine-tune-CoT,
      "what is the final answer?"): `Answer: N` with the last number of that rationale;
    - otherwise: "I cannot find a problem to solve." (no answer; parsers return None).
    """

    def __init__(self, error_rate: float = 0.0, name: str = "arith-teacher", latency_s: float = 0.0):
        self.name, self.error_rate, self.latency_s = name, error_rate, latency_s
        self.requests = 0
        self.seen: Counter = Counter()  # (conversation, seed) -> times asked: a resumed run asks each once

    def encode_chat(self, messages: list[dict]) -> list[dict]:
        return messages

    def encode_text(self, prompt: str) -> list[dict]:
        return [{"role": "user", "content": prompt}]

    def check_length(self, prompt_ids, params) -> str | None:
        return None

    def answer(self, messages: list[dict], seed: int | None) -> str:
        user = [message["content"] for message in messages if message["role"] == "user"]
        problem = parse_problem(user[-1]) if user else None
        if problem is None:
            earlier = [message["content"] for message in messages if message["role"] == "assistant"]
            if len(user) > 1 and earlier and parse_problem(user[-2]) and NUMBERS.findall(earlier[-1]):
                return f"Answer: {NUMBERS.findall(earlier[-1])[-1]}"  # stage 2: the answer its rationale reached
            return "I cannot find a problem to solve."
        start, operations = problem
        rng = random.Random(seed)
        # Told the correct answer (a rationalization prompt), it explains it without slipping.
        told = "correct answer is" in user[-1].lower()
        slip_at = rng.randrange(len(operations)) if rng.random() < self.error_rate and not told else None
        lines, value = worked_steps(start, operations, slip_at, rng.choice([-2, -1, 1, 2]))
        return " ".join(lines) + f"\nAnswer: {value}"

    async def stream(self, prompt_ids: list[dict], params) -> AsyncIterator[tuple]:
        self.requests += 1
        self.seen[(json.dumps(prompt_ids, sort_keys=True), params.seed)] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        for choice in range(params.n):
            seed = None if params.seed is None else params.seed + choice
            text = self.answer(prompt_ids, seed)
            yield choice, text, None, "stop"

    def stats(self) -> dict:
        return {"requests": self.requests, "batches": self.requests, "rows": self.requests}


def main() -> None:
    """`python -m kdlm.recipes.arith --port 8000`: serve the rule-based teacher over the OpenAI API."""
    import argparse

    from kdlm.serve import run_server

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--error-rate", type=float, default=0.0, help="Share of answers with one wrong step.")
    parser.add_argument("--name", default="arith-teacher", help="The model id clients send.")
    args = parser.parse_args()
    run_server(ArithTeacher(args.error_rate, name=args.name), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
