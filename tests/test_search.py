"""The search: space validation, recipes from numbers, CMA-ES provenance, and whole studies on
the tiny family (outputs, resume, failures, kill -9, Ctrl-C)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from evomerge.errors import SpaceError
from evomerge.moe import MoEConfig
from evomerge.recipe import Recipe, setting_leaves
from evomerge.search import SearchSpace, dry_run, run_search
from evomerge.search.sampler import MethodwiseCmaEs, _seed, from_unit, suggest
from evomerge.trials import SAMPLER_PREFIX as KEY
from evomerge.trials import TrialRecord
from tests.conftest import REPO, oracle, tiny_space, write_yaml

# ----------------------------------------------------------------------------- space.yaml


@pytest.mark.parametrize(
    "override,message",
    [
        ({"methods": ["frankenmerge"]}, "methods: unknown merge method 'frankenmerge'"),
        ({"sampler": "cmaes", "objective": "multi"}, "sampler: cmaes optimises one objective"),
        ({"n_trials": None}, "n_trials or timeout"),
        ({"methods": "passthrough"}, "stacking"),
        ({"parameters": {"wieght": {"low": 0, "high": 1}}}, "parameters.wieght: not a searchable parameter"),
        ({"parameters": {"weight": {"low": 1, "high": 0}}}, "parameters.weight: low must be below high"),
        # user ranges are checked against the method's own bounds when the space loads
        ({"methods": "ties", "parameters": {"density": {"low": 0, "high": 1}}},
         "parameters.density.low: must be in (0, 1], got 0"),
        ({"methods": "della", "parameters": {"epsilon": {"low": 0.1, "high": 1.5}}},
         "parameters.epsilon.high: must be in [0, 1], got 1.5"),
        ({"parameters": {"density": {"low": 0.2, "high": 1}}}, "parameters.density: not a searchable parameter"),
        ({"parameters": {"nearswap.t": {"low": 0.01, "high": 0.1}}},
         "parameters.nearswap.t: method 'nearswap' is not among methods"),
        ({"tasks": [{"task": "gsm8k", "metric": "bleu"}]}, "tasks.0.metric"),
        ({"layer_schedule": 0}, "layer_schedule"),
        ({"base_model": None, "methods": "ties"}, "base_model: method 'ties' needs a base_model"),
        ({"sampler": "cma"}, "sampler"),
        ({"colour": "blue"}, "colour: unknown field"),
        ({"name": "../../elsewhere"}, "name: study name '../../elsewhere': use letters, digits"),
        ({"parameters": {"weight": {"low": 0, "high": float("nan")}}}, "parameters.weight.high: Input should be a finite number"),
        ({"timeout": float("inf")}, "timeout: Input should be a finite number"),
        ({"tasks": [{"task": "gsm8k", "weight": 0}, {"task": "mmlu", "weight": 0}]},
         "tasks: the weights must sum to more than 0"),
    ],
)
def test_bad_spaces_name_the_field(override, message, tiny_family, tmp_path):
    with pytest.raises(SpaceError) as info:
        SearchSpace.load(write_yaml(tiny_space(tiny_family, tmp_path, **override), tmp_path / "space.yaml"))
    assert message in str(info.value) and str(info.value).startswith(str(tmp_path / "space.yaml"))


def test_relative_model_paths_are_relative_to_the_space_file(tiny_family, tmp_path):
    family_root = Path(tiny_family["base"]).parent
    space = tiny_space(tiny_family, tmp_path, base_model="../" + family_root.name + "/base")
    space["models"] = ["../" + family_root.name + "/ft_math", {"name": "code", "path": tiny_family["ft_code"]}]
    folder = family_root.parent / "spaces"
    folder.mkdir(exist_ok=True)
    loaded = SearchSpace.load(write_yaml(space, folder / "s.yaml"))
    assert loaded.models["ft_math"] == tiny_family["ft_math"] and loaded.base == tiny_family["base"]


@pytest.mark.oracle
def test_schedules_and_filters_become_gradients_and_filter_lists(tiny_family, tmp_path):
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, methods=["ties"], layer_schedule=3, filters=True))
    dims = space.dimensions("ties")
    assert len(dims) == 3 * 2 * 3 * 3 + 1  # models x (weight, density) x filters x points + lambda
    values = {d.name: (d.low + d.high) / 2 for d in dims}
    values["ties.math.weight.self_attn.2"] = 0.9
    recipe = space.recipe("ties", values)
    math_params = recipe.models[0].parameters
    assert math_params["weight"][0] == {"filter": "self_attn", "value": [0.5, 0.5, 0.9]}
    assert math_params["weight"][-1] == {"value": [0.5, 0.5, 0.5]}  # catch-all last
    assert recipe.parameters == {"lambda": 1.0}
    # and mergekit's own schema accepts it
    mergekit_config = oracle("mergekit.config")
    mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))


def test_della_epsilon_keeps_density_inside_the_unit_interval(tiny_family, tmp_path):
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, methods=["della"], layer_schedule=2))
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = {d.name: from_unit(d, rng.random()) for d in space.dimensions("della")}
        recipe = space.recipe("della", values)
        for model in recipe.models:
            eps = model.parameters["epsilon"]
            for density in setting_leaves(model.parameters["density"]):
                assert density >= 1 or (density - eps > 0 and density + eps < 1)


def test_several_objectives_default_to_nsga2(tiny_family, tmp_path):
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, objective="multi"))
    assert space.config.sampler == "nsga2" and space.objectives == 2


def test_task_arithmetic_does_not_search_density(tiny_family, tmp_path):
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path))
    assert {d.param for d in space.dimensions("task_arithmetic")} == {"weight", "lambda"}


def test_dry_run_prints_recipes_without_models(tmp_path):
    """The 7B example spaces validate and propose recipes without any model on disk."""
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = SearchSpace.load(path)
        recipes = dry_run(space, 2)
        kind = MoEConfig if space.config.moe else Recipe  # demo_moe.yaml proposes mixtures of experts
        assert len(recipes) == 2 and all(isinstance(r, kind) for r in recipes)


def test_dry_run_reads_layer_counts_through_the_checkpoint_code(tiny_family, tmp_path):
    """Stacking needs each source's layer count; a dry run reads it from the config the engine would
    read (a local dir here; GGUF headers and cached hub ids go through the same `locate`)."""
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, methods="passthrough",
                                         stacking={"slots": 3, "block": 2}))
    for recipe in dry_run(space, 4):
        ranges = [s.sources[0].layer_range for s in recipe.slices]
        assert len(ranges) == 3 and all(0 <= lo < hi <= 4 and hi - lo == 2 for lo, hi in ranges)


# ----------------------------------------------------------------------------- CMA-ES provenance


def _synthetic_study(space: SearchSpace, n: int, target: float = 0.8, sampler=None):
    """The real sampler (or `sampler`) and recipes, scored by a cheap function of the weights (no model)."""
    study = optuna.create_study(direction="maximize", sampler=sampler or MethodwiseCmaEs(space, seed=5))

    def objective(trial):
        method, values = suggest(trial, space)
        trial.set_user_attr("method", method)
        return -sum((v - target) ** 2 for k, v in values.items() if ".weight." in k)

    study.optimize(objective, n_trials=n)
    return study


def test_continuous_parameters_are_proposed_by_cmaes(tiny_family, tmp_path):
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, methods=["task_arithmetic", "ties"]))
    study = _synthetic_study(space, 60)
    sampler = study.sampler
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        attrs = trial.system_attrs
        assert attrs[KEY + "sampler"] == "cmaes"
        assert not [k for k in attrs if k.startswith(KEY + "independent:")], "a parameter escaped CMA-ES"
        # Replaying the records before this trial reproduces its proposal exactly.
        method = attrs[KEY + "method"]
        earlier = [t for t in trials if t.number < trial.number]
        optimizer, generation, assigned = sampler.replay(method, earlier)
        assert (generation, assigned) == (attrs[KEY + "cma_generation"], attrs[KEY + "cma_index"])
        optimizer._rng = np.random.RandomState(_seed(sampler.seed, method, generation, assigned, trial.number))
        x = optimizer.ask()
        assert np.allclose(x, attrs[KEY + "cma_x"])
        for dim, xi in zip(space.dimensions(method), x):
            assert math.isclose(trial.params[dim.name], from_unit(dim, xi), rel_tol=1e-9)
    generations = {(t.system_attrs[KEY + "method"], t.system_attrs[KEY + "cma_generation"]) for t in trials}
    assert {m for m, _ in generations} == {"task_arithmetic", "ties"}
    assert max(g for _, g in generations) >= 2  # CMA-ES advanced, not just its first sample


def test_cmaes_learns_where_random_does_not(tiny_family, tmp_path):
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path))
    study = _synthetic_study(space, 90, target=0.9)
    trials = study.get_trials(deepcopy=False)
    sigmas = [t.system_attrs[KEY + "cma_sigma"] for t in trials]
    assert sigmas[-1] < sigmas[0]
    first = np.mean([t.value for t in trials[:10]])
    last = np.mean([t.value for t in trials[-10:]])
    assert last > first + 0.1  # the population moved towards the optimum
    # Random search on the same objective and budget does not: its last third is no better than its
    # first (within noise), and far below CMA-ES's last proposals.
    randomly = _synthetic_study(space, 90, target=0.9, sampler=optuna.samplers.RandomSampler(seed=5))
    random_values = [t.value for t in randomly.get_trials(deepcopy=False)]
    assert abs(np.mean(random_values[-30:]) - np.mean(random_values[:30])) < 0.25
    assert last > np.mean(random_values[-30:]) + 0.3


# ----------------------------------------------------------------------------- whole studies


@pytest.mark.e2e
def test_search_writes_every_output_and_resumes(tiny_family, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))  # held-out scores: computed, then cached
    space = SearchSpace.load(write_yaml(tiny_space(tiny_family, tmp_path, methods=["task_arithmetic", "ties"]), tmp_path / "s.yaml"))
    summary = run_search(space, progress=False)
    results = tmp_path / "results" / "tiny"
    for name in ("best.yaml", "leaderboard.csv", "leaderboard.md", "history.png", "tasks.png", "importances.png",
                 "summary.json", "heldout.md", "heldout.json", "search.log", "study.db"):
        assert (results / name).exists(), name
    assert summary["trials"]["COMPLETE"] + summary["trials"]["PRUNED"] == 6
    best = Recipe.load(results / "best.yaml")
    assert best.merge_method in ("task_arithmetic", "ties")
    heldout = json.loads((results / "heldout.json").read_text())
    assert set(heldout["rows"]) == {"winner", "base", "math", "code", "know"}
    # The winner against each source on the same items, with item-level scores kept to recompute it.
    from evomerge.report.stats import VERDICTS, paired

    items = json.loads((results / "heldout_items.json").read_text())
    assert set(items) == set(heldout["rows"]) and (results / "heldout.png").exists()
    for name, row in heldout["rows"].items():
        for column, value in row["scores"].items():
            assert len(items[name][column]) == {"mmlu/accuracy": 4, "gsm8k/gold_loglik": 3}[column]
            assert np.mean(items[name][column]) == pytest.approx(value)
    assert set(heldout["comparisons"]) == {"base", "math", "code", "know"}
    for source, found in heldout["comparisons"].items():
        assert found == paired(items["winner"], items[source], heldout["combined_over"], seed=0)
        assert all(f["verdict"] in VERDICTS for f in found.values())
    assert "paired bootstrap interval" in (results / "heldout.md").read_text()
    # MMLU's search items are questions of its public test split: said once, naming task and split
    log = (results / "search.log").read_text()
    assert log.count("mmlu: the search scores items of this public benchmark's test split") == 1
    assert "gsm8k: the search scores" not in log  # GSM8K searches on its training split
    # Every source's search-split scores, scored as trials are: the plots' reference lines.
    references = summary["sources_search"]
    assert set(references) == {"base", "math", "code", "know"}
    for found in references.values():
        assert set(found["scores"]) == {"gsm8k", "mmlu"} and found["score"] == space.objective(found["scores"])
    # `evomerge report` rewrites the folder from the database and keeps the held-out table and references.
    from evomerge.search import write_report

    again = write_report(summary["storage"], "tiny", tmp_path / "results")
    assert again["heldout"] == summary["heldout"] and again["heldout"]["trial"] == summary["best"]["trial"]
    assert again["sources_search"] == references
    # The same command again: nothing to run, held-out scores from the cache (no model is built).
    from evomerge.engine import MergeEngine

    def no_materialize(*args, **kwargs):
        raise AssertionError("a finished study's held-out scores were computed again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MergeEngine, "materialize", no_materialize)
        patch.setattr(MergeEngine, "__init__", no_materialize)
        rerun = run_search(space, progress=False)
    assert rerun["heldout"]["rows"] == summary["heldout"]["rows"]
    assert rerun["heldout"]["comparisons"] == summary["heldout"]["comparisons"]
    assert rerun["sources_search"] == references
    # Every completed trial can be re-run from its record alone.
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{results / 'study.db'}")
    record = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    assert Recipe.from_yaml(record.user_attrs["recipe"]) == best and record.user_attrs["seed"] == 0
    assert set(record.user_attrs["scores"]) == {"gsm8k", "mmlu"}
    # Same command, bigger budget: the study continues where it was.
    numbers_before = {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}
    run_search(space, n_trials=9, heldout=False, progress=False)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{results / 'study.db'}")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 9
    after = {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert all(after[n] == v for n, v in numbers_before.items())
    # A different space under the same name is refused, naming the study.
    other = SearchSpace.load(write_yaml(tiny_space(tiny_family, tmp_path, methods=["ties"]), tmp_path / "s.yaml"))
    with pytest.raises(SpaceError, match="study 'tiny'"):
        run_search(other, progress=False)


@pytest.mark.e2e
def test_a_nan_candidate_fails_alone(tiny_family, tmp_path, monkeypatch):
    from evomerge.search.runner import Searcher

    original = Searcher.recipe_for

    def recipe_for(self, trial):
        recipe = original(self, trial)
        if trial.number == 1:  # weights summing to zero: a real NaN merge
            return Recipe.from_dict({"merge_method": "linear", "dtype": "float32", "models": [
                {"model": tiny_family["ft_math"], "parameters": {"weight": 1.0}},
                {"model": tiny_family["ft_code"], "parameters": {"weight": -1.0}}]})
        return recipe

    monkeypatch.setattr(Searcher, "recipe_for", recipe_for)
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, n_trials=4, pruning={"enabled": False}))
    summary = run_search(space, heldout=False, progress=False)
    assert summary["trials"]["FAIL"] == 1 and summary["trials"]["COMPLETE"] == 4
    study = optuna.load_study(study_name="tiny", storage=summary["storage"])
    failed = study.get_trials(states=(TrialState.FAIL,))[0]
    assert failed.number == 1 and "NaN/inf" in failed.user_attrs["fail_reason"]


@pytest.mark.e2e
def test_failed_trials_in_a_row_stop_the_search_with_their_reasons(tiny_family, tmp_path, monkeypatch):
    """Every candidate fails (zero-sum weights): the search stops after MAX_CONSECUTIVE_FAILURES
    instead of failing trials forever, says why, and still writes its results folder."""
    from evomerge.search import runner

    def recipe_for(self, trial):
        return Recipe.from_dict({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": tiny_family["ft_math"], "parameters": {"weight": 1.0}},
            {"model": tiny_family["ft_code"], "parameters": {"weight": -1.0}}]})

    monkeypatch.setattr(runner.Searcher, "recipe_for", recipe_for)
    monkeypatch.setattr(runner, "MAX_CONSECUTIVE_FAILURES", 3)
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, n_trials=20, pruning={"enabled": False}))
    summary = run_search(space, heldout=False, progress=False)
    assert summary["trials"]["FAIL"] == 3 and summary["trials"]["COMPLETE"] == 0
    assert summary["this_run"]["stopped"].startswith("3 trials in a row failed; linear produced NaN/inf")
    assert (tmp_path / "results" / "tiny" / "summary.json").exists()


def test_a_bug_stops_the_search_with_its_traceback(tiny_family, tmp_path, monkeypatch):
    """An exception no candidate can cause is a bug: its trial fails with the reason, and the search
    stops by raising it (it is not scored as a bad candidate and retried forever)."""
    from evomerge.search import runner

    def broken(self, model, part=None):
        raise KeyError("a bug in the evaluator")

    monkeypatch.setattr(runner.Searcher, "_score", broken)
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, n_trials=5))
    with pytest.raises(KeyError, match="a bug in the evaluator"):
        run_search(space, heldout=False, progress=False)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/results/tiny/study.db")
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert len(study.trials) == 1 and failed.user_attrs["fail_reason"].startswith("KeyError")


@pytest.mark.e2e
def test_the_search_shows_one_bar_and_no_evaluation_bars(tiny_family, tmp_path, capsys):
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, n_trials=2, pruning={"enabled": False}))
    run_search(space, heldout=False, progress=True)
    err = capsys.readouterr().err
    assert "search:" in err and "best=" in err  # the search's bar, with the best score so far
    assert "Running loglikelihood requests" not in err and "Tokenizing inputs" not in err


@pytest.mark.e2e
def test_multi_objective_results_follow_the_pareto_front(tiny_family, tmp_path):
    """Three objectives: the front is marked in the leaderboard and summary, the winner is chosen by the
    stated rule (`winner:`), the plot shows every pair, the held-out table scores the front."""
    tasks = [{"task": "gsm8k", "metric": "gold_loglik", "size": 3}, {"task": "mmlu", "metric": "gold_loglik", "size": 4},
             {"task": "humaneval", "metric": "gold_loglik", "size": 2}]
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, objective="multi", n_trials=6, tasks=tasks,
                                         winner="mmlu", heldout=[{"task": "mmlu", "metric": "gold_loglik", "size": 3}]))
    summary = run_search(space, progress=False)
    assert summary["directions"] == ["maximize"] * 3 and summary["winner_rule"] == "mmlu"
    study = optuna.load_study(study_name="tiny", storage=summary["storage"])
    front = sorted(t.number for t in study.best_trials)
    assert summary["pareto_front"] == front
    on_front = [t for t in study.trials if t.number in front]
    assert summary["best"]["trial"] == max(on_front, key=lambda t: t.user_attrs["scores"]["mmlu"]).number
    results = tmp_path / "results" / "tiny"
    rows = list(csv.DictReader(open(results / "leaderboard.csv")))
    assert sorted(int(r["trial"]) for r in rows if r["pareto_front"] == "True") == front
    assert "Pareto front" in (results / "leaderboard.md").read_text()
    held = summary["heldout"]["rows"]
    assert {f"front trial {n}" for n in front if n != summary["best"]["trial"]} <= set(held)
    assert (results / "pareto.png").exists() and (results / "importances.png").exists()


def _search_process(space_file: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(space_file), "-q", "--no-heldout"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _wait_for(study_db: Path, complete: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if study_db.exists():
            try:
                study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_db}")
                done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if len(done) >= complete and running:
                    return
            except Exception:
                pass
        time.sleep(0.3)
    raise AssertionError("the search did not get far enough")


@pytest.mark.e2e
def test_kill_9_loses_no_completed_trial(tiny_family, tmp_path):
    space = tiny_space(tiny_family, tmp_path, n_trials=10, pruning={"enabled": False})
    space["tasks"][1]["size"] = 12  # trials long enough to be killed in the middle of one
    space_file = write_yaml(space, tmp_path / "s.yaml")
    db = tmp_path / "results" / "tiny" / "study.db"
    process = _search_process(space_file, tmp_path / "first.log")
    _wait_for(db, complete=3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    before = {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(before) >= 3 and study.get_trials(states=(TrialState.RUNNING,))

    process = _search_process(space_file, tmp_path / "second.log")
    assert process.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-2000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    after = {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert all(after[n] == v for n, v in before.items())  # only grows, nothing re-valued
    assert len(after) == 10
    lost = study.get_trials(states=(TrialState.FAIL,))
    assert len(lost) == 1 and lost[0].user_attrs["fail_reason"] == "worker process died"
    retry = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == lost[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    if "evomerge:cma_x" in lost[0].system_attrs:  # it had been proposed: the retry is the same candidate
        assert retry[0].system_attrs["evomerge:cma_x"] == lost[0].system_attrs["evomerge:cma_x"]
    assert not lost[0].params or retry[0].params == lost[0].params
    # No completed trial was evaluated twice: each trial number was evaluated in one process only.
    log = (tmp_path / "results" / "tiny" / "search.log").read_text()
    evaluated = [int(line.split("trial ")[1].split(":")[0]) for line in log.splitlines() if ": evaluating" in line]
    assert len(evaluated) == len(set(evaluated))
    assert set(before) <= set(evaluated) and not set(before) & set(evaluated[len(before) + 1:])


@pytest.mark.e2e
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tiny_family, tmp_path):
    space = tiny_space(tiny_family, tmp_path, n_trials=6, pruning={"enabled": False})
    space["tasks"][1]["size"] = 12
    space_file = write_yaml(space, tmp_path / "s.yaml")
    db = tmp_path / "results" / "tiny" / "study.db"
    process = _search_process(space_file, tmp_path / "first.log")
    _wait_for(db, complete=2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "results" / "tiny" / "summary.json").read_text())
    assert summary["this_run"]["interrupted"] is True
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    # The running trial is marked interrupted; a Ctrl-C that came during a database write lets that
    # write (and so that trial) finish first. Either way nothing is left RUNNING.
    interrupted = study.get_trials(states=(TrialState.FAIL,))
    assert len(interrupted) <= 1 and all(t.user_attrs["interrupted"] is True for t in interrupted)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert _search_process(space_file, tmp_path / "second.log").wait(timeout=600) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6


@pytest.mark.e2e
def test_ctrl_c_waits_for_a_database_write_then_stops(tiny_family, tmp_path, monkeypatch, ordinary_ctrl_c):
    """A Ctrl-C that arrives inside a database write (here: while trial 2 stores its recipe) does
    not tear the write; it stops the trial right after, which is then marked interrupted."""
    from optuna.storages import RDBStorage

    original = RDBStorage.set_trial_user_attr

    def set_trial_user_attr(self, trial_id, key, value):
        if key == "recipe" and self.get_trial_number_from_id(trial_id) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered before the write below, in the main thread
        return original(self, trial_id, key, value)

    monkeypatch.setattr(RDBStorage, "set_trial_user_attr", set_trial_user_attr)
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, n_trials=5, pruning={"enabled": False}))
    summary = run_search(space, heldout=False, progress=False)
    assert summary["this_run"]["interrupted"] is True and summary["trials"]["COMPLETE"] == 2
    assert summary["trials"]["INTERRUPTED"] == 1 and summary["trials"]["FAIL"] == 0  # reported as what it was
    study = optuna.load_study(study_name="tiny", storage=summary["storage"])
    stopped = study.trials[2]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["interrupted"] is True
    assert "recipe" in stopped.user_attrs  # the write in flight when Ctrl-C came was finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is ordinary again


@pytest.fixture
def ordinary_ctrl_c():
    """SIGINT as in an interactive shell (a background job, e.g. under CI, inherits it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_the_interrupt_gate_defers_outside_and_delivers_inside_interruptible_regions(ordinary_ctrl_c):
    from evomerge.search.interrupts import InterruptGate

    gate = InterruptGate()
    with gate.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        assert gate.pending  # deferred, not raised
        with pytest.raises(KeyboardInterrupt):
            gate.checkpoint()
        with pytest.raises(KeyboardInterrupt):
            with gate.interruptible():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # interrupted at once
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # one that came while closed stops the next region on entry
            with gate.interruptible():
                pytest.fail("entered a region after a deferred Ctrl-C")
        with pytest.raises(KeyboardInterrupt):  # one swallowed where it landed (a __del__) still stops
            with gate.interruptible():
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                except KeyboardInterrupt:
                    pass
    with pytest.raises(KeyboardInterrupt):  # outside the loop, ordinary behaviour
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_a_trial_lost_before_storing_its_parameters_is_retried_as_the_same_candidate(tiny_family, tmp_path):
    from evomerge.search.storage import requeue_once

    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, methods=["task_arithmetic", "ties"]))
    study = optuna.create_study(direction="maximize", sampler=MethodwiseCmaEs(space, seed=1))
    lost = study.ask()
    assert lost.relative_params  # the sampler proposed (recorded in system attributes) ...
    study.tell(lost, state=TrialState.FAIL)  # ... and the worker died before suggest() stored anything
    assert not study.trials[lost.number].params
    requeue_once(study, study.trials[lost.number])
    retry = study.ask()
    method, values = suggest(retry, space)
    recorded = study.trials[lost.number].system_attrs
    assert retry.user_attrs["retry_of"] == lost.number and method == recorded[KEY + "method"]
    expected = {d.name: from_unit(d, x) for d, x in zip(space.dimensions(method), recorded[KEY + "cma_x"])}
    assert values == pytest.approx(expected)
    assert not [k for k in study.trials[retry.number].system_attrs if k.startswith(KEY + "independent:")]
    # A trial lost before the sampler ever proposed (no record) is retried as a fresh CMA-ES proposal.
    empty = study.ask()
    study.tell(empty, state=TrialState.FAIL)
    requeue_once(study, study.trials[empty.number])
    fresh = study.ask()
    suggest(fresh, space)
    attrs = study.trials[fresh.number].system_attrs
    assert attrs[KEY + "sampler"] == "cmaes" and not [k for k in attrs if k.startswith(KEY + "independent:")]


