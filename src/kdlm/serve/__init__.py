"""An OpenAI-compatible server for any local model: batched sampling with logprobs, fault injection."""

from kdlm.serve.app import create_app
from kdlm.serve.backends import BatchScheduler, EchoBackend, ModelBackend, Params
from kdlm.serve.server import ServerThread, build_backend, free_port, run_server
from kdlm.serve.state import Faults

__all__ = [
    "BatchScheduler",
    "EchoBackend",
    "Faults",
    "ModelBackend",
    "Params",
    "Row",
    "ServerThread",
    "build_backend",
    "create_app",
    "decode_batch",
    "free_port",
    "run_server",
]


def __getattr__(name: str):
    # The decoder needs torch; `kdlm serve echo` and clients that only need free_port do not.
    if name in ("Row", "decode_batch"):
        from kdlm.models import decode as sampling

        return getattr(sampling, name)
    raise AttributeError(f"module 'kdlm.serve' has no attribute {name!r}")
