"""GKD across tokenizers: the student's samples, re-tokenised for the teacher and aligned (docs/cross-tokenizer.md)."""

from __future__ import annotations

from kdlm.data.tokenize import IGNORE_INDEX
from kdlm.xtok.data import encode_pair


class CrossTokenizerSamples:
    """An on-policy method whose sampled examples are paired again with the teacher's tokens.

    The method samples in the student's tokens (its ``tokenizer`` is the student's). Each sampled response is
    decoded to text and the chat re-encoded for both models (``encode_pair``): the student trains on its
    tokenisation of its own text, which is the sample itself unless the sampler produced a non-canonical split.
    A sample cut by ``method.max_new_tokens`` gets the template's end of turn like any response.
    Everything else (state, logs, its loss) is the wrapped method's.
    """

    def __init__(self, method, student_tokenizer, teacher_tokenizer, max_length: int):
        self.method = method
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.max_length = max_length

    def __getattr__(self, name: str):
        return getattr(self.method, name)

    def prepare_step(self, step: int, batches: list[list[dict]]) -> list[list[dict]]:
        sampled = self.method.prepare_step(step, batches)
        return [[new if new is old else self.paired(new, old) for new, old in zip(batch, original, strict=True)]
                for batch, original in zip(sampled, batches, strict=True)]

    def paired(self, sample: dict, original: dict) -> dict:
        """The sample as a paired example: the original's prompt messages, the sample's text as the response."""
        response = [label for label in sample["labels"] if label != IGNORE_INDEX]
        if response and response[-1] == self.student_tokenizer.eos_token_id:
            response = response[:-1]
        text = self.student_tokenizer.decode(response, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        messages = [*original["prompt_messages"], {"role": "assistant", "content": text}]
        example = encode_pair(self.student_tokenizer, self.teacher_tokenizer, messages, max_length=self.max_length)
        example["prompt_messages"] = original["prompt_messages"]
        return example
