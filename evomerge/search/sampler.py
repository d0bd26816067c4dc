"""Samplers: one CMA-ES per merge method, and Optuna's own for the rest.

Optuna's CmaEsSampler hands categorical and conditional parameters to its random fallback, so
a "CMA-ES" search over several methods would silently become a random one. `MethodwiseCmaEs`
keeps one CMA-ES (the `cmaes` package) per method over that method's own continuous dimensions,
normalised to [0, 1]:

- Stateless: a method's optimizer is rebuilt on every proposal by replaying its told
  generations from the trials' records (each trial stores its generation, its index and the
  exact point x), so resuming a study or running many workers needs no extra state.
- Asynchronous: a generation is told as soon as `popsize` of its candidates have finished (in
  order of completion); while some are still running, further candidates are drawn from the same
  generation, so no worker waits for a generation to end.
- Candidate i of generation g is drawn with its own seeded generator: the same records always
  give the same proposals, on any machine.
- Several methods: each first gets one full generation; afterwards a trial goes to the method
  ranked r-th by its best score with probability proportional to 2^-r (methods without
  continuous parameters are evaluated once).

Each proposal writes `trials.SAMPLER = "cmaes"` and its CMA coordinates into the trial's
system attributes; any parameter Optuna had to sample independently is recorded too.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from evomerge import trials as record
from evomerge.search.soup import SoupSampler
from evomerge.trials import CMA_X, PROPOSED_METHOD, Dimension, TrialRecord


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def popsize_for(dimensions: int) -> int:
    """CMA-ES's default population, 4 + floor(3 ln d)."""
    return 4 + int(3 * math.log(max(dimensions, 1)))


def to_unit(dim: Dimension, value: float) -> float:
    if dim.log:
        return (math.log(value) - math.log(dim.low)) / (math.log(dim.high) - math.log(dim.low))
    return (value - dim.low) / (dim.high - dim.low)


def from_unit(dim: Dimension, x: float) -> float:
    x = min(1.0, max(0.0, float(x)))
    if dim.log:
        return math.exp(math.log(dim.low) + x * (math.log(dim.high) - math.log(dim.low)))
    return dim.low + x * (dim.high - dim.low)


def trial_loss(trial: FrozenTrial, rung_offset: float = 0.0) -> float | None:
    """What CMA-ES minimises for a finished trial (the negated score); None when unknown. A pruned
    trial has only a first-rung score (other items, other scale): `rung_offset` maps it to the
    full scale."""
    if trial.state == TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value):
        return -trial.value
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
        return -(value + rung_offset) if math.isfinite(value) else None
    return None


def rung_offset(trials: list[FrozenTrial]) -> float:
    """Mean (full score - first-rung score) of the completed trials among `trials`."""
    gaps = [t.value - t.intermediate_values[0] for t in trials
            if t.state == TrialState.COMPLETE and t.value is not None and 0 in t.intermediate_values]
    return sum(gaps) / len(gaps) if gaps else 0.0


def is_interrupted(trial: FrozenTrial, retried: set[int] = frozenset()) -> bool:
    """Stopped by the user or lost with its worker (then retried): says nothing about the candidate."""
    return trial.state == TrialState.FAIL and (TrialRecord.of(trial).interrupted or trial.number in retried)


def retried_numbers(history: list[FrozenTrial]) -> set[int]:
    return {r.retry_of for r in map(TrialRecord.of, history) if r.retry_of is not None}


class Proposals(Protocol):
    """What a sampler reads of a search space (evomerge.search.space.SearchSpace; not imported here,
    so the space can read the sampler table below)."""

    config: Any
    models: dict[str, str]
    methods: list[str]

    def dimensions(self, method: str) -> list[Dimension]: ...

    def default_values(self, method: str) -> dict[str, float]: ...


