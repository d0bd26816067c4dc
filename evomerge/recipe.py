"""The recipe: mergekit's merge configuration, validated, resolved and round-tripped as YAML.

This is the hinge of evomerge. The search writes recipes, the engine reads them, the reporter
saves them, and `mergekit-yaml` accepts every recipe this module writes.

A parameter setting is one of
  - a scalar:                     `weight: 0.5`
  - a gradient (list of scalars): `t: [0, 0.5, 1]`, piecewise-linear over the layers of a slice
  - a filter list:                `t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]`,
                                  substring match on the tensor name, first match wins.
Precedence (highest first): the source's own parameters, the slice's, the recipe's global.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.device import DTYPES
from evomerge.errors import RecipeError
from evomerge.methods import registry
from evomerge.userfile import UserFileError, parse_yaml, read_text

Scalar = Union[bool, int, float, str]
log = logging.getLogger(__name__)
CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


def chat_template_names() -> list[str]:
    """The named chat templates a recipe may give (`chat_template: chatml`), as mergekit names them."""
    return sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja"))


def _named_template(value: str) -> Optional[Path]:
    """The file of a named chat template (a name has no braces and no line breaks), or None."""
    file = CHAT_TEMPLATES / f"{value}.jinja"
    return file if "{" not in value and "\n" not in value and "/" not in value and file.is_file() else None


def chat_template_text(value: Optional[str]) -> Optional[str]:
    """The Jinja text a recipe's `chat_template` stands for: a named template's file, or the text
    itself; None for none and for 'auto' (chosen from the sources when the checkpoint is written)."""
    if value is None or value == "auto":
        return None
    named = _named_template(value)
    return named.read_text(encoding="utf-8") if named else value


# --------------------------------------------------------------------------- settings


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def normalize_setting(value: Any) -> Any:
    """Checks the shape of a parameter setting and returns it as plain YAML data."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    if _is_scalar(value):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"value", "filter"}
        if "value" not in value or unknown:
            raise ValueError("a conditional setting is {filter: <substring>, value: <scalar or list>}")
        inner = value["value"]
        if not (_is_scalar(inner) or (isinstance(inner, list) and inner and all(map(_is_scalar, inner)))):
            raise ValueError("a conditional value must be a scalar or a list of scalars")
        inner = normalize_setting(inner)
        flt = value.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise ValueError("filter must be a string")
        return {"filter": flt, "value": inner} if flt is not None else {"value": inner}
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list is not a setting")
        if all(map(_is_scalar, value)):
            return [normalize_setting(v) for v in value]
        if all(isinstance(v, dict) for v in value):
            return [normalize_setting(v) for v in value]
        raise ValueError("a list must hold only scalars (a gradient) or only {filter, value} items")
    raise ValueError(f"unsupported setting {value!r}")


def evaluate_setting(setting: Any, tensor_name: str, t: float, coerce: Callable[[Any], Any]) -> Any:
    """Value of a setting for one tensor at relative layer position t in [0, 1].

    Returns None when a filter list has no matching entry, so a lower-precedence scope decides.
    """
    if _is_scalar(setting):
        return coerce(setting)
    if isinstance(setting, dict):
        setting = [setting]
    if all(map(_is_scalar, setting)):
        values = [coerce(v) for v in setting]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        lo = int(scaled)
        hi = min(len(values) - 1, lo + 1)
        frac = scaled - lo
        return coerce((1 - frac) * values[lo] + frac * values[hi])
    for item in setting:
        flt = item.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(item["value"], tensor_name, t, coerce)
    return None


def setting_leaves(setting: Any) -> Iterator[Any]:
    """Every scalar a setting can evaluate to (gradient endpoints and filter values)."""
    if _is_scalar(setting):
        yield setting
    elif isinstance(setting, dict):
        yield from setting_leaves(setting["value"])
    else:
        for item in setting:
            yield from setting_leaves(item)


Parameters = Optional[dict[str, Any]]


def _check_parameters(value: Parameters) -> Parameters:
    if value is None:
        return None
    out = {}
    for key, setting in value.items():
        try:
            out[key] = normalize_setting(setting)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return out


