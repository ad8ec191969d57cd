"""The sections of a `kdlm generate` config that the recipes' settings reuse: the teacher, its sampling, the
engine's limits, prices."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kdlm.config import Section
from kdlm.precision import Bf16Setting


class TeacherSection(Section):
    ALIASES: ClassVar[dict[str, str]] = {"api_base": "base_url"}  # the name `kdlm distill` uses
    backend: Literal["openai", "transformers", "vllm"] = Field(
        "openai", description="openai: any OpenAI-compatible endpoint; transformers/vllm: run `model` locally."
    )
    model: str = Field("bundled:smollm2-135m-instruct", description="Model id sent to the API, or the local model spec.")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="The endpoint (openai backend).")
    api_key: str | None = Field(None, description="API key; prefer api_key_env so that it stays out of files.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable read when api_key is not set.")
    batch_size: int = Field(16, ge=1, description="Local backends: sequences decoded together.")
    bf16: Bf16Setting = Field(
        "auto", description="transformers backend: bf16 autocast; auto: only where the hardware runs it fast (see kdlm.precision)."
    )


class SamplingSection(Section):
    ALIASES: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens"}  # transformers' name
    n: int = Field(1, ge=1, description="Samples per prompt; each is one request with its own seed and cache entry.")
    temperature: float = Field(0.7, ge=0, le=2, description="0 means greedy.")
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(192, ge=1)
    stop: list[str] | None = None
    seed: int = Field(0, description="Base seed; each (prompt, sample) gets its own seed derived from it.")


class LimitsSection(Section):
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Counted before sending as prompt characters / 4 + max_tokens."
    )
    max_retries: int = Field(6, ge=0, description="Retries of a request after a 429, a 5xx or a timeout.")
    timeout_s: float = Field(120.0, gt=0, description="Give up waiting for one answer (then retry).")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay without Retry-After; doubles each time.")
    backoff_max_s: float = Field(
        60.0, ge=0, description="Longest wait before a retry, a server's Retry-After included (a longer one is capped)."
    )
    window_s: float = Field(
        60.0, gt=0, description="The window the per-minute limits count over: a minute, as providers count; "
        "shorter only to test the limits quickly."
    )


class Price(Section):
    input_per_million: float = Field(0.0, ge=0, description="Currency units per million prompt tokens.")
    output_per_million: float = Field(0.0, ge=0, description="Currency units per million completion tokens.")
