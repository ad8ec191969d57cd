"""`kdlm generate`: the engine against the real server on loopback, with faults, kills and user errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import until
from kdlm.data import load_records
from kdlm.errors import KdlmError
from kdlm.generate import GenerateConfig, RateLimiter, generate
from kdlm.models import load_model
from kdlm.serve import EchoBackend, Faults, ModelBackend, ServerThread
from tiny import tiny_llama, tiny_tokenizer, write_chat_jsonl

KDLM = [sys.executable, "-m", "kdlm.cli"]


def config(tmp_path: Path, url: str, prompts: Path, **sections) -> GenerateConfig:
    tree = {
        "prompts": str(prompts),
        "output": str(tmp_path / "out.jsonl"),
        "progress": False,
        "teacher": {"model": "echo", "base_url": url},
        "sampling": {"max_tokens": 6},
        "limits": {"concurrency": 8, "timeout_s": 2, "backoff_s": 0.05},
    }
    for name, values in sections.items():
        tree[name] = {**tree[name], **values} if isinstance(values, dict) and name in tree else values
    return GenerateConfig.model_validate(tree)



def settled(server) -> dict:
    """The server's outcome counts once no completion request is in flight (each has logged its outcome)."""
    until(lambda: server.app.state.load.requests == 0, "the server ends every request")
    return dict(server.app.state.counts)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_each_record_once(output: Path, prompts: int, samples: int) -> list[dict]:
    records = [json.loads(line) for line in output.read_text().splitlines()]
    keys = Counter((record["meta"]["prompt_index"], record["meta"]["sample"]) for record in records)
    assert len(records) == prompts * samples
    assert set(keys) == {(p, s) for p in range(prompts) for s in range(samples)}
    assert max(keys.values()) == 1
    return records


def test_round_trip_writes_chat_records_that_training_loads(tmp_path):
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=6)
    with ServerThread(EchoBackend()) as server:
        cfg = config(tmp_path, server.url, prompts, sampling={"n": 3, "max_tokens": 4},
                     prices={"echo": {"input_per_million": 1000.0, "output_per_million": 2000.0}})
        stats = generate(cfg)
        received = server.app.state.counts["received"]
        again = generate(cfg)  # everything cached: nothing is sent
        assert server.app.state.counts["received"] == received == 18
    records = assert_each_record_once(tmp_path / "out.jsonl", prompts=6, samples=3)
    assert stats.answered == 18 and again.answered == 0 and again.cached == 18
    assert stats.completion_tokens == 18 * 4  # every prompt has more than 4 words
    assert stats.cost == pytest.approx((stats.prompt_tokens * 1000 + stats.completion_tokens * 2000) / 1e6)
    assert again.total_cost == pytest.approx(stats.cost) and again.cost == 0
    first = records[0]
    assert first["messages"][-1]["role"] == "assistant"
    assert first["messages"][-1]["content"] == " ".join(first["messages"][0]["content"].split()[:4])
    assert {"teacher", "fingerprint", "parameters", "seed"} <= set(first["meta"])
    assert len({record["meta"]["seed"] for record in records}) == 18  # every sample its own seed
    loaded = load_records(str(tmp_path / "out.jsonl"))
    assert len(loaded) == 18 and loaded[0]["messages"][-1]["role"] == "assistant"
    assert loaded[0]["meta"]["fingerprint"] == first["meta"]["fingerprint"]


def test_faults_are_retried_until_every_record_is_there_once(tmp_path):
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=30)
    # A stall lasts until the client gives up (timeout_s), however long that is.
    faults = Faults(rate_429=0.15, rate_500=0.15, rate_stall=0.05, retry_after_s=0.05, stall_s=600, seed=1)
    log = tmp_path / "server.jsonl"
    with ServerThread(EchoBackend(latency_ms=10), faults=faults, request_log=log) as server:
        stats = generate(config(tmp_path, server.url, prompts, sampling={"n": 2},
                                limits={"timeout_s": 1, "max_retries": 10}))
        counts = settled(server)
    assert_each_record_once(tmp_path / "out.jsonl", prompts=30, samples=2)
    assert counts["429"] >= 3 and counts["500"] >= 3 and counts["stall"] >= 1
    # Every fault the server injected was retried once, and nothing else was. A request slowed past the
    # client's timeout by a loaded machine is a timeout too, and the server logs it as client_gone.
    timeouts = counts["stall"] + counts["client_gone"]
    assert stats.retries == Counter({"429": counts["429"], "500": counts["500"], "timeout": timeouts})
    answered = [entry["fingerprint"] for entry in read_log(log) if entry["status"] == "answered"]
    assert len(answered) == len(set(answered)) == 60