def _single_module(data: dict, source: str) -> dict:
    """`modules: {default: {slices|models, parameters}}` (mergekit's multi-module syntax with the one
    module a decoder-only model has) is the same recipe with the module's keys at the top. Other
    modules (vision towers, encoders) are refused."""
    modules = data["modules"]
    if not (isinstance(modules, dict) and set(modules) == {"default"} and isinstance(modules["default"], dict)):
        names = ", ".join(map(str, modules)) if isinstance(modules, dict) else repr(modules)
        raise RecipeError(f"{source}: modules: only the `default` module of a decoder-only model is supported, "
                          f"got {names}")
    module = modules["default"]
    unknown = set(module) - {"slices", "models", "parameters"}
    if unknown:
        raise RecipeError(f"{source}: modules.default.{sorted(unknown)[0]}: not a module key (slices, models, parameters)")
    for key in ("slices", "models"):
        if key in module and key in data:
            raise RecipeError(f"{source}: {key}: given both at the top and in modules.default")
    shared = set(module.get("parameters") or {}) & set(data.get("parameters") or {})
    if shared:
        raise RecipeError(f"{source}: modules.default.parameters.{sorted(shared)[0]}: also set in the top-level "
                          "parameters; set it in one place")
    lifted = {k: v for k, v in data.items() if k != "modules"}
    lifted.update({k: v for k, v in module.items() if k != "parameters"})
    if module.get("parameters"):
        lifted["parameters"] = {**(data.get("parameters") or {}), **module["parameters"]}
    return lifted


def _ignored_condition_keys(data: dict, source: str, strict: bool) -> dict:
    """Keys of a conditional setting other than `filter` and `value` (`pattern:`, an old spelling of
    `filter:` in mergekit's own examples): mergekit ignores them, so the entry applies to every
    tensor. Dropped with a warning that says so, or refused when `strict`."""

    def scopes():
        yield "parameters", data.get("parameters")
        for i, entry in enumerate(data.get("models") or []):
            if isinstance(entry, dict):
                yield f"models.{i}.parameters", entry.get("parameters")
        for i, out_slice in enumerate(data.get("slices") or []):
            if isinstance(out_slice, dict):
                yield f"slices.{i}.parameters", out_slice.get("parameters")
                for j, entry in enumerate(out_slice.get("sources") or []):
                    if isinstance(entry, dict):
                        yield f"slices.{i}.sources.{j}.parameters", entry.get("parameters")

    data = copy.deepcopy(data)
    for where, params in scopes():
        for name, setting in (params.items() if isinstance(params, dict) else ()):
            items = setting if isinstance(setting, list) else [setting]
            for k, item in enumerate(items):
                if not (isinstance(item, dict) and "value" in item):
                    continue
                for key in sorted(set(item) - {"value", "filter"}):
                    location = f"{where}.{name}" + (f".{k}" if isinstance(setting, list) else "") + f".{key}"
                    if strict:
                        raise RecipeError(f"{source}: {location}: not a key of a conditional setting "
                                          "(mergekit ignores it, so the entry applies to every tensor; did you mean "
                                          "filter?)")
                    log.warning("%s: %s: not a key of a conditional setting; ignored, as mergekit ignores it, so "
                                "this entry applies to every tensor (did you mean filter? --strict refuses it)",
                                source, location)
                    del item[key]
    return data


# --------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("parameters", check_fields=False)
    @classmethod
    def _parameters(cls, value: Parameters) -> Parameters:
        return _check_parameters(value)


class InputModel(_Strict):
    model: str
    parameters: Parameters = None


class InputSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got [{start}, {end}]")
        return value

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: Optional[str] = None
    residual_weight: Optional[float] = None
    parameters: Parameters = None

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.num_layers for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return self

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers


class ModelToken(_Strict):
    """A token's embedding taken from one model's row for a token (by text or id)."""

    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = Field(None, ge=0)
    token: Optional[str] = None

    @model_validator(mode="after")
    def _one_token(self) -> "ModelToken":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token or token_id")
        return self


class ZeroToken(_Strict):
    kind: Literal["zero"]


class TokenSetting(_Strict):
    """Where one output token's embedding comes from (mergekit's TokenEmbeddingConfig): a model's
    row for that token, another token's row, zeros; `force` applies it to every model."""

    source: Union[ModelToken, ZeroToken, str, None] = None
    force: bool = False

    @model_validator(mode="after")
    def _forced_source(self) -> "TokenSetting":
        if self.force and self.source is None:
            raise ValueError("force: true needs a source")
        return self


VOCABULARY_KINDS = ("union", "base")  # tokenizer sources that are not a model


