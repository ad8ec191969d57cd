"""The typed config of `kdlm generate`: a YAML file plus dotted `key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from kdlm.config import Section, load_yaml_model
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


class GenerateConfig(Section):
    prompts: str = Field("builtin:quickstart", description="JSONL/JSON file, hf:NAME[:CONFIG] or builtin:NAME.")
    split: str = Field("train", description="Split of a Hugging Face dataset.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    output: str = Field("runs/generate/answers.jsonl", description="Chat records with provenance under `meta`.")
    cache: str | None = Field(None, description="SQLite request cache (default: OUTPUT with .sqlite).")
    progress: bool = Field(True, description="Show a progress bar with rate and ETA.")
    teacher: TeacherSection = TeacherSection()
    sampling: SamplingSection = SamplingSection()
    limits: LimitsSection = LimitsSection()
    prices: dict[str, Price] = Field(default_factory=dict, description="Per model id: price of input and output tokens.")
    recipe: dict[str, Any] | None = Field(
        None, description="A black-box recipe run instead of answering `prompts` once: recipe.name (self_instruct, "
        "evol_instruct, lion, cot, icl: a module of kdlm.recipes) and that recipe's settings, which it validates."
    )


def load_generate_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> GenerateConfig:
    """Read a generate config (YAML) and apply `key=value` overrides; errors name the key and the file."""
    return load_yaml_model(GenerateConfig, path, overrides, sections="sections (prompts, output, teacher, sampling, limits)",
                           example="sampling.n=4")
