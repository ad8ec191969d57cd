"""`kdlm serve` under hostile or unlucky clients: huge bodies, prompts past the context, a full queue, clients
that leave mid-answer, foreign Host headers, a keyless public bind, docs behind the key. Real servers on
loopback (a subprocess where its memory is measured), real clients."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import until
from kdlm.models.decode import Row, decode_batch
from kdlm.serve import EchoBackend, ModelBackend, ServerThread
from kdlm.serve.guard import default_allowed_hosts
from kdlm.serve.server import free_port
from tiny import tiny_llama, tiny_tokenizer

KDLM = [sys.executable, "-m", "kdlm.cli"]
MB = 2**20



def stats(url: str) -> dict:
    return httpx.get(url + "/kdlm/stats").json()


def serve_process(*args: str) -> tuple[subprocess.Popen, str]:
    """`kdlm serve ARGS` as a subprocess on a free port; returns it once /v1/models answers."""
    port = free_port()
    source = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([*KDLM, "serve", *args, "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        assert proc.poll() is None, proc.communicate()
        try:
            return httpx.get(url + "/models").status_code == 200
        except httpx.TransportError:
            return False

    until(up, "the server answers")
    return proc, url


class PeakMemory:
    """The peak resident memory of a process: the kernel's high-water mark, reset at the start where the
    kernel allows it (/proc/PID/clear_refs), and a 2 ms sampler of VmRSS besides."""

    def __init__(self, pid: int):
        self.pid, self.samples, self.running = pid, [], True
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start = self.field("VmRSS")
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def field(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(name)

    def _sample(self) -> None:
        while self.running:
            self.samples.append(self.field("VmRSS"))
            time.sleep(0.002)

    def growth(self) -> int:
        self.running = False
        self.thread.join()
        peak = max(self.samples + [self.field("VmRSS")] + ([self.field("VmHWM")] if self.hwm_reset else []))
        return peak - self.start


def post_raw(port: int, size: int, chunked: bool, pause_at: int | None = None, while_paused=None) -> bytes:
    """POST `size` bytes to /v1/chat/completions over a raw socket, reading the answer as soon as one comes
    (a client that stops sending then, as curl does); `while_paused()` runs once `pause_at` bytes are sent."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            + ("transfer-encoding: chunked\r\n\r\n" if chunked else f"content-length: {size}\r\n\r\n"))
    piece = b"x" * 65536
    frame = (b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece
    answer, sent = b"", 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode())
        while True:
            if pause_at is not None and sent >= pause_at and while_paused is not None:
                while_paused()
                while_paused = None
            readable, writable, _ = select.select([sock], [sock] if sent < size else [], [], 60)
            assert readable or writable, "the server neither answered nor read"
            if readable:
                data = sock.recv(65536)
                answer += data
                if not data or (b"\r\n\r\n" in answer and answer.endswith(b"}")):
                    return answer
            elif writable:
                try:
                    sock.sendall(frame)
                except (BrokenPipeError, ConnectionResetError):
                    sent = size  # refused and closed: read what it answered
                    continue
                sent += len(piece)


def test_a_50_mb_body_is_refused_unread_and_the_server_stays_small_and_responsive():
    proc, url = serve_process("echo")
    port = int(url.split(":")[-1].split("/")[0])
    try:
        memory = PeakMemory(proc.pid)
        started = time.monotonic()
        declared = post_raw(port, 50 * MB, chunked=False)
        answered_in = time.monotonic() - started
        models_meanwhile = []
        streamed = post_raw(port, 50 * MB, chunked=True, pause_at=1 * MB,
                            while_paused=lambda: models_meanwhile.append(httpx.get(url + "/models").status_code))
        growth = memory.growth()
        assert httpx.get(url + "/models").status_code == 200
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    for answer in (declared, streamed):
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_too_large" and "4194304 bytes" in body["error"]["message"]
    assert models_meanwhile == [200]  # answered while a big body was half sent
    assert growth < 100 * MB, f"the server grew by {growth / MB:.0f} MB"
    print(f"50 MB body: 413 after {answered_in * 1000:.0f} ms, server memory growth {growth / MB:.1f} MB")
    assert "warning" not in stderr  # loopback without a key: nothing to warn about


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    with ServerThread(ModelBackend("tiny", model, tokenizer, wait_ms=5)) as running:
        yield running