class MethodwiseCmaEs(BaseSampler):
    def __init__(self, space: Proposals, seed: int = 0, sigma0: float = 0.25, popsize: int | None = None):
        self.space = space
        self.seed = seed
        self.sigma0 = sigma0
        self.popsize = popsize
        self._fallback = RandomSampler(seed=seed)

    # -------------------------------------------------------------- Optuna interface

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        space: dict[str, BaseDistribution] = {}
        if len(self.space.methods) > 1:
            space["method"] = CategoricalDistribution(self.space.methods)
        for method in self.space.methods:
            for dim in self.space.dimensions(method):
                space[dim.name] = FloatDistribution(dim.low, dim.high, log=dim.log)
        return space

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space or record.WARM_RECIPE in trial.user_attrs:  # a warm-start candidate is not CMA-ES's
            return {}
        history = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
        retry_of = TrialRecord.of(trial).retry_of
        original = next((t for t in history if t.number == retry_of), None) if retry_of is not None else None
        if original is not None and CMA_X in original.system_attrs:
            # A re-queued trial repeats the lost candidate: same proposal, same place in its
            # generation (rebuilt from the recorded point: the worker may have died before storing
            # some or all of its parameters; the stored ones are the same values).
            for key, value in original.system_attrs.items():
                if key.startswith(record.SAMPLER_PREFIX) and key != record.WORKER:
                    study._storage.set_trial_system_attr(trial._trial_id, key, value)
            method = original.system_attrs[PROPOSED_METHOD]
            x = original.system_attrs[CMA_X]
            params = {dim.name: from_unit(dim, xi) for dim, xi in zip(self.space.dimensions(method), x)}
            return {"method": method, **params} if len(self.space.methods) > 1 else params
        # (a lost trial that never got a proposal is simply a new one)
        method = self.choose_method(history, trial.number)
        attrs: dict[str, Any] = {record.SAMPLER: "cmaes", PROPOSED_METHOD: method}
        params: dict[str, Any] = {"method": method} if len(self.space.methods) > 1 else {}
        dims = self.space.dimensions(method)
        if dims:
            optimizer, generation, assigned = self.replay(method, history)
            # Seeded by the slot and the trial number: reproducible from the records, and two
            # workers racing for one slot still draw different candidates.
            optimizer._rng = np.random.RandomState(_seed(self.seed, method, generation, assigned, trial.number))
            x = optimizer.ask()
            params.update({dim.name: from_unit(dim, xi) for dim, xi in zip(dims, x)})
            attrs.update({record.CMA_GENERATION: generation, record.CMA_INDEX: assigned, CMA_X: [float(v) for v in x],
                          record.CMA_SIGMA: float(optimizer._sigma), record.CMA_POPSIZE: optimizer.population_size})
        for key, value in attrs.items():
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
        return params

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution) -> Any:
        # Only reached for parameters outside the relative space; recorded so it cannot go unnoticed.
        study._storage.set_trial_system_attr(trial._trial_id, record.INDEPENDENT_PREFIX + param_name, True)
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    # -------------------------------------------------------------- CMA-ES per method

    def new_optimizer(self, method: str, history: list[FrozenTrial] = ()):
        """CMA-ES for one method, centred on the best warm-start candidate of that method (when the
        study had a warm start), else on the middle of every range."""
        from cmaes import CMA

        dims = self.space.dimensions(method)
        start = self.space.default_values(method)
        warm = [(trial_loss(t), t.user_attrs[record.WARM_POINT][1]) for t in history
                if t.user_attrs.get(record.WARM_POINT) and t.user_attrs[record.WARM_POINT][0] == method
                and trial_loss(t) is not None]
        if warm:
            best = min(warm, key=lambda pair: pair[0])[1]
            start = {name: best.get(name, value) for name, value in start.items()}
        mean = np.array([to_unit(d, start[d.name]) for d in dims])
        return CMA(
            mean=mean,
            sigma=self.sigma0,
            bounds=np.array([[0.0, 1.0]] * len(dims)),
            seed=_seed(self.seed, method, "init"),
            population_size=self.popsize or popsize_for(len(dims)),
        )

    def replay(self, method: str, history: list[FrozenTrial]):
        """The method's optimizer after telling every complete generation; returns
        (optimizer, current generation, candidates already assigned to it)."""
        optimizer = self.new_optimizer(method, history)
        popsize = optimizer.population_size
        mine = [t for t in history if t.system_attrs.get(PROPOSED_METHOD) == method
                and record.CMA_GENERATION in t.system_attrs]
        retried = retried_numbers(history)
        generation = 0
        while True:
            members = [t for t in mine if t.system_attrs[record.CMA_GENERATION] == generation]
            finished = [t for t in members if t.state.is_finished() and not is_interrupted(t, retried)]
            if len(finished) < popsize:
                return optimizer, generation, len(members)
            finished.sort(key=lambda t: (t.datetime_complete, t.number))
            chosen = finished[:popsize]
            offset = rung_offset(chosen)  # from this generation alone, so replays never change
            losses = [trial_loss(t, offset) for t in chosen]
            known = [v for v in losses if v is not None]
            # Failed candidates rank below the worst finished one of their own generation
            # (decided from that generation alone, so replays never change).
            penalty = (max(known) + (max(known) - min(known)) + 1.0) if known else 0.0
            optimizer.tell([(np.array(t.system_attrs[CMA_X]), v if v is not None else penalty)
                            for t, v in zip(chosen, losses)])
            generation += 1

    def choose_method(self, history: list[FrozenTrial], number: int) -> str:
        methods = self.space.methods
        if len(methods) == 1:
            return methods[0]
        assigned = {m: 0 for m in methods}
        best: dict[str, float] = {}
        retried = retried_numbers(history)
        for t in history:
            method = t.system_attrs.get(PROPOSED_METHOD)
            if method not in assigned or is_interrupted(t, retried):
                continue
            assigned[method] += 1
            loss = trial_loss(t)
            if loss is not None and t.state == TrialState.COMPLETE:
                best[method] = min(best.get(method, math.inf), loss)
        first = {m: popsize_for(len(self.space.dimensions(m))) if self.space.dimensions(m) else 1 for m in methods}
        behind = [m for m in methods if assigned[m] < first[m]]
        if behind:  # everyone's first generation, interleaved
            return min(behind, key=lambda m: (assigned[m] / first[m], methods.index(m)))
        candidates = [m for m in methods if self.space.dimensions(m)]  # parameter-less: done after one
        if not candidates:
            return min(methods, key=lambda m: best.get(m, math.inf))
        ranked = sorted(candidates, key=lambda m: (best.get(m, math.inf), methods.index(m)))
        weights = np.array([2.0 ** -rank for rank in range(len(ranked))])
        rng = np.random.default_rng(_seed(self.seed, "method", number))
        return ranked[int(rng.choice(len(ranked), p=weights / weights.sum()))]


