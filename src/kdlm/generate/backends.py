"""Where answers come from: an OpenAI-compatible endpoint, a local transformers model, or vLLM.

Every backend answers one job at a time (`await backend.complete(job)`); the engine runs many at once.
Backends sort failures into three kinds, which decide what the engine does:

- `TransientError` (429, 5xx, a timeout, a dropped connection): retried after a backoff, or after the
  server's Retry-After when it sends one.
- `RefusedError` (any other 4xx, e.g. a prompt too long): this request fails, the run goes on.
- `FatalError` (a refused API key, an unknown model, an unreachable server): the run stops at once.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from kdlm.errors import KdlmError, require_extra
from kdlm.generate.cache import Answer
from kdlm.generate.config import GenerateConfig


@dataclass
class Job:
    prompt_index: int
    sample: int
    messages: list[dict]
    fingerprint: str
    seed: int


class TransientError(Exception):
    def __init__(self, message: str, cause: str, retry_after: float | None = None):
        super().__init__(message)
        self.cause, self.retry_after = cause, retry_after


class RefusedError(Exception):
    pass


class FatalError(KdlmError):
    pass


def _retry_after(headers) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (numbers only; an HTTP date is ignored)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                pass
    return None


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint, through the `openai` async client (its own retries off)."""

    def __init__(self, config: GenerateConfig):
        require_extra("api", ("openai",), "a teacher behind an OpenAI-compatible API (teacher.backend=openai)")
        import openai

        teacher = config.teacher
        self.base_url, self.model, self.sampling = teacher.base_url, teacher.model, config.sampling
        self.key_source = "teacher.api_key" if teacher.api_key else f"the {teacher.api_key_env} environment variable"
        api_key = teacher.api_key or os.environ.get(teacher.api_key_env) or "none"
        self.client = openai.AsyncOpenAI(
            base_url=teacher.base_url, api_key=api_key, max_retries=0, timeout=config.limits.timeout_s,
            **_fast_http_client(),
        )

    async def check(self) -> None:
        """Fail fast, before any prompt is sent, on an unreachable server or a refused key."""
        import openai

        try:
            await self.client.models.list()
        except openai.APIConnectionError as error:
            raise FatalError(f"cannot reach {self.base_url} ({error}); is the server running?") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise self._refused_key(error) from None
        except openai.APIStatusError:
            pass  # some servers have no /models; the first request will tell

    def _refused_key(self, error) -> FatalError:
        return FatalError(
            f"{self.base_url} refused the API key ({error.status_code}: {_message(error)}); "
            f"set the right key in {self.key_source}"
        )

    async def complete(self, job: Job) -> Answer:
        import openai

        try:
            # The client's generic POST, not chat.completions.create: same transport, errors and auth,
            # but it skips converting the parameters and the answer to typed objects, which took 40%
            # of the client's CPU per request (measured: 1.6 ms against 0.9 ms).
            payload = {"model": self.model, "messages": job.messages, "temperature": self.sampling.temperature,
                       "top_p": self.sampling.top_p, "max_tokens": self.sampling.max_tokens, "seed": job.seed}
            if self.sampling.stop:
                payload["stop"] = self.sampling.stop
            response = await self.client.post("/chat/completions", body=payload, cast_to=object)
        except openai.APITimeoutError as error:
            raise TransientError(str(error), "timeout") from None
        except openai.APIConnectionError as error:
            raise TransientError(str(error), "connection") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise self._refused_key(error) from None
        except openai.NotFoundError as error:
            raise FatalError(f"{self.base_url}: {_message(error)} (teacher.model={self.model!r})") from None
        except openai.APIStatusError as error:
            status = error.status_code
            if status == 429 or status >= 500 or status == 408:
                raise TransientError(_message(error), str(status), _retry_after(error.response.headers)) from None
            raise RefusedError(f"{status}: {_message(error)}") from None
        try:
            choice = response["choices"][0]
            usage = response.get("usage") or {}
            return Answer(
                text=choice["message"].get("content") or "",
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
            )
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TransientError(f"malformed answer from {self.base_url}: {str(response)[:200]}", "malformed") from None

    async def close(self) -> None:
        await self.client.close()


def _fast_http_client() -> dict:
    """The client's aiohttp transport when installed (openai[aiohttp]): 0.6-1.3 ms of CPU per request
    against 2.2-2.3 ms for the default httpx one with 300 requests in flight (measured on loopback)."""
    import openai

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return {}
    factory = getattr(openai, "DefaultAioHttpClient", None)  # openai >= 1.86
    return {} if factory is None else {"http_client": factory()}


def _message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(error)