def test_a_prompt_past_the_context_is_refused_before_it_is_tokenised(server, tiny):
    _, tokenizer = tiny
    longest = max(len(token) for token in tokenizer.get_vocab())  # 13: "<|endoftext|>"
    chat = {"model": "tiny", "max_tokens": 12}
    # 3.9 MB: under the body cap, 800 times what 500 tokens of at most 13 characters can hold.
    huge = httpx.post(server.url + "/chat/completions", timeout=60,
                      json={**chat, "messages": [{"role": "user", "content": "a" * 3_900_000}]})
    assert huge.status_code == 400
    assert f"at most {(512 - 12) * longest} characters" in huge.json()["error"]["message"]
    # Under that bound but over the context in tokens ("é" is two byte tokens): tokenised, then refused.
    tokens = httpx.post(server.url + "/chat/completions", json={**chat, "messages": [{"role": "user", "content": "é" * 3000}]})
    assert tokens.status_code == 400
    assert f"({len(_chat_ids(tokenizer, 'é' * 3000))} tokens) plus max_tokens (12)" in tokens.json()["error"]["message"]
    completion = httpx.post(server.url + "/completions", timeout=60,
                            json={"model": "tiny", "prompt": ["fine", "b" * 3_000_000], "max_tokens": 4})
    assert completion.status_code == 400 and "characters" in completion.json()["error"]["message"]
    assert httpx.post(server.url + "/chat/completions", json={**chat, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after_and_frees_when_clients_leave():
    backend = EchoBackend(latency_ms=600_000)  # answers only when the test lets its clients go
    with ServerThread(backend, max_queue=4) as running:
        body = {"model": "echo", "messages": [{"role": "user", "content": "a b c"}], "n": 2}

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=600) as client:
                waiting = [asyncio.create_task(client.post(running.url + "/chat/completions", json=body))
                           for _ in range(2)]
                while (await client.get(running.url + "/kdlm/stats")).json()["in_flight_rows"] < 4:
                    await asyncio.sleep(0.01)
                full = await client.post(running.url + "/chat/completions", json={**body, "n": 1})
                too_big = await client.post(running.url + "/chat/completions", json={**body, "n": 5})
                for task in waiting:
                    task.cancel()  # the clients leave: their connections close
                await asyncio.gather(*waiting, return_exceptions=True)
                return full, too_big

        full, too_big = asyncio.run(scenario())
        assert full.status_code == 429 and full.json()["error"]["code"] == "server_busy"
        assert int(full.headers["retry-after"]) >= 1
        assert too_big.status_code == 400 and "at most 4" in too_big.json()["error"]["message"]
        until(lambda: stats(running.url)["in_flight_rows"] == 0, "the abandoned requests release the queue")
        counts = stats(running.url)
        assert counts["client_gone"] == 2 and counts["busy"] == 1
        backend.latency_s = 0
        assert httpx.post(running.url + "/chat/completions", json=body).status_code == 200


def _chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_clients_that_leave_take_their_rows_out_of_the_decoder(server, tiny):
    model, tokenizer = tiny
    prompt = "the quick brown fox"
    longest = 512 - len(_chat_ids(tokenizer, prompt))
    # Greedy decoding of this prompt never meets EOS: only a cancellation can end its batch before `longest` steps.
    assert decode_batch(model, tokenizer, [Row(_chat_ids(tokenizer, prompt), longest, 0.0)])[0].finish_reason == "length"
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0}

    def short_request_steps() -> int:
        before = stats(server.url)["steps"]
        assert httpx.post(server.url + "/chat/completions", json={**body, "max_tokens": 4}).status_code == 200
        return stats(server.url)["steps"] - before

    baseline = short_request_steps()
    before = stats(server.url)

    async def leave() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            long = asyncio.create_task(client.post(server.url + "/chat/completions", json={**body, "n": 16, "max_tokens": longest}))
            while (await client.get(server.url + "/kdlm/stats")).json()["active_rows"] < 16:
                await asyncio.sleep(0.005)
            queued = asyncio.create_task(client.post(server.url + "/chat/completions", json={**body, "n": 4, "max_tokens": longest}))
            while (await client.get(server.url + "/kdlm/stats")).json()["queued_rows"] < 4:
                await asyncio.sleep(0.005)
            for task in (queued, long):  # as a client timeout does: the connections close
                task.cancel()
            await asyncio.gather(queued, long, return_exceptions=True)

    asyncio.run(leave())
    after = until(lambda: (now := stats(server.url))["active_rows"] == 0 and now["in_flight_rows"] == 0 and now,
                  "the abandoned rows leave the decoder")
    assert after["client_gone"] - before["client_gone"] == 2
    assert after["cancelled_rows"] - before["cancelled_rows"] == 20
    assert after["rows"] - before["rows"] == 16  # the queued request never entered a batch
    assert after["steps"] - before["steps"] < longest  # its batch was cut short
    assert short_request_steps() == baseline  # and the next request waits for nothing


