"""Black-box generation: a teacher answers prompts through an API or locally, resumably and within limits."""

from kdlm.generate.backends import OpenAIBackend, TransformersBackend, VLLMBackend, make_backend
from kdlm.generate.cache import Answer, AnswerCache
from kdlm.generate.config import GenerateConfig, load_generate_config
from kdlm.generate.engine import RunStats, build_jobs, fingerprint, generate
from kdlm.generate.limits import RateLimiter

__all__ = [
    "Answer",
    "AnswerCache",
    "GenerateConfig",
    "OpenAIBackend",
    "RateLimiter",
    "RunStats",
    "TransformersBackend",
    "VLLMBackend",
    "build_jobs",
    "fingerprint",
    "generate",
    "load_generate_config",
    "make_backend",
]
