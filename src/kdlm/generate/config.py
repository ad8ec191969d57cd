"""The typed config of `kdlm generate`: a YAML file plus dotted `key=value` overrides."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from kdlm.config import Section, load_yaml_model
from kdlm.generate.recipe_settings import RECIPES, RecipeSettings
from kdlm.generate.sections import LimitsSection, Price, SamplingSection, TeacherSection

__all__ = ["GenerateConfig", "LimitsSection", "Price", "SamplingSection", "TeacherSection", "load_generate_config"]


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
    recipe: RecipeSettings | None = Field(
        None, description="A black-box recipe run instead of answering `prompts` once: recipe.name (self_instruct, "
        "evol_instruct, lion, cot, icl: a module of kdlm.recipes) and that recipe's settings "
        "(kdlm.generate.recipe_settings)."
    )

    @field_validator("recipe", mode="before")
    @classmethod
    def _known_recipe(cls, value):
        """Name the recipes when `recipe.name` is missing or unknown (the union would only list its tags)."""
        if value is not None and not isinstance(value, BaseModel):
            name = value.get("name") if isinstance(value, dict) else None
            if name not in RECIPES:
                raise ValueError(f"recipe.name must name a recipe (one of {', '.join(RECIPES)}), got {name!r}")
        return value


def load_generate_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> GenerateConfig:
    """Read a generate config (YAML) and apply `key=value` overrides; errors name the key and the file."""
    return load_yaml_model(GenerateConfig, path, overrides, sections="sections (prompts, output, teacher, sampling, limits)",
                           example="sampling.n=4")
