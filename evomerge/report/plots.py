"""PNG plots of a study, drawn with matplotlib (no display needed)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evomerge.trials import TrialRecord, dimension_label  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reference_lines(ax, values: dict[str, float], names: list[str]) -> None:
    """Each source model's search-split score as a dashed horizontal line, named in the legend (best
    first); a source keeps its colour from plot to plot."""
    styles = plt.get_cmap("Dark2")
    for name, value in sorted(values.items(), key=lambda kv: -kv[1]):
        ax.axhline(value, color=styles(names.index(name) % 8), linestyle="--", linewidth=0.9, alpha=0.8,
                   label=f"source: {name}")


def history(study: optuna.Study, path: Path, references: dict[str, Any] | None = None) -> None:
    """Every trial's score, coloured by method, with the best so far; pruned and failed trials
    marked; each source model's score on the same split as a dashed line."""
    trials = [TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    methods = sorted({t.label for t in trials})
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        mine = [t for t in trials if t.label == method and t.state == TrialState.COMPLETE]
        if mine:
            ax.scatter([t.number for t in mine], [t.score for t in mine], s=18, color=colours(i % 10), label=method)
    # Pruned trials were scored on the first rung's items only, a different scale from the full
    # score: marked along the bottom edge (like failed ones), not plotted as if comparable.
    edge = ax.get_xaxis_transform()  # x in trials, y in axes fraction
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    if pruned:
        ax.scatter([t.number for t in pruned], [0.03] * len(pruned), transform=edge, s=18, marker="x",
                   color="grey", label="pruned after the first rung", clip_on=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        ax.scatter([t.number for t in failed], [0.03] * len(failed), transform=edge, s=18, marker="v",
                   color="red", label="failed", clip_on=False)
    best, line = -math.inf, []
    for t in sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number):
        best = max(best, t.score)
        line.append((t.number, best))
    if line:
        ax.step([x for x, _ in line], [y for _, y in line], where="post", color="black", linewidth=1.2, label="best so far")
    _reference_lines(ax, {name: r["score"] for name, r in (references or {}).items() if "score" in r},
                     list(references or {}))
    ax.set_xlabel("trial")
    ax.set_ylabel("score (higher is better)")
    ax.set_title(f"{study.study_name}: optimisation history")
    if ax.has_data():
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def task_scores(study: optuna.Study, tasks: list[str], path: Path, references: dict[str, Any] | None = None) -> None:
    """Each task's score over the completed trials, with each source model's as a dashed line."""
    if not tasks:  # a study evomerge did not write: no per-task scores to draw
        return
    records = map(TrialRecord.of, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    trials = sorted((r for r in records if r.scores), key=lambda r: r.number)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(8, 2.4 * len(tasks)), sharex=True, squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        ax.plot([t.number for t in trials], [t.scores.get(task, math.nan) for t in trials],
                marker="o", markersize=3, linewidth=0.8, color="black", label="trials")
        _reference_lines(ax, {name: r["scores"][task] for name, r in (references or {}).items()
                              if task in r.get("scores", {})}, list(references or {}))
        if references:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_ylabel(task)
    axes[-1, 0].set_xlabel("trial")
    axes[0, 0].set_title(f"{study.study_name}: per-task scores of completed trials")
    _save(fig, path)


def importances(study: optuna.Study, path: Path, tasks: list[str] | None = None) -> None:
    """fANOVA importances over the completed trials of the best method (its own dimensions); with
    several objectives, one bar per objective."""
    completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    objectives = len(study.directions)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    message = None
    if len(completed) >= 4:
        best = max(completed, key=lambda t: sum(t.values) / len(t.values))
        method = TrialRecord.of(best).method
        params = [p for p in best.params if p != "method"]
        same = [t for t in completed if TrialRecord.of(t).method == method and set(params) <= set(t.params)]
        per_objective: list[dict[str, float]] = []
        try:
            for i in range(objectives):
                sub = optuna.create_study(direction="maximize")
                sub.add_trials(optuna.trial.create_trial(params={p: t.params[p] for p in params},
                                                         distributions={p: t.distributions[p] for p in params},
                                                         value=t.values[i]) for t in same)
                per_objective.append(optuna.importance.get_param_importances(sub, params=params) if params else {})
        except (RuntimeError, ValueError) as exc:
            per_objective, message = [], f"importances unavailable: {exc}"
        if per_objective and per_objective[0]:
            names = list(per_objective[0])[:20][::-1]
            height = 0.8 / len(per_objective)
            for i, values in enumerate(per_objective):
                ax.barh([n + (i - (len(per_objective) - 1) / 2) * height for n in range(len(names))],
                        [values.get(n, 0.0) for n in names], height=height,
                        label=(tasks[i] if tasks and len(tasks) == objectives else f"objective {i + 1}")
                        if objectives > 1 else None)
            ax.set_yticks(range(len(names)), [dimension_label(n) for n in names])
            ax.set_xlabel("importance (fANOVA)")
            ax.set_title(f"{study.study_name}: what mattered ({method}, {len(same)} trials)")
            if objectives > 1:
                ax.legend(fontsize=8)
    else:
        message = f"importances need at least 4 completed trials ({len(completed)} so far)"
    if message or not ax.has_data():
        ax.axis("off")
        ax.text(0.5, 0.5, message or "no searched parameters", ha="center", va="center")
    _save(fig, path)


def pareto(study: optuna.Study, tasks: list[str], path: Path) -> None:
    """Every pair of objectives (a scatter matrix), the Pareto front marked in each panel: with three
    or more objectives a front point can look dominated in one pair and not be."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials}
    k = len(study.directions)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    cols = min(3, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows), squeeze=False)
    best = [t for t in completed if t.number in front]
    for ax, (i, j) in zip(axes.flat, pairs):
        ax.scatter([t.values[i] for t in completed], [t.values[j] for t in completed], s=14, color="lightgrey",
                   label="trials")
        ax.scatter([t.values[i] for t in best], [t.values[j] for t in best], s=24, color="crimson",
                   label=f"Pareto front ({len(best)}, over all {k} objectives)")
        ax.set_xlabel(tasks[i])
        ax.set_ylabel(tasks[j])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.suptitle(f"{study.study_name}: every pair of objectives")
    _save(fig, path)


def heldout(heldout: dict, path: Path) -> None:
    """The winner minus each source on the held-out items, per task and combined, with 95 % intervals."""
    comparisons = heldout["comparisons"]
    names = [*heldout["columns"], *(f"combined {m}" for m in heldout["combined_over"])]
    keys = [*heldout["columns"], *heldout["combined_over"]]
    sources = list(comparisons)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.4 * len(keys) + 1, 3.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, key, name in zip(axes[0], keys, names):
        for i, source in enumerate(sources):
            found = comparisons[source][key]
            ax.errorbar([i], [found["difference"]], yerr=[[found["difference"] - found["low"]],
                                                          [found["high"] - found["difference"]]],
                        fmt="o", color=colours(i % 10), capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sources)), sources, rotation=45, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    axes[0][0].set_ylabel("winner − source (95 % interval)")
    fig.suptitle("held-out: the winner against each source, on the same items", fontsize=10)
    _save(fig, path)
