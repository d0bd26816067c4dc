"""`evomerge search` and `evomerge report`: one job, one pipeline.

    trials (this process, N local workers, or one worker of a shared study)
      -> best trial -> held-out scores of the winner and the sources -> results folder

`run(SearchJob)` is that pipeline; `run_worker` (trials only) and `write_report` (a finished study)
are its other entry points.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from evomerge.errors import EvomergeError
from evomerge.evaluation.sandbox import describe, require_isolation
from evomerge.moe import Candidate, load_candidate
from evomerge.search import storage as store
from evomerge.search.heldout import evaluate_heldout, source_search_scores
from evomerge.search.runner import Searcher
from evomerge.search.sampler import SAMPLERS
from evomerge.search.space import SearchSpace
from evomerge.trials import STUDY_SPACE, study_task_names

log = logging.getLogger(__name__)

MAX_FRONT_HELDOUT = 6  # other Pareto-front trials scored on the held-out split beside the winner

__all__ = ["SearchJob", "SearchSpace", "Searcher", "run", "run_search", "run_worker", "dry_run", "memory_plan",
           "evaluate_heldout", "write_report", "worker_environment"]


@dataclass(frozen=True)
class SearchJob:
    """What one `evomerge search` is asked to do; None means the space's own setting."""

    space: SearchSpace
    storage: str | None = None
    study_name: str | None = None
    n_trials: int | None = None
    timeout: float | None = None
    device: str | None = None
    results_root: str | Path | None = None
    heldout: bool = True
    progress: bool = True
    threads: int | None = None  # CPU threads of this process (of each worker: its share)
    workers: int = 1  # local worker processes; 1 runs the trials in this process
    space_file: str | None = None  # what the worker processes load (with workers > 1)

    def searcher(self) -> Searcher:
        return Searcher(self.space, storage=self.storage, study_name=self.study_name, results_root=self.results_root,
                        device=self.device, progress=self.progress, threads=self.threads)


def run(job: SearchJob) -> dict[str, Any]:
    """Trials, then the best trial's held-out scores, then the results folder; returns the summary."""
    from evomerge.log import setup_logging

    if job.workers > 1 and not SAMPLERS[job.space.config.sampler].parallel:
        raise EvomergeError(f"--workers: {job.space.config.sampler} decides each trial from the last; run it with one worker")
    runs_code = job.space.runs_generated_code(heldout=job.heldout)
    if runs_code:
        require_isolation()  # refused now, not after hours of trials
    searcher = job.searcher()
    setup_logging(log_file=searcher.results_dir / "search.log")
    if job.workers > 1:
        study, this_run = _run_local_workers(job, searcher)
    else:
        outcome = searcher.run(n_trials=job.n_trials, timeout=job.timeout)
        study = outcome.study
        this_run = {"trials": outcome.trials_run, "seconds": round(outcome.seconds, 1),
                    "interrupted": outcome.interrupted}
        if outcome.stopped:
            this_run["stopped"] = outcome.stopped
    extra = {"storage": store.shown(searcher.storage_url), "this_run": this_run}
    if runs_code:
        extra["sandbox"] = describe()
    heldout = job.heldout and not this_run.get("interrupted")
    if job.heldout and this_run.get("interrupted"):
        extra["heldout_skipped"] = "interrupted; rerun the same command to resume and finish"
    return _finish(searcher, study, heldout=heldout, extra=extra)


