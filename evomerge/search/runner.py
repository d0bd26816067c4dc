"""The search loop: trial -> recipe -> resident model -> scores -> Optuna.

One worker loads the sources once, then repeats: admit a trial (the budget is checked under a
lock), let the sampler propose, build the recipe, materialise it into the resident model, score
a first rung of every task (the pruner may stop it there), score the rest, tell Optuna. Every
trial stores its recipe, seed and per-task scores, so it can be re-run from its record alone.
A failed candidate (NaN weights or scores, a method's value error, out of memory) is a FAIL trial
with its reason, and the search goes on; `MAX_CONSECUTIVE_FAILURES` failed trials in a row stop it
with their reasons. Any other exception is a bug: its trial is failed and the search stops with the
traceback. Ctrl-C marks the running trial interrupted and stops cleanly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from evomerge import trials as record
from evomerge.device import resolve_device, use_threads
from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError, MergeFailure, SpaceError
from evomerge.evaluation import Evaluator, Scores
from evomerge.moe import Candidate, load_candidate
from evomerge.search import storage as store
from evomerge.search.interrupts import InterruptGate
from evomerge.search.sampler import SAMPLERS, make_sampler, suggest
from evomerge.search.soup import remaining as soup_remaining
from evomerge.search.soup import suggest_members
from evomerge.search.space import SearchSpace
from evomerge.trials import check_study_name

log = logging.getLogger(__name__)

# This many failed trials in a row (of any kind) stop the search: something is wrong with every candidate.
MAX_CONSECUTIVE_FAILURES = 10


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
    trials_run: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    stopped: str | None = None  # why the search stopped before its budget (consecutive failures)


def space_fingerprint(space: SearchSpace, *, by_path: bool = False) -> str:
    """What must not change when a study is resumed: what is searched and how it is scored. Models
    are named as the space names them (demo-family members by name, `~/…` unexpanded), so a study
    resumes on another machine or with another cache folder; `by_path`: the absolute paths, which
    studies made before that recorded."""
    c = space.config

    def named(path: str | None) -> str | None:
        return path if by_path or path is None else space.portable_refs.get(path, path)

    relevant = {"models": {name: named(path) for name, path in space.models.items()}, "base": named(space.base),
                "methods": space.methods,
                "parameters": {k: v.model_dump() for k, v in c.parameters.items()},
                "layer_schedule": c.layer_schedule, "filters": c.filters,
                "stacking": c.stacking.model_dump() if c.stacking else None,
                "tasks": [t.model_dump() for t in c.tasks], "objective": c.objective, "seed": c.seed,
                "dtype": c.dtype, "out_dtype": c.out_dtype}
    if space.tokenizer is not None:  # only when set: studies made before tokenizer settings keep their fingerprint
        relevant["tokenizer"] = space.tokenizer.renamed(named).model_dump(exclude_none=True)
    if c.mergekit_exact:  # likewise
        relevant["mergekit_exact"] = True
    if c.moe is not None:
        relevant["moe"] = c.moe.model_dump(mode="json")
    if c.apply_chat_template != "auto":  # likewise: studies made before the setting keep their fingerprint
        relevant["apply_chat_template"] = c.apply_chat_template
    return hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()[:16]


class Searcher:
    def __init__(self, space: SearchSpace, *, storage: str | None = None, study_name: str | None = None,
                 results_root: str | Path | None = None, device: str | None = None, progress: bool = True,
                 threads: int | None = None):
        self.space = space
        self.threads = use_threads(threads or space.config.threads)
        self.study_name = study_name or space.name
        try:
            check_study_name(self.study_name)
        except ValueError as exc:
            raise SpaceError(f"--study-name: {exc}") from None
        root = Path(results_root) if results_root else space.results_root
        earlier = Path(space.config.results_dir) / self.study_name  # before, relative to the working directory
        if results_root is None and not (root / self.study_name).exists() and (earlier / "study.db").is_file() \
                and earlier.resolve() != (root / self.study_name).resolve():
            log.warning("resuming the study in %s, where searches before evomerge 0.2 put it (results_dir was relative "
                        "to the working directory; it is now relative to the space file: %s)", earlier, root)
            root = Path(space.config.results_dir)
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
        directions = ["maximize"] * self.space.objectives
        pruner = (RungPruner(config.pruning.quantile, config.pruning.min_trials)
                  if config.pruning.enabled and config.objective != "multi" else optuna.pruners.NopPruner())
        storage = store.open_storage(self.storage_url)
        study = optuna.create_study(study_name=self.study_name, storage=storage, directions=directions,
                                    sampler=make_sampler(self.space), pruner=pruner, load_if_exists=True)
        fingerprint = space_fingerprint(self.space)
        existing = study.user_attrs.get(record.STUDY_FINGERPRINT)
        if existing is None:
            study.set_user_attr(record.STUDY_FINGERPRINT, fingerprint)
            study.set_user_attr(record.STUDY_SPACE, self.space.config.model_dump(mode="json"))
            study.set_user_attr(record.STUDY_MODELS, self.space.models)
            self._enqueue_warm_start(study)
        elif existing not in (fingerprint, space_fingerprint(self.space, by_path=True)):
            raise SpaceError(
                f"study '{self.study_name}' in {store.shown(self.storage_url)} was created from a different search space "
                f"(models, methods, tasks or seed changed); use another --study-name or results folder"
            )
        elif existing != fingerprint:  # recorded by path, before: recorded as the space names its models now
            study.set_user_attr(record.STUDY_FINGERPRINT, fingerprint)
        if config.objective == "multi" and study.user_attrs.get("winner_rule") != config.winner:
            study.set_user_attr("winner_rule", config.winner)  # the space's rule now (not part of what is searched)
        return study

    def _enqueue_warm_start(self, study: optuna.Study) -> None:
        """A new study's first trials: the warm start's candidates (never for a study that ran)."""
        if study.get_trials(deepcopy=False) or not self.space.warm_recipes:
            return
        for label, recipe in self.space.warm_recipes.items():
            point = self.space.values_for(recipe)
            study.enqueue_trial({}, user_attrs={record.FIELDS["warm_start"]: label, record.WARM_RECIPE: recipe.to_yaml(),
                                                record.WARM_POINT: list(point) if point else None},
                                skip_if_exists=False)
        log.info("warm start: %d first trials (%s)", len(self.space.warm_recipes), ", ".join(self.space.warm_recipes))

    def load(self) -> None:
        """Sources resident on the device, tokenizer and evaluator: once per worker."""
        config = self.space.config
        if self.space.family_refs:
            from evomerge.demo.family import build_referenced

            build_referenced(self.space.family_refs, device=self.device, progress=self.progress)  # no-op once built
        self.space.check_moe()  # a MoE no architecture can build is refused now, not trial by trial
        refs = list(dict.fromkeys([*([self.space.base] if self.space.base else []), *self.space.models.values()]))
        self.engine = MergeEngine(refs, base_model=self.space.base, device=self.device, dtype=config.dtype,
                                  out_dtype=config.out_dtype, tokenizer=self.space.tokenizer,
                                  mergekit_exact=config.mergekit_exact, placement=config.placement,
                                  device_memory=config.device_memory, host_memory=config.host_memory,
                                  evaluation=self.space.evaluation_shape(resolve_device(self.device).type),
                                  output_layers=self.space.output_layers, progress=self.progress,
                                  # a MoE search merges only its recipe experts: task vectors pay off then
                                  delta_cache=False if config.moe and not self.space.moe_recipes else "auto")
        # candidates speak the output vocabulary when there is one, else the base's
        if config.moe:  # every prompt set's router rows, once, before the first trial
            self.engine.moe.prepare_gates(self.space.base, self.space.moe_prompt_sets())
        vocabulary = self.engine.vocabulary
        tokenizer = vocabulary.tokenizer if vocabulary else self.engine.sources[self.engine.reference].tokenizer()
        self.evaluator = Evaluator(self.space.task_requests(), tokenizer, split="search", seed=config.seed,
                                   batch_size=config.batch_size, task_paths=self.space.task_paths,
                                   apply_chat_template=config.apply_chat_template)
        for task, split in self.evaluator.public_test_items():
            log.warning("%s: the search scores items of this public benchmark's %s split; held-out scores on "
                        "another split stay honest, but a score on %s is no longer a clean test score", task, split, split)

    # ------------------------------------------------------------------ one trial

    def recipe_for(self, trial: optuna.Trial) -> Candidate:
        warm = trial.user_attrs.get(record.WARM_RECIPE)
        if warm is not None:  # a warm-start candidate: run as it was queued
            return load_candidate(warm)
        if self.space.soup:
            return self.space.soup_recipe(suggest_members(trial, list(self.space.models)))
        method, values = suggest(trial, self.space)
        return self.space.recipe(method, values, self.engine.model_layers if self.engine else None)

    def evaluate_trial(self, trial: optuna.Trial) -> float | list[float]:
        config = self.space.config
        recipe = self.recipe_for(trial)
        text = recipe.to_yaml()
        warm = record.FIELDS["warm_start"] in trial.user_attrs
        record.write(trial, recipe=text, method=recipe.merge_method, proposer="warm_start" if warm else config.sampler,
                     seed=config.seed)
        started, cpu_started = time.perf_counter(), time.process_time()
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in self._recipe_scores:  # the same recipe again (e.g. a parameter-less method)
            value, scores = self._recipe_scores[key]
            record.write(trial, scores=scores, duplicate_of_recipe=key[:12])
            return value
        try:
            with self._gate.interruptible():
                model = self.engine.materialize(recipe, seed=config.seed)
        except MergeFailure as exc:
            raise CandidateFailed(str(exc)) from exc
        merge_seconds = time.perf_counter() - started
        # a soup's decisions need full scores: its trials are never pruned
        pruning = (config.pruning.enabled and config.objective != "multi" and SAMPLERS[config.sampler].prunable
                   and not warm)
        if pruning:
            rung = config.pruning.first_rung
            first = self._score(model, part=(0.0, rung))
            first_value = self.space.objective(first.scores)
            record.write(trial, first_rung_scores=first.scores)
            trial.report(first_value, step=0)
            if trial.should_prune():
                record.write(trial, seconds=round(time.perf_counter() - started, 2))
                raise optuna.TrialPruned(f"first rung {first_value:.4f} below the {config.pruning.quantile:.0%} quantile")
            scores = self.evaluator.combine(first, self._score(model, part=(rung, 1.0))).scores
        else:
            scores = self._score(model).scores
        record.write(trial, scores=scores, merge_seconds=round(merge_seconds, 3),
                     seconds=round(time.perf_counter() - started, 2),
                     cpu_seconds=round(time.process_time() - cpu_started, 2))
        value = self.space.objective(scores)
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
        if self.space.soup:  # as many trials as the soup still needs, beside any the study holds
            n_trials = done_before + soup_remaining(self.space.soup, list(self.space.models), study)
        log.info("study '%s' in %s: %d finished trials so far, budget %s, %d CPU threads", self.study_name,
                 store.shown(self.storage_url), done_before, n_trials if n_trials is not None else "unbounded",
                 self.threads)
        outcome = SearchOutcome(study)
        if n_trials is not None and done_before >= n_trials:
            log.info("the budget of %d trials is spent: nothing to run", n_trials)
            return outcome
        if self.engine is None:
            self.load()
        lock = store.AdmissionLock(self.storage_url, self.study_name)
        start = time.monotonic()
        failures: list[str] = []  # reasons of the failed trials since the last one that finished
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
                    state, reason = self._run_trial(study, trial)
                    outcome.trials_run += 1
                    failures = failures + [f"trial {trial.number}: {reason}"] if state == TrialState.FAIL else []
                    if len(failures) >= MAX_CONSECUTIVE_FAILURES:
                        outcome.stopped = f"{len(failures)} trials in a row failed; " + "; ".join(
                            dict.fromkeys(r.split(": ", 1)[1] for r in failures))
                        log.error("stopping the search: %s", outcome.stopped)
                        break
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
        """Runs one trial to a final state; returns (state, a failure's reason or None). A bug (any
        exception a candidate cannot cause) fails the trial, then propagates with its traceback."""
        log.debug("trial %d: evaluating", trial.number)
        with store.Heartbeat(study._storage, trial._trial_id):
            try:
                value = self.evaluate_trial(trial)
            except optuna.TrialPruned as exc:
                study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d: pruned (%s)", trial.number, exc)
                return TrialState.PRUNED, None
            except (CandidateFailed, EvomergeError) as exc:
                reason = " ".join(str(exc).split())
                record.write(trial, fail_reason=reason)
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d: failed: %s", trial.number, reason)
                return TrialState.FAIL, reason
            except KeyboardInterrupt:
                record.write(trial, interrupted=True, fail_reason="interrupted by the user")
                study.tell(trial, state=TrialState.FAIL)
                raise
            except Exception as exc:  # a bug, not a bad candidate: fail the trial and stop, traceback kept
                record.write(trial, fail_reason=f"{type(exc).__name__}: {' '.join(str(exc).split())} (a bug)")
                study.tell(trial, state=TrialState.FAIL)
                log.exception("trial %d: unexpected error; stopping the search", trial.number)
                raise
        study.tell(trial, value)
        shown = f"{value:.4f}" if isinstance(value, float) else ", ".join(f"{v:.4f}" for v in value)
        log.info("trial %d: %s -> %s", trial.number, trial.user_attrs.get(record.FIELDS["method"]), shown)
        return TrialState.COMPLETE, None

    def _update_bar(self, bar, study: optuna.Study) -> None:
        if self.space.config.objective == "multi":
            return
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if completed:
            best = max(t.value for t in completed)
            bar.set_postfix(best=f"{best:.4f}")
