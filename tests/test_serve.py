"""`kdlm serve`: the real `openai` client against the real server on loopback, with a tiny model."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest
import torch

from kdlm.models.decode import Row, decode_batch
from kdlm.serve import EchoBackend, ModelBackend, ServerThread
from tiny import tiny_llama, tiny_tokenizer, trained_tiny_teacher

KEY = "test-key"


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    # A long batching window so that the concurrent requests of the batching test surely meet.
    with ServerThread(ModelBackend("tiny", model, tokenizer, wait_ms=50), api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def stats(server) -> dict:
    return httpx.get(server.url + "/kdlm/stats", headers={"Authorization": f"Bearer {KEY}"}).json()


def chat(client, content="what is the capital of france?", **options):
    options = {"max_tokens": 8, **options}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **options)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == ["tiny"]


def test_chat_logprobs_are_the_models_raw_log_softmax(client, tiny):
    model, tokenizer = tiny
    response = chat(client, temperature=0, logprobs=True, top_logprobs=3, max_tokens=4)
    choice = response.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == response.usage.completion_tokens == 4
    assert choice.finish_reason == "length"
    assert "".join(entry.token for entry in entries) == choice.message.content

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is the capital of france?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert response.usage.prompt_tokens == len(ids)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    first = entries[0]
    top = reference.topk(3)
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-4)  # greedy: the top token
    assert [alt.logprob for alt in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [alt.token for alt in first.top_logprobs] == [tokenizer.decode([int(i)]) for i in top.indices]
    assert math.fsum(math.exp(v) for v in reference.tolist()) == pytest.approx(1, abs=1e-4)


def test_logprobs_at_another_temperature_and_top_p_are_still_the_raw_log_softmax():
    # The server's promise (kdlm.models.decode): logprobs are the model's log-softmax at temperature 1 over the
    # whole vocabulary, before top-p, whatever the sampling settings. The trained tiny teacher writes ASCII (one
    # token a character), so its answer's token ids are known from its text.
    model, tokenizer = trained_tiny_teacher()
    prompt = "what is the capital of france?"
    with ServerThread(ModelBackend("teacher", model, tokenizer)) as running:
        client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0)
        response = client.chat.completions.create(
            model="teacher", messages=[{"role": "user", "content": prompt}], temperature=0.5, top_p=0.6, seed=5,
            max_tokens=12, logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    answer = "".join(entry.token for entry in entries)
    prompt_ids = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert answer.isascii() and len(answer_ids) == len(entries) == 12
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1 : -1].double()
    raw, tempered = torch.log_softmax(logits, -1), torch.log_softmax(logits / 0.5, -1)
    for entry, token, row, hot in zip(entries, answer_ids, raw, tempered, strict=True):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        top = row.topk(3)
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        # Sampled inside the nucleus of the tempered distribution: the likelier tokens hold less than top_p.
        assert float(hot.exp()[hot > hot[token]].sum()) < 0.6
    assert float((raw - tempered).abs().max()) > 0.1  # the two distributions differ: the check above can fail


def test_seed_reproduces_and_n_gives_distinct_samples(client):
    first = chat(client, temperature=1.0, seed=7, n=3, max_tokens=12)
    again = chat(client, temperature=1.0, seed=7, n=3, max_tokens=12)
    texts = [choice.message.content for choice in first.choices]
    assert texts == [choice.message.content for choice in again.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert len(set(texts)) == 3  # a random 259-token model: three equal 12-token samples would be a bug
    assert first.usage.completion_tokens == 36


def test_completions_with_logprobs_and_stop(client):
    response = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=6, logprobs=2,
                                         temperature=1.0, seed=3)
    choice = response.choices[0]
    assert choice.logprobs.tokens and len(choice.logprobs.tokens) == response.usage.completion_tokens
    # {token: logprob}: two ids that decode to the same text (e.g. partial UTF-8 bytes) share one key.
    assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert any(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0
    # Stop on the second character the same seed produced: the text ends before it.
    stop = choice.text[1]
    stopped = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=6, temperature=1.0,
                                        seed=3, stop=[stop], logprobs=0)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == choice.text[: choice.text.index(stop)]
    # Tokens (and their logprobs) stop where the text stops, not at the end of the budget.
    kept = stopped.choices[0].logprobs.tokens
    assert kept == choice.logprobs.tokens[: len(kept)] and len(kept) < len(choice.logprobs.tokens)
    assert stopped.usage.completion_tokens == len(kept)


def test_streaming_gives_the_same_text_as_a_plain_request(client):
    plain = chat(client, temperature=0.8, seed=11, max_tokens=10)
    chunks = list(chat(client, temperature=0.8, seed=11, max_tokens=10, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_rows_with_one_prompt_share_a_prefill_and_decode_as_if_alone(tiny):
    model, tokenizer = tiny

    def ids(content: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def rows() -> list[Row]:  # three samples of one prompt, one of another (a longer one: left padding)
        return [Row(ids("what is the capital of france?"), 10, temperature=1.0, seed=seed) for seed in (1, 2, 3)] + [
            Row(ids("plants make food from light, water and air."), 10, temperature=0)]

    batches = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: batches.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    try:
        together = decode_batch(model, tokenizer, rows())
    finally:
        hook.remove()
    assert batches[0][0] == 2 and all(shape[0] == 4 for shape in batches[1:])  # the prefill ran each prompt once
    alone = [decode_batch(model, tokenizer, [row])[0] for row in rows()]
    assert [result.token_ids for result in together] == [result.token_ids for result in alone]
    assert len({tuple(result.token_ids) for result in together[:3]}) == 3  # the seeds still tell samples apart
    for mine, reference in zip(together, alone, strict=True):
        assert [entry["logprob"] for entry in mine.logprobs] == pytest.approx(
            [entry["logprob"] for entry in reference.logprobs], abs=1e-4)


def test_concurrent_requests_share_forward_batches(server):
    before = stats(server)
    client = openai.AsyncOpenAI(base_url=server.url, api_key=KEY, max_retries=0)

    async def burst():
        return await asyncio.gather(*(
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"prompt {i}"}],
                                           max_tokens=4, temperature=0)
            for i in range(8)
        ))

    responses = asyncio.run(burst())
    after = stats(server)
    assert all(response.choices[0].message.content is not None for response in responses)
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # batched: fewer decodes than requests
    assert after["rows"] - before["rows"] == 8


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "x" * 600}]}, 400, "context"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-99"}, 404, "not served"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_clear_message(server, body, status, words):
    body = {"model": "tiny", **body}
    response = httpx.post(server.url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


def test_malformed_json_and_bad_key(server):
    response = httpx.post(server.url + "/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert refused.value.status_code == 401
    assert stats(server)["requests"] >= 0  # the server is still up after all of the above


def test_echo_backend_streams_words_after_its_latency():
    with ServerThread(EchoBackend(latency_ms=100)) as running:
        client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0)
        response = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b c d"}],
                                                  max_tokens=3)
        assert response.choices[0].message.content == "a b c"
        assert response.choices[0].finish_reason == "length"
        log = json.dumps(response.model_dump())
        assert "echo" in log
