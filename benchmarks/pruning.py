"""Cheap rejection on the demo: the demo space with and without the first-rung pruner, same trial
budget and sampler seeds; how much evaluation the pruner saved, and the best found either way.

Usage: python benchmarks/pruning.py [--trials 24] [--seeds 0 1]   (prints Markdown)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.log import setup_logging  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402
from evomerge.search.runner import RungPruner, Searcher  # noqa: E402
from evomerge.search.sampler import MethodwiseCmaEs  # noqa: E402
from evomerge.search.space import SearchSpace  # noqa: E402


def run(searcher: Searcher, space: SearchSpace, seed: int, trials: int, pruning: bool):
    pruner = RungPruner(space.config.pruning.quantile, space.config.pruning.min_trials) if pruning else None
    study = optuna.create_study(direction="maximize", sampler=MethodwiseCmaEs(space, seed=seed),
                                pruner=pruner or optuna.pruners.NopPruner())
    searcher.space.config.pruning.enabled = pruning
    searcher._recipe_scores.clear()  # one seed proposes the same recipes in both runs: score them again
    start = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        try:
            study.tell(trial, searcher.evaluate_trial(trial))
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
    seconds = time.perf_counter() - start
    pruned = len(study.get_trials(states=(TrialState.PRUNED,)))
    rung = space.config.pruning.first_rung if pruning else 1.0
    spent = (trials - pruned) + pruned * rung
    best = study.best_trial
    return {"best": best.value, "best_scores": best.user_attrs["scores"], "pruned": pruned,
            "saved": 1 - spent / trials, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    setup_logging()
    path = REPO / "search_spaces" / "demo.yaml"
    space = SearchSpace.from_dict(yaml.safe_load(path.read_text()), source=path)
    searcher = Searcher(space, storage="sqlite:///:memory:", results_root="/tmp/evomerge-pruning", progress=False)
    searcher.load()
    rows = []
    for seed in args.seeds:
        off = run(searcher, space, seed, args.trials, pruning=False)
        on = run(searcher, space, seed, args.trials, pruning=True)
        rows.append([seed, f"{off['best']:.4f}", f"{on['best']:.4f}", f"{on['best'] - off['best']:+.4f}",
                     f"{on['pruned']}/{args.trials}", f"{on['saved']:.0%}", f"{off['seconds']:.0f}",
                     f"{on['seconds']:.0f}"])
        print(f"<!-- seed {seed}: off {off} on {on} -->", flush=True)
    print(f"Demo space (`search_spaces/demo.yaml`), {args.trials} trials, CMA-ES; pruner: first rung = "
          f"{space.config.pruning.first_rung:.0%} of every task's items, pruned below the "
          f"{space.config.pruning.quantile:.0%} quantile of all first rungs, after {space.config.pruning.min_trials} "
          "trials.\n")
    print(markdown_table(["sampler seed", "best, no pruning", "best, pruning", "difference", "pruned",
                          "evaluation saved", "seconds, no pruning", "seconds, pruning"], rows))


if __name__ == "__main__":
    main()
