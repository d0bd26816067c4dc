"""Planning: recipe + layer layout -> one job per output tensor, all parameters resolved.

Pure and cheap (no tensors), so every structural error — a layer range past the end of a
model, a missing required parameter, a method given the wrong inputs — surfaces before any
arithmetic. Follows mergekit's planner: `models:` becomes one slice spanning every layer
(the base appended when absent), layer weights interpolate gradients at t = i / (n - 1)
within their slice, weights before the layers use the first slice and those after the last.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from evomerge.errors import RecipeError
from evomerge.methods import registry
from evomerge.methods.registry import BasePolicy, MergeMethod, Scope
from evomerge.recipe import InputSlice, OutputSlice, Recipe, evaluate_setting


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: random draws give the same result whatever order tensors run in."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps its weights: before the layers, in each layer, after."""

    layer_prefix: str  # e.g. "model.layers."
    layer_suffixes: tuple[str, ...]  # e.g. "self_attn.q_proj.weight"
    pre: tuple[str, ...]  # e.g. "model.embed_tokens.weight"
    post: tuple[str, ...]  # e.g. "model.norm.weight", "lm_head.weight" (untied)
    vocab: tuple[str, ...] = ()  # the tensors with a row per token: input embeddings, LM head (untied)

    def layer_name(self, layer: int, suffix: str) -> str:
        return f"{self.layer_prefix}{layer}.{suffix}"

    def names(self, num_layers: int) -> list[str]:
        layers = [self.layer_name(i, s) for i in range(num_layers) for s in self.layer_suffixes]
        return [*self.pre, *layers, *self.post]

    @classmethod
    def of(cls, model: nn.Module, num_layers: int) -> "Layout":
        """Reads the layout off a transformers model: its decoder layers are the ModuleList of
        `num_layers` entries holding the most parameters; tied weights appear once."""
        candidates = [
            (sum(p.numel() for p in module.parameters()), name)
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == num_layers
        ]
        if not candidates:
            raise RecipeError(f"cannot find the {num_layers} decoder layers in {type(model).__name__}")
        prefix = max(candidates)[1] + "."
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
        pre, post, suffixes = [], [], []
        seen_layer = False
        for name, _ in model.named_parameters():
            match = pattern.fullmatch(name)
            if match:
                seen_layer = True
                if match.group(1) == "0":
                    suffixes.append(match.group(2))
            else:
                (post if seen_layer else pre).append(name)
        by_id = {id(p): name for name, p in model.named_parameters()}
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        vocab = tuple(dict.fromkeys(by_id[id(m.weight)] for m in embeddings if m is not None and id(m.weight) in by_id))
        return cls(prefix, tuple(suffixes), tuple(pre), tuple(post), vocab)


@dataclass(frozen=True)
class Job:
    """Merge one output tensor from (model, tensor name) inputs with resolved parameters."""

    name: str
    sources: tuple[tuple[str, str], ...]
    base_index: int | None
    params: dict[str, Any]
    base_model: str | None = None  # the recipe's base here, even for a method that ignores it


@dataclass(frozen=True)
class Plan:
    method: MergeMethod
    num_layers: int
    layer_origin: tuple[tuple[str, int], ...]  # per output layer: (model, layer) of its first source
    jobs: tuple[Job, ...]


def plan_recipe(recipe: Recipe, layout: Layout, model_layers: dict[str, int]) -> Plan:
    """model_layers: number of layers of every model the recipe may reference."""
    method = registry.get(recipe.merge_method)
    for ref in recipe.referenced_models():
        if ref not in model_layers:
            raise RecipeError(f"model '{ref}' is not among the loaded sources: {', '.join(model_layers)}")
    slices = _as_slices(recipe, model_layers)
    for i, out_slice in enumerate(slices):
        _check_slice(recipe, method, out_slice, i, model_layers)

    jobs: list[Job] = []
    first, last = slices[0], slices[-1]
    for name in layout.pre:
        jobs.append(_job(recipe, method, first, name, [(s.model, name) for s in first.sources], 0.0, name))
    origin: list[tuple[str, int]] = []
    for out_slice in slices:
        n = out_slice.num_layers
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            out_layer = len(origin)
            origin.append((out_slice.sources[0].model, out_slice.sources[0].layer_range[0] + offset))
            for suffix in layout.layer_suffixes:
                out_name = layout.layer_name(out_layer, suffix)
                inputs = [(s.model, layout.layer_name(s.layer_range[0] + offset, suffix)) for s in out_slice.sources]
                jobs.append(_job(recipe, method, out_slice, out_name, inputs, t, out_name))
    # mergekit pairs the last slice's models with the first slice's input count.
    count = len(first.sources)
    for name in layout.post:
        inputs = [(s.model, name) for s in last.sources][:count]
        jobs.append(_job(recipe, method, last, name, inputs, 0.0, name))
    return Plan(method, len(origin), tuple(origin), tuple(jobs))