def test_a_trial_lost_before_its_worker_wrote_its_name_is_recovered(tmp_path, monkeypatch):
    """kill -9 between ask() and the worker's name reaching the database leaves an ownerless
    RUNNING trial that never beat: after the grace period it is failed and re-queued once."""
    from evomerge.search import storage as store

    study = optuna.create_study(storage=store.open_storage(f"sqlite:///{tmp_path / 's.db'}"), study_name="x")
    study.ask()
    assert store.recover_dead_trials(study) == 0  # still within the grace period: a worker may be writing
    monkeypatch.setattr(store, "GRACE_PERIOD", 0)
    assert store.recover_dead_trials(study) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    assert study.get_trials()[1].user_attrs["retry_of"] == 0


# ----------------------------------------------------------------------------- bad input on the command line


@pytest.mark.parametrize("args,message", [
    (["--n-trials", "0"], "argument --n-trials: must be above 0, got 0"),
    (["--timeout", "-5"], "argument --timeout: must be above 0, got -5"),
    (["--study-name", "../../x"], "--study-name: study name '../../x': use letters, digits"),
])
def test_bad_search_arguments_are_one_line_and_write_nothing(args, message, tiny_family, tmp_path, capsys):
    from evomerge.cli import main

    space_file = write_yaml(tiny_space(tiny_family, tmp_path), tmp_path / "s.yaml")
    try:
        code = main(["search", str(space_file), "-q", *args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path.parent / "x").exists()


def test_report_on_a_missing_database_creates_nothing(tmp_path, capsys):
    from evomerge.cli import main

    db = tmp_path / "nothing.db"
    assert main(["report", "--storage", f"sqlite:///{db}", "--study-name", "s", "--results", str(tmp_path)]) == 2
    assert f"no study database at {db}" in capsys.readouterr().err and not db.exists()


def test_workers_get_the_storage_url_through_the_environment_not_argv(tiny_family, tmp_path, monkeypatch):
    """A password in a storage URL must not show in `ps`: local workers read it from $EVOMERGE_STORAGE."""
    from evomerge import search

    started = []

    class Finished:
        returncode = 0

        def __init__(self, command, env):
            started.append((command, env))

        def poll(self):
            return 0

    monkeypatch.setattr(search.subprocess, "Popen", Finished)
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path))
    url = f"sqlite:///{tmp_path}/secret-study.db"
    search.run(search.SearchJob(space, storage=url, workers=2, space_file="s.yaml", heldout=False, progress=False))
    assert len(started) == 2
    for command, env in started:
        assert url not in " ".join(command) and "--storage" not in command
        assert env["EVOMERGE_STORAGE"] == url


