"""Search quality: CMA-ES vs TPE vs random at equal budgets, 3 seeds each, on the demo family with the
gold log-likelihood fitness (the demo space, pruning off so every trial is fully scored). The
models and the evaluation items are the same for every run; only the sampler and its seed change.

Prints a Markdown table and writes docs/search_quality.png (best score against trials).
Target: CMA-ES reaches random search's 64-trial best within 24 trials.

Usage: python benchmarks/search_quality.py [--trials 64] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.log import setup_logging  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402
from evomerge.search.runner import Searcher  # noqa: E402
from evomerge.search.sampler import MethodwiseCmaEs  # noqa: E402
from evomerge.search.space import SearchSpace  # noqa: E402


def sampler_for(name: str, space: SearchSpace, seed: int):
    if name == "cmaes":
        return MethodwiseCmaEs(space, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8)
    return optuna.samplers.RandomSampler(seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs=3, default=[8, 8, 16], metavar=("GSM8K", "HUMANEVAL", "MMLU"))
    args = parser.parse_args()
    setup_logging()
    import yaml

    config = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    config["pruning"] = {"enabled": False}
    for task, size in zip(("gsm8k", "humaneval", "mmlu"), args.sizes):
        next(t for t in config["tasks"] if t["task"] == task)["size"] = size
    space = SearchSpace.from_dict(config, source=REPO / "search_spaces" / "demo.yaml")
    searcher = Searcher(space, storage="sqlite:///:memory:", results_root="/tmp/evomerge-search-quality",
                        progress=False)
    searcher.load()  # once: every run scores with the same resident models and items
    curves: dict[str, list[list[float]]] = {}
    started = time.perf_counter()
    for name in ("cmaes", "tpe", "random"):
        for seed in args.seeds:
            study = optuna.create_study(direction="maximize", sampler=sampler_for(name, space, seed))
            best, curve = float("-inf"), []
            for _ in range(args.trials):
                trial = study.ask()
                value = searcher.evaluate_trial(trial)
                study.tell(trial, value)
                best = max(best, value)
                curve.append(best)
            curves.setdefault(name, []).append(curve)
            print(f"<!-- {name} seed {seed}: best {best:.4f} ({time.perf_counter() - started:.0f} s) -->", flush=True)

    def at(name: str, k: int) -> list[float]:
        return [curve[k - 1] for curve in curves[name]]

    print(f"\n{len(args.seeds)} seeds x {args.trials} trials per sampler; fitness: mean gold log-likelihood over "
          f"GSM8K ({args.sizes[0]}), HumanEval ({args.sizes[1]}), MMLU ({args.sizes[2]}) search items; "
          "task arithmetic of the three specialists, 7 dimensions.\n")
    budgets = [k for k in (8, 16, 24, 32) if k < args.trials] + [args.trials]
    rows = []
    for name in curves:
        row = [name]
        for k in budgets:
            values = at(name, k)
            row.append(f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}")
        rows.append(row)
    print(markdown_table(["sampler", *(f"best@{k}" for k in budgets)], rows))
    reach = []
    for cma, rand in zip(curves["cmaes"], curves["random"]):
        target = rand[-1]
        reach.append(next((i + 1 for i, v in enumerate(cma) if v >= target), None))
    shown = ", ".join("never" if r is None else str(r) for r in reach)
    met = all(r is not None and r <= 24 for r in reach)
    print(f"\nTrials CMA-ES needed to reach random search's {args.trials}-trial best, per seed: {shown} "
          f"(target <= 24: {'met' if met else 'not met'})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, colour in (("cmaes", "tab:blue"), ("tpe", "tab:orange"), ("random", "tab:grey")):
        xs = range(1, args.trials + 1)
        mean = [statistics.fmean(c[i] for c in curves[name]) for i in range(args.trials)]
        for curve in curves[name]:
            ax.plot(xs, curve, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(xs, mean, color=colour, linewidth=2, label=f"{name} (mean of {len(curves[name])})")
    ax.set_xlabel("trials")
    ax.set_ylabel("best fitness so far (gold log-likelihood)")
    ax.set_title("Search quality on the demo family")
    ax.legend()
    fig.tight_layout()
    fig.savefig(REPO / "docs" / "search_quality.png", dpi=110)


if __name__ == "__main__":
    main()
