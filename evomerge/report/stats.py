"""Paired comparisons on the same items: mean differences, bootstrap intervals, and their verdict.

Two models scored on the same held-out items give per-item differences (signed so that positive
is better: a lower-is-better metric such as perplexity counts a drop as a gain); resampling the items
(with replacement, the same draw for both models: paired) gives the spread of the mean
difference. A combined score (the mean over the tasks of one metric) resamples each task's items
independently and averages, so its interval accounts for every task's size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
ITERATIONS = 4000
VERDICTS = ("better", "no detectable difference", "worse")


def verdict(low: float, high: float) -> str:
    """The interval's wording: above zero, straddling it, or below it."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no detectable difference"


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _aggregation(name: str | None) -> Callable[[list], float] | None:
    """lm-eval's aggregation by name (None: the mean, which is vectorised)."""
    if name in (None, "mean"):
        return None
    from lm_eval.api.registry import get_aggregation

    found = get_aggregation(name)
    if found is None:
        raise ValueError(f"no aggregation named {name!r} to resample")
    return found


def paired(first: dict[str, Sequence], second: dict[str, Sequence], groups: dict[str, list[str]],
           *, iterations: int = ITERATIONS, level: float = LEVEL, seed: int = 0,
           higher: dict[str, bool] | None = None, aggregation: dict[str, str] | None = None) -> dict[str, dict]:
    """How much better `first` is than `second`, per column ({column: per-item values, items in the
    same order for both}) and per group of columns (their mean): {name: {difference, low, high,
    verdict, items}}. A column whose metric is lower-is-better (`higher[column]` False) counts a lower
    score as better; one aggregated by other than the mean (`aggregation[column]`, lm-eval's name:
    perplexity, ...) resamples the items and aggregates each draw."""
    rng = np.random.default_rng(seed)
    draws: dict[str, np.ndarray] = {}
    found: dict[str, dict] = {}
    for column in first:
        sign = 1.0 if (higher or {}).get(column, True) else -1.0
        function = _aggregation((aggregation or {}).get(column))
        size, other = len(first[column]), len(second[column])
        if size != other or size == 0:
            raise ValueError(f"{column}: paired scores need the same items, got {size} and {other}")
        picks = rng.integers(0, size, size=(iterations, size))
        if function is None:
            difference = sign * (np.asarray(first[column], dtype=float) - np.asarray(second[column], dtype=float))
            draws[column] = difference[picks].mean(axis=1)
            observed = float(difference.mean())
        else:
            a, b = list(first[column]), list(second[column])
            observed = sign * (function(a) - function(b))
            draws[column] = np.array([sign * (function([a[i] for i in pick]) - function([b[i] for i in pick]))
                                      for pick in picks])
        low, high = _interval(draws[column], level)
        found[column] = {"difference": observed, "low": low, "high": high,
                         "verdict": verdict(low, high), "items": int(size)}
    for name, columns in groups.items():
        combined = np.mean([draws[c] for c in columns], axis=0)
        low, high = _interval(combined, level)
        found[name] = {"difference": float(np.mean([found[c]["difference"] for c in columns])), "low": low,
                       "high": high, "verdict": verdict(low, high), "items": sum(found[c]["items"] for c in columns)}
    return found
