"""Paired comparisons on the same items: mean differences, bootstrap intervals, and their verdict.

Two models scored on the same held-out items give per-item differences; resampling the items
(with replacement, the same draw for both models: paired) gives the spread of the mean
difference. A combined score (the mean over the tasks of one metric) resamples each task's items
independently and averages, so its interval accounts for every task's size.
"""

from __future__ import annotations

from typing import Sequence

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


def paired(first: dict[str, Sequence[float]], second: dict[str, Sequence[float]], groups: dict[str, list[str]],
           *, iterations: int = ITERATIONS, level: float = LEVEL, seed: int = 0) -> dict[str, dict]:
    """`first` minus `second` per column ({column: per-item scores, items in the same order for both})
    and per group of columns (their mean): {name: {difference, low, high, verdict, items}}."""
    rng = np.random.default_rng(seed)
    draws: dict[str, np.ndarray] = {}
    found: dict[str, dict] = {}
    for column in first:
        a, b = np.asarray(first[column], dtype=float), np.asarray(second[column], dtype=float)
        if a.shape != b.shape or a.size == 0:
            raise ValueError(f"{column}: paired scores need the same items, got {a.size} and {b.size}")
        difference = a - b
        draws[column] = difference[rng.integers(0, difference.size, size=(iterations, difference.size))].mean(axis=1)
        low, high = _interval(draws[column], level)
        found[column] = {"difference": float(difference.mean()), "low": low, "high": high,
                         "verdict": verdict(low, high), "items": int(difference.size)}
    for name, columns in groups.items():
        combined = np.mean([draws[c] for c in columns], axis=0)
        low, high = _interval(combined, level)
        found[name] = {"difference": float(np.mean([found[c]["difference"] for c in columns])), "low": low,
                       "high": high, "verdict": verdict(low, high), "items": sum(found[c]["items"] for c in columns)}
    return found
