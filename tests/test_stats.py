"""Paired bootstrap comparisons: the difference, its interval and the verdict follow the items."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.report.stats import paired, verdict


def test_the_verdict_is_the_intervals():
    assert verdict(0.01, 0.2) == "better"
    assert verdict(-0.2, -0.01) == "worse"
    assert verdict(-0.1, 0.1) == "no detectable difference"
    assert verdict(0.0, 0.0) == "no detectable difference"


def test_paired_differences_and_intervals_follow_the_scores_you_control():
    rng = np.random.default_rng(1)
    base = rng.normal(-1.5, 0.3, size=64)
    winner = {"gsm8k/gold_loglik": base + 0.2 + rng.normal(0, 0.05, 64),  # clearly better, item by item
              "mmlu/gold_loglik": base + rng.normal(0, 0.3, 64),  # noise around zero
              "mmlu/accuracy": [1.0, 0.0] * 32}
    source = {"gsm8k/gold_loglik": base, "mmlu/gold_loglik": base, "mmlu/accuracy": [1.0, 0.0] * 32}
    groups = {"gold_loglik": ["gsm8k/gold_loglik", "mmlu/gold_loglik"], "accuracy": ["mmlu/accuracy"]}
    found = paired(winner, source, groups, seed=0)
    gsm8k = found["gsm8k/gold_loglik"]
    assert gsm8k["verdict"] == "better" and gsm8k["low"] < gsm8k["difference"] < gsm8k["high"]
    assert gsm8k["difference"] == pytest.approx(np.mean(np.asarray(winner["gsm8k/gold_loglik"]) - base))
    assert found["mmlu/gold_loglik"]["verdict"] == "no detectable difference"
    assert found["mmlu/accuracy"] == {"difference": 0.0, "low": 0.0, "high": 0.0,
                                      "verdict": "no detectable difference", "items": 64}
    combined = found["gold_loglik"]
    assert combined["difference"] == pytest.approx((gsm8k["difference"] + found["mmlu/gold_loglik"]["difference"]) / 2)
    assert combined["items"] == 128
    # the other way round: worse, with the interval mirrored
    backwards = paired(source, winner, groups, seed=0)["gsm8k/gold_loglik"]
    assert backwards["verdict"] == "worse" and backwards["high"] == pytest.approx(-gsm8k["low"])
    # seeded: the same numbers again
    assert paired(winner, source, groups, seed=0) == found


def test_paired_scores_must_cover_the_same_items():
    with pytest.raises(ValueError, match="mmlu/accuracy: paired scores need the same items, got 3 and 2"):
        paired({"mmlu/accuracy": [1, 0, 1]}, {"mmlu/accuracy": [1, 0]}, {})
