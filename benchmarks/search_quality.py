"""Search quality: the search against what a user would do without it, at equal trial budgets.

On either family (`--family compose`: search_spaces/compose.yaml, the composition family; `--family
demo`: search_spaces/demo.yaml), with pruning off so every trial is fully scored, the same resident
models and items for every run:

- CMA-ES, TPE and random search over the space (each over --seeds);
- the per-method search (CMA-ES over ties, dare_ties and task_arithmetic, one per method);
- the baselines without a search: plain task arithmetic with every weight 1.0, the uniform soup,
  the greedy soup (each source alone, then added in rank order while the fitness improves).

Each time a run's best search fitness improves, that candidate is scored on held-out items by the
space's held-out metric (accuracy on the composition family; cached by recipe), so the curves are
*best-so-far held-out accuracy against trials* — what a user gets after k trials. Prints the table
and whether CMA-ES reached random search's best within 24 trials, and writes
docs/search_quality[_compose].png (mean and spread over seeds) and the raw curves beside it (.json,
rewritten after each run).

Usage: python benchmarks/search_quality.py [--family compose] [--trials 64] [--seeds 0 1 2] [--heldout-size 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.evaluation import Evaluator  # noqa: E402
from evomerge.log import setup_logging  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402
from evomerge.search.runner import Searcher  # noqa: E402
from evomerge.search.sampler import MethodwiseCmaEs  # noqa: E402
from evomerge.search.space import SearchSpace  # noqa: E402

SEARCHES = ("cmaes", "tpe", "random", "per_method")


def sampler_for(name: str, space: SearchSpace, seed: int):
    if name in ("cmaes", "per_method"):
        return MethodwiseCmaEs(space, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8)
    return optuna.samplers.RandomSampler(seed=seed)


class Bench:
    """One resident engine, the search-split evaluator and a held-out evaluator, shared by every run."""

    def __init__(self, space: SearchSpace, heldout_size: int):
        self.searcher = Searcher(space, storage="sqlite:///:memory:", results_root="/tmp/evomerge-search-quality",
                                 progress=False)
        self.searcher.load()
        entries = space.heldout_entries()
        metric = entries[0].metric  # the held-out table's first metric: accuracy for both families
        self.heldout_tasks = [e.task for e in entries if e.metric == metric]
        requests = space.task_requests([e.model_copy(update={"size": min(e.size, heldout_size)})
                                        for e in entries if e.metric == metric])
        self.metric = metric
        self.heldout = Evaluator(requests, self.searcher.evaluator.tokenizer, split="heldout", seed=space.config.seed,
                                 batch_size=space.config.batch_size, task_paths=space.task_paths)
        self._held: dict[str, float] = {}

    def fitness(self, recipe: Recipe) -> float:
        model = self.searcher.engine.materialize(recipe, seed=self.searcher.space.config.seed)
        return self.searcher.space.objective(self.searcher.evaluator.evaluate(model).scores)

    def held_out(self, recipe: Recipe) -> float:
        """Mean held-out score over the tasks (cached by recipe)."""
        key = recipe.to_yaml()
        if key not in self._held:
            model = self.searcher.engine.materialize(recipe, seed=self.searcher.space.config.seed)
            scores = self.heldout.evaluate(model).scores
            self._held[key] = statistics.fmean(scores.values())
        return self._held[key]

    def run(self, space: SearchSpace, sampler, trials: int) -> list[float]:
        """Best-so-far held-out score after each trial of one search."""
        self.searcher.space = space
        study = optuna.create_study(direction="maximize", sampler=sampler)
        best, best_held, curve = float("-inf"), float("nan"), []
        for _ in range(trials):
            trial = study.ask()
            recipe = self.searcher.recipe_for(trial)
            value = self.searcher.evaluate_trial(trial)
            study.tell(trial, value)
            if value > best:
                best, best_held = value, self.held_out(recipe)
            curve.append(best_held)
        return curve


def greedy_soup(bench: Bench, space: SearchSpace) -> tuple[Recipe, int]:
    """Wortsman et al.'s greedy soup: (its recipe, the trials it took)."""
    names = list(space.models)
    alone = {name: bench.fitness(space.soup_recipe([name])) for name in names}
    ranked = sorted(names, key=lambda n: -alone[n])
    soup, best, trials = [ranked[0]], alone[ranked[0]], len(names)
    for name in ranked[1:]:
        value = bench.fitness(space.soup_recipe([*soup, name]))
        trials += 1
        if value > best:
            soup, best = [*soup, name], value
    return space.soup_recipe(soup), trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["compose", "demo"], default="compose")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heldout-size", type=int, default=60, help="held-out items per task for the curves")
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=SEARCHES)
    args = parser.parse_args()
    setup_logging()
    import yaml

    path = REPO / "search_spaces" / ("compose.yaml" if args.family == "compose" else "demo.yaml")
    config = yaml.safe_load(path.read_text())
    config["pruning"] = {"enabled": False}
    config.pop("compare", None)
    space = SearchSpace.from_dict(config, source=path)
    per_method = SearchSpace.from_dict({**config, "methods": ["ties", "dare_ties", "task_arithmetic"]}, source=path)
    bench = Bench(space, args.heldout_size)
    started = time.perf_counter()

    baselines = {}
    everything = {name: 1.0 for name in space.models}
    plain = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": space.base, "dtype": space.config.dtype,
                              "models": [{"model": space.models[n], "parameters": {"weight": w}}
                                         for n, w in everything.items()]})
    baselines["task arithmetic, weights 1.0"] = (bench.held_out(plain), 1)
    baselines["uniform soup"] = (bench.held_out(space.soup_recipe(list(space.models))), 1)
    greedy, greedy_trials = greedy_soup(bench, space)
    baselines["greedy soup"] = (bench.held_out(greedy), greedy_trials)
    for name in space.models:
        baselines[f"{name} alone"] = (bench.held_out(space.soup_recipe([name])), 1)
    print(f"<!-- baselines done ({time.perf_counter() - started:.0f} s) -->", flush=True)

    curves: dict[str, list[list[float]]] = {}
    raw = REPO / "docs" / f"search_quality{'_compose' if args.family == 'compose' else ''}.json"
    for name in args.searches:
        for seed in args.seeds:
            run_space = per_method if name == "per_method" else space
            curve = bench.run(run_space, sampler_for(name, run_space, seed), args.trials)
            curves.setdefault(name, []).append(curve)
            print(f"<!-- {name} seed {seed}: best held-out {curve[-1]:.4f} ({time.perf_counter() - started:.0f} s) -->",
                  flush=True)
            raw.write_text(json.dumps({"family": args.family, "trials": args.trials, "seeds": args.seeds,
                                       "heldout_size": args.heldout_size, "baselines": baselines, "curves": curves},
                                      indent=1))  # kept run by run: an interrupted benchmark keeps what it measured

    tasks = ", ".join(bench.heldout_tasks)
    print(f"\n{args.family} family; {len(args.seeds)} seeds x {args.trials} trials per search; search fitness as "
          f"{path.name} defines it (pruning off); curves: the best-so-far candidate's mean held-out {bench.metric} "
          f"over {tasks} ({args.heldout_size} items each).\n")
    budgets = [k for k in (8, 16, 24, 32, 48) if k < args.trials] + [args.trials]
    rows = []
    for name in curves:
        row = [name]
        for k in budgets:
            values = [c[k - 1] for c in curves[name]]
            row.append(f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}")
        rows.append(row)
    for name, (value, trials) in baselines.items():
        rows.append([f"{name} ({trials} trial{'s' if trials > 1 else ''})", *([f"{value:.3f}"] * len(budgets))])
    print(markdown_table(["search", *(f"best@{k}" for k in budgets)], rows))
    if "cmaes" in curves and "random" in curves:
        reach = []
        for cma, rand in zip(curves["cmaes"], curves["random"]):
            reach.append(next((i + 1 for i, v in enumerate(cma) if v >= rand[-1]), None))
        shown = ", ".join("never" if r is None else str(r) for r in reach)
        met = all(r is not None and r <= 24 for r in reach)
        mean_ok = all(statistics.fmean(c[k] for c in curves["cmaes"]) >= statistics.fmean(c[k] for c in curves["random"])
                      for k in range(args.trials))
        print(f"\nTrials CMA-ES needed to reach random search's {args.trials}-trial best held-out score, per seed: "
              f"{shown} (target <= 24: {'met' if met else 'not met'}); CMA-ES mean at or above random's at every "
              f"budget: {'yes' if mean_ok else 'no'}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    colours = {"cmaes": "tab:blue", "tpe": "tab:orange", "random": "tab:grey", "per_method": "tab:green"}
    xs = range(1, args.trials + 1)
    for name, runs in curves.items():
        mean = [statistics.fmean(c[i] for c in runs) for i in range(args.trials)]
        low = [min(c[i] for c in runs) for i in range(args.trials)]
        high = [max(c[i] for c in runs) for i in range(args.trials)]
        ax.fill_between(xs, low, high, color=colours[name], alpha=0.15, linewidth=0)
        ax.plot(xs, mean, color=colours[name], linewidth=2, label=f"{name} (mean, range over {len(runs)} seeds)")
    for (name, (value, _trials)), style in zip(baselines.items(), ("--", "-.", ":", (0, (1, 3)), (0, (5, 5)))):
        ax.axhline(value, color="black", linestyle=style, linewidth=1, label=name)
    ax.set_xlabel("trials")
    ax.set_ylabel(f"held-out {bench.metric} of the best candidate so far")
    ax.set_title(f"Search quality on the {args.family} family")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    suffix = "_compose" if args.family == "compose" else ""
    fig.savefig(REPO / "docs" / f"search_quality{suffix}.png", dpi=110)


if __name__ == "__main__":
    main()
