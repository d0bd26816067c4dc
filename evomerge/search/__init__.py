"""`evomerge search`: the product's main job, and `evomerge report`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import optuna

from evomerge.evaluation import Evaluator
from evomerge.recipe import Recipe
from evomerge.search.runner import Searcher, task_requests
from evomerge.search.space import HeldoutEntry, SearchSpace

log = logging.getLogger(__name__)

__all__ = ["SearchSpace", "Searcher", "run_search", "run_workers", "run_worker", "dry_run", "evaluate_heldout",
           "write_report", "worker_environment"]


def heldout_entries(space: SearchSpace) -> list[HeldoutEntry]:
    if space.config.heldout:
        return list(space.config.heldout)
    return [HeldoutEntry(task=t.task, metric="accuracy", size=t.size) for t in space.config.tasks]


def evaluate_heldout(searcher: Searcher, best_recipe: Recipe) -> dict[str, Any]:
    """The winner and every source model, re-scored on the held-out split."""
    space, engine = searcher.space, searcher.engine
    entries = heldout_entries(space)
    by_metric: dict[str, list] = {}
    for entry in entries:
        by_metric.setdefault(entry.metric, []).append(entry)
    tokenizer = searcher.evaluator.tokenizer
    evaluators = {metric: Evaluator(task_requests(space, group), tokenizer, split="heldout", seed=space.config.seed,
                                    batch_size=space.config.batch_size) for metric, group in by_metric.items()}
    candidates = {"winner": best_recipe}
    sources = ({"base": space.base} if space.base and space.base not in space.models.values() else {}) | space.models
    for name, path in sources.items():  # a source as the engine sees it: a weight-1 linear "merge"
        candidates[name] = Recipe.from_dict({"merge_method": "linear", "dtype": space.config.dtype,
                                             "models": [{"model": path, "parameters": {"weight": 1.0}}]})
    columns = [f"{e.task}/{e.metric}" for e in entries]
    groups = {metric: [c for c in columns if c.endswith("/" + metric)] for metric in ("accuracy", "gold_loglik")}
    groups = {metric: cols for metric, cols in groups.items() if cols}
    rows: dict[str, Any] = {}
    for name, recipe in candidates.items():
        model = engine.materialize(recipe, seed=space.config.seed)
        scores = {}
        for metric, evaluator in evaluators.items():
            scores.update({f"{task}/{metric}": value for task, value in evaluator.evaluate(model).scores.items()})
        combined = {metric: sum(scores[c] for c in cols) / len(cols) for metric, cols in groups.items()}
        rows[name] = {"scores": scores, "combined": combined}
        log.info("held-out %s: %s", name, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    beats = {metric: rows["winner"]["combined"][metric] > max(row["combined"][metric] for name, row in rows.items()
                                                                 if name != "winner") for metric in groups}
    return {"split": "heldout", "seed": space.config.seed, "columns": columns, "combined_over": groups,
            "rows": rows, "winner_beats_all_sources": beats}


def run_search(space: SearchSpace, *, storage: str | None = None, study_name: str | None = None,
               n_trials: int | None = None, timeout: float | None = None, device: str | None = None,
               results_root: str | Path | None = None, heldout: bool = True, progress: bool = True) -> dict[str, Any]:
    from evomerge.log import setup_logging
    from evomerge.report.results import best_trial, write_results

    searcher = Searcher(space, storage=storage, study_name=study_name, results_root=results_root, device=device,
                        progress=progress)
    setup_logging(log_file=searcher.results_dir / "search.log")
    outcome = searcher.run(n_trials=n_trials, timeout=timeout)
    study = outcome.study
    best = best_trial(study)
    held = None
    if heldout and best is not None and not outcome.interrupted:
        log.info("scoring the winner (trial %d) and the source models on the held-out split", best.number)
        held = evaluate_heldout(searcher, Recipe.from_yaml(best.user_attrs["recipe"]))
    extra = {"storage": searcher.storage_url, "this_run": {"trials": outcome.trials_run,
             "seconds": round(outcome.seconds, 1), "interrupted": outcome.interrupted}}
    if outcome.interrupted:
        extra["heldout_skipped"] = "interrupted; rerun the same command to resume and finish"
    return write_results(study, searcher.results_dir, task_names=[t.task for t in space.config.tasks], heldout=held,
                         extra=extra)


def worker_environment(index: int, workers: int, gpus: int) -> dict[str, str]:
    """The environment of local worker `index` of `workers`: one GPU each when there are several;
    on CPUs a share of the cores instead of each worker claiming all of them."""
    env = dict(os.environ)
    if gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    elif gpus == 0:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return env


def run_workers(space: SearchSpace, space_file: str, workers: int, *, storage: str | None = None,
                study_name: str | None = None, n_trials: int | None = None, timeout: float | None = None,
                device: str | None = None, results_root: str | Path | None = None, heldout: bool = True,
                progress: bool = True) -> dict[str, Any]:
    """`--workers N`: N local worker processes on one study (one per GPU when there are several),
    then the held-out evaluation and the results folder, written by this process."""
    import subprocess
    import sys
    import time

    import torch
    from tqdm.auto import tqdm

    from evomerge.log import setup_logging
    from evomerge.report.results import best_trial, write_results
    from evomerge.search import storage as store

    searcher = Searcher(space, storage=storage, study_name=study_name, results_root=results_root, device=device,
                        progress=progress)
    setup_logging(log_file=searcher.results_dir / "search.log")
    study = searcher.open_study()  # created once, before the workers race for it
    gpus = torch.cuda.device_count()
    command = [sys.executable, "-m", "evomerge", "search", str(space_file), "--worker", "-q",
               "--storage", searcher.storage_url, "--study-name", searcher.study_name,
               "--results", str(searcher.results_dir.parent)]
    for flag, value in (("--n-trials", n_trials), ("--timeout", timeout), ("--device", device)):
        if value is not None:
            command += [flag, str(value)]
    processes = [subprocess.Popen(command, env=worker_environment(index, workers, gpus)) for index in range(workers)]
    log.info("started %d workers on study '%s' (%s)", workers, searcher.study_name, searcher.storage_url)
    budget = n_trials or space.config.n_trials
    started = time.monotonic()
    with tqdm(total=budget, desc=f"search ({workers} workers)", unit="trial", disable=not progress) as bar:
        while any(p.poll() is None for p in processes):
            done = store.finished_count(study)
            bar.update(max(0, min(done, budget or done) - bar.n))
            time.sleep(2)
    codes = [p.returncode for p in processes]
    if any(codes):
        log.warning("worker exit codes: %s", codes)
    best = best_trial(study)
    held = None
    if heldout and best is not None:
        searcher.load()
        held = evaluate_heldout(searcher, Recipe.from_yaml(best.user_attrs["recipe"]))
    extra = {"storage": searcher.storage_url, "this_run": {"workers": workers, "worker_exit_codes": codes,
                                                            "seconds": round(time.monotonic() - started, 1)}}
    return write_results(study, searcher.results_dir, task_names=[t.task for t in space.config.tasks],
                         heldout=held, extra=extra)


def run_worker(space: SearchSpace, **kwargs) -> int:
    """One worker of a shared study: the trial loop only (no held-out, no results folder)."""
    from evomerge.log import setup_logging

    searcher = Searcher(space, storage=kwargs.get("storage"), study_name=kwargs.get("study_name"),
                        results_root=kwargs.get("results_root"), device=kwargs.get("device"), progress=False)
    setup_logging(log_file=searcher.results_dir / "search.log")
    outcome = searcher.run(n_trials=kwargs.get("n_trials"), timeout=kwargs.get("timeout"))
    return 130 if outcome.interrupted else 0


def write_report(storage: str, study_name: str, results_root: str | Path = "results",
                 heldout_space: SearchSpace | None = None) -> dict[str, Any]:
    """`evomerge report`: the results folder of any study, from its database alone; with the
    study's search space (and its models on this machine), the held-out table too."""
    from evomerge.report.results import best_trial, write_results
    from evomerge.search import storage as store

    storage = store.normalize_url(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        from evomerge.errors import EvomergeError

        raise EvomergeError(f"no study '{study_name}' in {storage}") from None
    space = study.user_attrs.get("evomerge:space", {})
    tasks = [t["task"] for t in space.get("tasks", [])] or sorted(
        {k for t in study.get_trials(deepcopy=False) for k in t.user_attrs.get("scores", {})})
    held = None
    best = best_trial(study)
    if heldout_space is not None and best is not None:
        searcher = Searcher(heldout_space, storage=storage, study_name=study_name, results_root=results_root)
        searcher.open_study()  # refuses a space other than the study's
        searcher.load()
        held = evaluate_heldout(searcher, Recipe.from_yaml(best.user_attrs["recipe"]))
    return write_results(study, Path(results_root) / study_name, task_names=tasks, heldout=held,
                         extra={"storage": storage})


def dry_run(space: SearchSpace, count: int = 3) -> list[Recipe]:
    """The first recipes the sampler would propose, without loading any model."""
    from evomerge.search.sampler import make_sampler, suggest

    study = optuna.create_study(directions=["maximize"] * (len(space.config.tasks) if space.config.objective == "multi" else 1),
                                sampler=make_sampler(space))
    layers = _layer_counts(space) if space.config.stacking else None
    recipes = []
    for _ in range(count):
        trial = study.ask()
        method, values = suggest(trial, space)
        recipes.append(space.recipe(method, values, layers))
    return recipes


def _layer_counts(space: SearchSpace) -> dict[str, int]:
    import json

    counts = {}
    for path in space.models.values():
        config = Path(path) / "config.json"
        if config.exists():
            counts[path] = json.loads(config.read_text()).get("num_hidden_layers")
    return counts