def test_storage_urls_are_shown_without_passwords_or_machine_folders(monkeypatch, tmp_path):
    from evomerge.search.storage import shown

    assert shown("postgresql+psycopg://evo:hunter2@db.example:5432/studies") == \
        "postgresql+psycopg://evo:***@db.example:5432/studies"
    monkeypatch.chdir(tmp_path)
    assert shown(f"sqlite:///{tmp_path}/results/s/study.db") == "sqlite:///results/s/study.db"
    assert shown("sqlite:////elsewhere/study.db") == "sqlite:////elsewhere/study.db"


def test_a_search_that_runs_generated_code_records_its_sandbox(tiny_family, tmp_path):
    from evomerge.evaluation.sandbox import bubblewrap

    if bubblewrap() is None:
        pytest.skip("needs bubblewrap (apt-get install bubblewrap); CI installs it")
    tasks = [{"task": "humaneval", "metric": "accuracy", "size": 2, "max_gen_toks": 8},
             {"task": "gsm8k", "metric": "gold_loglik", "size": 2}]
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, tasks=tasks, n_trials=1, pruning={"enabled": False}))
    assert space.runs_generated_code() and not SearchSpace.from_dict(tiny_space(tiny_family, tmp_path)).runs_generated_code()
    summary = run_search(space, heldout=False, progress=False)
    assert summary["sandbox"]["isolation"] == "bubblewrap" and summary["trials"]["COMPLETE"] == 1
    saved = json.loads((tmp_path / "results" / "tiny" / "summary.json").read_text())
    assert saved["sandbox"] == summary["sandbox"]


