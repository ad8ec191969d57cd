"""Sampling settings of each recipe step, with the published defaults.

Each step gets its own subclass so that overriding one field (`recipe.generation.max_tokens=256`)
keeps the step's other defaults instead of falling back to the engine's.
"""

from __future__ import annotations

from pydantic import Field

from kdlm.generate.config import SamplingSection


class Creative(SamplingSection):
    """Writing new instructions: Self-Instruct's temperature 0.7 and top_p 0.5 (presence_penalty 2 is not
    sent: the engine speaks the common subset of the API, and `kdlm serve` ignores penalties)."""

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.5, gt=0, le=1)
    max_tokens: int = Field(1024, ge=1)


class Greedy(SamplingSection):
    """Labels, instances and judgements: temperature 0 (Self-Instruct's classification and instance steps)."""

    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(350, ge=1)


class Short(Greedy):
    """A one-word verdict (yes/no, equal/not equal)."""

    max_tokens: int = Field(8, ge=1)


class Answer(SamplingSection):
    """The teacher (or student) answering an instruction."""

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)


class Referee(SamplingSection):
    """Lion's referee: temperature 0.2."""

    temperature: float = Field(0.2, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
