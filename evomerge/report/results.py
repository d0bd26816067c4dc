"""The results folder of a study: what a researcher opens in the morning.

results/<study>/
  best.yaml          the winning recipe (mergekit YAML: `mergekit-yaml best.yaml OUT` or `evomerge merge`)
  leaderboard.csv    every finished trial: scores per task, method, time, full recipe
  leaderboard.md     the top trials, readable
  history.png        score per trial and best so far, by method; pruned and failed trials marked
  tasks.png          each task's score per trial
  importances.png    which searched numbers mattered (fANOVA on the best method's trials)
  pareto.png         the Pareto front (multi-objective studies)
  heldout.md/.json   the winner and every source model on the held-out split, and the winner minus
                     each source with 95 % paired bootstrap intervals and their verdicts
  heldout_items.json every model's score on every held-out item (any comparison can be recomputed)
  heldout.png        the winner minus each source, per task and combined, with the intervals
  summary.json       counts, best trial, pruning savings, timings, versions
  search.log         what happened
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge import __version__
from evomerge.moe import load_candidate
from evomerge.report import plots
from evomerge.report.tables import markdown_table
from evomerge.trials import STUDY_SPACE, TrialRecord, dimension_label

log = logging.getLogger(__name__)


def completed(study: optuna.Study) -> list[TrialRecord]:
    records = map(TrialRecord.of, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return [r for r in records if r.complete]


def winner_rule(study: optuna.Study) -> str:
    """How a multi-objective study picks its winner on the Pareto front: `mean` (of the objectives) or a
    task's name (the front's best on that task), from the study's space (`winner:`)."""
    return study.user_attrs.get("winner_rule") or (study.user_attrs.get(STUDY_SPACE) or {}).get("winner") or "mean"


def pareto_front(study: optuna.Study) -> list[int]:
    """Trial numbers on the Pareto front (multi-objective), in trial order; [] for one objective."""
    if len(study.directions) < 2:
        return []
    return sorted(t.number for t in study.best_trials)


def best_trial(study: optuna.Study) -> TrialRecord | None:
    """The winner: the best value, or (multi-objective) the Pareto-front trial chosen by the study's
    rule (`winner_rule`: the best mean of the objectives, or the best on one task)."""
    records = completed(study)
    if len(study.directions) > 1:
        front = set(pareto_front(study))
        records = [r for r in records if r.number in front]
        rule = winner_rule(study)
        if records and rule != "mean":
            return max(records, key=lambda r: r.scores.get(rule, -math.inf))
    if not records:
        return None
    return max(records, key=lambda r: r.score)


def ranked(study: optuna.Study) -> list[TrialRecord]:
    return sorted(completed(study), key=lambda r: r.score, reverse=True)


