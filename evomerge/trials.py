"""The trial record: what evomerge stores on an Optuna study and its trials, and how it is read.

This module owns every attribute key, the names of searched dimensions, and a trial's score; the
search writes through it, the sampler, the storage coordination and the report read through it.
A study stays a plain Optuna study: optuna-dashboard and any Optuna tool can open it.

Trial user attributes (`FIELDS`): the recipe (mergekit YAML), its method and seed, per-task scores
(and first-rung scores when pruning), timings, a failure's reason, and retry bookkeeping.
Trial system attributes (`SAMPLER_PREFIX`…): the CMA-ES record of each proposal and the worker
that holds the trial. Study user attributes: the space and its fingerprint.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from optuna.trial import FrozenTrial, TrialState

# ---------------------------------------------------------------------------- study attributes

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_study_name(name: str) -> str:
    """A study name becomes a folder under the results root: a plain name, never a path."""
    if not STUDY_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"study name {name!r}: use letters, digits, '.', '_' and '-' (no paths, at most 128)")
    return name


STUDY_SPACE = "evomerge:space"  # the space.yaml the study was created from, as JSON
STUDY_FINGERPRINT = "evomerge:space_fingerprint"  # what must not change on resume
STUDY_MODELS = "evomerge:models"  # model name -> resolved path

# ---------------------------------------------------------------------------- trial attributes

# TrialRecord field -> user attribute key
FIELDS: Mapping[str, str] = {
    "recipe": "recipe",
    "method": "method",
    "proposer": "proposer",  # the sampler that proposed it (cmaes, tpe, …, greedy_soup, uniform_soup)
    "seed": "seed",
    "scores": "scores",
    "first_rung_scores": "first_rung_scores",
    "seconds": "seconds",
    "cpu_seconds": "cpu_seconds",  # CPU time of the worker process (all its threads) for the trial
    "merge_seconds": "merge_seconds",
    "fail_reason": "fail_reason",
    "interrupted": "interrupted",
    "retry_of": "retry_of",
    "duplicate_of_recipe": "duplicate_of_recipe",
    "warm_start": "warm_start",  # a warm-start candidate's label ("math alone", "uniform soup", a file)
}
# A warm-start trial's candidate, set when it is queued: its recipe, and its search point (method, values).
WARM_RECIPE = "warm_recipe"
WARM_POINT = "warm_point"

# System attributes, written by the sampler and the storage coordination.
SAMPLER_PREFIX = "evomerge:"
WORKER = SAMPLER_PREFIX + "worker"  # host:pid:start of the worker running the trial
SAMPLER = SAMPLER_PREFIX + "sampler"
PROPOSED_METHOD = SAMPLER_PREFIX + "method"
CMA_GENERATION = SAMPLER_PREFIX + "cma_generation"
CMA_INDEX = SAMPLER_PREFIX + "cma_index"
CMA_X = SAMPLER_PREFIX + "cma_x"
CMA_SIGMA = SAMPLER_PREFIX + "cma_sigma"
CMA_POPSIZE = SAMPLER_PREFIX + "cma_popsize"
INDEPENDENT_PREFIX = SAMPLER_PREFIX + "independent:"  # a parameter the sampler left to its fallback


def user_attrs(**fields: Any) -> dict[str, Any]:
    """Record fields as user attributes (unknown fields are a bug, not a new key)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise KeyError(f"not a trial-record field: {', '.join(sorted(unknown))}")
    return {FIELDS[name]: value for name, value in fields.items()}


def write(trial, **fields: Any) -> None:
    """Stores fields on a live `optuna.Trial`."""
    for key, value in user_attrs(**fields).items():
        trial.set_user_attr(key, value)


def write_to_storage(storage, trial_id: int, **fields: Any) -> None:
    """Stores fields on any trial through its storage (a trial another worker holds)."""
    for key, value in user_attrs(**fields).items():
        storage.set_trial_user_attr(trial_id, key, value)


def study_task_names(study) -> list[str]:
    """The search tasks of a study, from its space (or, for a study without one, its trials' scores)."""
    space = study.user_attrs.get(STUDY_SPACE, {})
    return [t["task"] for t in space.get("tasks", [])] or sorted(
        {task for t in study.get_trials(deepcopy=False) for task in TrialRecord.of(t).scores})


def score(values: list[float] | None) -> float:
    """A trial's single score: its value, or the mean of its objectives (multi-objective)."""
    values = values or [math.nan]
    return sum(values) / len(values)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as evomerge reads it."""

    number: int
    state: TrialState
    values: list[float] | None
    params: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    method: str | None = None
    proposer: str | None = None
    seed: int | None = None
    scores: dict[str, float] = field(default_factory=dict)
    first_rung_scores: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    cpu_seconds: float | None = None
    merge_seconds: float | None = None
    fail_reason: str | None = None
    interrupted: bool = False
    retry_of: int | None = None
    duplicate_of_recipe: str | None = None
    warm_start: str | None = None

    @classmethod
    def of(cls, trial: FrozenTrial) -> "TrialRecord":
        attrs = trial.user_attrs
        found = {name: attrs[key] for name, key in FIELDS.items() if key in attrs}
        found["interrupted"] = bool(found.get("interrupted", False))
        found.setdefault("scores", {})
        found.setdefault("first_rung_scores", {})
        return cls(number=trial.number, state=trial.state, values=trial.values, params=dict(trial.params), **found)

    @property
    def score(self) -> float:
        return score(self.values)

    @property
    def label(self) -> str:
        """The method, and the soup that proposed it (a search's own trials: the method alone)."""
        method = self.method or "?"
        return f"{method} ({self.proposer.replace('_', ' ')})" if self.proposer and "soup" in self.proposer else method

    @property
    def complete(self) -> bool:
        """Finished with a score and a recipe to show for it."""
        return self.state == TrialState.COMPLETE and self.recipe is not None


# ---------------------------------------------------------------------------- dimensions


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


def dimension_name(method: str, owner: str | None, param: str, flt: str | None = None,
                   point: int | None = None) -> str:
    """`method.owner.param.filter.point` ('all' for shared, 'rest' for no filter), or, for a
    stacking slot, `method.slotN.role`."""
    if point is None:
        return ".".join([method, owner or "all", param])
    return ".".join([method, owner or "all", param, flt or "rest", str(point)])


def dimension_label(name: str) -> str:
    """A readable label: 'ties.math.weight.self_attn.1' -> 'math.weight[self_attn][1]',
    'ties.all.lambda.rest.0' -> 'lambda[0]', 'passthrough.slot0.model' -> 'slot0.model'."""
    parts = name.split(".")
    if len(parts) == 3:
        return ".".join(parts[1:])
    if len(parts) != 5:
        return name
    _method, owner, param, flt, point = parts
    label = param if owner == "all" else f"{owner}.{param}"
    if flt != "rest":
        label += f"[{flt}]"
    return label + f"[{point}]"