def _finish(searcher: Searcher, study: optuna.Study, *, heldout: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """The best trial's held-out scores (when asked), then the results folder."""
    from evomerge.device import resolve_device
    from evomerge.report.results import best_trial, completed, pareto_front, write_results
    from evomerge.search.reproduce import record

    best = best_trial(study)
    device = str(resolve_device(searcher.device))
    held = references = None
    if heldout and best is not None:
        def load():
            if searcher.engine is None:
                searcher.load()
            return searcher.engine, searcher.evaluator.tokenizer

        log.info("scoring the source models on the search split (the plots' reference lines)")
        references = source_search_scores(searcher.space, load, device=device)
        front = [r for r in completed(study) if r.number in set(pareto_front(study)) and r.number != best.number]
        others = {f"front trial {r.number}": load_candidate(r.recipe) for r in front[:MAX_FRONT_HELDOUT]}
        if len(front) > MAX_FRONT_HELDOUT:
            log.info("held-out: %d of the %d other Pareto-front trials (`evomerge export --trial N` for any)",
                     MAX_FRONT_HELDOUT, len(front))
        log.info("scoring the winner (trial %d)%s and the source models on the held-out split", best.number,
                 f", {len(others)} other Pareto-front trial(s)" if others else "")
        held = evaluate_heldout(searcher.space, load, load_candidate(best.recipe), device=device,
                                others=others) | {"trial": best.number}
    applied = searcher.evaluator.apply_chat_template if searcher.evaluator is not None else None
    extra = {**extra, "reproduce": record(searcher.space, threads=searcher.threads, device=device,
                                           results_dir=searcher.results_dir),
             "apply_chat_template": {"setting": searcher.space.config.apply_chat_template, "applied": applied}}
    return write_results(study, searcher.results_dir, task_names=searcher.space.task_names, heldout=held,
                         references=references, extra=extra, rename=searcher.space.portable_refs)


def run_search(space: SearchSpace, **options: Any) -> dict[str, Any]:
    """The search in this process (see `SearchJob` for the options)."""
    return run(SearchJob(space, **options))


def run_worker(space: SearchSpace, **options: Any) -> int:
    """One worker of a shared study: the trial loop only (no held-out, no results folder)."""
    from evomerge.log import setup_logging

    job = SearchJob(space, **options, progress=False)
    searcher = job.searcher()
    setup_logging(log_file=searcher.results_dir / "search.log")
    outcome = searcher.run(n_trials=job.n_trials, timeout=job.timeout)
    return 130 if outcome.interrupted else (1 if outcome.stopped else 0)


def worker_environment(index: int, workers: int, gpus: int) -> dict[str, str]:
    """The environment of local worker `index` of `workers`: one GPU each when there are several;
    on CPUs a share of the cores instead of each worker claiming all of them."""
    env = dict(os.environ)
    if gpus > 1:
        env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    elif gpus == 0:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return env


def _run_local_workers(job: SearchJob, searcher: Searcher) -> tuple[optuna.Study, dict[str, Any]]:
    import torch
    from tqdm.auto import tqdm


    study = searcher.open_study()  # created once, before the workers race for it
    gpus = torch.cuda.device_count()
    command = [sys.executable, "-m", "evomerge", "search", str(job.space_file), "--worker", "-q",
               "--study-name", searcher.study_name, "--results", str(searcher.results_dir.parent)]
    threads = None if gpus else max(1, searcher.threads // job.workers)  # CPU workers split the cores
    for flag, value in (("--n-trials", job.n_trials), ("--timeout", job.timeout), ("--device", job.device),
                        ("--threads", threads)):
        if value is not None:
            command += [flag, str(value)]
    for folder in job.space.task_paths:  # --include-path folders given to this command reach the workers too
        command += ["--include-path", folder]
    processes = [subprocess.Popen(command, env={**worker_environment(i, job.workers, gpus),
                                                store.STORAGE_ENV: searcher.storage_url}) for i in range(job.workers)]
    log.info("started %d workers on study '%s' (%s)", job.workers, searcher.study_name, store.shown(searcher.storage_url))
    budget = job.n_trials or job.space.config.n_trials
    started = time.monotonic()
    with tqdm(total=budget, desc=f"search ({job.workers} workers)", unit="trial", disable=not job.progress) as bar:
        while any(p.poll() is None for p in processes):
            done = store.finished_count(study)
            bar.update(max(0, min(done, budget or done) - bar.n))
            time.sleep(2)
    codes = [p.returncode for p in processes]
    if any(codes):
        log.warning("worker exit codes: %s", codes)
    return study, {"workers": job.workers, "worker_exit_codes": codes, "seconds": round(time.monotonic() - started, 1)}


def write_report(storage: str, study_name: str, results_root: str | Path = "results",
                 heldout_space: SearchSpace | None = None) -> dict[str, Any]:
    """`evomerge report`: the results folder of any study, from its database alone; with the
    study's search space (and its models on this machine), the held-out table too."""
    from evomerge.report.results import write_results

    storage = store.normalize_url(storage)
    study = store.load_study(storage, study_name)  # a SQLite file that is not there: refused, not created
    if heldout_space is None:  # the held-out table already written for this study's winner stays
        from evomerge.report.results import best_trial

        folder, best = Path(results_root) / study_name, best_trial(study)
        held = json.loads((folder / "heldout.json").read_text()) if (folder / "heldout.json").is_file() else None
        held = held if held and best and held.get("trial") == best.number else None
        previous = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        extra = {"storage": store.shown(storage)}
        same = previous.get("study") == study_name  # the search's own record and reference scores stay
        if same and previous.get("reproduce"):
            extra["reproduce"] = previous["reproduce"]
        return write_results(study, folder, task_names=study_task_names(study), heldout=held, extra=extra,
                             references=previous.get("sources_search") if same else None,
                             rename=_portable_refs(study))
    searcher = Searcher(heldout_space, storage=storage, study_name=study_name, results_root=results_root)
    searcher.open_study()  # refuses a space other than the study's
    return _finish(searcher, study, heldout=True, extra={"storage": store.shown(storage)})


def _portable_refs(study: optuna.Study) -> dict[str, str]:
    """Model paths -> the names the study's space gave them (demo-family members by name), from the
    space the study records; nothing when it records none or its models are not on this machine."""
    config = study.user_attrs.get(STUDY_SPACE)
    if not config:
        return {}
    try:
        return SearchSpace.from_dict(config).portable_refs
    except EvomergeError:
        return {}


def memory_plan(space: SearchSpace, device: str | None = None):
    """The memory plan a search of this space would make on `device` (default: the space's), from the
    models' configs alone: nothing is loaded (see evomerge.engine.memory)."""
    from evomerge.device import target_device
    from evomerge.engine import plan_family

    device = device or space.config.device
    device_type = target_device(device).type
    c = space.config
    return plan_family(list(space.models.values()), base_model=space.base, device=device, dtype=c.dtype,
                       out_dtype=c.out_dtype, mergekit_exact=c.mergekit_exact, mapped_vocab=space.tokenizer is not None,
                       placement=c.placement, device_memory=c.device_memory, host_memory=c.host_memory,
                       evaluation=space.evaluation_shape(device_type), output_layers=space.output_layers)


def dry_run(space: SearchSpace, count: int = 3) -> list[Candidate]:
    """The first recipes the sampler would propose, without loading any model (layer counts for
    stacking come from the sources' configs: local dirs, GGUF headers or cached hub ids)."""
    from evomerge.checkpoint import locate
    from evomerge.search.sampler import make_sampler, suggest

    if space.soup:  # what a soup tries before it has scores: each source alone (greedy), or all of them
        names = list(space.models)
        first = [[name] for name in names] if space.soup == "greedy_soup" else [names]
        return [space.soup_recipe(members) for members in first[:count]]
    space.check_moe(missing_ok=True)
    study = optuna.create_study(directions=["maximize"] * space.objectives, sampler=make_sampler(space))
    layers = {path: locate(path).num_layers for path in space.models.values()} if space.config.stacking else None
    recipes = []
    for _ in range(count):
        trial = study.ask()
        method, values = suggest(trial, space)
        recipes.append(space.recipe(method, values, layers))
    return recipes
