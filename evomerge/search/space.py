"""The search space (space.yaml): what is searched, how candidates are scored, how the study runs.

A space turns numbers into recipes: `SearchSpace.dimensions(method)` lists the continuous
dimensions of one method (named `method.model.param.filter.point`), and
`SearchSpace.recipe(method, values)` builds the mergekit recipe those values mean. Samplers only
ever see named numbers in [low, high]; the engine only ever sees recipes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import SpaceError
from evomerge.methods import registry
from evomerge.methods.registry import BasePolicy, Scope
from evomerge.recipe import Recipe, format_validation_error

# Parameters worth searching, with default ranges; anything else keeps the method's default.
DEFAULT_RANGES: dict[str, tuple[float, float, bool]] = {  # name -> (low, high, log scale)
    "weight": (0.0, 1.0, False),
    "density": (0.1, 1.0, False),
    "lambda": (0.5, 1.5, False),
    "t": (0.0, 1.0, False),
    "gamma": (0.0, 0.1, False),
    "epsilon": (0.05, 0.95, False),  # della: a fraction of the room density leaves, see _della_epsilon
    "select_topk": (0.1, 1.0, False),
    "r": (0.0, 0.5, False),
    "alpha": (0.0, 0.5, False),
}
NEARSWAP_T = (1e-4, 1e-1, True)
SAMPLERS = ("cmaes", "tpe", "random", "nsga2")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    name: str
    path: str


class Range(_Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low must be below high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


class TaskEntry(_Strict):
    task: Literal["gsm8k", "mmlu", "humaneval"]
    metric: Literal["accuracy", "gold_loglik"] = "gold_loglik"
    weight: float = 1.0
    size: int = Field(32, ge=1)
    num_fewshot: int = Field(0, ge=0)
    max_gen_toks: Optional[int] = Field(None, ge=1)
    subjects: Optional[list[str]] = None


class HeldoutEntry(_Strict):
    task: Literal["gsm8k", "mmlu", "humaneval"]
    metric: Literal["accuracy", "gold_loglik"] = "accuracy"
    size: int = Field(32, ge=1)
    num_fewshot: int = Field(0, ge=0)
    max_gen_toks: Optional[int] = Field(None, ge=1)


class Stacking(_Strict):
    """Layer stacking: `slots` output blocks of `block` layers, each filled from any source's
    layer range (passthrough slices); the output has slots * block layers."""

    slots: int = Field(ge=1)
    block: int = Field(ge=1)


class Pruning(_Strict):
    enabled: bool = True
    first_rung: float = Field(0.34, gt=0, lt=1)  # fraction of every task's items scored first
    quantile: float = Field(0.25, gt=0, lt=1)  # pruned when the first rung is below this quantile
    min_trials: int = Field(6, ge=1)  # trials through the first rung before anything is pruned


class SpaceConfig(_Strict):
    name: Optional[str] = None
    models: list[Union[str, ModelEntry]] = Field(min_length=1)
    base_model: Optional[str] = None
    methods: Union[str, list[str]] = "task_arithmetic"
    parameters: dict[str, Range] = Field(default_factory=dict)
    layer_schedule: int = Field(1, ge=1, le=16)  # control points per parameter (1 = one global value)
    filters: bool = False  # separate schedules for self_attn and mlp weights
    stacking: Optional[Stacking] = None
    tasks: list[TaskEntry] = Field(min_length=1)
    heldout: Optional[list[HeldoutEntry]] = None
    objective: Literal["weighted_sum", "multi"] = "weighted_sum"
    sampler: Literal["cmaes", "tpe", "random", "nsga2"] = "cmaes"
    n_trials: Optional[int] = Field(None, ge=1)
    timeout: Optional[float] = Field(None, gt=0)  # seconds
    seed: int = 0
    device: str = "auto"
    dtype: Optional[str] = "bfloat16"
    out_dtype: Optional[str] = None
    batch_size: Union[Literal["auto"], int] = "auto"  # auto: largest that fits on a GPU, 8 on a CPU
    storage: Optional[str] = None
    pruning: Pruning = Field(default_factory=Pruning)
    results_dir: str = "results"

    @field_validator("methods")
    @classmethod
    def _methods(cls, value):
        methods = [value] if isinstance(value, str) else list(value)
        known = registry.names()
        for name in methods:
            if name not in known:
                raise ValueError(f"unknown merge method {name!r}; known: {', '.join(known)}")
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice")
        return methods

    @model_validator(mode="after")
    def _consistent(self) -> "SpaceConfig":
        if self.n_trials is None and self.timeout is None:
            raise ValueError("n_trials or timeout: give at least one, or the search never stops")
        if self.objective == "multi" and self.sampler == "cmaes":
            raise ValueError("sampler: cmaes optimises one objective; use nsga2, tpe or random with objective: multi")
        if self.objective == "multi" and len(self.tasks) < 2:
            raise ValueError("objective: multi needs at least two tasks")
        names = [m.name if isinstance(m, ModelEntry) else m for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        for name in self.parameters:
            if name not in DEFAULT_RANGES and name != "nearswap_t":
                raise ValueError(f"parameters.{name}: not a searchable parameter ({', '.join(DEFAULT_RANGES)})")
        tasks = [t.task for t in self.tasks]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: each task once, got {tasks}")
        if self.stacking is not None and self.methods != ["passthrough"]:
            raise ValueError("stacking: layer stacking searches passthrough slices; set methods: passthrough")
        if self.methods == ["passthrough"] and self.stacking is None:
            raise ValueError("methods: passthrough is searched through stacking: give stacking: {slots, block}")
        return self


@dataclass(frozen=True)
class Dimension:
    """One searched number: its Optuna name, range, and where it goes in the recipe."""

    name: str
    low: float
    high: float
    log: bool
    param: str
    model: str | None  # None for shared parameters
    filter: str | None  # self_attn | mlp | None (everything else)
    point: int


class SearchSpace:
    """space.yaml, validated, with model paths resolved."""

    def __init__(self, config: SpaceConfig, source: Path | None = None):
        self.config = config
        self.source = source
        here = source.parent if source else Path.cwd()
        self.models: dict[str, str] = {}
        for entry in config.models:
            name, path = (entry.name, entry.path) if isinstance(entry, ModelEntry) else (Path(entry).name, entry)
            self.models[name] = _resolve(path, here)
        base = config.base_model
        if base is not None:
            # base_model may name an entry of `models` or be a path of its own
            self.base = self.models[base] if base in self.models else _resolve(base, here)
        else:
            self.base = None
        self.name = config.name or (source.stem if source else "study")
        self.uses_demo_family = any(
            (m if isinstance(m, str) else m.path).startswith(DEMO_PREFIX) for m in config.models
        ) or (config.base_model or "").startswith(DEMO_PREFIX)
        for method in config.methods:
            if method == "passthrough":
                continue
            spec = registry.get(method)
            if spec.base is BasePolicy.REQUIRED and self.base is None:
                raise SpaceError(f"{self._where}base_model: method '{method}' needs a base_model")
            uses_base = spec.base is not BasePolicy.IGNORED and self.base is not None
            count = len(self.models) + (1 if uses_base and self.base not in self.models.values() else 0)
            if method == "slerp":
                count = 2 if uses_base and len(self.non_base_models()) == 1 else count
            problem = spec.check_inputs(count, uses_base, "models")
            if problem:
                raise SpaceError(f"{self._where}{problem}")

    @property
    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchSpace":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SpaceError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SpaceError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Any, source: Path | None = None) -> "SearchSpace":
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise SpaceError(f"{where}a search space is a YAML mapping")
        try:
            config = SpaceConfig.model_validate(data)
        except ValidationError as exc:
            raise SpaceError(f"{where}{format_validation_error(exc)}") from None
        return cls(config, source)

    # ------------------------------------------------------------------ structure

    @property
    def methods(self) -> list[str]:
        return list(self.config.methods)

    def non_base_models(self) -> list[str]:
        return [name for name, path in self.models.items() if path != self.base]

    def inputs(self, method: str) -> list[str]:
        """Model names taking part in a method's recipe (the base, when separate, is implicit)."""
        return list(self.models)

    def _range(self, param: str, method: str) -> tuple[float, float, bool]:
        if method == "nearswap" and param == "t":
            custom = self.config.parameters.get("nearswap_t")
            return (custom.low, custom.high, custom.log) if custom else NEARSWAP_T
        custom = self.config.parameters.get(param)
        return (custom.low, custom.high, custom.log) if custom else DEFAULT_RANGES[param]

    def dimensions(self, method: str) -> list[Dimension]:
        """The continuous dimensions of one method, in a fixed order."""
        if method == "passthrough":
            return self._stacking_dimensions()
        spec = registry.get(method)
        filters = ("self_attn", "mlp", None) if self.config.filters else (None,)
        points = self.config.layer_schedule
        dims: list[Dimension] = []
        for param in spec.params:
            if param.name not in DEFAULT_RANGES or param.type is not float:
                continue
            if param.name == "density" and spec.options.get("sparsify", "n/a") is None:
                continue  # task_arithmetic takes a density but never drops anything
            low, high, log = self._range(param.name, method)
            owners: list[str | None]
            if param.scope is Scope.SHARED:
                owners = [None]
            else:
                owners = [name for name in self.inputs(method) if not (
                    param.scope is Scope.NON_BASE and self.models[name] == self.base)]
            per_layer = param.name in ("weight", "density", "t", "gamma")
            for owner in owners:
                for flt in (filters if per_layer else (None,)):
                    for point in range(points if per_layer else 1):
                        name = ".".join([method, owner or "all", param.name, flt or "rest", str(point)])
                        dims.append(Dimension(name, low, high, log, param.name, owner, flt, point))
        return dims

    def _stacking_dimensions(self) -> list[Dimension]:
        stacking = self.config.stacking
        dims = []
        for slot in range(stacking.slots):
            # which model fills the slot, and where its block starts (as a fraction of the room)
            dims.append(Dimension(f"passthrough.slot{slot}.model", 0.0, 1.0, False, "model", None, None, slot))
            dims.append(Dimension(f"passthrough.slot{slot}.start", 0.0, 1.0, False, "start", None, None, slot))
        return dims

    # ------------------------------------------------------------------ recipes

    def recipe(self, method: str, values: dict[str, float], model_layers: dict[str, int] | None = None) -> Recipe:
        """The mergekit recipe that the values of one method's dimensions mean."""
        config = self.config
        common = {"merge_method": method, "dtype": config.dtype}
        if config.out_dtype:
            common["out_dtype"] = config.out_dtype
        if method == "passthrough":
            return Recipe.from_dict({**common, "slices": self._stack_slices(values, model_layers or {})})
        dims = self.dimensions(method)
        settings: dict[tuple[str | None, str], dict] = {}
        for dim in dims:
            key = (dim.model, dim.param)
            settings.setdefault(key, {}).setdefault(dim.filter, []).append(values[dim.name])
        per_model: dict[str, dict[str, Any]] = {name: {} for name in self.inputs(method)}
        shared: dict[str, Any] = {}
        for (owner, param), by_filter in settings.items():
            setting = _setting(by_filter)
            (per_model[owner] if owner else shared)[param] = setting
        if method in ("della", "della_linear"):
            for name, params in per_model.items():
                if "epsilon" in params:
                    params["epsilon"] = _della_epsilon(params["epsilon"], params.get("density", 1.0))
        if method == "slerp":
            models = [{"model": self.base}, {"model": self.models[self.non_base_models()[0]]}]
        else:
            models = []
            for name in self.inputs(method):
                entry: dict[str, Any] = {"model": self.models[name]}
                if per_model[name]:
                    entry["parameters"] = per_model[name]
                models.append(entry)
        recipe: dict[str, Any] = {**common, "models": models}
        if registry.get(method).base is not BasePolicy.IGNORED and self.base:
            recipe["base_model"] = self.base
        if shared:
            recipe["parameters"] = shared
        return Recipe.from_dict(recipe)

    def _stack_slices(self, values: dict[str, float], model_layers: dict[str, int]) -> list[dict]:
        stacking = self.config.stacking
        names = list(self.models)
        slices = []
        for slot in range(stacking.slots):
            name = names[min(len(names) - 1, int(values[f"passthrough.slot{slot}.model"] * len(names)))]
            path = self.models[name]
            layers = model_layers.get(path)
            if layers is None:
                raise SpaceError(f"stacking: layer count of model '{name}' unknown")
            room = layers - stacking.block
            if room < 0:
                raise SpaceError(f"stacking.block: {stacking.block} layers, but model '{name}' has {layers}")
            start = round(values[f"passthrough.slot{slot}.start"] * room)
            slices.append({"sources": [{"model": path, "layer_range": [start, start + stacking.block]}]})
        return slices

    def default_values(self, method: str) -> dict[str, float]:
        """A sensible first candidate: the middle of every range (geometric middle for log ranges)."""
        return {d.name: (math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2) for d in self.dimensions(method)}


