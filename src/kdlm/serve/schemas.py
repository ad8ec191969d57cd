"""The request bodies the server accepts, in OpenAI's shapes. Unknown OpenAI parameters (user,
frequency_penalty, ...) are accepted and ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None

    def wants_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool((self.stream_options or {}).get("include_usage"))


# Its name shows in the errors a bad `content` gets ("messages.0.content.list[_TextPart]: ..."): kept as it was.
class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(BaseRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def rows(self) -> int:
        """The sequences this request decodes at once."""
        return self.n


class CompletionRequest(BaseRequest):
    # Token-id prompts (OpenAI and vLLM accept them too) skip tokenisation: what a scoring client needs.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's extension: tokens as "token_id:N", never ambiguous

    def prompts(self) -> list:
        """The prompts as a list: one string or one list of token ids is a single prompt."""
        return [self.prompt] if isinstance(self.prompt, str) or is_token_ids(self.prompt) else self.prompt

    def rows(self) -> int:
        """The sequences this request decodes at once: n per prompt, or one per scored prompt."""
        return len(self.prompts()) * (1 if self.echo else self.n)


def is_token_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(token, int) for token in prompt)