def test_retry_after_is_honoured(tmp_path):
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=4)
    faults = Faults(rate_429=0.5, retry_after_s=0.4, seed=3)
    with ServerThread(EchoBackend(), faults=faults) as server:
        started = time.monotonic()
        stats = generate(config(tmp_path, server.url, prompts, limits={"concurrency": 1, "backoff_s": 0}))
        elapsed = time.monotonic() - started
        rate_limited = server.app.state.counts["429"]
    assert rate_limited >= 2 and stats.retries["429"] == rate_limited
    assert elapsed >= 0.4 * rate_limited  # one request at a time: every 429 cost its full Retry-After


def test_a_refused_request_is_not_retried_and_the_rest_is_saved(tmp_path):
    tokenizer = tiny_tokenizer()
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "short one"}, {"prompt": "x" * 600}, {"prompt": "short two"}]  # 600 tokens > 512 positions
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with ServerThread(ModelBackend("tiny", tiny_llama(len(tokenizer)), tokenizer)) as server:
        cfg = config(tmp_path, server.url, prompts, teacher={"model": "tiny"}, limits={"timeout_s": 120})
        with pytest.raises(KdlmError, match="1 of 3 requests failed.*400.*context"):
            generate(cfg)
        assert server.app.state.counts["received"] == 3  # the refused one was sent once
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_local_transformers_backend_matches_the_server(tmp_path):
    tokenizer = tiny_tokenizer()
    folder = tmp_path / "teacher"
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, tokenizer = load_model(str(folder))
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=5)
    sampling = {"n": 2, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9}
    with ServerThread(ModelBackend(str(folder), model, tokenizer)) as server:
        remote = config(tmp_path / "remote", server.url, prompts, teacher={"model": str(folder)}, sampling=sampling,
                        limits={"timeout_s": 120})
        generate(remote)
    local = config(tmp_path / "local", "unused", prompts, sampling=sampling,
                   teacher={"model": str(folder), "backend": "transformers", "bf16": False, "batch_size": 4})
    generate(local)  # loads the model from teacher.model
    answers = [json.loads(line)["messages"][-1]["content"] for line in Path(remote.output).read_text().splitlines()]
    assert answers == [json.loads(line)["messages"][-1]["content"] for line in Path(local.output).read_text().splitlines()]
    assert len(set(answers)) == 10


