"""Many workers, one study, on a real PostgreSQL server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.recipe import Recipe
from tests.conftest import REPO, tiny_space, write_yaml

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]


def _worker(space_file, url, name, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(space_file), "--worker", "-q",
                             "--storage", url, "--study-name", name], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _running_on(study, pid: int):
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.system_attrs.get("evomerge:worker", "").split(":")[1:2] == [str(pid)]]


def test_three_workers_one_killed_exact_budget(tiny_family, tmp_path, postgres_url):
    from evomerge.search import SearchSpace
    from evomerge.search.runner import Searcher

    n_trials = 12
    space = tiny_space(tiny_family, tmp_path, n_trials=n_trials, pruning={"enabled": False},
                   methods=["task_arithmetic", "ties"])
    space["tasks"][1]["size"] = 16  # ~1-2 s trials: long enough to be killed in the middle of one
    space_file = write_yaml(space, tmp_path / "space.yaml")
    name = f"dist-{uuid.uuid4().hex[:8]}"
    workers = [_worker(space_file, postgres_url, name, tmp_path / f"w{i}.log") for i in range(3)]
    victim = workers[1]
    deadline = time.time() + 300
    killed_trial = None
    while time.time() < deadline and killed_trial is None:
        try:
            study = optuna.load_study(study_name=name, storage=postgres_url)
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            running = _running_on(study, victim.pid)
            if len(done) >= 2 and running:
                victim.send_signal(signal.SIGKILL)
                killed_trial = running[0].number
        except KeyError:
            pass  # the study does not exist yet
        time.sleep(0.2)
    assert killed_trial is not None, "worker 1 never ran a trial"
    victim.wait()
    for index in (0, 2):
        assert workers[index].wait(timeout=600) == 0, (tmp_path / f"w{index}.log").read_text()[-2000:]

    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials  # exactly the budget, across all workers
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed_trial]
    assert failed[0].user_attrs["fail_reason"] == "worker process died"
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed_trial]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    # Same candidate: the lost trial's parameters, or (killed before they were stored) its recorded
    # proposal; a trial killed before the sampler proposed anything is retried as a fresh proposal.
    if failed[0].params:
        assert retries[0].params == failed[0].params
    if "evomerge:cma_x" in failed[0].system_attrs:
        assert retries[0].system_attrs["evomerge:cma_x"] == failed[0].system_attrs["evomerge:cma_x"]
    assert retries[0].system_attrs["evomerge:sampler"] == "cmaes"
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # The best recipe, re-run from its record alone, gives the recorded score.
    best = max(complete, key=lambda t: t.value)
    searcher = Searcher(SearchSpace.load(space_file), storage=postgres_url, study_name=name, progress=False)
    searcher.load()
    model = searcher.engine.materialize(Recipe.from_yaml(best.user_attrs["recipe"]), seed=best.user_attrs["seed"])
    scores = searcher.evaluator.evaluate(model).scores
    assert searcher.space.objective(scores) == pytest.approx(best.value, abs=1e-6)


def test_workers_flag_runs_local_workers_and_writes_results(tiny_family, tmp_path, postgres_url):
    from evomerge.cli import main

    space_file = write_yaml(tiny_space(tiny_family, tmp_path, n_trials=5, pruning={"enabled": False}), tmp_path / "s.yaml")
    name = f"flag-{uuid.uuid4().hex[:8]}"
    assert main(["search", str(space_file), "--workers", "2", "--storage", postgres_url, "--study-name", name,
                 "-q", "--no-heldout"]) == 0
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 5
    workers = {t.system_attrs["evomerge:worker"] for t in study.get_trials()}
    assert len(workers) == 2
    assert (tmp_path / "results" / name / "leaderboard.md").exists()
    # `evomerge report` rebuilds the results folder from the database alone.
    assert main(["report", "--storage", postgres_url, "--study-name", name, "--results", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / name / "best.yaml").exists()


_OPEN_TOGETHER = """
import sys, time
from evomerge.search.storage import open_storage
import optuna
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
storage = open_storage(sys.argv[1])
optuna.create_study(study_name="race", storage=storage, load_if_exists=True)
print("ok")
"""


def test_workers_starting_together_on_a_new_database_all_open_it(tmp_path):
    """Workers started at one instant race to create the tables of a new study database; every
    one of them must end up on the same study, none with 'table already exists'."""
    url = f"sqlite:///{tmp_path / 'new.db'}"
    start = time.time() + 3.0  # after the imports, so the creations really coincide
    processes = [subprocess.Popen([sys.executable, "-c", _OPEN_TOGETHER, url, str(start)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(8)]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), "\n".join(outputs)
    assert len(optuna.get_all_study_names(url)) == 1
