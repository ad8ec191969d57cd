"""Start the server: from the CLI (`kdlm serve MODEL`), or in a thread for tests and benchmarks."""

from __future__ import annotations

import socket
import sys
import threading
import time

import uvicorn

from kdlm.errors import KdlmError
from kdlm.serve.app import create_app
from kdlm.serve.backends import EchoBackend, ModelBackend
from kdlm.serve.guard import default_allowed_hosts, is_loopback

ECHO = "echo"


def build_backend(
    model: str,
    *,
    name: str | None = None,
    dtype: str = "auto",
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    latency_ms: float = 0.0,
):
    """A backend for a model spec (see kdlm.models.load_model), or the echo stub for MODEL=`echo`.

    Args:
        model: the model spec, or `echo` (answers the prompt's words after `latency_ms`).
        name: the model id clients must send; defaults to the spec.
        dtype: auto, float32, or bfloat16 to run the forward passes under bf16 autocast (weights stay fp32); auto
            picks bf16 only where the hardware runs it fast (kdlm.precision).
    """
    if model == ECHO:
        return EchoBackend(latency_ms, name=name or ECHO)
    if dtype not in ("auto", "float32", "bfloat16"):
        raise KdlmError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    from kdlm.models import load_model

    loaded, tokenizer = load_model(model)
    return ModelBackend(name or model, loaded, tokenizer, max_batch=max_batch, wait_ms=batch_wait_ms,
                        bf16="auto" if dtype == "auto" else dtype == "bfloat16")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _config(app, host: str, port: int) -> uvicorn.Config:
    # No access log: one line per request would flood the console in a generation run.
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=1)


def run_server(backend, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               allowed_hosts: list[str] | None = None, **app_options) -> None:
    """Serve until interrupted.

    Args:
        allowed_hosts: names accepted in the Host header; default: localhost, 127.0.0.1, ::1 and `host`
            (see kdlm.serve.guard.default_allowed_hosts); `["*"]` accepts any.
        app_options: the rest of create_app's options (faults, request_log, max_body_bytes, max_queue).
    """
    if api_key is None and not is_loopback(host):
        print(f"warning: serving on {host} without an API key: anyone who can reach this address can use the "
              "model. Set --api-key (or KDLM_API_KEY), or bind 127.0.0.1", file=sys.stderr, flush=True)
    app = create_app(backend, api_key=api_key, allowed_hosts=allowed_hosts or default_allowed_hosts(host),
                     **app_options)
    uvicorn.Server(_config(app, host, port)).run()


class ServerThread:
    """The server in a background thread on a free loopback port; use as a context manager.

    >>> with ServerThread(EchoBackend()) as server:
    ...     client = openai.OpenAI(base_url=server.url, api_key="x")
    """

    def __init__(self, backend, *, host: str = "127.0.0.1", **app_options):
        app_options.setdefault("allowed_hosts", default_allowed_hosts(host))
        self.app = create_app(backend, **app_options)
        self.host, self.port = host, free_port(host)
        self.url = f"http://{host}:{self.port}/v1"
        self._server = uvicorn.Server(_config(self.app, host, self.port))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