def _as_slices(recipe: Recipe, model_layers: dict[str, int]) -> list[OutputSlice]:
    if recipe.slices:
        return list(recipe.slices)
    sources = [
        InputSlice(model=m.model, layer_range=(0, model_layers[m.model]), parameters=m.parameters)
        for m in recipe.models
    ]
    if recipe.base_model and recipe.base_model not in {m.model for m in recipe.models}:
        sources.append(InputSlice(model=recipe.base_model, layer_range=(0, model_layers[recipe.base_model])))
    lengths = {s.model: s.num_layers for s in sources}
    if len(set(lengths.values())) > 1:
        raise RecipeError(
            f"models: all models must have the same number of layers to merge without slices, got {lengths}"
        )
    return [OutputSlice(sources=sources)]


def _check_slice(recipe: Recipe, method: MergeMethod, out_slice: OutputSlice, index: int, model_layers) -> None:
    where = f"slices.{index}" if recipe.slices else "models"
    models = [s.model for s in out_slice.sources]
    if len(set(models)) != len(models):
        raise RecipeError(f"{where}: a model appears twice among the inputs: {models}")
    for j, source in enumerate(out_slice.sources):
        available = model_layers[source.model]
        if source.layer_range[1] > available:
            raise RecipeError(
                f"{where}.sources.{j}.layer_range: [{source.layer_range[0]}, {source.layer_range[1]}) "
                f"exceeds model '{source.model}', which has {available} layers"
            )
    base = out_slice.base_model or recipe.base_model
    if base is not None and method.base is not BasePolicy.IGNORED and base not in models:
        raise RecipeError(f"{where}: base_model '{base}' is not among this slice's sources {models}")
    problem = method.check_inputs(len(models), base in models, where)
    if problem:
        raise RecipeError(problem)


def _job(
    recipe: Recipe,
    method: MergeMethod,
    out_slice: OutputSlice,
    out_name: str,
    inputs: list[tuple[str, str]],
    t: float,
    shared_name: str,
) -> Job:
    base = out_slice.base_model or recipe.base_model
    base_index = None
    if method.base is not BasePolicy.IGNORED and base is not None:
        base_index = next((i for i, (model, _) in enumerate(inputs) if model == base), None)

    def resolve(param: registry.Param, scopes: list, tensor_name: str, model: str | None) -> Any:
        for scope in scopes:
            if scope and param.name in scope:
                value = evaluate_setting(scope[param.name], tensor_name, t, param.coerce)
                if value is not None:
                    return value
        if param.required:
            who = f"model '{model}'" if model else "the recipe"
            raise RecipeError(
                f"parameters: {who} has no '{param.name}' for tensor {tensor_name} "
                f"(required by merge_method '{method.name}')"
            )
        return param.default

    shared_scopes = [out_slice.parameters, recipe.parameters]
    params: dict[str, Any] = {}
    for param in method.params:
        if param.scope is Scope.SHARED:
            params[param.name] = resolve(param, shared_scopes, shared_name, None)
            continue
        values = []
        for i, (model, in_name) in enumerate(inputs):
            if param.scope is Scope.NON_BASE and i == base_index:
                continue
            own = [s.parameters for s in out_slice.sources if s.model == model]
            values.append(resolve(param, [*own, *shared_scopes], in_name, model))
        params[param.name] = tuple(values)
    return Job(out_name, tuple(inputs), base_index, params, base)