def _setting(by_filter: dict[str | None, list[float]]) -> Any:
    """Control points -> scalar or gradient; with filters, a filter list (catch-all last)."""

    def value(points: list[float]) -> Any:
        rounded = [round(v, 6) for v in points]
        return rounded[0] if len(rounded) == 1 else rounded

    if list(by_filter) == [None]:
        return value(by_filter[None])
    items = [{"filter": flt, "value": value(points)} for flt, points in by_filter.items() if flt]
    items.append({"value": value(by_filter[None])})
    return items


def _della_epsilon(fraction: Any, density: Any) -> float:
    """DELLA needs density ± epsilon inside (0, 1) at every layer: epsilon is searched as a
    fraction of the smallest room any density value leaves."""
    from evomerge.recipe import setting_leaves

    fraction = fraction if isinstance(fraction, float) else list(setting_leaves(fraction))[0]
    rooms = [min(d, 1 - d) for d in setting_leaves(density) if d < 1]
    room = min(rooms) if rooms else 0.5
    return round(max(1e-4, fraction * room * 0.999), 6)


DEMO_PREFIX = "demo-family:"


def demo_member_path(member: str) -> str:
    """Where the demo family keeps a member (built on first use by the search, not here)."""
    from evomerge.demo.family import FamilyRecipe, member_dir
    from evomerge.demo.smollm2 import base_dir

    if member == "base":
        return str(base_dir())
    recipe = FamilyRecipe()
    specs = {s.name: s for s in recipe.specialists}
    if member not in specs:
        raise SpaceError(f"{DEMO_PREFIX}{member}: the demo family has base, {', '.join(specs)}")
    return str(member_dir(specs[member], recipe))


def _resolve(path: str, here: Path) -> str:
    """Relative model paths in space.yaml are relative to the file; hub ids stay as they are;
    `demo-family:<member>` names a member of the built-in demo family."""
    if path.startswith(DEMO_PREFIX):
        return demo_member_path(path[len(DEMO_PREFIX):])
    candidate = (here / path).expanduser()
    if not Path(path).is_absolute() and candidate.exists():
        return str(candidate.resolve())
    if Path(path).expanduser().exists():
        return str(Path(path).expanduser().resolve())
    return path