class TransformersBackend:
    """A local model run in-process by the server's batching scheduler: the engine's concurrent jobs
    are decoded `batch_size` at a time, with the same seeds (hence the same answers) as `kdlm serve`."""

    def __init__(self, config: GenerateConfig, model=None, tokenizer=None):
        from kdlm.serve.backends import ModelBackend

        if model is None:
            from kdlm.models import load_model

            model, tokenizer = load_model(config.teacher.model)
        self.sampling = config.sampling
        # The scheduler waits a little for a full batch; the engine keeps batch_size jobs in flight.
        self.local = ModelBackend(config.teacher.model, model, tokenizer, max_batch=config.teacher.batch_size,
                                  wait_ms=20, bf16=config.teacher.bf16)

    async def check(self) -> None:
        return None

    async def complete(self, job: Job) -> Answer:
        from kdlm.serve.backends import Params

        params = Params(max_tokens=self.sampling.max_tokens, temperature=self.sampling.temperature,
                        top_p=self.sampling.top_p, seed=job.seed, stop=list(self.sampling.stop or []))
        prompt_ids = self.local.encode_chat(job.messages)
        problem = self.local.check_length(prompt_ids, params)
        if problem:
            raise RefusedError(problem)
        text, finish, tokens = "", None, 0
        async for _, delta, entry, finish_reason in self.local.stream(prompt_ids, params):
            text += delta
            tokens += entry is not None
            finish = finish_reason or finish
        return Answer(text, finish, len(prompt_ids), tokens)

    async def close(self) -> None:
        return None


class BatchGenerateBackend:
    """A local model answering a whole batch of jobs with one `model.generate` call, seeded once per batch with
    the seed of its first job: the decode of `kdlm distill`'s teacher answers.

    It is not the server's decoder (TransformersBackend, one seed per request) because answers cached and trained
    on before must stay reproducible: a sampled answer here depends on its batch, so the engine feeds it batches
    in a fixed order (`engine.answer_in_batches`). Greedy decoding (temperature 0) does not depend on the seed.
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float, top_p: float, bf16: bool):
        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.context = getattr(model.config, "max_position_embeddings", None)

    def render(self, job: Job) -> str:
        return self.tokenizer.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)

    def too_long(self, text: str) -> str | None:
        """Why a rendered prompt cannot be answered within the model's context, or None."""
        if not self.context:
            return None
        num_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if num_tokens + self.max_new_tokens <= self.context:
            return None
        return (f"the prompt has {num_tokens} tokens, and with data.answer_max_new_tokens={self.max_new_tokens} the "
                f"answer would exceed the teacher's context of {self.context} tokens")

    def answer_batch(self, jobs: list[Job], texts: list[str]) -> list[Answer | str]:
        """An Answer, or the reason it failed, per job; a batch that raises is retried one prompt at a time."""
        try:
            return self._decode(texts, jobs[0].seed)
        except (RuntimeError, ValueError, IndexError) as exc:
            if len(jobs) == 1:
                lines = str(exc).strip().splitlines()
                return [f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"]
        return [self.answer_batch([job], [text])[0] for job, text in zip(jobs, texts, strict=True)]

    def _decode(self, texts: list[str], seed: int) -> list[Answer]:
        import torch

        tokenizer, do_sample = self.tokenizer, self.temperature > 0
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # batched decoder-only generation
        try:
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        finally:
            tokenizer.padding_side = padding_side
        torch.manual_seed(seed)
        with torch.no_grad(), torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            generated = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=do_sample, top_k=None,
                temperature=self.temperature if do_sample else None, top_p=self.top_p if do_sample else None,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [Answer(tokenizer.decode(tokens, skip_special_tokens=True).strip(), None, prompt,
                       int((tokens != tokenizer.pad_token_id).sum()))
                for tokens, prompt in zip(new_tokens, prompt_tokens, strict=True)]


class VLLMBackend:
    """vLLM on a GPU: jobs gathered for a few milliseconds and handed to `LLM.chat` as one batch.

    Not exercised by the test suite (no GPU there); it needs `pip install vllm` and CUDA.
    """

    def __init__(self, config: GenerateConfig):
        import torch

        try:
            import vllm
        except ImportError:
            raise KdlmError("teacher.backend=vllm needs vLLM: pip install vllm") from None
        if not torch.cuda.is_available():
            raise KdlmError("teacher.backend=vllm needs a CUDA GPU; use teacher.backend=transformers on CPU")
        self.vllm, self.config = vllm, config
        self.llm = vllm.LLM(model=config.teacher.model)
        self.pending: list[tuple[Job, asyncio.Future]] = []
        self.flusher: asyncio.Task | None = None

    async def check(self) -> None:
        return None

    async def complete(self, job: Job) -> Answer:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((job, future))
        if len(self.pending) >= self.config.teacher.batch_size:
            await self._flush()
        elif self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush(delay=0.02))
        return await future

    async def _flush(self, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        batch, self.pending = self.pending, []
        if not batch:
            return
        sampling = self.config.sampling
        params = [
            self.vllm.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                     max_tokens=sampling.max_tokens, stop=sampling.stop, seed=job.seed)
            for job, _ in batch
        ]
        try:
            outputs = await asyncio.to_thread(self.llm.chat, [job.messages for job, _ in batch], params, use_tqdm=False)
        except Exception as error:
            for _, future in batch:
                future.set_exception(error)
            return
        for (_, future), output in zip(batch, outputs, strict=True):
            completion = output.outputs[0]
            future.set_result(Answer(completion.text, completion.finish_reason, len(output.prompt_token_ids),
                                     len(completion.token_ids)))

    async def close(self) -> None:
        return None


def make_backend(config: GenerateConfig):
    if config.teacher.backend == "openai":
        return OpenAIBackend(config)
    if config.teacher.backend == "transformers":
        return TransformersBackend(config)
    return VLLMBackend(config)
