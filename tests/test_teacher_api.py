"""Teacher log-probs from an OpenAI-compatible server: `kdlm serve`'s prompt scoring, and a top-k cache
filled through it that equals the cache written from the local model (real server on loopback)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from kdlm.data import encode_records, load_records
from kdlm.errors import KdlmError
from kdlm.serve import ModelBackend, ServerThread
from kdlm.serve.server import free_port
from kdlm.teachers.api import ApiTeacher
from kdlm.teachers.cache import cache_identity, check_cache, read_targets, write_cache
from tiny import trained_tiny_teacher, write_chat_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher, tokenizer = trained_tiny_teacher(num_layers=2, steps=10)
    records = load_records(str(write_chat_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", count=10)))
    examples = encode_records(tokenizer, records, max_length=160)
    with ServerThread(ModelBackend("tiny-teacher", teacher, tokenizer, max_batch=8)) as server:
        yield teacher, tokenizer, examples, server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)


def test_echo_scoring_returns_the_models_raw_prompt_logprobs(setup):
    teacher, tokenizer, examples, server = setup
    prompts = [examples[0]["input_ids"], examples[3]["input_ids"][:7]]  # two lengths: the batch is padded
    response = client(server).completions.create(
        model="tiny-teacher", prompt=prompts, echo=True, max_tokens=0, logprobs=4, extra_body={"return_tokens_as_token_ids": True}
    )
    assert response.usage.prompt_tokens == sum(map(len, prompts)) and response.usage.completion_tokens == 0
    for ids, choice in zip(prompts, sorted(response.choices, key=lambda c: c.index), strict=True):
        with torch.no_grad():  # one unpadded forward per prompt, in fp32
            reference = torch.log_softmax(teacher(torch.tensor([ids])).logits[0].float(), -1)
        logprobs = choice.logprobs
        assert logprobs.tokens == [f"token_id:{i}" for i in ids]
        assert choice.text == tokenizer.decode(ids)
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        own = reference[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:]), own, atol=1e-5, rtol=0)
        for j in range(1, len(ids)):
            top = reference[j - 1].topk(4)
            served = logprobs.top_logprobs[j]
            assert list(served) == [f"token_id:{int(i)}" for i in top.indices]
            torch.testing.assert_close(torch.tensor(list(served.values())), top.values, atol=1e-5, rtol=0)
    # a text prompt is tokenised by the server as tokenizer(text) does, and tokens come back as strings
    text = "the quick brown fox"
    response = client(server).completions.create(model="tiny-teacher", prompt=text, echo=True, max_tokens=0, logprobs=1)
    assert "".join(response.choices[0].logprobs.tokens) == text
    assert len(response.choices[0].logprobs.tokens) == len(tokenizer(text)["input_ids"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": [5, 6, 7], "echo": True, "max_tokens": 3}, "set max_tokens=0"),
        ({"prompt": [5, 6, 7], "echo": True, "max_tokens": 0, "stream": True}, "set max_tokens=0"),
        ({"prompt": "hi", "max_tokens": 0}, "meant for echo=true"),
        ({"prompt": [5, 6, 7], "max_tokens": 4}, "token-id prompts are supported with echo=true"),
        ({"prompt": [5, 100000], "echo": True, "max_tokens": 0}, "token ids must lie in"),
        ({"prompt": [[5, 6], []], "echo": True, "max_tokens": 0}, "non-empty"),
        ({"prompt": [5, 6], "echo": True, "max_tokens": 0, "logprobs": 21}, "logprobs"),
    ],
)
def test_bad_scoring_requests_get_a_clear_400(setup, body, message):
    server = setup[3]
    response = httpx.post(server.url + "/completions", json={"model": "tiny-teacher", **body})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_models_lists_vocabulary_and_tokenizer_fingerprint(setup):
    teacher, tokenizer, _, server = setup
    entry = client(server).models.list().data[0].to_dict()
    from kdlm.teachers.cache import tokenizer_fingerprint

    assert entry["vocab_size"] == teacher.config.vocab_size
    assert entry["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)


def test_cache_through_the_api_equals_the_local_cache(setup, tmp_path):
    teacher, tokenizer, examples, server = setup
    identity = cache_identity(kind="topk", teacher="tiny", tokenizer=tokenizer, vocab_size=teacher.config.vocab_size,
                              examples=examples, top_k=8, bf16=False, examples_per_shard=4)
    local = write_cache(teacher, examples, tmp_path / "local", identity=identity, pad_token_id=tokenizer.pad_token_id,
                        batch_size=3, show_progress=False)
    api_teacher = ApiTeacher(server.url, "tiny-teacher", tokenizer)
    assert api_teacher.check_tokenizer() == teacher.config.vocab_size
    served = write_cache(api_teacher, examples, tmp_path / "api", identity=identity, pad_token_id=tokenizer.pad_token_id,
                         batch_size=3, show_progress=False)
    assert served["source"] == server.url and local["source"] == "model"
    assert served["num_tokens"] == local["num_tokens"] > 200
    check_cache(tmp_path / "api", identity)  # training accepts it like a local cache
    compared = 0
    for (local_ids, local_values), (api_ids, api_values) in zip(read_targets(tmp_path / "local"), read_targets(tmp_path / "api"),
                                                                strict=True):
        # the same ids wherever the top-8 has no near-tie (batches differ, so logits differ by ~1e-6)
        top = local_values[:, : local_ids.shape[1]]  # the k values; the last column is the tail's log-mass
        clear = (top[:, :-1] - top[:, 1:]).min(-1).values > 1e-4
        assert torch.equal(local_ids[clear], api_ids[clear])
        compared += int(clear.sum())
        # values (sorted on both sides, so ties do not matter) within fp16 rounding (an ulp is 2^-10 relative),
        # the missing mass within fp32 noise
        assert torch.all((local_values - api_values).abs() <= local_values.abs() * 2**-10 + 1e-5)
        torch.testing.assert_close(api_values.exp().sum(-1), local_values.exp().sum(-1), atol=1e-5, rtol=0)
    assert compared > 0.8 * local["num_tokens"]  # the rest have exact ties (tokens the teacher never saw)


def test_a_different_tokenizer_is_refused(setup):
    _, tokenizer, examples, server = setup
    other = trained_tiny_teacher(num_layers=1, steps=0)[1]
    other.add_tokens(["café"])  # tokenises "café" as one token: the probe text contains it
    with pytest.raises(KdlmError, match="tokenizer of 'tiny-teacher' .* differs from the local one"):
        ApiTeacher(server.url, "tiny-teacher", other).check_tokenizer()
    # servers that list no fingerprint are checked by tokenising a probe on both sides
    ApiTeacher(server.url, "tiny-teacher", tokenizer).probe_tokenizer()
    with pytest.raises(KdlmError, match="a probe text becomes .* tokens there and .* here"):
        ApiTeacher(server.url, "tiny-teacher", other).probe_tokenizer()
    with pytest.raises(KdlmError, match="'other-model' is not served"):
        ApiTeacher(server.url, "other-model", tokenizer).check_tokenizer()


def test_top_k_beyond_the_servers_limit_is_a_clear_error(setup):
    _, tokenizer, examples, server = setup
    with pytest.raises(KdlmError, match="refused a prompt-scoring request .* HTTP 400"):
        ApiTeacher(server.url, "tiny-teacher", tokenizer).score_topk(examples[:1], 32)


def test_cache_teacher_from_the_api_without_the_teachers_weights(setup, tmp_path):
    """`kdlm cache-teacher` with teacher.api_base: teacher.model gives the tokenizer and the served name only."""
    from kdlm.config import load_config
    from kdlm.pipeline import prepare_data, run_cache_teacher, teacher_cache_identity

    teacher, tokenizer, _, server = setup
    folder = tmp_path / "teacher"
    tokenizer.save_pretrained(folder)  # a tokenizer folder: no weights anywhere
    data = write_chat_jsonl(tmp_path / "chat.jsonl", count=10)
    args = [f"teacher.model={folder}", f"data.train={data}", "data.heldout=2", "data.teacher_answers=false",
            "data.max_length=160", "teacher.top_k=5", f"teacher.cache={tmp_path / 'cache'}",
            f"train.output_dir={tmp_path / 'run'}"]
    with pytest.raises(KdlmError, match="is not served at"):  # that server serves `tiny-teacher`
        run_cache_teacher(load_config(None, [*args, f"teacher.api_base={server.url}"]))
    with ServerThread(ModelBackend(str(folder), teacher, tokenizer)) as named:
        config = load_config(None, [*args, f"teacher.api_base={named.url}"])
        manifest = run_cache_teacher(config)
    assert manifest["complete"] and manifest["source"] == named.url and manifest["top_k"] == 5
    assert manifest["num_examples"] == 8  # the held-out records were split off, as training does
    examples, _ = prepare_data(config, None, tokenizer)
    check_cache(tmp_path / "cache", teacher_cache_identity(config, tokenizer, manifest["vocab_size"], examples))


# ---- a server that scores prompts the way vLLM does, in front of kdlm serve ----

def vllm_like(upstream: str) -> FastAPI:
    """A small real HTTP app that answers where vLLM differs from kdlm serve (vllm-project/vllm#9336, #6508):
    max_tokens=0 refused (the client then asks for 1 token and ignores it), the prompt's own token added to
    each position's top_logprobs, and no tokenizer fingerprint in /v1/models (the client then probes)."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        listing = httpx.get(upstream + "/models").json()
        listing["data"] = [{key: entry[key] for key in ("id", "object", "created", "owned_by")} for entry in listing["data"]]
        return listing

    @app.post("/v1/completions")
    def completions(body: dict):
        if body.get("max_tokens") == 0:
            error = {"message": "max_tokens must be at least 1, got 0.", "type": "BadRequestError", "param": None, "code": 400}
            return JSONResponse({"error": error, "object": "error"}, 400)
        answer = httpx.post(upstream + "/completions", json={**body, "max_tokens": 0}).json()
        for choice in answer["choices"]:
            logprobs = choice["logprobs"]
            for j in range(1, len(logprobs["tokens"])):
                logprobs["top_logprobs"][j].setdefault(logprobs["tokens"][j], logprobs["token_logprobs"][j])
            logprobs["tokens"].append("token_id:0")  # the one generated token
            logprobs["token_logprobs"].append(-1.0)
            logprobs["top_logprobs"].append({"token_id:0": -1.0})
            logprobs["text_offset"].append(len(choice["text"]))
        answer["usage"]["completion_tokens"] = len(answer["choices"])
        return answer

    return app


@contextmanager
def serving(app: FastAPI):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_vllm_like_server_fills_the_same_cache(setup, tmp_path):
    teacher, tokenizer, examples, server = setup
    identity = cache_identity(kind="topk", teacher="tiny", tokenizer=tokenizer, vocab_size=teacher.config.vocab_size,
                              examples=examples, top_k=6, bf16=False, examples_per_shard=4)
    direct = ApiTeacher(server.url, "tiny-teacher", tokenizer)
    write_cache(direct, examples, tmp_path / "direct", identity=identity, pad_token_id=0, batch_size=3, show_progress=False)
    with serving(vllm_like(server.url)) as url:
        proxied = ApiTeacher(url, "tiny-teacher", tokenizer)
        assert proxied.check_tokenizer() == len(tokenizer)  # probed: no fingerprint listed
        assert proxied.max_tokens == 1  # it fell back after the refusal of max_tokens=0
        write_cache(proxied, examples, tmp_path / "proxied", identity=identity, pad_token_id=0, batch_size=3, show_progress=False)
        other = trained_tiny_teacher(num_layers=1, steps=0)[1]
        other.add_tokens(["café"])
        with pytest.raises(KdlmError, match="a probe text becomes"):
            ApiTeacher(url, "tiny-teacher", other).check_tokenizer()
    for a, b in zip(read_targets(tmp_path / "direct"), read_targets(tmp_path / "proxied"), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