def write_results(study: optuna.Study, results_dir: Path, *, task_names: list[str],
                  heldout: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                  references: dict[str, Any] | None = None, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """Writes everything but the held-out evaluation (passed in when it was run). `references`: the
    sources' search-split scores, drawn as reference lines. `rename` maps model paths to the names
    recipes are written with (the demo family's members)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    # a trial stopped by Ctrl-C is stored failed (Optuna has no other final state for it): counted apart
    states["INTERRUPTED"] = sum(t.state == TrialState.FAIL and TrialRecord.of(t).interrupted for t in trials)
    states["FAIL"] -= states["INTERRUPTED"]
    best = best_trial(study)
    if best is not None:
        load_candidate(best.recipe).with_models(rename or {}).save(results_dir / "best.yaml")
    _leaderboard(study, results_dir, task_names, rename or {})
    _draw(results_dir / "history.png", lambda path: plots.history(study, path, references=references))
    _draw(results_dir / "tasks.png", lambda path: plots.task_scores(study, task_names, path, references=references))
    _draw(results_dir / "importances.png", lambda path: plots.importances(study, path, task_names))
    if len(study.directions) > 1:
        _draw(results_dir / "pareto.png", lambda path: plots.pareto(study, task_names, path))
    summary = {
        "study": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "trials": states,
        **({"pareto_front": pareto_front(study), "winner_rule": winner_rule(study)} if len(study.directions) > 1 else {}),
        "best": None if best is None else {
            "trial": best.number, "value": best.score, "method": best.method,
            "scores": best.scores, "recipe": "best.yaml",
        },
        "pruning": pruning_savings(study),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions(),
        **({"sources_search": references} if references else {}),
        **(extra or {}),
    }
    if heldout is not None:
        summary["heldout"] = {key: value for key, value in heldout.items() if key != "items"}
        _heldout_files(summary["heldout"], heldout.get("items"), results_dir)
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log.info("results written to %s", results_dir)
    return summary


def pruning_savings(study: optuna.Study) -> dict[str, Any]:
    """How much evaluation the pruner saved. Every trial scores a first rung (a fraction of each
    task's items); completed trials then score only the remaining items, pruned ones stop."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    pruning = study.user_attrs.get(STUDY_SPACE, {}).get("pruning", {})
    rung = pruning.get("first_rung", 0.34) if pruning.get("enabled", False) else 1.0
    spent = (len(trials) - pruned) + pruned * rung  # in full evaluations
    return {"pruned_trials": pruned, "finished_trials": len(trials),
            "evaluation_saved_fraction": round(1 - spent / len(trials), 3) if trials else 0.0}


def _leaderboard(study: optuna.Study, results_dir: Path, task_names: list[str], rename: dict[str, str]) -> None:
    rows = ranked(study)
    front = set(pareto_front(study))
    multi = len(study.directions) > 1
    with open(results_dir / "leaderboard.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "trial", "score", "method", *task_names, *(["pareto_front"] if multi else []),
                         "seconds", "cpu_seconds", "recipe"])
        for rank, r in enumerate(rows, 1):
            writer.writerow([rank, r.number, f"{r.score:.6f}", r.label,
                             *(f"{r.scores.get(task, math.nan):.6f}" for task in task_names),
                             *([r.number in front] if multi else []), r.seconds, r.cpu_seconds,
                             load_candidate(r.recipe).with_models(rename).to_yaml() if rename else r.recipe])
    header = ["rank", "trial", "score", "method", *task_names, *(["front"] if multi else []), "parameters"]
    table = []
    for rank, r in enumerate(rows[:20], 1):
        table.append([rank, r.number, f"{r.score:.4f}", r.label,
                      *(f"{r.scores.get(task, math.nan):.4f}" for task in task_names),
                      *(["★" if r.number in front else ""] if multi else []), _compact(r.params)])
    text = f"# Leaderboard: {study.study_name}\n\nTop {len(table)} of {len(rows)} completed trials (higher is better). "
    if multi:
        rule = winner_rule(study)
        text += (f"Several objectives: score is their mean; ★ marks the {len(front)} trials on the Pareto front "
                 f"(no other trial is at least as good on every task and better on one); the winner is the front's "
                 f"{'best mean' if rule == 'mean' else f'best on {rule}'} (`winner:` in space.yaml). ")
    text += "Full recipes: leaderboard.csv; the winner: best.yaml.\n\n" + markdown_table(header, table)
    (results_dir / "leaderboard.md").write_text(text, encoding="utf-8")


def _compact(params: dict[str, Any]) -> str:
    parts = []
    for name, value in params.items():
        if name == "method":
            continue
        label = dimension_label(name)
        parts.append(f"{label}={value:.3g}" if isinstance(value, float) else f"{label}={value}")
    return " ".join(parts)


def _heldout_files(heldout: dict[str, Any], items: dict[str, Any] | None, results_dir: Path) -> None:
    """heldout.json (scores, comparisons), heldout_items.json (every item's score, to recompute any
    comparison), heldout.md (the table and the verdicts) and heldout.png."""
    if items is not None:  # (a report rewritten from heldout.json has none: the file written with it stays)
        (results_dir / "heldout_items.json").write_text(json.dumps(items) + "\n")
    (results_dir / "heldout.json").write_text(json.dumps(heldout, indent=2, default=str) + "\n")
    columns, groups = heldout["columns"], heldout["combined_over"]
    header = ["model", *columns, *(f"combined {metric}" for metric in groups)]
    rows = [[name, *(f"{row['scores'][c]:.4f}" for c in columns), *(f"{row['combined'][m]:.4f}" for m in groups)]
            for name, row in heldout["rows"].items()]
    text = (f"# Held-out scores\n\nSplit `heldout` (never seen by the search), seed {heldout['seed']}, "
            f"winner: trial {heldout.get('trial', '?')}. Combined = mean over the tasks of one metric.\n\n"
            + markdown_table(header, rows))
    comparisons = heldout.get("comparisons")
    if comparisons:
        text += ("\n## The winner against each source, on the same items\n\nWinner minus source, with a 95 % "
                 "paired bootstrap interval (items resampled, the same draw for both models); the verdict is "
                 "the interval's: above zero *better*, below *worse*, across zero *no detectable difference*.\n\n")
        lower = [c for c, up in (heldout.get("higher_is_better") or {}).items() if not up]
        if lower:
            text += (f"Lower is better for {', '.join(lower)}: there the difference is source minus winner, so "
                     "positive still means the winner is better.\n\n")
        names = [*columns, *groups]
        cells = [[source, *(_difference(c[name]) for name in names)] for source, c in comparisons.items()]
        text += markdown_table(["vs", *columns, *(f"combined {m}" for m in groups)], cells)
        for metric in groups:
            worded = ", ".join(f"{c[metric]['verdict']} than {source}" if c[metric]["verdict"] != "no detectable difference"
                               else f"not detectably different from {source}" for source, c in comparisons.items())
            text += f"\nOn combined {metric} the winner is {worded}.\n"
        _draw(results_dir / "heldout.png", lambda path: plots.heldout(heldout, path))
    (results_dir / "heldout.md").write_text(text, encoding="utf-8")


def _draw(path: Path, draw) -> None:
    """Draws one plot; a plot that fails (matplotlib, odd data) costs only itself, with a warning."""
    try:
        draw(path)
    except Exception as exc:  # noqa: BLE001 - the tables and summary.json still come
        log.warning("%s not drawn: %s: %s", path.name, type(exc).__name__, exc)


def _difference(found: dict[str, Any]) -> str:
    return f"{found['difference']:+.4f} [{found['low']:+.4f}, {found['high']:+.4f}] {found['verdict']}"


def versions() -> dict[str, str]:
    import torch
    import transformers

    try:
        import lm_eval

        lm_eval_version = getattr(lm_eval, "__version__", "?")
    except ImportError:  # pragma: no cover
        lm_eval_version = "missing"
    return {"evomerge": __version__, "optuna": optuna.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "lm_eval": lm_eval_version, "python": platform.python_version()}