@dataclass(frozen=True)
class SamplerEntry:
    """One sampler `sampler:` (and --sampler) can name, with the rules the space and the runner read."""

    make: Callable[[Proposals], BaseSampler]
    help: str
    multi_objective: bool  # optimises several objectives (objective: multi)
    parallel: bool = True  # several workers may share its study
    prunable: bool = True  # its trials may stop at a rung (a soup decides from full scores)
    soup: bool = False  # proposes soups of the sources and knows how many trials it needs


def _soup(kind: str) -> Callable[[Proposals], BaseSampler]:
    return lambda space: SoupSampler(kind, list(space.models))


# The samplers: the space's schema, the CLI's --sampler, the reference and the runner read this table.
SAMPLERS: dict[str, SamplerEntry] = {
    "cmaes": SamplerEntry(lambda space: MethodwiseCmaEs(space, seed=space.config.seed),
                          "CMA-ES, one per merge method (the default)", multi_objective=False),
    "tpe": SamplerEntry(lambda space: optuna.samplers.TPESampler(seed=space.config.seed, multivariate=True, group=True,
                                                                 n_startup_trials=8),
                        "Optuna's multivariate TPE", multi_objective=True),
    "random": SamplerEntry(lambda space: optuna.samplers.RandomSampler(seed=space.config.seed),
                           "uniform random proposals (a baseline)", multi_objective=True),
    "nsga2": SamplerEntry(lambda space: optuna.samplers.NSGAIISampler(seed=space.config.seed),
                          "NSGA-II (the default with objective: multi)", multi_objective=True),
    "greedy_soup": SamplerEntry(_soup("greedy_soup"), "each source alone, then added in rank order while the score "
                                "improves (Wortsman et al., 2022)", multi_objective=False, parallel=False,
                                prunable=False, soup=True),
    "uniform_soup": SamplerEntry(_soup("uniform_soup"), "one trial: every source, equal weights",
                                 multi_objective=False, parallel=False, prunable=False, soup=True),
}
MULTI_OBJECTIVE_DEFAULT = "nsga2"


def make_sampler(space: Proposals) -> BaseSampler:
    return SAMPLERS[space.config.sampler].make(space)


def suggest(trial: optuna.Trial, space: Proposals) -> tuple[str, dict[str, float]]:
    """Define-by-run: the method (when several), then that method's dimensions."""
    # Optuna asks the sampler lazily, and not at all when a queued trial fixes every parameter:
    # ask it up front, so each trial (retries included) carries its CMA-ES record.
    trial.relative_params  # noqa: B018
    methods = space.methods
    method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
    values = {d.name: trial.suggest_float(d.name, d.low, d.high, log=d.log) for d in space.dimensions(method)}
    return method, values
