"""Scoring outside the trial loop: the winner and every source on the split the search never saw,
and every source on the search split (the reference lines of the history and per-task plots).

Each model is scored item by item; the winner is compared with each source on the same held-out
items (paired differences with bootstrap intervals, `evomerge.report.stats`). Scores are cached by
what determines them (the recipe with its sources' weight hashes, the split and its entries, seed,
dtype, batch size, device, task definitions and versions), so re-running a finished study's
command re-scores nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable

from evomerge.evaluation import Evaluator
from evomerge.evaluation.catalog import for_paths
from evomerge.moe import Candidate
from evomerge.paths import atomic_write_text, cache_dir
from evomerge.recipe import Recipe
from evomerge.report.stats import paired
from evomerge.search.space import SearchSpace

log = logging.getLogger(__name__)


def source_recipes(space: SearchSpace) -> dict[str, Recipe]:
    """Every source model as the engine sees it: a weight-1 linear "merge" of itself. With a tokenizer
    setting, every candidate speaks the output vocabulary, so a source does too: a linear merge with
    weight 1 on it and 0 on every other model (the setting's per-token sources all merge, so a token
    the source lacks gets the row the setting gives it; every other tensor is the source's own)."""
    sources = ({"base": space.base} if space.base and space.base not in space.models.values() else {}) | space.models
    everyone = list(dict.fromkeys(sources.values()))
    recipes = {}
    for name, path in sources.items():
        weights = {ref: float(ref == path) for ref in (everyone if space.tokenizer is not None else [path])}
        recipes[name] = Recipe.from_dict({"merge_method": "linear", **space.common_settings(),
                                          "models": [{"model": ref, "parameters": {"weight": weight}}
                                                     for ref, weight in weights.items()]})
    return recipes


def _tasks_digest(space: SearchSpace, entries: list) -> str:
    """What the tasks' definitions and data are: their folders' files and local data files."""
    found = for_paths(space.task_paths)
    return hashlib.sha256("".join(found.fingerprint(e.task) for e in entries).encode()).hexdigest()


def _entries(space: SearchSpace, split: str) -> list:
    """What a split scores: the held-out entries, or the search's tasks."""
    return space.heldout_entries() if split == "heldout" else space.config.tasks


def cache_key(space: SearchSpace, recipe: Candidate, device: str, split: str = "heldout") -> str:
    """What a model's scores on a split depend on; the same key, the same scores."""
    import lm_eval
    import torch
    import transformers

    from evomerge import __version__
    from evomerge.checkpoint import weights_sha256

    weights = recipe.with_models({ref: weights_sha256(ref) for ref in recipe.referenced_models()})
    config = space.config
    key = {"recipe": weights.to_yaml(), **({"split": split} if split != "heldout" else {}),
           "entries": [e.model_dump(mode="json") for e in _entries(space, split)],
           "seed": config.seed, "dtype": config.dtype, "batch_size": config.batch_size, "device": device,
           **({"chat": config.apply_chat_template} if config.apply_chat_template != "auto" else {}),
           "tasks": _tasks_digest(space, _entries(space, split)), "versions": [__version__, lm_eval.__version__, torch.__version__,
                                                  transformers.__version__]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _cache_file(key: str):
    return cache_dir() / "heldout" / f"{key}.json"


def score_models(space: SearchSpace, load: Callable[[], tuple[Any, Any]], candidates: dict[str, Candidate], *,
                 split: str, device: str) -> dict[str, dict[str, Any]]:
    """{name: {"scores": {column: value}, "items": {column: [per-item score]}}} for each candidate on
    `split` (columns "task/metric"), from the cache where it has them. `load()` gives (engine,
    tokenizer), called only when a score is missing."""
    by_metric: dict[str, list] = {}
    for entry in _entries(space, split):
        by_metric.setdefault(entry.metric, []).append(entry)
    evaluators: dict[str, Evaluator] = {}
    found: dict[str, dict[str, Any]] = {}
    for name, recipe in candidates.items():
        file = _cache_file(cache_key(space, recipe, device, split))
        if file.is_file():
            found[name] = json.loads(file.read_text())
            log.info("%s %s: cached", split, name)
            continue
        engine, tokenizer = load()
        if not evaluators:
            evaluators.update({metric: Evaluator(space.task_requests(group), tokenizer, split=split,
                                                 seed=space.config.seed, batch_size=space.config.batch_size,
                                                 task_paths=space.task_paths,
                                                 apply_chat_template=space.config.apply_chat_template)
                               for metric, group in by_metric.items()})
        model = engine.materialize(recipe, seed=space.config.seed)
        scored: dict[str, Any] = {"scores": {}, "items": {}, "higher_is_better": {}, "aggregation": {}}
        for metric, evaluator in evaluators.items():
            result = evaluator.evaluate(model, per_item=True)
            for task, value in result.scores.items():
                column = f"{task}/{metric}"
                scored["scores"][column] = value
                scored["items"][column] = result.per_item[task]
                scored["higher_is_better"][column] = evaluator.aggregates[task].higher_is_better
                scored["aggregation"][column] = evaluator.aggregates[task].name
        atomic_write_text(file, json.dumps(scored))  # never half a cache entry
        found[name] = scored
        log.info("%s %s: %s", split, name, ", ".join(f"{k}={v:.4f}" for k, v in scored["scores"].items()))
    return found


def source_search_scores(space: SearchSpace, load: Callable[[], tuple[Any, Any]], *,
                         device: str) -> dict[str, dict[str, Any]]:
    """Every source on the search split, scored as a trial is: {name: {"scores": {task: value},
    "score": the trial objective}} (no "score" under objective: multi, whose trials have several)."""
    found = score_models(space, load, source_recipes(space), split="search", device=device)
    metric = {t.task: t.metric for t in space.config.tasks}
    references = {}
    for name, scored in found.items():
        scores = {task: scored["scores"][f"{task}/{metric[task]}"] for task in metric}
        value = space.objective(scores)
        references[name] = {"scores": scores, **({"score": value} if isinstance(value, float) else {})}
    return references


def evaluate_heldout(space: SearchSpace, load: Callable[[], tuple[Any, Any]], best_recipe: Candidate, *,
                     device: str, others: dict[str, Candidate] | None = None) -> dict[str, Any]:
    """Scores the winner, `others` (e.g. the rest of a Pareto front), the space's `compare:` models and
    every source (item by item; cached), and compares the winner with each on the same items."""
    columns = [f"{e.task}/{e.metric}" for e in space.heldout_entries()]
    groups: dict[str, list[str]] = {}
    for e in space.heldout_entries():
        groups.setdefault(e.metric, []).append(f"{e.task}/{e.metric}")
    candidates = {"winner": best_recipe, **(others or {}), **space.compare, **source_recipes(space)}
    found = score_models(space, load, candidates, split="heldout", device=device)
    rows: dict[str, Any] = {}
    items: dict[str, dict[str, list[float]]] = {}
    for name, scored in found.items():
        scores = scored["scores"]
        combined = {metric: sum(scores[c] for c in cols) / len(cols) for metric, cols in groups.items()}
        rows[name] = {"scores": scores, "combined": combined}
        items[name] = scored["items"]
    first = found["winner"]
    higher = first.get("higher_is_better") or {}
    aggregation = first.get("aggregation") or {}
    comparisons = {name: paired(items["winner"], items[name], groups, seed=space.config.seed, higher=higher,
                                aggregation=aggregation)
                   for name in candidates if name != "winner"}
    better = {metric: all(c[metric]["verdict"] == "better" for c in comparisons.values()) for metric in groups}
    return {"split": "heldout", "seed": space.config.seed, "columns": columns, "combined_over": groups,
            "higher_is_better": higher,
            "rows": rows, "comparisons": comparisons, "winner_better_than_every_source": better, "items": items}
