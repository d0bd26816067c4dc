"""Model soups, the merging guides' baselines, as samplers of the same study.

- `uniform_soup`: one trial, every source with equal weight.
- `greedy_soup` (Wortsman et al., 2022): score every source alone, rank them, then try adding
  each in rank order to the soup, keeping it only when the search score improves.

A soup is the space's first method with equal weights 1/k over its k members (`methods:
[linear]` is the uniform average of weights; `task_arithmetic`, of task vectors), other
parameters at the method's defaults. Soup trials are ordinary trials of the study (parameters
`soup:<model>` = 0 or 1, the proposer recorded), so they sit on the same leaderboard and plots as
the search's; the search's samplers ignore them. The greedy decisions are recomputed from the
trials each time, so a soup resumes like any search; it is sequential (one worker).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from evomerge.methods import registry
from evomerge.methods.registry import BasePolicy
from evomerge.recipe import Recipe
from evomerge.trials import SAMPLER

SOUPS = ("greedy_soup", "uniform_soup")
PARAM = "soup:"


def check_method(method: str) -> str | None:
    """Why `method` cannot make a soup, or None."""
    spec = registry.get(method)
    weight = spec.param("weight")
    if weight is None or weight.scope is registry.Scope.SHARED:
        return f"a soup weighs each model: method {method!r} has no per-model weight"
    missing = [p.name for p in spec.params if p.required and p.name != "weight"]
    if missing:
        return f"a soup leaves other parameters at their defaults: {method!r} has none for {', '.join(missing)}"
    return None


def members_of(trial: FrozenTrial, names: Sequence[str]) -> list[str]:
    return [name for name in names if trial.params.get(PARAM + name) == 1]


def _value(trial: FrozenTrial) -> float:
    if trial.state == TrialState.COMPLETE and trial.values and all(math.isfinite(v) for v in trial.values):
        return sum(trial.values) / len(trial.values)
    return -math.inf


def plan(kind: str, names: Sequence[str], history: Sequence[FrozenTrial]) -> tuple[list[str] | None, int]:
    """(the members of the next soup trial, or None when the soup is done; trials still to run),
    from this soup's trials so far (in order)."""
    names = list(names)
    mine = sorted((t for t in history if t.system_attrs.get(SAMPLER) == kind), key=lambda t: t.number)
    if kind == "uniform_soup":
        return (None, 0) if mine else (names, 1)
    n = len(names)
    if len(mine) < n:  # every source alone, in the space's order
        return [names[len(mine)]], 2 * n - 1 - len(mine)
    score = {members_of(t, names)[0]: _value(t) for t in mine[:n] if len(members_of(t, names)) == 1}
    ranked = sorted(names, key=lambda name: -score.get(name, -math.inf))  # stable: ties keep the space's order
    soup, best = [ranked[0]], score.get(ranked[0], -math.inf)
    for step, trial in enumerate(mine[n:], start=1):
        if _value(trial) > best:  # the candidate was soup + ranked[step]: kept only when it improves
            soup, best = soup + [ranked[step]], _value(trial)
    step = len(mine) - n + 1
    if step >= n:
        return None, 0
    return soup + [ranked[step]], n - step


def final_soup(kind: str, names: Sequence[str], history: Sequence[FrozenTrial]) -> list[str]:
    """The soup the trials settled on: the best soup trial's members."""
    mine = [t for t in history if t.system_attrs.get(SAMPLER) == kind and t.state == TrialState.COMPLETE]
    return members_of(max(mine, key=_value), names) if mine else []


class SoupSampler(BaseSampler):
    """Proposes the soup's next members (`soup:<model>` = 1) and records itself as the proposer."""

    def __init__(self, kind: str, names: Sequence[str]):
        if kind not in SOUPS:
            raise ValueError(f"unknown soup {kind!r}")
        self.kind, self.names = kind, list(names)
        self._members: dict[int, list[str]] = {}

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        history = _finished(study)
        members, _left = plan(self.kind, self.names, history)
        # past the end (more trials than the soup needs): the soup it settled on, scored again
        self._members[trial.number] = members if members is not None else final_soup(self.kind, self.names, history)
        study._storage.set_trial_system_attr(trial._trial_id, SAMPLER, self.kind)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return int(param_name.removeprefix(PARAM) in self._members[trial.number])


def suggest_members(trial: optuna.Trial, names: Sequence[str]) -> list[str]:
    return [name for name in names if trial.suggest_categorical(PARAM + name, [0, 1]) == 1]


def _finished(study: Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


def remaining(kind: str, names: Sequence[str], study: optuna.Study) -> int:
    return plan(kind, names, _finished(study))[1]


def soup_recipe(method: str, members: Sequence[str], models: dict[str, str], base: str | None,
                common: dict[str, Any]) -> Recipe:
    """`method` over `members` with equal weights 1/k (the base, when the method uses one)."""
    spec = registry.get(method)
    weight = 1.0 / len(members)
    recipe: dict[str, Any] = {**common, "merge_method": method,
                              "models": [{"model": models[name], "parameters": {"weight": weight}} for name in members]}
    if spec.base is not BasePolicy.IGNORED and base:
        recipe["base_model"] = base
    return Recipe.from_dict(recipe)