class TokenizerSetting(_Strict):
    """mergekit's `tokenizer:` block: the output vocabulary, per-token embedding sources, padding."""

    source: str = "union"  # "union", "base", or a model (in the recipe or not)
    tokens: Optional[dict[str, TokenSetting]] = None
    pad_to_multiple_of: Optional[int] = Field(None, ge=1)

    def renamed(self, rename: Callable[[str], str]) -> "TokenizerSetting":
        """The same setting with the models it names passed through `rename`."""
        data = self.model_dump(exclude_none=True)
        if self.source not in VOCABULARY_KINDS:
            data["source"] = rename(self.source)
        for token in (data.get("tokens") or {}).values():
            if isinstance(token.get("source"), str):
                token["source"] = rename(token["source"])
            elif isinstance(token.get("source"), dict) and "model" in token["source"]:
                token["source"]["model"] = rename(token["source"]["model"])
        return TokenizerSetting.model_validate(data)


def tokenizer_setting(source: Optional[str], block: Optional[TokenizerSetting]) -> Optional[TokenizerSetting]:
    """What `tokenizer_source: X` or a `tokenizer:` block asks for (`tokenizer_source: X` is
    `tokenizer: {source: X}`), as recipes and space.yaml write them; None when neither is given."""
    if source is not None and block is not None:
        raise ValueError("tokenizer: give tokenizer_source or a tokenizer block, not both (as mergekit)")
    return block if source is None else TokenizerSetting(source=source)


