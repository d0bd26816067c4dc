"""The search space (space.yaml): what is searched, how candidates are scored, how the study runs.

A space turns numbers into recipes: `SearchSpace.dimensions(method)` lists the continuous
dimensions of one method (named by `trials.dimension_name`), and `SearchSpace.recipe(method,
values)` builds the mergekit recipe those values mean. Samplers only ever see named numbers in
[low, high]; the engine only ever sees recipes. What is searched, in what range and with what
constraints is the methods' own knowledge (`Param.search`, `MergeMethod.constrain`): the space
asks the registry and never names a method.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.demo.family import is_member_ref, member_path
from evomerge.errors import EvomergeError, SpaceError
from evomerge.evaluation import ACCURACY, GOLD, TaskRequest, runs_generated_code
from evomerge.evaluation.catalog import TaskError, for_paths
from evomerge.methods import registry
from evomerge.methods.registry import BasePolicy, MergeMethod, Param, Scope
from evomerge.moe import GATE_MODES, PROMPTED, MoEConfig
from evomerge.recipe import Recipe, TokenizerSetting, format_validation_error, tokenizer_setting
from evomerge.search.sampler import MULTI_OBJECTIVE_DEFAULT, SAMPLERS
from evomerge.search.soup import check_method, soup_recipe
from evomerge.trials import Dimension, check_study_name, dimension_name
from evomerge.userfile import UserFileError, load_yaml

MOE = "moe"  # what trials of a `moe:` search build, in place of a merge method


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/inf anywhere is a named error




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
    """A task the search scores: any lm-eval task (evomerge.evaluation.catalog); metric accuracy (the
    task's first metric), gold_loglik, or any metric the task declares, read through `filter`."""

    task: str = Field(min_length=1)
    metric: str = GOLD
    filter: Optional[str] = None
    weight: float = 1.0
    size: int = Field(32, ge=1)
    num_fewshot: int = Field(0, ge=0)
    max_gen_toks: Optional[int] = Field(None, ge=1)
    subjects: Optional[list[str]] = None


class HeldoutEntry(_Strict):
    task: str = Field(min_length=1)
    metric: str = ACCURACY
    filter: Optional[str] = None
    size: int = Field(32, ge=1)
    num_fewshot: int = Field(0, ge=0)
    max_gen_toks: Optional[int] = Field(None, ge=1)
    subjects: Optional[list[str]] = None


class Stacking(_Strict):
    """Layer stacking: `slots` output blocks of `block` layers, each filled from any source's
    layer range (passthrough slices); the output has slots * block layers."""

    slots: int = Field(ge=1)
    block: int = Field(ge=1)


class PromptSet(_Strict):
    positive: list[str] = Field(min_length=1)
    negative: Optional[list[str]] = None


class Count(_Strict):
    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "Count":
        if self.low > self.high:
            raise ValueError(f"low must not be above high, got [{self.low}, {self.high}]")
        return self


class GateScale(_Strict):
    """A searched scale on each expert's router row: `points` control points over the layers."""

    points: int = Field(1, ge=1, le=16)
    low: float = Field(0.5, gt=0)
    high: float = 2.0
    log: bool = True


class RecipeExpert(_Strict):
    """An expert that is a merge recipe (mergekit YAML naming models by their names in `models`)."""

    name: str
    recipe: dict[str, Any]


GateMode = Literal[GATE_MODES]


class MoEBlock(_Strict):
    """`moe:`: the search builds mixtures of experts (attention from base_model, each expert's MLP from
    one source or recipe, router rows from prompts) instead of merges."""

    experts: list[Union[str, RecipeExpert]] = Field(min_length=2)
    count: Optional[Count] = None  # experts per candidate, a subset chosen per trial (default: all)
    experts_per_token: Union[int, Count] = 2
    gate_mode: Union[GateMode, list[GateMode]] = "hidden"
    prompts: dict[str, PromptSet] = Field(default_factory=dict)  # the pool; each expert's own set by its name
    gate_scale: Optional[GateScale] = None
    architecture: Optional[str] = None
    # A shared expert every token passes through (a name in `models`; Qwen MoE needs one, gated by the
    # prompt set named after it).
    shared: Optional[str] = None

    @property
    def names(self) -> list[str]:
        return [e if isinstance(e, str) else e.name for e in self.experts]

    @property
    def modes(self) -> list[str]:
        return [self.gate_mode] if isinstance(self.gate_mode, str) else list(self.gate_mode)

    @property
    def per_token(self) -> Count:
        k = self.experts_per_token
        return Count(low=k, high=k) if isinstance(k, int) else k

    @property
    def sizes(self) -> Count:
        return self.count or Count(low=len(self.experts), high=len(self.experts))

    @model_validator(mode="after")
    def _consistent(self) -> "MoEBlock":
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError(f"experts: names must be unique, got {names}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"gate_mode: each mode once, got {self.modes}")
        sizes, k = self.sizes, self.per_token
        if sizes.high > len(names):
            raise ValueError(f"count.high: {sizes.high} experts, but {len(names)} are listed")
        prompted = [m for m in self.modes if m in PROMPTED]
        if prompted and sizes.low < 2:
            raise ValueError("count.low: a MoE routed by prompts needs at least two experts")
        if k.low < 1:
            raise ValueError("experts_per_token: must be at least 1")
        if k.high > sizes.high:
            raise ValueError(f"experts_per_token: {k.high} is more than the {sizes.high} experts a candidate has")
        if self.shared is not None and self.shared in names:
            raise ValueError(f"shared: '{self.shared}' is a routed expert too; a shared expert is another model")
        if prompted and self.shared is not None and self.shared not in self.prompts:
            raise ValueError(f"prompts: the shared expert is gated by prompts; give the prompt set '{self.shared}'")
        if prompted:
            missing = [n for n in names if n not in self.prompts]
            if missing:
                raise ValueError(f"prompts: gate_mode {prompted[0]} routes by prompts; give the prompt set "
                                 f"'{missing[0]}' (each expert's own set is named after it)")
        seen: dict[tuple, str] = {}
        for name, prompts in self.prompts.items():
            key = (tuple(prompts.positive), tuple(prompts.negative or ()))
            if key in seen:
                raise ValueError(f"prompts.{name}: the same prompts as '{seen[key]}'; each set routes differently")
            seen[key] = name
        if self.gate_scale and not self.gate_scale.low < self.gate_scale.high:
            raise ValueError("gate_scale: low must be below high")
        return self


class WarmStart(_Strict):
    """The first trials of a new study: candidates a user would try first (the search starts from the
    best of them: CMA-ES centres its first generation there)."""

    sources: bool = True  # each source alone
    uniform_soup: bool = True  # every source, equal weights
    recipes: list[str] = Field(default_factory=list)  # recipe files (relative to the space file; models by name)


class Pruning(_Strict):
    enabled: bool = True
    first_rung: float = Field(0.34, gt=0, lt=1)  # fraction of every task's items scored first
    quantile: float = Field(0.25, gt=0, lt=1)  # pruned when the first rung is below this quantile
    min_trials: int = Field(6, ge=1)  # trials through the first rung before anything is pruned


class SpaceConfig(_Strict):
    name: Optional[str] = None
    models: list[Union[str, ModelEntry]] = Field(min_length=1)
    base_model: Optional[str] = None
    methods: Union[str, list[str]] = Field("task_arithmetic", validate_default=True)  # one or a list
    # Search ranges by parameter (`density`) or for one method's parameter (`nearswap.t`).
    parameters: dict[str, Range] = Field(default_factory=dict)
    layer_schedule: int = Field(1, ge=1, le=16)  # control points per parameter (1 = one global value)
    filters: bool = False  # separate schedules for self_attn and mlp weights
    stacking: Optional[Stacking] = None
    tasks: list[TaskEntry] = Field(min_length=1)
    heldout: Optional[list[HeldoutEntry]] = None
    # Folders of lm-eval task YAMLs (relative to this file), searched before the built-ins and lm-eval's own.
    task_paths: list[str] = Field(default_factory=list)
    objective: Literal["weighted_sum", "multi"] = "weighted_sum"
    # objective: multi: which Pareto-front trial is the winner: the best mean of the objectives, or a task's best.
    winner: str = "mean"
    # a name in evomerge.search.sampler.SAMPLERS; default: cmaes, or nsga2 with objective: multi
    sampler: str = "cmaes"
    n_trials: Optional[int] = Field(None, ge=1)
    timeout: Optional[float] = Field(None, gt=0)  # seconds
    seed: int = 0
    threads: Optional[int] = Field(None, ge=1)  # CPU threads (torch, tokenizers); default: the cores available
    device: str = "auto"
    dtype: Optional[str] = "bfloat16"
    out_dtype: Optional[str] = None
    # The output vocabulary when the models' vocabularies differ, as in a recipe (mergekit's settings).
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSetting] = None
    # Candidates merged with mergekit 0.1.5's arithmetic (in `dtype`, its tie-breaking): what
    # `evomerge merge --mergekit-exact` and mergekit-yaml give for the trial's recipe, bit for bit.
    mergekit_exact: bool = False
    batch_size: Union[Literal["auto"], int] = "auto"  # auto: largest that fits on a GPU, 8 on a CPU
    # Prompts through the model's chat template: auto (when the tokenizer has one), true or false.
    apply_chat_template: Union[Literal["auto"], bool] = "auto"
    # Where the sources live (evomerge.engine.memory): the fastest tier that fits, or one for all.
    placement: Literal["auto", "device", "host", "disk"] = "auto"
    device_memory: Optional[Union[str, float]] = None  # e.g. "80GB"; default: the device's free memory
    host_memory: Optional[Union[str, float]] = None  # default: the host's free memory
    storage: Optional[str] = None
    pruning: Pruning = Field(default_factory=Pruning)
    results_dir: str = "results"  # relative to this file, as the models are
    moe: Optional[MoEBlock] = None  # search mixtures of experts instead of merges
    # More models for the held-out table, beside the winner and the sources: name -> a recipe or MoE
    # config file (e.g. another study's best.yaml), relative to this file.
    compare: dict[str, str] = Field(default_factory=dict)
    # The first trials of a new study (true: the sources alone and the uniform soup; or a mapping).
    warm_start: Union[bool, WarmStart] = False

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        return value if value is None else check_study_name(value)

    @field_validator("device_memory", "host_memory")
    @classmethod
    def _memory(cls, value):
        from evomerge.engine.memory import memory_size

        if value is not None:
            memory_size(value)  # its ValueError names what is wrong; pydantic names the field
        return value

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
        tokenizer_setting(self.tokenizer_source, self.tokenizer)  # not both forms
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown sampler {self.sampler!r}; one of {', '.join(SAMPLERS)}")
        kind = SAMPLERS[self.sampler]
        if kind.soup:  # a soup knows its own length
            problem = check_method(self.methods[0])
            if problem:
                raise ValueError(f"sampler: {self.sampler}: {problem}")
        elif self.n_trials is None and self.timeout is None:
            raise ValueError("n_trials or timeout: give at least one, or the search never stops")
        if self.objective == "multi" and not kind.multi_objective:
            if "sampler" in self.model_fields_set:
                several = ", ".join(name for name, entry in SAMPLERS.items() if entry.multi_objective)
                raise ValueError(f"sampler: {self.sampler} optimises one objective; use one of {several} with "
                                 "objective: multi")
            self.sampler = MULTI_OBJECTIVE_DEFAULT
        if self.objective == "multi" and len(self.tasks) < 2:
            raise ValueError("objective: multi needs at least two tasks")
        if self.winner != "mean" and self.winner not in [t.task for t in self.tasks]:
            raise ValueError(f"winner: mean or one of the tasks ({', '.join(t.task for t in self.tasks)}), got {self.winner!r}")
        names = [m.name if isinstance(m, ModelEntry) else m for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        for key, bounds in self.parameters.items():
            _check_range(key, bounds, self.methods)
        tasks = [t.task for t in self.tasks]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: each task once, got {tasks}")
        if self.objective == "weighted_sum" and not sum(t.weight for t in self.tasks) > 0:
            raise ValueError(f"tasks: the weights must sum to more than 0, got {[t.weight for t in self.tasks]}")
        if self.warm_start and (self.moe is not None or kind.soup):
            raise ValueError("warm_start: starts a search over merges; a moe: search or a soup has its own first trials")
        if self.moe is not None:
            for key in ("methods", "parameters", "stacking", "layer_schedule", "filters", "tokenizer",
                        "tokenizer_source", "mergekit_exact"):
                if key in self.model_fields_set:
                    raise ValueError(f"{key}: a moe: search builds mixtures of experts, not merges; remove {key} "
                                     "(an expert may be a merge recipe: moe.experts: [{name, recipe}])")
            if kind.soup:
                raise ValueError(f"sampler: {self.sampler} soups merges; a moe: search uses cmaes, tpe or random")
            if self.base_model is None:
                raise ValueError("base_model: a mixture of experts takes attention and embeddings from base_model")
            known = [m.name if isinstance(m, ModelEntry) else Path(m).name for m in self.models]
            for i, expert in enumerate(self.moe.experts):
                if isinstance(expert, str) and expert not in known:
                    raise ValueError(f"moe.experts.{i}: '{expert}' is not a name in models ({', '.join(known)})")
            if self.moe.shared is not None and self.moe.shared not in known:
                raise ValueError(f"moe.shared: '{self.moe.shared}' is not a name in models ({', '.join(known)})")
            return self
        copying = [m for m in self.methods if registry.get(m).copies_one_input]
        if self.stacking is not None and (len(self.methods) != 1 or not copying):
            raise ValueError("stacking: layer stacking searches slices that one method copies; "
                             f"set methods to one of {[m for m in registry.names() if registry.get(m).copies_one_input]}")
        if copying and self.stacking is None:
            raise ValueError(f"methods: {copying[0]} copies one input and is searched through stacking: "
                             "give stacking: {slots, block}")
        return self


def _check_range(key: str, bounds: Range, methods: list[str]) -> None:
    """A user's range names a searched parameter of a listed method and stays inside its bounds."""
    method_name, _, param_name = key.rpartition(".")
    owners = [method_name] if method_name else methods
    if method_name and method_name not in methods:
        raise ValueError(f"parameters.{key}: method '{method_name}' is not among methods {methods}")
    params = [p for m in owners for p in registry.get(m).searched if p.name == param_name]
    if not params:
        searchable = sorted({p.name for m in methods for p in registry.get(m).searched})
        raise ValueError(f"parameters.{key}: not a searchable parameter of {', '.join(owners)} "
                         f"(searchable: {', '.join(searchable) or 'none'})")
    for param in params:
        for end in ("low", "high"):
            problem = param.check(getattr(bounds, end)) if param.check else None
            if problem:
                raise ValueError(f"parameters.{key}.{end}: {problem}")


class SearchSpace:
    """space.yaml, validated, with model paths resolved."""

    def __init__(self, config: SpaceConfig, source: Path | None = None):
        self.config = config
        self.source = source
        here = source.parent if source else Path.cwd()
        self.models: dict[str, str] = {}
        # What a search writes names models as the user did: demo-family members by name (their cache
        # paths mean nothing elsewhere) and `~/…` paths unexpanded (a home folder is no one else's).
        self.portable_refs: dict[str, str] = {}

        def resolve(ref: str) -> str:
            path = _resolve(ref, here)
            if is_member_ref(ref) or ref.startswith("~"):
                self.portable_refs[path] = ref
            return path

        try:
            for i, entry in enumerate(config.models):
                name, path = (entry.name, entry.path) if isinstance(entry, ModelEntry) else (Path(entry).name, entry)
                resolved = resolve(path)
                twin = next((other for other, p in self.models.items() if os.path.realpath(p) == os.path.realpath(resolved)), None)
                if twin is not None:
                    raise SpaceError(f"models.{i}: {path} is the model '{twin}' again; list each model once")
                if name in self.models:
                    raise SpaceError(f"models.{i}: the name '{name}' is taken by an earlier model; give each its own "
                                     "(models: [{name, path}])")
                self.models[name] = resolved
            base = config.base_model
            # base_model may name an entry of `models` or be a path of its own
            self.base = None if base is None else self.models[base] if base in self.models else resolve(base)
            # the tokenizer setting names models as base_model does: an entry of `models`, or a path
            setting = tokenizer_setting(config.tokenizer_source, config.tokenizer)
            self.tokenizer = None if setting is None else setting.renamed(
                lambda ref: self.models[ref] if ref in self.models else resolve(ref))
        except EvomergeError as exc:
            raise SpaceError(f"{self._where}{exc}") from None
        self.moe_recipes = self._moe_recipes() if config.moe else {}
        self.compare = self._compare(here)
        self.warm_recipes = self._warm_recipes(here)
        self.task_paths = tuple(str((here / p).expanduser().resolve()) for p in config.task_paths)
        self.higher_is_better = self._check_tasks()
        self.name = config.name or (source.stem if source else "study")
        # the built-in families this space names members of (`demo-family:math`): built before trial 1
        self.family_refs = [ref for ref in self.portable_refs.values() if is_member_ref(ref)]
        for method in ([] if config.moe else config.methods):
            spec = registry.get(method)
            if spec.copies_one_input:
                continue  # stacking: one input per slice
            if spec.base is BasePolicy.REQUIRED and self.base is None:
                raise SpaceError(f"{self._where}base_model: method '{method}' needs a base_model")
            uses_base = spec.base is not BasePolicy.IGNORED and self.base is not None
            count = len(self.models) + (1 if uses_base and self.base not in self.models.values() else 0)
            problem = spec.check_inputs(count, uses_base, "models")
            if problem:
                raise SpaceError(f"{self._where}{problem}")

    def _compare(self, here: Path) -> dict[str, Recipe | MoEConfig]:
        """The `compare:` models, read now (a missing file is named before any trial runs)."""
        from evomerge.moe import load_candidate

        found = {}
        taken = {"winner", "base", *self.models}
        for name, path in self.config.compare.items():
            if name in taken:
                raise SpaceError(f"{self._where}compare.{name}: the name of another row of the held-out table")
            file = (here / path).expanduser()
            try:
                text = file.read_text(encoding="utf-8")
            except OSError as exc:
                raise SpaceError(f"{self._where}compare.{name}: cannot read {path}: {exc.strerror}") from None
            candidate = load_candidate(text, source=f"{self._where}compare.{name}")
            found[name] = candidate.with_models({ref: _resolve(ref, file.parent)
                                                 for ref in candidate.referenced_models()})
        return found

    def _warm_recipes(self, here: Path) -> dict[str, Recipe]:
        """The warm start's candidates, in order: {label: recipe}."""
        warm = self.config.warm_start
        if not warm:
            return {}
        warm = WarmStart() if warm is True else warm
        found: dict[str, Recipe] = {}
        method = self.methods[0]
        if warm.sources or warm.uniform_soup:
            problem = check_method(method)
            if problem:
                raise SpaceError(f"{self._where}warm_start: the sources alone and the soup are {method} recipes: {problem}")
        if warm.sources:
            found.update({f"{name} alone": self.soup_recipe([name]) for name in self.models})
        if warm.uniform_soup and len(self.models) > 1:
            found["uniform soup"] = self.soup_recipe(list(self.models))
        names = {**self.models, **({self.config.base_model: self.base} if self.config.base_model else {})}
        for i, path in enumerate(warm.recipes):
            file = (here / path).expanduser()
            try:
                recipe = Recipe.from_yaml(file.read_text(encoding="utf-8"), source=f"{self._where}warm_start.recipes.{i}")
            except OSError as exc:
                raise SpaceError(f"{self._where}warm_start.recipes.{i}: cannot read {path}: {exc.strerror}") from None
            if recipe.merge_method not in self.methods:
                raise SpaceError(f"{self._where}warm_start.recipes.{i}: {recipe.merge_method} is not among methods "
                                 f"{self.methods}")
            found[Path(path).name] = recipe.with_models(
                {ref: names.get(ref) or _resolve(ref, file.parent) for ref in recipe.referenced_models()})
        return found

    def values_for(self, recipe: Recipe) -> tuple[str, dict[str, float]] | None:
        """The search point a recipe is (method, {dimension: value}), as near as the space can say:
        each dimension takes the recipe's setting of its parameter (scalar, or one point of a
        gradient), clipped to its range, else the middle of the range; None for a method not searched
        or a stacking/MoE space."""
        method = recipe.merge_method
        if method not in self.methods or registry.get(method).copies_one_input:
            return None
        by_model = {entry.model: entry.parameters or {} for entry in recipe.models or []}
        shared = recipe.parameters or {}
        paths = self.models
        values = self.default_values(method)
        for dim in self.dimensions(method):
            setting = (by_model.get(paths.get(dim.model), {}) if dim.model else shared).get(dim.param)
            if dim.model and dim.model in paths and paths[dim.model] not in by_model and dim.param == "weight":
                setting = dim.low  # a model the recipe leaves out weighs nothing
            if isinstance(setting, list) and setting and all(isinstance(v, (int, float)) for v in setting):
                setting = setting[min(len(setting) - 1, round(dim.point * (len(setting) - 1) /
                                                               max(1, self.config.layer_schedule - 1)))]
            if isinstance(setting, (int, float)) and not isinstance(setting, bool):
                values[dim.name] = min(dim.high, max(dim.low, float(setting)))
        return method, values

    def _moe_recipes(self) -> dict[str, Recipe]:
        """The experts that are merge recipes, their models named as `models` (or base_model) names them."""
        names = {**self.models, self.config.base_model: self.base}
        recipes = {}
        for i, entry in enumerate(self.config.moe.experts):
            if isinstance(entry, str):
                continue
            where = f"{self._where}moe.experts.{i}.recipe"
            try:
                recipe = Recipe.from_dict({"dtype": self.config.dtype, **entry.recipe}, source=where, strict=True)
            except EvomergeError as exc:
                raise SpaceError(str(exc)) from None
            unknown = [ref for ref in recipe.referenced_models() if ref not in names]
            if unknown:
                raise SpaceError(f"{where}: '{unknown[0]}' is not a name in models ({', '.join(self.models)})")
            recipes[entry.name] = recipe.with_models(names)
        return recipes

    def _check_tasks(self) -> dict[str, bool]:
        """Every task entry names a task and a metric it has (read from the task YAMLs, no data
        loaded); returns whether higher is better for each search task's metric."""
        try:
            found = for_paths(self.task_paths)
        except EvomergeError as exc:
            raise SpaceError(f"{self._where}task_paths: {exc}") from None
        higher = {}
        for key, entries in (("tasks", self.config.tasks), ("heldout", self.config.heldout or [])):
            for i, entry in enumerate(entries):
                try:
                    spec = found.metric(entry.task, entry.metric, entry.filter)
                    most = found.max_fewshot(entry.task)
                    if not spec.gold:
                        found.check_code(entry.task)
                except TaskError as exc:
                    raise SpaceError(f"{self._where}{key}.{i}.{exc.field}: {exc.detail}") from None
                except EvomergeError as exc:
                    raise SpaceError(f"{self._where}{key}.{i}: {exc}") from None
                if most is not None and entry.num_fewshot > most:
                    raise SpaceError(f"{self._where}{key}.{i}.num_fewshot: {entry.task} takes at most {most} "
                                     f"exemplars, got {entry.num_fewshot}")
                if key == "tasks":
                    higher[entry.task] = spec.higher_is_better
        return higher

    @property
    def results_root(self) -> Path:
        """Where results/<study> folders go: `results_dir`, relative to this file (as models are), so
        the same command finds the same study from any working directory."""
        configured = Path(self.config.results_dir).expanduser()
        if configured.is_absolute() or self.source is None:
            return configured
        return Path(os.path.normpath(self.source.parent.absolute() / configured))

    @property
    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike, *, task_paths: list[str] | None = None) -> "SearchSpace":
        """space.yaml; `task_paths` (e.g. --include-path, absolute) are searched after the file's own."""
        path = Path(path)
        try:
            data = load_yaml(path)
        except UserFileError as exc:
            raise SpaceError(f"{path}: {exc}") from None
        if task_paths and isinstance(data, dict):
            data = {**data, "task_paths": [*(data.get("task_paths") or []), *task_paths]}
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
        """What trials build: the listed merge methods, or the mixture of experts of a `moe:` search."""
        return [MOE] if self.config.moe else list(self.config.methods)

    # ------------------------------------------------------------------ scoring

    @property
    def task_names(self) -> list[str]:
        return [t.task for t in self.config.tasks]

    def heldout_entries(self) -> list[HeldoutEntry]:
        """The `heldout:` list, else each search task again, scored by accuracy."""
        return list(self.config.heldout or [HeldoutEntry(task=t.task, metric="accuracy", size=t.size)
                                            for t in self.config.tasks])

    def runs_generated_code(self, heldout: bool = True) -> bool:
        """Whether scoring executes what the model writes (HumanEval accuracy)."""
        entries = [*self.config.tasks, *(self.heldout_entries() if heldout else [])]
        return any(runs_generated_code(e.task, e.metric, self.task_paths) for e in entries)

    @property
    def objectives(self) -> int:
        """How many values a trial reports: one per task (objective: multi), else one."""
        return len(self.config.tasks) if self.config.objective == "multi" else 1

    def task_requests(self, entries: list[TaskEntry | HeldoutEntry] | None = None) -> list[TaskRequest]:
        """What the evaluator scores: the search tasks, or the given (held-out) entries."""
        return [TaskRequest(t.task, t.metric, size=t.size, num_fewshot=t.num_fewshot,
                            subjects=tuple(t.subjects) if t.subjects else None, max_gen_toks=t.max_gen_toks,
                            filter=t.filter)
                for t in (entries if entries is not None else self.config.tasks)]

    def objective(self, scores: dict[str, float]) -> float | list[float]:
        """A trial's value (maximised): the per-task scores (objective: multi) or their weighted mean; a
        lower-is-better metric (perplexity) enters negated, so that maximising it minimises the metric."""
        tasks = self.config.tasks
        signed = {t.task: scores[t.task] if self.higher_is_better.get(t.task, True) else -scores[t.task]
                  for t in tasks}
        if self.config.objective == "multi":
            return [signed[t.task] for t in tasks]
        return sum(t.weight * signed[t.task] for t in tasks) / sum(t.weight for t in tasks)

    def _range(self, param: Param, method: str) -> tuple[float, float, bool]:
        """The user's range for this method's parameter, else for the parameter, else the method's own."""
        config = self.config.parameters
        custom = config.get(f"{method}.{param.name}") or config.get(param.name)
        if custom:
            return custom.low, custom.high, custom.log
        return param.search.low, param.search.high, param.search.log

    def dimensions(self, method: str) -> list[Dimension]:
        """The continuous dimensions of one method, in a fixed order."""
        if method == MOE:
            return self._moe_dimensions()
        spec = registry.get(method)
        if spec.copies_one_input:
            return self._stacking_dimensions(method)
        filters = ("self_attn", "mlp", None) if self.config.filters else (None,)
        points = self.config.layer_schedule
        dims: list[Dimension] = []
        for param in spec.searched:
            low, high, log = self._range(param, method)
            owners: list[str | None]
            if param.scope is Scope.SHARED:
                owners = [None]
            else:
                owners = [name for name in self.models if not (
                    param.scope is Scope.NON_BASE and self.models[name] == self.base)]
            per_layer = param.search.per_layer
            for owner in owners:
                for flt in (filters if per_layer else (None,)):
                    for point in range(points if per_layer else 1):
                        name = dimension_name(method, owner, param.name, flt, point)
                        dims.append(Dimension(name, low, high, log, param.name, owner, flt, point))
        return dims

    def _stacking_dimensions(self, method: str) -> list[Dimension]:
        dims = []
        for slot in range(self.config.stacking.slots):
            # which model fills the slot, and where its block starts (as a fraction of the room)
            for role in ("model", "start"):
                dims.append(Dimension(dimension_name(method, f"slot{slot}", role), 0.0, 1.0, False, role, None,
                                      None, slot))
        return dims

    # ------------------------------------------------------------------ recipes

    @property
    def soup(self) -> str | None:
        """The soup this space's sampler makes (greedy_soup, uniform_soup), or None for a search."""
        return self.config.sampler if SAMPLERS[self.config.sampler].soup else None

    def with_sampler(self, sampler: str) -> "SearchSpace":
        """The same space proposed by another sampler (same study: the sampler is not part of it)."""
        return self.with_settings(sampler=sampler)

    def with_settings(self, **settings) -> "SearchSpace":
        """The same space with settings that are not part of the study (sampler, placement, memory
        budgets) changed; None leaves a setting as the space has it."""
        changes = {key: value for key, value in settings.items() if value is not None}
        return SearchSpace.from_dict({**self.config.model_dump(mode="json", exclude_unset=True), **changes},
                                     self.source)

    @property
    def output_layers(self) -> int | None:
        """The layers a stacked output has (None: as many as the base)."""
        stacking = self.config.stacking
        return stacking.slots * stacking.block if stacking else None

    def evaluation_shape(self, device_type: str) -> tuple[int, int]:
        """(batch, tokens) the memory plan reserves for evaluation: the space's batch size (auto: 8 on a
        CPU; on a GPU lm-eval's own search takes what is left, so one sequence is reserved), at
        lm-eval's default context of 2048 tokens, capped by the model's."""
        from evomerge.engine.memory import DEFAULT_EVAL_TOKENS

        batch = self.config.batch_size
        if batch == "auto":
            batch = 1 if device_type == "cuda" else 8
        return batch, DEFAULT_EVAL_TOKENS

    def common_settings(self) -> dict[str, Any]:
        common: dict[str, Any] = {"dtype": self.config.dtype}
        if self.config.out_dtype:
            common["out_dtype"] = self.config.out_dtype
        if self.tokenizer is not None:
            common["tokenizer"] = self.tokenizer.model_dump(exclude_none=True)
        return common

    def soup_recipe(self, members: list[str]) -> Recipe:
        """The first method over `members` (model names) with equal weights."""
        return soup_recipe(self.methods[0], members, self.models, self.base, self.common_settings())

    def recipe(self, method: str, values: dict[str, float],
               model_layers: dict[str, int] | None = None) -> Recipe | MoEConfig:
        """The mergekit recipe that the values of one method's dimensions mean (of a `moe:` search: the
        MoE config)."""
        if method == MOE:
            return self._moe_config(values)
        common = {"merge_method": method, **self.common_settings()}
        spec = registry.get(method)
        if spec.copies_one_input:
            return Recipe.from_dict({**common, "slices": self._stack_slices(method, values, model_layers or {})})
        # owner (a model name, or None for shared) -> parameter -> filter -> control points
        points: dict[str | None, dict[str, dict[str | None, list[float]]]] = {}
        for dim in self.dimensions(method):
            by_filter = points.setdefault(dim.model, {}).setdefault(dim.param, {})
            by_filter.setdefault(dim.filter, []).append(values[dim.name])
        if spec.constrain:
            for owner, params in points.items():
                _constrain(spec, params)
        settings = {owner: {param: _setting(by_filter) for param, by_filter in params.items()}
                    for owner, params in points.items()}
        models = []
        for name, path in self.models.items():
            entry: dict[str, Any] = {"model": path}
            if settings.get(name):
                entry["parameters"] = settings[name]
            models.append(entry)
        shared = settings.get(None)
        recipe: dict[str, Any] = {**common, "models": models}
        if spec.base is not BasePolicy.IGNORED and self.base:
            recipe["base_model"] = self.base
        if shared:
            recipe["parameters"] = shared
        return Recipe.from_dict(recipe)

    def _stack_slices(self, method: str, values: dict[str, float], model_layers: dict[str, int]) -> list[dict]:
        stacking = self.config.stacking
        names = list(self.models)
        slices = []
        for slot in range(stacking.slots):
            pick, start = (values[dimension_name(method, f"slot{slot}", role)] for role in ("model", "start"))
            name = names[min(len(names) - 1, int(pick * len(names)))]
            path = self.models[name]
            layers = model_layers.get(path)
            if layers is None:
                raise SpaceError(f"stacking: layer count of model '{name}' unknown")
            room = layers - stacking.block
            if room < 0:
                raise SpaceError(f"stacking.block: {stacking.block} layers, but model '{name}' has {layers}")
            start = round(start * room)
            slices.append({"sources": [{"model": path, "layer_range": [start, start + stacking.block]}]})
        return slices

    # ------------------------------------------------------------------ mixtures of experts

    def _moe_dimensions(self) -> list[Dimension]:
        """Which experts (when a subset is chosen), experts per token, gate mode, each expert's prompt
        set (an offset into the pool from its own set: the middle is its own; a set another expert took
        moves on to the next free one, so experts never share prompts), its gate-scale points."""
        moe = self.config.moe
        dims: list[Dimension] = []

        def add(owner, param, low=0.0, high=1.0, log=False, point=None):
            dims.append(Dimension(dimension_name(MOE, owner, param, None, point), low, high, log, param, owner,
                                  None, point or 0))

        if moe.sizes.low < len(moe.experts):
            for name in moe.names:
                add(name, "use")
        k = moe.per_token
        if k.low < k.high:
            add(None, "experts_per_token", k.low, k.high + 1 - 1e-6)
        if len(moe.modes) > 1:
            add(None, "gate_mode")
        if len([n for n in moe.prompts if n != moe.shared]) > 1 and any(m in PROMPTED for m in moe.modes):
            for name in moe.names:
                add(name, "prompts")
        if moe.gate_scale:
            scale = moe.gate_scale
            for name in moe.names:
                for point in range(scale.points):
                    add(name, "gate_scale", scale.low, scale.high, scale.log, point)
        return dims

    def _moe_config(self, values: dict[str, float]) -> MoEConfig:
        moe = self.config.moe
        names = moe.names
        name_of = lambda owner, param, point=None: dimension_name(MOE, owner, param, None, point)  # noqa: E731
        chosen = names
        if moe.sizes.low < len(names):
            use = {n: values[name_of(n, "use")] for n in names}
            ranked = sorted(names, key=lambda n: -use[n])  # stable: ties keep the listed order
            count = min(max(sum(v >= 0.5 for v in use.values()), moe.sizes.low), moe.sizes.high)
            chosen = [n for n in names if n in ranked[:count]]
        k = moe.per_token
        per_token = int(values[name_of(None, "experts_per_token")]) if k.low < k.high else k.low
        modes = moe.modes
        mode = modes[min(len(modes) - 1, int(values[name_of(None, "gate_mode")] * len(modes)))] \
            if len(modes) > 1 else modes[0]
        pool = [name for name in moe.prompts if name != moe.shared]  # the shared expert keeps its own set
        taken: set[int] = set()
        experts = []
        for name in chosen:
            entry: dict[str, Any] = ({"source_model": self.models[name]} if name not in self.moe_recipes
                                     else {"recipe": self.moe_recipes[name]})
            if mode in PROMPTED:
                own = pool.index(name)
                offset = 0
                if name_of(name, "prompts") in values:  # 0.5 (the middle) is the expert's own set
                    offset = int(((values[name_of(name, "prompts")] + 0.5) % 1.0) * len(pool))
                pick = (own + offset) % len(pool)
                while pick in taken:  # another expert routes with it: the next free set (each has its own)
                    pick = (pick + 1) % len(pool)
                taken.add(pick)
                prompts = moe.prompts[pool[pick]]
                entry["positive_prompts"] = list(prompts.positive)
                if prompts.negative:
                    entry["negative_prompts"] = list(prompts.negative)
            if moe.gate_scale:
                points = [round(values[name_of(name, "gate_scale", p)], 6) for p in range(moe.gate_scale.points)]
                entry["gate_scale"] = points[0] if len(points) == 1 else points
            experts.append(entry)
        config = {"base_model": self.base, "gate_mode": mode, "dtype": self.config.out_dtype or self.config.dtype,
                  "experts_per_token": min(per_token, len(experts)), "experts": experts}
        if moe.shared is not None:
            shared: dict[str, Any] = {"source_model": self.models[moe.shared]}
            if mode in PROMPTED:
                shared["positive_prompts"] = list(moe.prompts[moe.shared].positive)
                if moe.prompts[moe.shared].negative:
                    shared["negative_prompts"] = list(moe.prompts[moe.shared].negative)
            config["shared_experts"] = [shared]
        if moe.architecture:
            config["architecture"] = moe.architecture
        return MoEConfig.from_dict(config, source="moe candidate")

    def check_moe(self, *, missing_ok: bool = False) -> None:
        """A `moe:` search's models make an output architecture (read from their configs, nothing
        loaded): refused before trial 1, naming what to set, instead of failing every trial.
        `missing_ok`: models not on this machine are not checked (a dry run of another box's space)."""
        if self.config.moe is None:
            return
        from evomerge.checkpoint import locate
        from evomerge.engine.moe import check_inputs

        candidate = self.recipe(MOE, self.default_values(MOE))
        try:
            sources = {ref: locate(ref) for ref in candidate.referenced_models()}
        except EvomergeError:
            if missing_ok:
                return
            raise
        try:
            check_inputs(candidate, sources)
        except EvomergeError as exc:
            raise SpaceError(f"{self._where}moe: {exc}") from None

    def moe_prompt_sets(self) -> list[tuple[str, list[str], list[str] | None]]:
        """(gate mode, positive, negative) of every prompt set a `moe:` search may route with: their
        gate vectors are computed once, before the first trial."""
        moe = self.config.moe
        if moe is None:
            return []
        return [(mode, list(p.positive), list(p.negative) if p.negative else None)
                for mode in moe.modes if mode in PROMPTED for p in moe.prompts.values()]

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


def _constrain(spec: MergeMethod, params: dict[str, dict[str | None, list[float]]]) -> None:
    """Applies the method's cross-parameter constraints to one owner's control points, in place."""
    flat = {param: [v for points in by_filter.values() for v in points] for param, by_filter in params.items()}
    constrained = spec.constrain(flat)
    for param, by_filter in params.items():
        values = iter(constrained[param])
        for flt, points in by_filter.items():
            by_filter[flt] = [next(values) for _ in points]


def _resolve(path: str, here: Path) -> str:
    """Relative model paths in space.yaml are relative to the file; hub ids stay as they are;
    `demo-family:<member>` (`compose-family:<member>`) names a member of a built-in family."""
    if is_member_ref(path):
        return member_path(path)
    if "+" in path and not (here / path).expanduser().exists():  # model+adapter: each part resolved
        return "+".join(_resolve(part, here) for part in path.split("+"))
    candidate = (here / path).expanduser()
    if not Path(path).is_absolute() and candidate.exists():
        return str(candidate.resolve())
    if Path(path).expanduser().exists():
        return str(Path(path).expanduser().resolve())
    return path