def test_the_limiter_spaces_requests_and_caps_the_tokens_of_a_window():
    async def times(limiter: RateLimiter, calls: int, tokens: float) -> list[float]:
        stamps = [time.monotonic()]
        for _ in range(calls):
            await limiter.acquire(tokens)
            stamps.append(time.monotonic())
        return [stamp - stamps[0] for stamp in stamps[1:]]

    # 5 requests per "minute" of 1 s: the k-th request goes 0.2 k s after the start at the earliest.
    spaced = asyncio.run(times(RateLimiter(5, window_s=1.0), 6, 0))
    assert all(at >= 0.2 * k - 1e-3 for k, at in enumerate(spaced))
    # 100 tokens per 0.5 s window, 40 per request: two per window, so the k-th goes in window k // 2.
    capped = asyncio.run(times(RateLimiter(tokens_per_minute=100, window_s=0.5), 5, 40))
    assert all(at >= 0.5 * (k // 2) - 1e-3 for k, at in enumerate(capped))


def test_the_engine_sends_within_its_requests_and_tokens_per_minute(tmp_path):
    """The limits as the server sees them, through the engine, retries included (a 429 is retried
    through the limiter too). Arrivals come after sends, so the k-th arrival can only be later than
    the k-th send the limits allow: lower bounds only."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i:02d}"}) + "\n" for i in range(6)))
    # The engine's documented estimate: prompt characters (as JSON) / 4 + max_tokens.
    estimate = len(json.dumps([{"role": "user", "content": "p00"}])) / 4 + 6
    for limits, earliest in [({"requests_per_minute": 5}, lambda k: 0.1 * k),                  # 0.5 s windows
                             ({"tokens_per_minute": 2.5 * estimate}, lambda k: 0.5 * (k // 2))]:  # 2 per window
        log = tmp_path / f"{sorted(limits)[0]}.jsonl"
        with ServerThread(EchoBackend(), faults=Faults(rate_429=0.3, retry_after_s=0.01, seed=2), request_log=log) as server:
            started = time.time()
            generate(config(tmp_path / log.stem, server.url, prompts, limits={**limits, "window_s": 0.5}))
            counts = settled(server)
        arrivals = sorted(entry["received"] - started for entry in read_log(log))
        assert counts["429"] >= 1 and len(arrivals) == 6 + counts["429"]
        assert all(at >= earliest(k) - 1e-3 for k, at in enumerate(arrivals)), (limits, arrivals)


def test_a_long_retry_after_is_capped_at_backoff_max_s(tmp_path, capsys):
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=4)
    with ServerThread(EchoBackend(), faults=Faults(rate_429=0.5, retry_after_s=3600, seed=3)) as server:
        result = {}
        cfg = config(tmp_path, server.url, prompts, limits={"concurrency": 1, "backoff_max_s": 0.05})
        worker = threading.Thread(target=lambda: result.update(stats=generate(cfg)), daemon=True)
        worker.start()
        worker.join(timeout=600)  # a hang guard: uncapped, the run would sleep an hour per 429
        assert not worker.is_alive(), "the engine waited out Retry-After: 3600"
        rate_limited = settled(server)["429"]
    stats = result["stats"]
    assert rate_limited >= 2 and stats.retries["429"] == stats.retry_after_capped == rate_limited
    stderr = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert stderr.count("asked to wait 3600 s") == 1  # said once per run, not once per retry
    assert "waiting limits.backoff_max_s=0.05 s instead" in stderr
    assert f"{rate_limited} with Retry-After capped" in stderr


def test_user_errors_name_the_file_and_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    with pytest.raises(KdlmError, match=r"prompts.jsonl:2: not valid JSON"):
        generate(config(tmp_path, "http://127.0.0.1:9/v1", prompts))
    with pytest.raises(KdlmError, match="data file not found"):
        generate(config(tmp_path, "http://127.0.0.1:9/v1", tmp_path / "missing.jsonl"))
    prompts.write_text('{"prompt": "fine"}\n')
    with pytest.raises(KdlmError, match="cannot reach"):  # nothing listens on port 9
        generate(config(tmp_path, "http://127.0.0.1:9/v1", prompts))


def cached_count(cache: Path) -> int:
    """Answers in a run's SQLite cache, read while the run may be writing it."""
    if not cache.exists():
        return 0
    with sqlite3.connect(cache) as connection:
        try:
            return connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


def _env(cwd: Path) -> dict:
    source = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's kdlm, whatever the cwd
    return {**os.environ, "KDLM_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}


def _cli(*args, cwd: Path, **popen):
    return subprocess.Popen([*KDLM, *args], cwd=cwd, env=_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def test_a_bad_api_key_stops_at_once_with_exit_code_2(tmp_path):
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=4)
    with ServerThread(EchoBackend(), api_key="right") as server:
        proc = _cli("generate", f"prompts={prompts}", f"output={tmp_path / 'out.jsonl'}", "progress=false",
                    "teacher.model=echo", f"teacher.base_url={server.url}", "teacher.api_key=wrong", cwd=tmp_path)
        stdout, stderr = proc.communicate(timeout=120)
        counts = dict(server.app.state.counts)
    assert proc.returncode == 2, stdout + stderr
    assert "refused the API key" in stderr and "Traceback" not in stderr + stdout
    assert counts["rejected"] == 1 and counts["received"] == 0  # one check, no completion request, no retry


def test_kill_9_mid_run_then_rerun_sends_only_what_is_missing(tmp_path):
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=24)
    log = tmp_path / "server.jsonl"
    cache = tmp_path / "out.sqlite"
    args = ["generate", f"prompts={prompts}", f"output={tmp_path / 'out.jsonl'}", "progress=false",
            "teacher.model=echo", "sampling.n=2", "limits.concurrency=4", "limits.timeout_s=10"]

    def cached() -> int:
        return cached_count(cache)

    with ServerThread(EchoBackend(latency_ms=300), request_log=log) as server:
        proc = _cli(*args, f"teacher.base_url={server.url}", cwd=tmp_path)
        deadline = time.monotonic() + 60
        while cached() < 8 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        until(lambda: server.app.state.load.requests > 0, "requests in flight")  # the kill cuts them
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        done_before = cached()
        assert 8 <= done_before < 48, "the kill must land mid-run"
        assert not (tmp_path / "out.jsonl").exists()

        rerun = _cli(*args, f"teacher.base_url={server.url}", cwd=tmp_path)
        stdout, stderr = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, stdout + stderr
        assert f"{done_before} from the cache, {48 - done_before} new" in " ".join(stderr.split())
        counts = settled(server)  # the requests cut by the kill are logged

    assert_each_record_once(tmp_path / "out.jsonl", prompts=24, samples=2)
    entries = read_log(log)
    answered = [entry["fingerprint"] for entry in entries if entry["status"] == "answered"]
    assert len(answered) == len(set(answered)) == 48  # no request answered twice
    assert counts["client_gone"] >= 1  # the kill cut requests in flight; the server did not count them


def test_a_second_run_on_the_same_output_refuses_and_a_dead_runs_lock_is_taken_over(tmp_path):
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=6)
    backend = EchoBackend(latency_ms=600_000)  # the first run waits until it is killed
    lock = tmp_path / "out.jsonl.lock"
    args = ["generate", f"prompts={prompts}", f"output={tmp_path / 'out.jsonl'}", "progress=false",
            "teacher.model=echo", "limits.timeout_s=900"]
    with ServerThread(backend) as server:
        first = _cli(*args, f"teacher.base_url={server.url}", cwd=tmp_path)
        until(lambda: server.app.state.counts["received"] == 6, "the first run sends")  # it holds the lock
        second = _cli(*args, f"teacher.base_url={server.url}", cwd=tmp_path)
        _, refused = second.communicate(timeout=300)
        assert second.returncode == 2 and server.app.state.counts["received"] == 6  # the second sent nothing
        assert f"in use by another `kdlm generate` run (pid {first.pid}" in " ".join(refused.split())
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
        assert lock.read_text().strip() == str(first.pid)  # what a killed run leaves
        backend.latency_s = 0
        third = _cli(*args, f"teacher.base_url={server.url}", cwd=tmp_path)
        _, taken_over = third.communicate(timeout=300)
    assert third.returncode == 0, taken_over
    assert f"took over the lock of run {first.pid}" in taken_over
    assert not lock.exists() and not (tmp_path / "out.sqlite.lock").exists()  # released at the end
    assert_each_record_once(tmp_path / "out.jsonl", prompts=6, samples=1)


# A process that has imported what `kdlm generate` imports (torch among them, 2-10 s a start on this
# machine) and forks a child per run: each child runs the real CLI, `kdlm.cli.main()`, and is what the
# test kills. Ten fresh interpreters would take most of the test's time.
FORKER = """
import json, os, signal, sys
import kdlm.cli, kdlm.data, kdlm.generate.engine, openai
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        sys.argv = ["kdlm", *json.loads(line)]
        try:
            kdlm.cli.main()
        except SystemExit as exit:
            os._exit(exit.code if isinstance(exit.code, int) else 1)
        os._exit(0)
    print(pid, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_ten_kill_9_cycles_under_faults_lose_nothing_and_pay_twice_only_what_was_in_flight(tmp_path):
    """kdlm generate killed 10 times mid-run while the server answers 10% 429s, 5% 500s and 2% stalls;
    then a last run to the end. Every record exactly once, and a request answered twice only if it was in
    flight at a kill (at most limits.concurrency per kill)."""
    prompts = write_chat_jsonl(tmp_path / "prompts.jsonl", count=60)
    cache, log, concurrency = tmp_path / "out.sqlite", tmp_path / "server.jsonl", 8
    faults = Faults(rate_429=0.10, rate_500=0.05, rate_stall=0.02, retry_after_s=0.05, stall_s=600, seed=5)
    args = ["generate", f"prompts={prompts}", f"output={tmp_path / 'out.jsonl'}", "progress=false",
            "teacher.model=echo", "sampling.n=2", f"limits.concurrency={concurrency}", "limits.timeout_s=1",
            "limits.backoff_s=0.05", "limits.max_retries=20"]
    kills = 0
    forker = subprocess.Popen([sys.executable, "-c", FORKER], cwd=tmp_path, env=_env(tmp_path), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    with ServerThread(EchoBackend(latency_ms=50), faults=faults, request_log=log) as server:
        args.append(f"teacher.base_url={server.url}")
        try:
            for _ in range(10):
                before = cached_count(cache)
                forker.stdin.write(json.dumps(args) + "\n")
                forker.stdin.flush()
                pid = int(forker.stdout.readline())
                until(lambda: cached_count(cache) >= before + 4 or not _alive(pid), "the run answers")  # noqa: B023
                kills += _alive(pid)  # killed mid-run, not after it ended
                os.kill(pid, signal.SIGKILL)
                until(lambda: not _alive(pid), "the run dies")  # noqa: B023
        finally:
            forker.stdin.close()
            forker.wait(timeout=60)
        last = _cli(*args, cwd=tmp_path)
        stdout, stderr = last.communicate(timeout=300)
        assert last.returncode == 0, stdout + stderr
        counts = settled(server)
    records = assert_each_record_once(tmp_path / "out.jsonl", prompts=60, samples=2)
    answered = Counter(entry["fingerprint"] for entry in read_log(log) if entry["status"] == "answered")
    paid_twice = sum(times - 1 for times in answered.values())
    assert kills == 10 and len(answered) == 120
    assert paid_twice <= kills * concurrency
    assert counts["429"] and counts["500"] and counts["stall"]
    print(f"10 kills: {len(records)} records, 0 lost, {paid_twice} requests paid twice, server counts {counts}")


@pytest.mark.slow
def test_kdlm_serve_bundled_teacher_answers_openai_and_kdlm_generate(tmp_path):
    """The issue's goal: `kdlm serve bundled:...` answers the openai client, `kdlm generate` fills a JSONL."""
    import httpx
    import openai

    from kdlm.serve import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    # The user's KDLM_CACHE, so that the converted teacher is reused.
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([*KDLM, "serve", "bundled:smollm2-135m-instruct", "--port", str(port),
                               "--api-key", "secret", "--threads", "1"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(url + "/models", headers={"Authorization": "Bearer secret"}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url, api_key="secret", max_retries=0)
        model = "bundled:smollm2-135m-instruct"
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2+2?"}],
                                               max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
        assert "4" in reply.choices[0].message.content
        assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 5
        completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3,
                                               temperature=0)
        assert "Paris" in completion.choices[0].text

        proc = subprocess.run(
            [*KDLM, "generate", str(Path(__file__).resolve().parents[1] / "configs" / "generate.yaml"),
             f"teacher.base_url={url}", "teacher.api_key=secret", "limit=4", "sampling.n=2", "sampling.max_tokens=8",
             f"output={tmp_path / 'answers.jsonl'}", "progress=false"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        stats = httpx.get(url + "/kdlm/stats", headers={"Authorization": "Bearer secret"}).json()
        assert stats["batches"] < stats["requests"]  # the 8 concurrent requests were batched
    finally:
        server.terminate()
        server.wait(timeout=30)
    records = load_records(str(tmp_path / "answers.jsonl"))
    assert len(records) == 8
    assert all(record["messages"][-1]["role"] == "assistant" and record["messages"][-1]["content"]
               for record in records)
