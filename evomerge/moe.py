"""The MoE config: mergekit-moe 0.1.5's configuration, validated and round-tripped as YAML.

A mixture of experts takes attention, norms and embeddings from `base_model` and each expert's MLP
from one source; each layer's router row for an expert comes from its prompts (`gate_mode`:
`hidden` — the base's hidden states over the prompts, `cheap_embed` — their mean token embedding,
`random`, `uniform_random`). `mergekit-moe CONFIG OUT` accepts every config this module writes that
uses mergekit's fields alone. Two fields are evomerge's own (mergekit ignores unknown keys, so it
would silently build something else: a config using them says so in its comment line):

  - `experts[].recipe`: the expert is a merge recipe (mergekit YAML) materialised first, instead
    of a `source_model`;
  - `experts[].gate_scale`: a scale on the expert's router row, a scalar or a gradient over the
    layers (piecewise-linear, as recipe gradients are).

This module owns the format; `evomerge.engine.moe` builds the model it describes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.device import DTYPES
from evomerge.errors import RecipeError
from evomerge.recipe import Recipe, RecipeDumper, format_validation_error, normalize_setting
from evomerge.userfile import UserFileError, parse_yaml, read_text

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last")
PROMPTED = tuple(m for m in GATE_MODES if m not in ("random", "uniform_random"))  # modes that read prompts
EXTENSIONS = ("recipe", "gate_scale")  # Expert fields mergekit-moe does not have


class MoEConfigError(RecipeError):
    """A MoE config is malformed or asks for something impossible (the message names the field)."""


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source_model: Optional[str] = None
    recipe: Optional[Recipe] = None  # evomerge: an expert that is a merge recipe
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None
    gate_scale: Optional[Union[float, list[float]]] = None  # evomerge: router-row scale over the layers

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe(cls, value):
        if value is None or isinstance(value, Recipe):
            return value
        try:
            return Recipe.from_dict(value, source="recipe", strict=True)
        except RecipeError as exc:
            raise ValueError(str(exc).removeprefix("recipe: ")) from None

    @field_validator("gate_scale")
    @classmethod
    def _gate_scale(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("a gradient needs at least one value")
        return normalize_setting(value) if value is not None else None

    @model_validator(mode="after")
    def _one_source(self) -> "Expert":
        if (self.source_model is None) == (self.recipe is None):
            raise ValueError("give source_model or recipe (exactly one)")
        return self

    @property
    def key(self) -> str:
        """What the expert's weights are: its model reference, or its recipe's YAML."""
        return self.source_model if self.source_model is not None else self.recipe.to_yaml()

    def models(self) -> list[str]:
        return [self.source_model] if self.source_model is not None else self.recipe.referenced_models()

    def renamed(self, mapping: dict[str, str]) -> "Expert":
        data = self.model_dump(exclude_none=True, exclude={"recipe"})
        if self.source_model is not None:
            data["source_model"] = mapping.get(self.source_model, self.source_model)
        else:
            data["recipe"] = self.recipe.with_models(mapping)
        return Expert(**data)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True, exclude={"recipe"}, mode="json")
        if self.recipe is not None:
            data = {"recipe": self.recipe.to_dict(), **data}
        return data


class MoEConfig(BaseModel):
    """mergekit-moe's config (MoEMergeConfig), with the checks mergekit-moe makes before building."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal[GATE_MODES] = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value):
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "MoEConfig":
        if self.experts_per_token < 1:
            raise ValueError("experts_per_token: must be at least 1")
        if self.experts_per_token > len(self.experts):
            raise ValueError(f"experts_per_token: {self.experts_per_token} is more than the {len(self.experts)} "
                             "experts; a token cannot be routed to more experts than there are")
        if self.gate_mode in PROMPTED:
            for i, expert in enumerate(self.experts):
                if not expert.positive_prompts or not any(p.strip() for p in expert.positive_prompts):
                    raise ValueError(f"experts.{i}.positive_prompts: gate_mode {self.gate_mode} computes each "
                                     "expert's router row from its prompts; give at least one")
            sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts or [])) for e in self.experts}
            if len(sets) == 1:  # (mergekit-moe refuses this too, one expert included)
                raise ValueError("experts: every expert has the same prompts, so the router cannot tell them "
                                 "apart; give each the prompts that should reach it" if len(self.experts) > 1 else
                                 "experts: one expert gets every token; a MoE needs at least two")
        if len(self.experts) > 1 and len({e.key for e in self.experts}) == 1:
            raise ValueError("experts: every expert is the same model, so the MoE computes what that model "
                             "computes at a higher cost; give experts of different sources")
        shared = self.shared_experts or []
        if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
            raise ValueError("shared_experts: give prompts to every shared expert or to none")
        return self

    # ----------------------------------------------------------------- structure

    @property
    def routed_by_prompts(self) -> bool:
        return self.gate_mode in PROMPTED

    def gated_shared(self) -> list[Expert]:
        """Shared experts that get a router row (mergekit: when they have prompts, or gates are random)."""
        shared = self.shared_experts or []
        if any(e.positive_prompts for e in shared) or not self.routed_by_prompts:
            return list(shared)
        return []

    def all_experts(self) -> list[tuple[str, Expert]]:
        """(field path, expert) for every routed and shared expert."""
        return ([(f"experts.{i}", e) for i, e in enumerate(self.experts)]
                + [(f"shared_experts.{i}", e) for i, e in enumerate(self.shared_experts or [])])

    def referenced_models(self) -> list[str]:
        """Every model the MoE reads, base first, each once."""
        seen = {self.base_model: None}
        for _, expert in self.all_experts():
            seen.update(dict.fromkeys(expert.models()))
        return list(seen)

    def with_models(self, mapping: dict[str, str]) -> "MoEConfig":
        data = self.model_dump(exclude_none=True, exclude={"experts", "shared_experts"})
        data["base_model"] = mapping.get(self.base_model, self.base_model)
        data["experts"] = [e.renamed(mapping) for e in self.experts]
        if self.shared_experts is not None:
            data["shared_experts"] = [e.renamed(mapping) for e in self.shared_experts]
        return MoEConfig(**data)

    def uses_extensions(self) -> bool:
        return any(getattr(e, f) is not None for _, e in self.all_experts() for f in EXTENSIONS)

    # ----------------------------------------------------------------- YAML

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "moe config") -> "MoEConfig":
        if not isinstance(data, dict):
            raise MoEConfigError(f"{source}: a MoE config is a YAML mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise MoEConfigError(f"{source}: {format_validation_error(exc)}") from None

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "moe config") -> "MoEConfig":
        try:
            data = parse_yaml(text)
        except UserFileError as exc:
            raise MoEConfigError(f"{source}: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MoEConfig":
        path = Path(path)
        try:
            text = read_text(path)
        except UserFileError as exc:
            raise MoEConfigError(f"{path}: MoE config {exc}") from None
        return cls.from_yaml(text, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"base_model": self.base_model, "gate_mode": self.gate_mode}
        if self.architecture:
            data["architecture"] = self.architecture
        if self.dtype:
            data["dtype"] = self.dtype
        data["experts_per_token"] = self.experts_per_token
        data["experts"] = [e.to_dict() for e in self.experts]
        if self.shared_experts is not None:
            data["shared_experts"] = [e.to_dict() for e in self.shared_experts]
        return data

    def to_yaml(self) -> str:
        text = yaml.dump(self.to_dict(), Dumper=RecipeDumper, sort_keys=False, allow_unicode=True)
        if self.uses_extensions():
            text = ("# evomerge MoE config: experts[].recipe / gate_scale are evomerge's; "
                    "build it with `evomerge moe`\n" + text)
        return text

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    @property
    def merge_method(self) -> str:
        """What a trial record calls this candidate's method."""
        return "moe"


Candidate = Union[Recipe, MoEConfig]


def is_moe(data: Any) -> bool:
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data


def load_candidate(text: str, *, source: str = "recipe") -> Candidate:
    """A trial's candidate from its YAML: a mergekit recipe, or a MoE config (it has `experts`)."""
    try:
        data = parse_yaml(text)
    except UserFileError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    return MoEConfig.from_dict(data, source=source) if is_moe(data) else Recipe.from_dict(data, source=source)