@pytest.mark.e2e
def test_a_full_disk_stops_cleanly_and_keeps_the_trials(tiny_family, tmp_path, monkeypatch, capsys):
    import errno

    from evomerge.cli import main
    from evomerge.report import results

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "results" / "tiny" / "leaderboard.csv"))

    monkeypatch.setattr(results, "write_results", full)
    space_file = write_yaml(tiny_space(tiny_family, tmp_path, n_trials=2, pruning={"enabled": False}), tmp_path / "s.yaml")
    assert main(["search", str(space_file), "-q", "--no-heldout"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge:")]
    assert len(err) == 1 and "no space left on device writing" in err[0] and "rerun the same command" in err[0]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/results/tiny/study.db")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2  # the finished trials are kept


@pytest.mark.parametrize("args", [["--dry-run", "{space}"], ["{space}", "--dry-run"], ["{space}", "--dry-run", "3"]])
def test_dry_run_takes_the_space_before_or_after_the_flag(args, tiny_family, tmp_path, capsys):
    from evomerge.cli import main

    space_file = write_yaml(tiny_space(tiny_family, tmp_path), tmp_path / "s.yaml")
    assert main(["search", *(a.format(space=space_file) for a in args)]) == 0
    out = capsys.readouterr().out
    assert "# candidate 2 (task_arithmetic)" in out and "# candidate 3" not in out
    assert not (tmp_path / "results").exists()  # nothing loaded, nothing written


@pytest.mark.e2e
def test_paths_are_written_as_the_user_gave_them(tiny_family, tmp_path, monkeypatch):
    """`~/…` in a space stays `~/…` in what a search writes (best.yaml, leaderboard), and that recipe
    merges as it is: a home folder's path is nobody else's."""
    from evomerge.cli import main

    home = Path(tiny_family["base"]).parent.parent
    monkeypatch.setenv("HOME", str(home))
    family = Path(tiny_family["base"]).parent.name
    space = tiny_space(tiny_family, tmp_path, n_trials=1, pruning={"enabled": False})
    space["models"] = [{"name": "math", "path": f"~/{family}/ft_math"}, {"name": "code", "path": f"~/{family}/ft_code"}]
    run_search(SearchSpace.from_dict(space, source=tmp_path / "s.yaml"), heldout=False, progress=False)
    results = tmp_path / "results" / "tiny"
    for rewrite in (False, True):  # as the search wrote them, and as `evomerge report` rewrites them
        if rewrite:
            assert main(["report", "--storage", f"sqlite:///{results / 'study.db'}", "--study-name", "tiny",
                         "--results", str(tmp_path / "results")]) == 0
        for name in ("best.yaml", "leaderboard.csv"):
            text = (results / name).read_text()
            assert f"~/{family}/ft_math" in text and tiny_family["ft_math"] not in text, (name, rewrite)
    assert main(["merge", str(results / "best.yaml"), str(tmp_path / "merged"), "--device", "cpu", "-q"]) == 0


@pytest.mark.e2e
@pytest.mark.parametrize("override,extra,message", [
    ({"parameters": {"weight": {"low": 0, "high": float("inf")}}}, [], "parameters.weight.high"),
    ({"methods": "ties", "parameters": {"density": {"low": 0, "high": 1}}}, [], "parameters.density.low"),
    ({"tasks": [{"task": "gsm8k", "weight": 0}, {"task": "mmlu", "weight": 0}]}, [], "tasks: the weights"),
    ({}, ["--study-name", "../tiny"], "--study-name: study name '../tiny'"),
])
def test_bad_input_leaves_sources_and_studies_byte_identical(override, extra, message, tiny_family, tmp_path, capsys):
    """A finished study and its sources, then bad input through the command line: exit 2, one line naming
    the field, and every byte of the study database and of the sources as it was."""
    from evomerge.cli import main

    good = write_yaml(tiny_space(tiny_family, tmp_path, n_trials=1, pruning={"enabled": False}), tmp_path / "good.yaml")
    assert main(["search", str(good), "-q", "--no-heldout"]) == 0
    watched = [tmp_path / "results" / "tiny" / "study.db", *(Path(p) / "model.safetensors" for p in tiny_family.values())]
    before = [p.read_bytes() for p in watched]
    capsys.readouterr()
    bad = write_yaml(tiny_space(tiny_family, tmp_path, n_trials=1, **override), tmp_path / "bad.yaml")
    assert main(["search", str(bad), "-q", *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge:")]
    assert len(err) == 1 and message in err[0], err
    assert [p.read_bytes() for p in watched] == before


@pytest.mark.e2e
def test_same_seed_same_numbers_with_one_thread_or_two(tiny_family, tmp_path):
    """Two searches of one space and seed, with 1 and with 2 CPU threads: identical proposals and
    identical scores; each trial records its CPU time, and the setting reaches torch."""
    import torch

    from evomerge.search import SearchJob, run

    records = []
    for threads in (1, 2):
        space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path / f"t{threads}", n_trials=6,
                                             pruning={"enabled": False}, methods=["task_arithmetic", "ties"]))
        summary = run(SearchJob(space, threads=threads, heldout=False, progress=False))
        assert torch.get_num_threads() == threads and os.environ["RAYON_NUM_THREADS"] == str(threads)
        study = optuna.load_study(study_name="tiny", storage=summary["storage"])
        records.append([(t.params, t.user_attrs["scores"], t.values) for t in study.trials])
        assert all(t.user_attrs["cpu_seconds"] > 0 for t in study.trials)
    assert len(records[0]) == 6 and records[0] == records[1]


@pytest.mark.e2e
def test_reproduce_reruns_a_finished_study_and_reports_each_trials_difference(tiny_family, tmp_path, monkeypatch,
                                                                               capsys):
    """`evomerge search --reproduce RESULTS` re-runs a finished study from its summary.json alone (in a
    scratch study; the original is not touched): same parameters, same states, scores within 1e-6.
    A change in the scores, or in the recorded inputs, is reported and fails the command."""
    from evomerge.cli import main
    from evomerge.evaluation import Evaluator

    space = tiny_space(tiny_family, tmp_path, n_trials=5, pruning={"min_trials": 2, "first_rung": 0.5})
    assert main(["search", str(write_yaml(space, tmp_path / "space.yaml")), "--no-heldout", "-q"]) == 0
    results = tmp_path / "results" / "tiny"
    summary = json.loads((results / "summary.json").read_text())
    record = summary["reproduce"]
    assert record["seed"] == 0 and set(record["sources_sha256"]) == {tiny_family[k] for k in
                                                                    ("base", "ft_math", "ft_code", "ft_knowledge")}
    assert all(len(h) == 64 for h in record["sources_sha256"].values())
    assert set(record["items_sha256"]["search"]) == {"gsm8k/gold_loglik", "mmlu/gold_loglik"}
    database = (results / "study.db").read_bytes()

    assert main(["search", "--reproduce", str(results), "-q"]) == 0
    report = json.loads((results / "reproduce.json").read_text())
    assert report["trials"] == 5 and report["reproduced"] == 5 and report["largest_difference"] <= 1e-6
    assert (results / "study.db").read_bytes() == database  # the original study is only read

    original = Evaluator.evaluate

    def drifting(self, model, **kwargs):
        scores = original(self, model, **kwargs)
        scores.scores = {task: value + 1e-3 for task, value in scores.scores.items()}
        return scores

    monkeypatch.setattr(Evaluator, "evaluate", drifting)
    assert main(["search", "--reproduce", str(results), "-q"]) == 1
    report = json.loads((results / "reproduce.json").read_text())
    assert report["reproduced"] < 5 and report["largest_difference"] >= 1e-3 * 0.99
    monkeypatch.setattr(Evaluator, "evaluate", original)

    true_digest = summary["reproduce"]["items_sha256"]["search"]["mmlu/gold_loglik"]
    summary["reproduce"]["items_sha256"]["search"]["mmlu/gold_loglik"] = "0" * 64
    (results / "summary.json").write_text(json.dumps(summary))
    assert main(["search", "--reproduce", str(results), "-q"]) == 1
    assert "inputs changed: items: search/mmlu/gold_loglik 000000000000 -> " in capsys.readouterr().out

    # another library version or machine is said, with both values, and fails nothing by itself
    summary["reproduce"]["items_sha256"]["search"]["mmlu/gold_loglik"] = true_digest
    summary["reproduce"]["versions"]["transformers"] = "5.23.0"
    summary["reproduce"]["hardware"]["cpu"] = "another CPU"
    (results / "summary.json").write_text(json.dumps(summary))
    assert main(["search", "--reproduce", str(results), "-q"]) == 0
    out = capsys.readouterr().out
    assert "inputs changed: none" in out and "versions: transformers 5.23.0 -> " in out
    assert "hardware: cpu another CPU -> " in out
    assert record["space_dir"] == "../.." and record["hardware"]["cores"] >= 1  # results/tiny -> the space's folder


@pytest.mark.e2e
def test_export_writes_exactly_what_merge_writes_with_the_search_in_its_card(tiny_family, tmp_path, capsys):
    """`evomerge export RESULTS OUT` = `evomerge merge best.yaml OUT` (same files, same tensors), plus
    the trial's scores, the held-out table and versions in the model card; `--trial N` any completed trial."""
    from safetensors.torch import load_file

    from evomerge.cli import main

    space = tiny_space(tiny_family, tmp_path, n_trials=4, pruning={"enabled": False})
    assert main(["search", str(write_yaml(space, tmp_path / "space.yaml")), "-q"]) == 0
    results = tmp_path / "results" / "tiny"
    summary = json.loads((results / "summary.json").read_text())
    assert main(["export", str(results), str(tmp_path / "exported"), "--device", "cpu", "-q"]) == 0
    assert main(["merge", str(results / "best.yaml"), str(tmp_path / "merged"), "--device", "cpu", "-q"]) == 0
    exported, merged = tmp_path / "exported", tmp_path / "merged"
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in merged.iterdir())
    a, b = load_file(exported / "model.safetensors"), load_file(merged / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (exported / "mergekit_config.yml").read_text() == (merged / "mergekit_config.yml").read_text()
    readme = (exported / "README.md").read_text()
    assert f"Trial {summary['best']['trial']} of study `tiny`" in readme and "## Held-out scores" in readme
    assert "- torch " in readme and f"{summary['best']['scores']['gsm8k']:.4f}" in readme
    # the card names local models relative to the checkpoint: no path of this machine in it
    assert tiny_family["ft_math"] not in readme
    import os

    assert f"- {os.path.relpath(tiny_family['ft_math'], exported)}" in readme
    other = next(n for n in range(4) if n != summary["best"]["trial"])
    assert main(["export", str(results), str(tmp_path / "other"), "--trial", str(other), "--device", "cpu", "-q"]) == 0
    assert "## Held-out scores" not in (tmp_path / "other" / "README.md").read_text()
    # --gguf: the same checkpoint, with GGUF files beside it listed in the card
    assert main(["export", str(results), str(tmp_path / "gguf"), "--device", "cpu", "-q", "--gguf", "q8_0"]) == 0
    assert load_file(tmp_path / "gguf" / "model.safetensors").keys() == a.keys()
    assert (tmp_path / "gguf" / "gguf-Q8_0.gguf").is_file()
    assert "`gguf-Q8_0.gguf`" in (tmp_path / "gguf" / "README.md").read_text()
    assert main(["export", str(results), str(tmp_path / "none"), "--trial", "99", "-q"]) == 2
    assert "--trial: study 'tiny' has no trial 99" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_study_resumes_wherever_its_models_are_named_alike_and_refuses_another_space(tiny_family, tmp_path,
                                                                                      monkeypatch):
    """The study records what is searched; models are named as the space names them, so a study
    whose `~/…` models (or demo-family members) sit elsewhere on this machine resumes, and one
    recorded by absolute paths (studies made before) still does; a changed space is refused."""
    import shutil

    from evomerge.search.runner import Searcher, space_fingerprint
    from evomerge.trials import STUDY_FINGERPRINT

    for home in ("home1", "home2"):
        for name in ("base", "ft_math", "ft_code", "ft_knowledge"):
            shutil.copytree(tiny_family[name], tmp_path / home / "family" / name)
    family = {name: f"~/family/{name}" for name in ("base", "ft_math", "ft_code", "ft_knowledge")}
    space = tiny_space(family, tmp_path, n_trials=2)
    monkeypatch.setenv("HOME", str(tmp_path / "home1"))
    run_search(SearchSpace.from_dict(space), heldout=False, progress=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home2"))  # the same space, its models in another home
    summary = run_search(SearchSpace.from_dict({**space, "n_trials": 3}), heldout=False, progress=False)
    assert summary["this_run"]["trials"] == 1
    moved = SearchSpace.from_dict({**space, "n_trials": 3})
    searcher = Searcher(moved, progress=False)
    study = searcher.open_study()
    study.set_user_attr(STUDY_FINGERPRINT, space_fingerprint(moved, by_path=True))  # as studies made before recorded
    searcher.open_study()
    assert searcher.open_study().user_attrs[STUDY_FINGERPRINT] == space_fingerprint(moved)  # recorded anew
    with pytest.raises(SpaceError, match="study 'tiny' in .* was created from a different search space"):
        Searcher(SearchSpace.from_dict({**space, "methods": ["ties"]}), progress=False).open_study()


@pytest.mark.e2e
def test_the_same_command_resumes_from_any_directory(tiny_family, tmp_path, monkeypatch):
    """results_dir is relative to the space file, as its models are: run from elsewhere, the same
    command finds the same study instead of silently starting a fresh one. A study made under the old
    rule (relative to the working directory) still resumes where it is."""
    project = tmp_path / "project"
    project.mkdir()
    space = tiny_space(tiny_family, tmp_path, n_trials=2, pruning={"enabled": False})
    space["results_dir"] = "runs"
    write_yaml(space, project / "space.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    first = run_search(SearchSpace.load(project / "space.yaml"), heldout=False, progress=False)
    assert (project / "runs" / "tiny" / "study.db").is_file() and not (elsewhere / "runs").exists()
    monkeypatch.chdir(tmp_path)
    again = run_search(SearchSpace.load("project/space.yaml"), n_trials=3, heldout=False, progress=False)
    assert again["this_run"]["trials"] == 1 and again["trials"]["COMPLETE"] == 3 and first["this_run"]["trials"] == 2
    # the old rule: results/<study> under the working directory, from before the change
    old = tmp_path / "old_cwd"
    (old / "runs").mkdir(parents=True)
    shutil.move(str(project / "runs" / "tiny"), str(old / "runs" / "tiny"))
    monkeypatch.chdir(old)
    resumed = run_search(SearchSpace.load(project / "space.yaml"), n_trials=4, heldout=False, progress=False)
    assert resumed["this_run"]["trials"] == 1 and resumed["trials"]["COMPLETE"] == 4
    assert not (project / "runs" / "tiny").exists()
    # `evomerge report` writes the study's folder where its database is, whatever the working directory
    from evomerge.cli import main

    (old / "runs" / "tiny" / "leaderboard.md").unlink()
    monkeypatch.chdir(elsewhere)
    assert main(["report", "--storage", f"sqlite:///{old / 'runs' / 'tiny' / 'study.db'}", "--study-name", "tiny"]) == 0
    assert (old / "runs" / "tiny" / "leaderboard.md").is_file() and not (elsewhere / "results").exists()


def test_a_fatal_error_is_written_to_search_log(tiny_family, tmp_path, capsys):
    """What ended an overnight search is in search.log, not only on a terminal that is gone."""
    from evomerge.cli import main

    space = tiny_space(tiny_family, tmp_path)
    space["models"][1]["path"] = str(tmp_path / "no-such-model")
    assert main(["search", str(write_yaml(space, tmp_path / "space.yaml")), "-q"]) == 2
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge: error:"))
    log = (tmp_path / "results" / "tiny" / "search.log").read_text()
    assert "ERROR" in log and line in log


def test_the_space_reference_is_generated_from_the_schema():
    """docs/space-reference.md is what the schema says now: a field added without a line, or a file
    not regenerated, fails here (`python -m evomerge.search.reference > docs/space-reference.md`)."""
    from evomerge.search.reference import render

    assert (REPO / "docs" / "space-reference.md").read_text(encoding="utf-8") == render()


@pytest.mark.e2e
def test_a_warm_start_runs_the_obvious_candidates_first_and_cma_es_starts_from_the_best(tiny_family, tmp_path):
    from evomerge.search.sampler import MethodwiseCmaEs, to_unit
    from evomerge.trials import WARM_POINT

    known = {"merge_method": "task_arithmetic", "base_model": tiny_family["base"], "dtype": "float32",
             "models": [{"model": "math", "parameters": {"weight": 0.9}}, {"model": "code", "parameters": {"weight": 0.2}}]}
    (tmp_path / "known.yaml").write_text(yaml.safe_dump(known))
    space = SearchSpace.load(write_yaml(tiny_space(tiny_family, tmp_path, n_trials=7, pruning={"enabled": False},
                                            warm_start={"recipes": ["known.yaml"]}), tmp_path / "space.yaml"))
    summary = run_search(space, heldout=False, progress=False)
    study = optuna.load_study(study_name="tiny", storage=summary["storage"])
    first = [TrialRecord.of(t) for t in study.trials[:5]]
    assert [r.warm_start for r in first] == ["math alone", "code alone", "know alone", "uniform soup", "known.yaml"]
    assert all(r.proposer == "warm_start" for r in first) and study.trials[5].user_attrs["proposer"] == "cmaes"
    alone = Recipe.from_yaml(first[0].recipe)
    assert [(m.model, m.parameters["weight"]) for m in alone.models] == [(tiny_family["ft_math"], 1.0)]
    # the point of the known recipe: its weights, the models it leaves out at the range's low end
    method, values = study.trials[4].user_attrs[WARM_POINT]
    assert values["task_arithmetic.math.weight.rest.0"] == 0.9 and values["task_arithmetic.know.weight.rest.0"] == 0.0
    # CMA-ES's first generation is centred on the best of them
    best = max(study.trials[:5], key=lambda t: t.value)
    optimizer = MethodwiseCmaEs(space).new_optimizer("task_arithmetic", study.trials)
    dims = space.dimensions("task_arithmetic")
    expected = [to_unit(d, best.user_attrs[WARM_POINT][1][d.name]) for d in dims]
    assert np.allclose(optimizer._mean, expected)
    # a study that already ran gets no second warm start
    again = run_search(space, n_trials=8, heldout=False, progress=False)
    assert again["trials"]["COMPLETE"] == 8
    assert sum(1 for t in optuna.load_study(study_name="tiny", storage=summary["storage"]).trials
               if t.user_attrs.get("warm_start")) == 5
