"""The search loop: trial -> recipe -> resident model -> scores -> Optuna.

One worker loads the sources once, then repeats: admit a trial (the budget is checked under a
lock), let the sampler propose, build the recipe, materialise it into the resident model, score
a first rung of every task (the pruner may stop it there), score the rest, tell Optuna. Every
trial stores its recipe, seed and per-task scores, so it can be re-run from its record alone.
A failed candidate (NaN weights or scores, shape mismatch, out of memory, crashing code) is a
FAIL trial with its reason; Ctrl-C marks the running trial interrupted and stops cleanly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError, MergeFailure, SpaceError
from evomerge.evaluation import Evaluator, Scores, TaskRequest
from evomerge.recipe import Recipe
from evomerge.search import storage as store
from evomerge.search.interrupts import InterruptGate
from evomerge.search.sampler import make_sampler, suggest
from evomerge.search.space import SearchSpace

log = logging.getLogger(__name__)

SPACE_ATTR = "evomerge:space_fingerprint"
# Unexpected errors (bugs, not bad candidates) in this many consecutive trials stop the search.
MAX_CONSECUTIVE_ERRORS = 5


class RungPruner(optuna.pruners.BasePruner):
    """Prunes a trial whose first-rung score is below the `quantile` of the first-rung scores of
    every trial that reached that rung, pruned ones included. (Optuna's PercentilePruner compares
    with completed trials only: the survivors set the bar, which then rises with every pruning.)"""

    def __init__(self, quantile: float = 0.25, min_trials: int = 6):
        self.quantile, self.min_trials = quantile, min_trials

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        others = [t.intermediate_values[step] for t in study.get_trials(
                  deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)) if step in t.intermediate_values]
        if len(others) < self.min_trials:
            return False
        import numpy as np

        return trial.intermediate_values[step] < float(np.quantile(others, self.quantile))


class CandidateFailed(Exception):
    """This candidate cannot be scored; the trial fails, the search goes on."""


@dataclass
class SearchOutcome:
    study: optuna.Study
    results_dir: Path
    trials_run: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    evaluation_seconds: dict[str, float] = field(default_factory=dict)


def space_fingerprint(space: SearchSpace) -> str:
    """What must not change when a study is resumed: what is searched and how it is scored."""
    c = space.config
    relevant = {"models": space.models, "base": space.base, "methods": space.methods,
                "parameters": {k: v.model_dump() for k, v in c.parameters.items()},
                "layer_schedule": c.layer_schedule, "filters": c.filters,
                "stacking": c.stacking.model_dump() if c.stacking else None,
                "tasks": [t.model_dump() for t in c.tasks], "objective": c.objective, "seed": c.seed,
                "dtype": c.dtype, "out_dtype": c.out_dtype}
    return hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()[:16]


def combined_score(space: SearchSpace, scores: dict[str, float]) -> float:
    """Weighted mean of the per-task scores."""
    tasks = space.config.tasks
    total = sum(t.weight for t in tasks)
    return sum(t.weight * scores[t.task] for t in tasks) / total


def task_requests(space: SearchSpace, entries=None) -> list[TaskRequest]:
    return [TaskRequest(t.task, t.metric, size=t.size, num_fewshot=t.num_fewshot,
                        subjects=tuple(t.subjects) if getattr(t, "subjects", None) else None,
                        max_gen_toks=t.max_gen_toks)
            for t in (entries if entries is not None else space.config.tasks)]


class Searcher:
    def __init__(self, space: SearchSpace, *, storage: str | None = None, study_name: str | None = None,
                 results_root: str | Path | None = None, device: str | None = None, progress: bool = True):
        self.space = space
        self.study_name = study_name or space.name
        root = Path(results_root or space.config.results_dir)
        self.results_dir = root / self.study_name
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.storage_url = store.normalize_url(storage or space.config.storage or store.default_storage(self.results_dir))
        self.device = device or space.config.device
        self.progress = progress
        self.engine: MergeEngine | None = None
        self.evaluator: Evaluator | None = None
        self._recipe_scores: dict[str, tuple[float, dict]] = {}
        self._gate = InterruptGate()

    # ------------------------------------------------------------------ setup

    def open_study(self) -> optuna.Study:
        config = self.space.config
        directions = ["maximize"] * (len(config.tasks) if config.objective == "multi" else 1)
        pruner = (RungPruner(config.pruning.quantile, config.pruning.min_trials)
                  if config.pruning.enabled and config.objective != "multi" else optuna.pruners.NopPruner())
        storage = store.open_storage(self.storage_url)
        study = optuna.create_study(study_name=self.study_name, storage=storage, directions=directions,
                                    sampler=make_sampler(self.space), pruner=pruner, load_if_exists=True)
        fingerprint = space_fingerprint(self.space)
        existing = study.user_attrs.get(SPACE_ATTR)
        if existing is None:
            study.set_user_attr(SPACE_ATTR, fingerprint)
            study.set_user_attr("evomerge:space", self.space.config.model_dump(mode="json"))
            study.set_user_attr("evomerge:models", self.space.models)
        elif existing != fingerprint:
            raise SpaceError(
                f"study '{self.study_name}' in {self.storage_url} was created from a different search space "
                f"(models, methods, tasks or seed changed); use another --study-name or results folder"
            )
        return study

    def load(self) -> None:
        """Sources resident on the device, tokenizer and evaluator: once per worker."""
        from transformers import AutoTokenizer

        from evomerge.engine.checkpoint import locate

        config = self.space.config
        if self.space.uses_demo_family:
            from evomerge.demo.family import build_family

            build_family(device=self.device, progress=self.progress)  # no-op once built
        refs = list(dict.fromkeys([*([self.space.base] if self.space.base else []), *self.space.models.values()]))
        self.engine = MergeEngine(refs, base_model=self.space.base, device=self.device, dtype=config.dtype,
                                  out_dtype=config.out_dtype, progress=self.progress)
        donor = locate(self.space.base or refs[0])
        kwargs = {"gguf_file": donor.gguf_file} if donor.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(donor.path, **kwargs)
        self.evaluator = Evaluator(task_requests(self.space), tokenizer, split="search", seed=config.seed,
                                   batch_size=config.batch_size)

    # ------------------------------------------------------------------ one trial

    def recipe_for(self, trial: optuna.Trial) -> Recipe:
        method, values = suggest(trial, self.space)
        return self.space.recipe(method, values, self.engine.model_layers if self.engine else None)

    def evaluate_trial(self, trial: optuna.Trial) -> float | list[float]:
        config = self.space.config
        recipe = self.recipe_for(trial)
        text = recipe.to_yaml()
        trial.set_user_attr("recipe", text)
        trial.set_user_attr("method", recipe.merge_method)
        trial.set_user_attr("seed", config.seed)
        started = time.perf_counter()
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in self._recipe_scores:  # the same recipe again (e.g. a parameter-less method)
            value, scores = self._recipe_scores[key]
            trial.set_user_attr("scores", scores)
            trial.set_user_attr("duplicate_of_recipe", key[:12])
            return value
        try:
            with self._gate.interruptible():
                model = self.engine.materialize(recipe, seed=config.seed)
        except MergeFailure as exc:
            raise CandidateFailed(str(exc)) from exc
        merge_seconds = time.perf_counter() - started
        pruning = config.pruning.enabled and config.objective != "multi"
        if pruning:
            rung = config.pruning.first_rung
            first = self._score(model, part=(0.0, rung))
            first_value = combined_score(self.space, first.scores)
            trial.set_user_attr("first_rung_scores", first.scores)
            trial.report(first_value, step=0)
            if trial.should_prune():
                trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
                raise optuna.TrialPruned(f"first rung {first_value:.4f} below the {config.pruning.quantile:.0%} quantile")
            scores = Scores.combine(first, self._score(model, part=(rung, 1.0))).scores
        else:
            scores = self._score(model).scores
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("merge_seconds", round(merge_seconds, 3))
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        if config.objective == "multi":
            value = [scores[t.task] for t in config.tasks]
        else:
            value = combined_score(self.space, scores)
        self._recipe_scores[key] = (value, scores)
        return value

    def _score(self, model, part: tuple[float, float] | None = None) -> Scores:
        try:
            with self._gate.interruptible():
                scores = self.evaluator.evaluate(model, part=part)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise CandidateFailed("out of GPU memory during evaluation") from exc
        bad = [task for task, value in scores.scores.items() if scores.items.get(task) and not math.isfinite(value)]
        if bad:
            raise CandidateFailed(f"non-finite score for {', '.join(bad)}")
        return scores

    # ------------------------------------------------------------------ the loop

    def run(self, n_trials: int | None = None, timeout: float | None = None) -> SearchOutcome:
        config = self.space.config
        n_trials = n_trials if n_trials is not None else config.n_trials
        timeout = timeout if timeout is not None else config.timeout
        study = self.open_study()
        recovered = store.recover_dead_trials(study)
        if recovered:
            log.info("recovered %d trial(s) of dead workers (re-queued)", recovered)
        done_before = store.finished_count(study)
        log.info("study '%s' in %s: %d finished trials so far, budget %s", self.study_name, self.storage_url,
                 done_before, n_trials if n_trials is not None else "unbounded")
        outcome = SearchOutcome(study, self.results_dir)
        if self.engine is None:
            self.load()
        lock = store.AdmissionLock(self.storage_url, self.study_name)
        start = time.monotonic()
        errors = 0
        bar = tqdm(total=n_trials, initial=min(done_before, n_trials or done_before), desc="search",
                   unit="trial", disable=not self.progress)
        self._update_bar(bar, study)
        try:
            with self._gate.deferred():
                while timeout is None or time.monotonic() - start < timeout:
                    self._gate.checkpoint()
                    store.recover_dead_trials(study)  # a peer that died mid-trial: fail and re-queue its trial
                    trial = store.admit(study, lock, n_trials)
                    if trial is None:
                        store.recover_dead_trials(study)
                        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                            break
                        with self._gate.interruptible():
                            time.sleep(2)  # others still run trials that may fail and come back
                        continue
                    state, error = self._run_trial(study, trial)
                    outcome.trials_run += 1
                    errors = errors + 1 if error else 0
                    if errors >= MAX_CONSECUTIVE_ERRORS:
                        raise EvomergeError(f"{errors} trials in a row failed with an unexpected error; last: {error}")
                    bar.update(1 if state in (TrialState.COMPLETE, TrialState.PRUNED) else 0)
                    self._update_bar(bar, study)
                self._gate.checkpoint()  # a Ctrl-C during the last write still stops before held-out
        except KeyboardInterrupt:
            outcome.interrupted = True
            log.warning("interrupted: stopped cleanly (a running trial is marked interrupted); "
                        "rerun the same command to resume")
        finally:
            bar.close()
        outcome.seconds = time.monotonic() - start
        return outcome

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial) -> tuple[TrialState, str | None]:
        """Runs one trial to a final state; returns (state, unexpected error or None)."""
        log.info("trial %d: evaluating", trial.number)
        with store.Heartbeat(study._storage, trial._trial_id):
            try:
                value = self.evaluate_trial(trial)
            except optuna.TrialPruned as exc:
                study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d: pruned (%s)", trial.number, exc)
                return TrialState.PRUNED, None
            except (CandidateFailed, EvomergeError) as exc:
                reason = " ".join(str(exc).split())
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d: failed: %s", trial.number, reason)
                return TrialState.FAIL, None
            except KeyboardInterrupt:
                trial.set_user_attr("interrupted", True)
                trial.set_user_attr("fail_reason", "interrupted by the user")
                study.tell(trial, state=TrialState.FAIL)
                raise
            except Exception as exc:  # a bug, not a bad candidate: fail the trial, keep the log
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=TrialState.FAIL)
                log.error("trial %d: unexpected error: %s\n%s", trial.number, reason, traceback.format_exc())
                return TrialState.FAIL, reason
        study.tell(trial, value)
        shown = value if isinstance(value, float) else ", ".join(f"{v:.4f}" for v in value)
        log.info("trial %d: %s -> %s", trial.number, trial.user_attrs.get("method"), shown if isinstance(shown, str) else f"{shown:.4f}")
        return TrialState.COMPLETE, None

    def _update_bar(self, bar, study: optuna.Study) -> None:
        if self.space.config.objective == "multi":
            return
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if completed:
            best = max(t.value for t in completed)
            bar.set_postfix(best=f"{best:.4f}")