class Recipe(_Strict):
    """A mergekit merge configuration (the subset evomerge materialises: one module)."""

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None  # "union", "base" or a model: the `tokenizer:` block, in short
    tokenizer: Optional[TokenizerSetting] = None
    chat_template: Optional[str] = None

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        known = registry.names()
        if value not in known:
            raise ValueError(f"unknown merge method {value!r}; known: {', '.join(known)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value == "auto" or "{" in value and len(value) >= 20:
            return value
        if _named_template(value):
            return value
        raise ValueError(f"unknown chat template {value!r}: name one of {', '.join(chat_template_names())}, "
                         "give the Jinja text, or 'auto' (the sources' most common)")

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; choose from {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _structure(self) -> "Recipe":
        self.vocabulary()  # not both forms
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        method = registry.get(self.merge_method)
        if method.base is registry.BasePolicy.REQUIRED:
            if self.slices:
                for i, out_slice in enumerate(self.slices):
                    if not (out_slice.base_model or self.base_model):
                        raise ValueError(
                            f"slices.{i}: merge_method '{self.merge_method}' needs a base_model"
                        )
            elif not self.base_model:
                raise ValueError(f"base_model: merge_method '{self.merge_method}' needs a base_model")
        for location, key, setting in self.parameter_settings():
            param = method.param(key)
            if param is None:
                continue  # mergekit ignores parameters a method does not take; so do we (warned at load)
            for leaf in setting_leaves(setting):
                try:
                    value = param.coerce(leaf)
                except ValueError as exc:
                    raise ValueError(f"{location}.{key}: {exc}") from None
                problem = param.check(value) if param.check else None
                if problem:
                    raise ValueError(f"{location}.{key}: {problem}")
        return self

    # ----------------------------------------------------------------- queries

    def parameter_settings(self) -> Iterator[tuple[str, str, Any]]:
        """(location, name, setting) for every parameter written anywhere in the recipe."""
        for key, setting in (self.parameters or {}).items():
            yield "parameters", key, setting
        for i, entry in enumerate(self.models or []):
            for key, setting in (entry.parameters or {}).items():
                yield f"models.{i}.parameters", key, setting
        for i, out_slice in enumerate(self.slices or []):
            for key, setting in (out_slice.parameters or {}).items():
                yield f"slices.{i}.parameters", key, setting
            for j, source in enumerate(out_slice.sources):
                for key, setting in (source.parameters or {}).items():
                    yield f"slices.{i}.sources.{j}.parameters", key, setting

    def vocabulary(self) -> Optional[TokenizerSetting]:
        """The output vocabulary the recipe asks for (`tokenizer_source: X` is `tokenizer: {source: X}`),
        or None: the base model's tokenizer, every vocabulary equal."""
        return tokenizer_setting(self.tokenizer_source, self.tokenizer)

    def unknown_parameters(self) -> list[str]:
        method = registry.get(self.merge_method)
        return sorted(
            {f"{loc}.{key}" for loc, key, _ in self.parameter_settings() if method.param(key) is None}
        )

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, each once, in order of appearance."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for entry in self.models or []:
            seen.setdefault(entry.model, None)
        for out_slice in self.slices or []:
            if out_slice.base_model:
                seen.setdefault(out_slice.base_model, None)
            for source in out_slice.sources:
                seen.setdefault(source.model, None)
        return list(seen)

    def with_models(self, mapping: dict[str, str]) -> "Recipe":
        """The same recipe with model references replaced (`mapping`: old -> new; others kept)."""
        data = self.to_dict()
        rename = lambda ref: mapping.get(ref, ref)  # noqa: E731
        for holder in [data, *data.get("models", []), *data.get("slices", []),
                       *(s for out in data.get("slices", []) for s in out["sources"])]:
            for key in ("model", "base_model"):
                if isinstance(holder.get(key), str):
                    holder[key] = rename(holder[key])
        if self.tokenizer_source not in (None, *VOCABULARY_KINDS):
            data["tokenizer_source"] = rename(self.tokenizer_source)
        if self.tokenizer is not None:
            data["tokenizer"] = self.tokenizer.renamed(rename).model_dump(exclude_none=True)
        return Recipe.from_dict(data)

    # ----------------------------------------------------------------- YAML

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "recipe", strict: bool = False) -> "Recipe":
        """A validated recipe. Keys mergekit does not know (it ignores them silently: a misplaced
        `int8_mask`, a typo) are dropped with a warning naming each, or refused when `strict`."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
        if "modules" in data:
            data = _single_module(data, source)
        data = _ignored_condition_keys(data, source, strict)
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            extra = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
            if strict or len(extra) < len(exc.errors()):
                raise RecipeError(f"{source}: {format_validation_error(exc)}"
                                  + (" (mergekit would ignore it; without --strict it is dropped with a warning)"
                                     if strict and extra else "")) from None
            try:
                recipe = cls.model_validate(_without(data, extra))
            except ValidationError:  # not a recipe even without them: the unknown keys are the likely cause
                raise RecipeError(f"{source}: {format_validation_error(exc)}") from None
            for location in extra:
                log.warning("%s: %s: not a mergekit setting; ignored, as mergekit ignores it (--strict refuses it)",
                            source, ".".join(map(str, location)))
        if strict and recipe.unknown_parameters():
            raise RecipeError(f"{source}: {recipe.unknown_parameters()[0]}: not a parameter of {recipe.merge_method} "
                              "(mergekit would ignore it; without --strict it is dropped with a warning)")
        return recipe

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe", strict: bool = False) -> "Recipe":
        try:
            data = parse_yaml(text)
        except UserFileError as exc:
            raise RecipeError(f"{source}: {exc}") from None
        return cls.from_dict(data, source=source, strict=strict)

    @classmethod
    def load(cls, path: str | os.PathLike, *, strict: bool = False) -> "Recipe":
        path = Path(path)
        try:
            text = read_text(path)
        except UserFileError as exc:
            raise RecipeError(f"{path}: recipe {exc}") from None
        return cls.from_yaml(text, source=str(path), strict=strict)

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True, mode="json")
        for out_slice in data.get("slices", []):
            for source in out_slice["sources"]:
                source["layer_range"] = list(source["layer_range"])
        # mergekit's conventional key order, for humans reading the YAML.
        order = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template"]
        return {k: data[k] for k in order if k in data}

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=RecipeDumper, sort_keys=False, allow_unicode=True)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")


def _without(data: Any, locations: list[tuple]) -> Any:
    """A copy of `data` without the keys at `locations` (paths of keys and list indices)."""
    import copy

    data = copy.deepcopy(data)
    for location in locations:
        holder = data
        for step in location[:-1]:
            holder = holder[step]
        holder.pop(location[-1], None)
    return data


class RecipeDumper(yaml.SafeDumper):
    """Numeric lists (gradients, layer ranges) in flow style, as mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


RecipeDumper.add_representer(list, _represent_list)


def format_validation_error(exc: ValidationError) -> str:
    """Pydantic errors as 'field.path: message' lines joined with '; '."""
    parts = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{loc}: {message}" if loc else message)
    # Unions report one error per alternative; keep the first per location.
    seen: dict[str, str] = {}
    for part in parts:
        seen.setdefault(part.split(":", 1)[0], part)
    return "; ".join(seen.values())
