"""Teacher top-k log-probs from an OpenAI-compatible server: white-box targets without the teacher's weights.

Each training example is sent as token ids to ``/v1/completions`` with ``echo: true, max_tokens: 0,
logprobs: k`` and vLLM's ``return_tokens_as_token_ids`` (``kdlm serve`` speaks all of it): the server
scores the prompt and returns, at every position, the log-probs of its k most likely next tokens, from the
raw distribution at temperature 1. The entries at the example's target positions become a top-k cache
(``kdlm.teachers.cache``, the tail bucket being the missing mass), the same files a local teacher writes.

Token alignment is checked, not assumed: the server's tokenizer must be the local one (by the fingerprint
that ``kdlm serve`` lists in /v1/models, or else by tokenising a probe text on both sides), and every
answer must echo the ids that were sent. Ids are read as ids ("token_id:N"), never as token strings,
which several ids can share.
"""

from __future__ import annotations

import math

import openai
import torch
from torch import Tensor

from kdlm.errors import KdlmError
from kdlm.teachers.cache import tokenizer_fingerprint

ID_PREFIX = "token_id:"
PROBE_MESSAGES = [
    {"role": "user", "content": "Naïve café: 3 × 4 = 12?\n\tYes — «déjà vu» 😀"},
    {"role": "assistant", "content": "Twelve. (0x0C)"},
]


