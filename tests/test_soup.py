"""Model soups: the greedy decisions follow the scores, and soups share a study with the search."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from evomerge.errors import SpaceError
from evomerge.search import SearchSpace
from evomerge.search.soup import PARAM, plan
from evomerge.trials import SAMPLER
from tests.conftest import tiny_space

NAMES = ["a", "b", "c", "d"]


def trial(number: int, members: list[str], value: float | None, kind: str = "greedy_soup"):
    made = create_trial(
        params={PARAM + name: int(name in members) for name in NAMES},
        distributions={PARAM + name: CategoricalDistribution([0, 1]) for name in NAMES},
        value=value, state=TrialState.COMPLETE if value is not None else TrialState.FAIL,
        system_attrs={SAMPLER: kind})
    made.number = number
    return made


def test_greedy_soup_scores_each_source_then_adds_one_only_when_the_score_improves():
    history = []
    assert plan("greedy_soup", NAMES, history) == (["a"], 7)  # 2n - 1 trials
    for number, (name, value) in enumerate({"a": 1.0, "b": 3.0, "c": 2.0, "d": 0.5}.items()):
        assert plan("greedy_soup", NAMES, history)[0] == [name]
        history.append(trial(number, [name], value))
    # ranked b (3.0), c (2.0), a (1.0), d (0.5): the soup starts as b, c is tried first
    assert plan("greedy_soup", NAMES, history) == (["b", "c"], 3)
    history.append(trial(4, ["b", "c"], 3.0))  # no better than b alone (equal): c stays out
    assert plan("greedy_soup", NAMES, history) == (["b", "a"], 2)
    history.append(trial(5, ["b", "a"], 3.2))  # better: a joins
    assert plan("greedy_soup", NAMES, history) == (["b", "a", "d"], 1)
    history.append(trial(6, ["b", "a", "d"], 3.1))  # worse: d stays out
    assert plan("greedy_soup", NAMES, history) == (None, 0)
    # a failed candidate is never kept; other proposers' trials are not the soup's
    history[5] = trial(5, ["b", "a"], None)
    history.append(trial(7, ["a", "b", "c"], 9.0, kind="cmaes"))
    assert plan("greedy_soup", NAMES, history[:6] + history[7:]) == (["b", "d"], 1)


def test_uniform_soup_is_one_trial_of_every_source():
    assert plan("uniform_soup", NAMES, []) == (NAMES, 1)
    assert plan("uniform_soup", NAMES, [trial(0, NAMES, 1.0, "uniform_soup")]) == (None, 0)


def test_a_soup_needs_a_method_that_weighs_each_model(tiny_family, tmp_path):
    with pytest.raises(SpaceError, match="sampler: greedy_soup: a soup weighs each model: method 'slerp' has no per-model weight"):
        SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, methods=["slerp"], sampler="greedy_soup"))


@pytest.mark.e2e
def test_a_greedy_soup_joins_the_searchs_study_and_leaderboard(tiny_family, tmp_path):
    """A CMA-ES search, then `--sampler greedy_soup` on the same space: the soup's 2n-1 trials
    join the same study, unpruned, labelled on the leaderboard; each is the first method over its
    members with equal weights; CMA-ES's own proposals are unaffected by them."""
    from evomerge.cli import main
    from evomerge.recipe import Recipe

    space = tiny_space(tiny_family, tmp_path, n_trials=4, pruning={"min_trials": 2, "first_rung": 0.5})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    assert main(["search", str(path), "--no-heldout", "-q"]) == 0
    assert main(["search", str(path), "--sampler", "greedy_soup", "--no-heldout", "-q"]) == 0
    results = tmp_path / "results" / "tiny"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{results / 'study.db'}")
    soup = [t for t in study.trials if t.user_attrs.get("proposer") == "greedy_soup"]
    assert len(study.trials) == 4 + 5 and len(soup) == 5
    assert all(t.state == TrialState.COMPLETE for t in soup)
    names = {tiny_family["ft_math"]: "math", tiny_family["ft_code"]: "code", tiny_family["ft_knowledge"]: "know"}
    for t in soup:
        recipe = Recipe.from_yaml(t.user_attrs["recipe"]).to_dict()
        members = [names[m["model"]] for m in recipe["models"]]
        assert sorted(members) == sorted(n for n in ("math", "code", "know") if t.params[PARAM + n] == 1)
        assert recipe["merge_method"] == "task_arithmetic"
        assert {m["parameters"]["weight"] for m in recipe["models"]} == {1 / len(members)}
    # the decisions are plan()'s on these very scores
    ordered = sorted(soup, key=lambda t: t.number)
    assert [sum(t.params.values()) for t in ordered[:3]] == [1, 1, 1] and sum(ordered[3].params.values()) == 2
    leaderboard = (results / "leaderboard.csv").read_text()
    assert "task_arithmetic (greedy soup)" in leaderboard
    # running it again adds nothing: the soup is done
    assert main(["search", str(path), "--sampler", "greedy_soup", "--no-heldout", "-q"]) == 0
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{results / 'study.db'}").trials) == 9
    summary = json.loads((results / "summary.json").read_text())
    assert summary["trials"]["COMPLETE"] + summary["trials"]["PRUNED"] == 9


@pytest.mark.e2e
def test_the_plots_reference_lines_are_the_scores_trials_give_the_same_models(tiny_family, tmp_path, monkeypatch):
    """A greedy soup over `linear` first scores each source alone, as a trial; the reference scores
    drawn on the history and per-task plots are computed apart (cached, item by item) and must be
    those very scores."""
    from evomerge.search import run_search
    from evomerge.search.heldout import source_search_scores
    from evomerge.search.runner import Searcher

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    space = SearchSpace.from_dict(tiny_space(tiny_family, tmp_path, methods=["linear"], sampler="greedy_soup"))
    run_search(space, heldout=False, progress=False)
    searcher = Searcher(space, results_root=tmp_path / "results", progress=False)
    searcher.load()
    references = source_search_scores(space, lambda: (searcher.engine, searcher.evaluator.tokenizer), device="cpu")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'results' / 'tiny' / 'study.db'}")
    alone = {name: t for t in study.trials for name in ("math", "code", "know")
             if sum(t.params.values()) == 1 and t.params[PARAM + name] == 1}
    assert set(alone) == {"math", "code", "know"}
    for name, t in alone.items():
        assert references[name]["scores"] == t.user_attrs["scores"], name
        assert references[name]["score"] == t.value, name
