"""The shapes the decoder and the backends emit, kept free of torch so that the echo stub starts fast."""

from __future__ import annotations

# One piece of text of one choice: (choice index, new text, logprob entry or None, finish reason or None).
Event = tuple[int, str, dict | None, str | None]


def token_entry(text: str, logprob: float) -> dict:
    """A token's logprob entry in OpenAI's chat format."""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