class ApiTeacher:
    """A served teacher, scored through the OpenAI completions API.

    Args:
        base_url: the server's /v1 URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model id the server serves.
        tokenizer: the local tokenizer the training data was encoded with.
        api_key: sent as a bearer token (servers without keys accept any value).
        timeout_s, max_retries: per request, as the ``openai`` client takes them (it retries 429/5xx).
    """

    def __init__(self, base_url: str, model: str, tokenizer, *, api_key: str | None = None, timeout_s: float = 300.0,
                 max_retries: int = 6):
        self.base_url, self.model, self.tokenizer = base_url, model, tokenizer
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=max_retries)
        self.vocab_size: int | None = None
        self.max_tokens = 0  # becomes 1 for a server that refuses to score without generating

    def _explain(self, error: openai.APIError, what: str) -> KdlmError:
        if isinstance(error, openai.APIStatusError):
            return KdlmError(f"the teacher server at {self.base_url} refused {what}: HTTP {error.status_code}: {error.message}")
        return KdlmError(f"cannot reach the teacher server at {self.base_url} ({error}); is it running?")

    def _call(self, what: str, function, **kwargs):
        try:
            return function(**kwargs)
        except (openai.APIStatusError, openai.APIConnectionError) as error:
            raise self._explain(error, what) from None

    def check_tokenizer(self) -> int:
        """Refuse a server whose tokenizer differs from the local one; return the served vocabulary size.

        Raises:
            KdlmError: the model is not served there, or the tokenizers differ.
        """
        served = self._call("GET /models", self.client.models.list).data
        entry = next((item.to_dict() for item in served if item.id == self.model), None)
        if entry is None:
            raise KdlmError(f"model {self.model!r} is not served at {self.base_url}; it serves {[item.id for item in served]}")
        local = tokenizer_fingerprint(self.tokenizer)
        if "tokenizer_fingerprint" in entry and entry["tokenizer_fingerprint"] != local:
            raise KdlmError(
                f"the tokenizer of {self.model!r} at {self.base_url} differs from the local one (fingerprint "
                f"{entry['tokenizer_fingerprint']} vs {local}): its log-probs would be paired with the wrong tokens. "
                "Serve the teacher with the tokenizer the data is encoded with, or set teacher.model to the served model"
            )
        if "tokenizer_fingerprint" not in entry:  # another server: compare how both sides tokenise a probe
            self.probe_tokenizer()
        self.vocab_size = int(entry.get("vocab_size") or len(self.tokenizer))
        return self.vocab_size

    def probe_tokenizer(self) -> None:
        """Tokenise a probe text (chat markup, accents, an emoji) on the server and here; refuse any difference."""
        text = self.tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False) if self.tokenizer.chat_template else (
            PROBE_MESSAGES[0]["content"]
        )
        response = self._score(text, 0)
        served = self._ids(response.choices[0].logprobs.tokens[: response.usage.prompt_tokens])
        local = self.tokenizer(text)["input_ids"]
        if served != local:
            at = next((i for i, (a, b) in enumerate(zip(served, local, strict=False)) if a != b), min(len(served), len(local)))
            raise KdlmError(
                f"the server's tokenizer for {self.model!r} differs from the local one: a probe text becomes "
                f"{len(served)} tokens there and {len(local)} here, first different at token {at}. Serve the teacher "
                "with the tokenizer the data is encoded with"
            )

    def _ids(self, names: list[str]) -> list[int]:
        if not all(isinstance(name, str) and name.startswith(ID_PREFIX) for name in names):
            raise KdlmError(
                f"the server at {self.base_url} ignores return_tokens_as_token_ids: token strings cannot be mapped back "
                "to ids unambiguously. Use `kdlm serve` or vLLM"
            )
        return [int(name[len(ID_PREFIX) :]) for name in names]

    def _score(self, prompts: list, top_k: int):
        """One scoring request. ``max_tokens=0`` scores only (kdlm serve, OpenAI's legacy API); servers that
        refuse it (vLLM requires max_tokens >= 1) are asked again with 1, and the generated token is ignored."""
        what = f"a prompt-scoring request (echo=true, max_tokens={self.max_tokens}, logprobs={top_k})"
        try:
            return self.client.completions.create(model=self.model, prompt=prompts, echo=True, max_tokens=self.max_tokens,
                                                  logprobs=top_k, extra_body={"return_tokens_as_token_ids": True})
        except (openai.APIStatusError, openai.APIConnectionError) as error:
            refused_zero = isinstance(error, openai.BadRequestError) and "max_tokens" in error.message
            if not (refused_zero and self.max_tokens == 0):
                raise self._explain(error, what) from None
        self.max_tokens = 1
        return self._score(prompts, top_k)

    def score_topk(self, examples: list[dict], top_k: int) -> list[tuple[Tensor, Tensor]]:
        """Per example, (log-probs (n, k) fp32 descending, ids (n, k) int64) at its n target positions.

        Raises:
            KdlmError: the server refused, returned fewer than k alternatives, or did not echo the ids sent.
        """
        if self.vocab_size is None:  # never score with an unchecked tokenizer
            self.check_tokenizer()
        prompts = [list(example["input_ids"]) for example in examples]
        choices = sorted(self._score(prompts, top_k).choices, key=lambda choice: choice.index)
        if len(choices) != len(prompts):
            raise KdlmError(f"the server answered {len(choices)} choices for {len(prompts)} prompts")
        results = []
        for example, prompt, choice in zip(examples, prompts, choices, strict=True):
            logprobs = choice.logprobs
            if logprobs is None or self._ids(logprobs.tokens[: len(prompt)]) != prompt:  # then any generated token
                raise KdlmError(f"the server did not echo the {len(prompt)} token ids it was sent; it cannot be used for a teacher cache")
            # the entry at position j is the distribution of token j given the tokens before it
            positions = [j for j, label in enumerate(example["labels"]) if j > 0 and label != -100]
            ids = torch.empty(len(positions), top_k, dtype=torch.int64)
            values = torch.empty(len(positions), top_k, dtype=torch.float32)
            for row, j in enumerate(positions):
                entry = logprobs.top_logprobs[j] or {}
                top = sorted(zip(entry.values(), self._ids(list(entry)), strict=True), key=lambda item: -item[0])[:top_k]
                if len(top) < top_k or not all(math.isfinite(value) for value, _ in top):
                    raise KdlmError(
                        f"the server returned {len(top)} finite top log-probs at a position, not teacher.top_k={top_k}; "
                        "lower teacher.top_k to what it allows (kdlm serve and vLLM: 20 by default)"
                    )
                values[row] = torch.tensor([value for value, _ in top])
                ids[row] = torch.tensor([token for _, token in top])
            if ids.numel() and int(ids.max()) >= self.vocab_size:
                raise KdlmError(f"the server returned token id {int(ids.max())} beyond the vocabulary ({self.vocab_size})")
            results.append((values, ids))
        return results