def test_a_closed_stream_cancels_its_rows(server, tiny):
    _, tokenizer = tiny
    prompt = "the quick brown fox"
    longest = 512 - len(_chat_ids(tokenizer, prompt))
    before = stats(server.url)
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], n=4,
                                            max_tokens=longest, temperature=0, stream=True)
    next(iter(stream))
    until(lambda: stats(server.url)["active_rows"] == 4, "the stream decodes")
    stream.close()
    after = until(lambda: (now := stats(server.url))["active_rows"] == 0 and now["in_flight_requests"] == 0 and now,
                  "the stream's rows leave the decoder")
    assert after["cancelled_rows"] - before["cancelled_rows"] == 4
    assert after["client_gone"] - before["client_gone"] == 1
    assert after["steps"] - before["steps"] < longest


def test_with_an_api_key_docs_and_schema_need_it():
    with ServerThread(EchoBackend(), api_key="k") as keyed, ServerThread(EchoBackend()) as open_server:
        root = keyed.url.removesuffix("/v1")
        assert httpx.get(root + "/docs").status_code == 404
        assert httpx.get(root + "/redoc").status_code == 404
        assert httpx.get(root + "/openapi.json").status_code == 401
        schema = httpx.get(root + "/openapi.json", headers={"Authorization": "Bearer k"})
        assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
        assert httpx.get(keyed.url + "/models").status_code == 401
        open_root = open_server.url.removesuffix("/v1")
        assert httpx.get(open_root + "/docs").status_code == 200  # without a key, the docs stay open
        assert httpx.get(open_root + "/openapi.json").status_code == 200


def test_a_foreign_host_header_is_refused():
    with ServerThread(EchoBackend()) as default, ServerThread(EchoBackend(), allowed_hosts=["teacher.lan"]) as named, \
            ServerThread(EchoBackend(), allowed_hosts=default_allowed_hosts("0.0.0.0")) as wildcard:
        def status(server, host: str) -> int:
            return httpx.get(server.url + "/models", headers={"Host": host}).status_code

        assert [status(default, f"{name}:{default.port}") for name in ("127.0.0.1", "localhost", "[::1]")] == [200] * 3
        refused = httpx.get(default.url + "/models", headers={"Host": f"rebound.attacker.example:{default.port}"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "host_not_allowed"
        assert "--allowed-hosts rebound.attacker.example" in refused.json()["error"]["message"]
        assert (status(named, "teacher.lan:8000"), status(named, "localhost")) == (200, 400)
        # Bound to every address: any IP address is fine (rebinding needs a name), other names are not.
        assert (status(wildcard, "10.1.2.3:8000"), status(wildcard, "evil.example")) == (200, 400)


def test_a_keyless_server_on_a_public_address_warns():
    proc, _ = serve_process("echo", "--host", "0.0.0.0")
    proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    assert "warning: serving on 0.0.0.0 without an API key" in stderr


def test_faults_are_drawn_for_valid_requests_only():
    """An invalid body gets its 400 before any fault is drawn; a wrong key its 401; neither counts as received."""
    from kdlm.serve import Faults

    with ServerThread(EchoBackend(), api_key="k", faults=Faults(rate_429=1.0)) as server:
        keyed = {"Authorization": "Bearer k"}
        invalid = httpx.post(server.url + "/chat/completions", json={"model": "echo", "messages": []}, headers=keyed)
        assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "messages"
        refused = httpx.post(server.url + "/chat/completions", json={"model": "echo", "messages": []})
        assert refused.status_code == 401
        valid = httpx.post(server.url + "/completions", json={"model": "echo", "prompt": "a b"}, headers=keyed)
        assert valid.status_code == 429 and valid.headers["retry-after"] == "1"
        counts = server.app.state.serve.counts
        assert (counts["received"], counts["429"], counts["rejected"]) == (1, 1, 1)
        assert server.app.state.counts is counts  # the old name, the same counters
