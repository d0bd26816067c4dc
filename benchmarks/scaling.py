"""Scaling: storage overhead per trial, and trials per minute with 1, 2 and 3 workers.

- overhead: the per-trial bookkeeping of a worker — admission under the lock, the CMA-ES
  sampler replaying its history, worker/recipe/score attributes, heartbeat thread, tell — with a
  no-op objective, on SQLite and on PostgreSQL (median and p90 per trial, over the first N trials
  of a fresh study, so the sampler's replay grows as in a real search).
- throughput: K `evomerge search --worker` processes on the tiny random family against PostgreSQL,
  steady-state trials per minute from the database's own timestamps (start-up excluded); the cores
  are split between the workers (this machine has 2; workers beyond that share them).

Usage: python benchmarks/scaling.py [--trials 100] [--postgres URL]   (starts PostgreSQL if no URL)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.demo.tiny import build_tiny_family  # noqa: E402
from evomerge.log import setup_logging  # noqa: E402
from evomerge.search import storage as store  # noqa: E402
from evomerge.search import worker_environment  # noqa: E402
from evomerge.search.sampler import MethodwiseCmaEs, suggest  # noqa: E402
from evomerge.search.space import SearchSpace  # noqa: E402


def space_dict(family: dict[str, str], results: Path, n_trials: int) -> dict:
    return {"name": "scaling", "models": [family["ft_math"], family["ft_code"], family["ft_knowledge"]],
            "base_model": family["base"], "methods": ["task_arithmetic", "ties"], "layer_schedule": 2,
            "tasks": [{"task": "gsm8k", "metric": "gold_loglik", "size": 8},
                      {"task": "mmlu", "metric": "gold_loglik", "size": 16}],
            "n_trials": n_trials, "dtype": "float32", "pruning": {"enabled": False}, "results_dir": str(results)}


def overhead(url: str, space: SearchSpace, trials: int) -> list[float]:
    name = f"overhead-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=store.open_storage(url), direction="maximize",
                                sampler=MethodwiseCmaEs(space, seed=0))
    lock = store.AdmissionLock(store.normalize_url(url), name)
    times = []
    for i in range(trials):
        start = time.perf_counter()
        trial = store.admit(study, lock, trials)
        with store.Heartbeat(study._storage, trial._trial_id):
            method, values = suggest(trial, space)
            for key, value in (("recipe", "x" * 600), ("method", method), ("seed", 0),
                               ("scores", {"gsm8k": -1.0, "mmlu": -1.5}), ("seconds", 1.0)):
                trial.set_user_attr(key, value)
        study.tell(trial, -sum((v - 0.7) ** 2 for v in values.values()))
        times.append(time.perf_counter() - start)
    return times


def throughput(space_file: Path, url: str, workers: int, trials: int) -> float:
    """Steady-state trials per minute: from the first trial's start to the last trial's end, as the
    database records them (process start-up and model loading excluded)."""
    name = f"throughput-{workers}-{uuid.uuid4().hex[:6]}"
    command = [sys.executable, "-m", "evomerge", "search", str(space_file), "--worker", "-q", "--storage", url,
               "--study-name", name, "--n-trials", str(trials)]
    processes = []
    for index in range(workers):  # the environment `--workers` gives its workers (cores split on CPUs)
        env = {**worker_environment(index, workers, gpus=0), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        processes.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
    for process in processes:
        process.wait()
    done = [t for t in optuna.load_study(study_name=name, storage=url).get_trials()
            if t.datetime_complete is not None and t.state.name == "COMPLETE"]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return len(done) / (span / 60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--throughput-trials", type=int, default=60)
    parser.add_argument("--postgres", default=os.environ.get("EVOMERGE_TEST_POSTGRES_URL"))
    args = parser.parse_args()
    setup_logging()
    pg_dir = None
    if not args.postgres:
        args.postgres, pg_dir = subprocess.run([str(REPO / ".ci" / "postgres")], check=True, capture_output=True,
                                               text=True).stdout.split()
    try:
        work = Path(tempfile.mkdtemp(prefix="evomerge-scaling-"))
        family = {k: str(v) for k, v in build_tiny_family(work / "family").items()}
        space_file = work / "space.yaml"
        space_file.write_text(yaml.safe_dump(space_dict(family, work / "results", args.throughput_trials)))
        space = SearchSpace.load(space_file)
        print(f"# scaling: {os.cpu_count()} cores, optuna {optuna.__version__}")
        print("\n| storage | trials | median ms / trial | p90 ms / trial |\n|---|---:|---:|---:|")
        for label, url in (("SQLite", f"sqlite:///{work / 'overhead.db'}"), ("PostgreSQL", args.postgres)):
            times = sorted(overhead(url, space, args.trials))
            print(f"| {label} | {len(times)} | {1000 * statistics.median(times):.1f} | "
                  f"{1000 * times[int(0.9 * len(times))]:.1f} |", flush=True)
        print("\n| workers | trials | trials / minute |\n|---:|---:|---:|")
        for workers in (1, 2, 3):
            rate = throughput(space_file, args.postgres, workers, args.throughput_trials)
            print(f"| {workers} | {args.throughput_trials} | {rate:.1f} |", flush=True)
    finally:
        if pg_dir:
            subprocess.run([str(REPO / ".ci" / "postgres"), "stop", pg_dir], capture_output=True)


if __name__ == "__main__":
    main()
