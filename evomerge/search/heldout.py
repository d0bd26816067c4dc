"""Held-out scoring: the winner and every source model, on the split the search never saw."""

from __future__ import annotations

import logging
from typing import Any

from evomerge.engine import MergeEngine
from evomerge.evaluation import METRICS, Evaluator
from evomerge.recipe import Recipe
from evomerge.search.space import SearchSpace

log = logging.getLogger(__name__)

def source_recipes(space: SearchSpace) -> dict[str, Recipe]:
    """Every source model as the engine sees it: a weight-1 linear "merge" of itself."""
    sources = ({"base": space.base} if space.base and space.base not in space.models.values() else {}) | space.models
    return {name: Recipe.from_dict({"merge_method": "linear", "dtype": space.config.dtype,
                                    "models": [{"model": path, "parameters": {"weight": 1.0}}]})
            for name, path in sources.items()}


def evaluate_heldout(space: SearchSpace, engine: MergeEngine, tokenizer, best_recipe: Recipe) -> dict[str, Any]:
    """Scores the winner and every source; combined = the mean over the tasks of one metric."""
    entries = space.heldout_entries()
    by_metric: dict[str, list] = {}
    for entry in entries:
        by_metric.setdefault(entry.metric, []).append(entry)
    evaluators = {metric: Evaluator(space.task_requests(group), tokenizer, split="heldout", seed=space.config.seed,
                                    batch_size=space.config.batch_size) for metric, group in by_metric.items()}
    candidates = {"winner": best_recipe, **source_recipes(space)}
    columns = [f"{e.task}/{e.metric}" for e in entries]
    groups = {metric: [c for c in columns if c.endswith("/" + metric)] for metric in METRICS}
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
