"""A deterministic OpenAI-compatible "teacher" for the recipe tests: well-formed answers, chosen by rule.

A tiny random model writes gibberish, so the recipes' happy paths need a teacher whose answers are
known in advance. This FastAPI app reads each chat request, recognises which recipe step wrote it, and
answers by rule (with a few planted defects: blocked words, duplicates, apologies, a position-biased
referee), so that the tests can predict the recipes' counts by hand. Every answer depends only on the
request, so a rerun gets the same answers. An answer longer than the request's max_tokens (a word counts
as a token) is cut there and finishes with "length".
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

WORDS = """apple river mountain engine violin harvest lantern compass garden thunder pepper marble orbit canyon
ribbon falcon meadow quartz saddle tunnel velvet walnut yogurt zephyr anchor bakery cactus dolphin ember fossil
glacier hammock igloo jasmine kettle lagoon magnet nectar oyster parcel quiver rocket spruce tulip umbrella
vortex willow xylem yarrow zenith acorn bison cobalt dune eclipse fjord geyser harbor island jungle kayak
lemur mosaic nebula oasis prairie quarry reef summit tundra utopia valley wharf badge cider denim easel
fiddle goblet hazel indigo jigsaw koala ledger mango noodle olive pebble quill raisin sonnet trumpet urchin
vessel waffle beacon cradle dagger feather glove helmet icicle jacket kernel ladder mitten needle paddle
rattle sandal tablet vacuum whistle bucket candle donkey eagle funnel ginger hollow insect jelly lizard""".split()


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.sample(WORDS, count))


def _rng(*parts) -> random.Random:
    return random.Random(int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16))


def self_instruct_generation(prompt: str) -> str:
    shown = re.findall(r"(?m)^\d+\. (.+)$", prompt)
    rng = _rng(prompt)
    fresh = [f"Explain how the {words(rng, 6)} relate to each other.",
             f"Describe a day that involves the {words(rng, 6)}.",
             f"Classify the word '{rng.choice(WORDS)}' as a noun or a verb given {words(rng, 4)}.",
             f"Summarize why the {words(rng, 6)} matter to farmers."]
    planted = [f"Draw a picture of the {words(rng, 4)}.",  # blocked word
               shown[0],                                    # an exact duplicate of an example
               " ".join(shown[1].split()[:-1]),             # a near duplicate (last word dropped)
               "Say hi.",                                   # too short
               f"- List {words(rng, 5)} in order."]         # starts with punctuation
    items = fresh[:2] + planted + fresh[2:]
    return "Sure! Here are more tasks:\n" + "\n".join(f"{9 + i}. {text}" for i, text in enumerate(items))


def instance_answer(prompt: str) -> str:
    rng = _rng(prompt)
    if prompt.startswith("The task is a classification task"):
        first = words(rng, 5)
        return (f"Class label: noun\nInput: {first}\nClass label: verb\nInput: {words(rng, 5)}\n"
                f"Class label: noun\nInput: {first}")  # the last one duplicates the first
    return (f"Example 1\nInput: {words(rng, 4)}\nOutput: {words(rng, 6)}\n"
            "Example 2\nInput: same words\nOutput: same words\n"  # input == output
            "Example 3\nInput: something\nOutput:\n"  # empty output
            f"Example 4\nInput:\nOutput: {words(rng, 5)}")


def evolve(prompt: str) -> str:
    original = prompt.split("#The Prompt#:\n", 1)[1].rsplit("\n\n#", 1)[0]
    if "[copy]" in original:
        return original
    if "[marker]" in original:
        return f"#Rewritten Prompt#: {original} now"
    return f"{original} (step {original.count('(step') + 1})"


def equality(prompt: str) -> str:
    first = prompt.split("First instruction:\n", 1)[1].split("\n\nSecond instruction:\n", 1)[0]
    second = prompt.split("\n\nSecond instruction:\n", 1)[1]
    return "Equal" if first == second else "Not Equal"


def plain_answer(model: str, question: str, seed: int) -> str:
    rng = _rng(model, question)
    evolved = "(step" in question
    if evolved and "[sorry]" in question:
        return "Sorry, I cannot help with that."
    if evolved and "[stop]" in question:
        return "It is what it is, and so on."
    if model == "student":
        return "I don't know." if "[hard]" in question else f"Good answer: {words(rng, 8)}."
    return f"Teacher answer: {words(rng, 8)}."


def quality(answer: str) -> int:
    return 4 if answer.startswith("I don't know") else 9


def referee(prompt: str) -> str:
    question = prompt.split("A user asked:\n", 1)[1].split("\n\n### Answer 1\n", 1)[0]
    if "[junk]" in question:
        return "Both answers are fine, I like them."
    first = prompt.split("### Answer 1\n", 1)[1].split("\n\n### Answer 2\n", 1)[0]
    second = prompt.split("### Answer 2\n", 1)[1].split("\n\nRate each answer", 1)[0]
    # A position-biased referee: the answer shown first gets one point more.
    return f"Both answers were read carefully.\n{min(10, quality(first) + 1)} {quality(second)}"


def create(prompt: str, seed: int) -> str:
    given = prompt.split("Instruction:\n", 1)[1].split("\n\nNew instruction:", 1)[0]
    if "same type of task" in prompt:  # from a hard seed: a new hard one, different for every request
        return f"New instruction: Tell me about the {words(_rng(given, seed), 6)} [hard]"
    return f"Tell me a rare fact about the {words(_rng(given), 6)}"  # from an easy seed: same for every request


def respond(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    if "Continue the list with 8 new ones" in prompt:
        return self_instruct_generation(prompt)
    if prompt.rstrip().endswith("Classification task:"):
        task = prompt.rstrip().rsplit("Task: ", 1)[1]
        return "Yes" if task.startswith("Classify") else "No"
    if prompt.startswith(("The task is a classification task", "Write examples of the task")):
        return instance_answer(prompt)
    if "#The Prompt#:" in prompt:
        return evolve(prompt)
    if prompt.startswith("Are these two instructions equal"):
        return equality(prompt)
    if prompt.startswith("A user asked:"):
        return referee(prompt)
    if prompt.startswith("Take inspiration from the instruction below"):
        return create(prompt, body.get("seed", 0))
    return plain_answer(body["model"], prompt, body.get("seed", 0))


def scripted_app(latency_s: float = 0.0) -> FastAPI:
    app = FastAPI()
    app.state.received = 0
    app.state.answered = 0
    app.state.prompts = []

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "teacher", "object": "model"}, {"id": "student", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        app.state.received += 1
        app.state.prompts.append(body["messages"][-1]["content"])
        if latency_s:
            await asyncio.sleep(latency_s)
        prompt = body["messages"][-1]["content"]
        if "[refuse]" in prompt:  # a request the server will never accept (a prompt too long, say)
            return JSONResponse({"error": {"message": "prompt too long", "type": "invalid_request_error"}}, 400)
        if "[down]" in prompt:  # a server error that outlasts the retries
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, 503)
        text, finish = respond(body), "stop"
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        ends = [match.end() for match in re.finditer(r"\S+", text)]
        if limit and len(ends) > limit:  # a word counts as one token: cut at the limit, as a server would
            text, finish = text[: ends[limit - 1]], "length"
        app.state.answered += 1
        return {"id": "scripted", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(str(body["messages"]).split()), "completion_tokens": len(text.split())}}

    return app


class AppThread:
    """An ASGI app served by uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        from kdlm.serve import free_port

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     access_log=False, timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> AppThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the scripted teacher did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
