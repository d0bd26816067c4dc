"""The evaluation harness: splits, extraction, and lm-eval end to end on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.evaluation import Evaluator, TaskRequest, dataset_split, task_items
from evomerge.evaluation.catalog import for_paths
from evomerge.evaluation.tasklib import gold_choice, humaneval_program
from tests.conftest import REPO


def select(task, split, size, seed, subjects=None):
    return task_items(task, split, size, seed, subjects)[0]


@pytest.mark.parametrize("task", ["gsm8k", "mmlu", "humaneval"])
def test_pools_are_disjoint_and_cover_everything(task):
    rules = for_paths(()).info(task).rules
    names = {"search": rules["search"], "heldout": rules["heldout"], "train": "train"}
    pools = {side: {item["key"] for item in dataset_split(task, name)} if name != "train" or task != "humaneval"
             else set() for side, name in names.items()}
    assert pools["search"] and pools["heldout"]
    assert not pools["search"] & pools["heldout"]
    assert not pools["train"] & (pools["search"] | pools["heldout"])
    every = {item["key"] for item in dataset_split(task, "test")}
    if task != "gsm8k":  # MMLU's and HumanEval's pools divide their test split
        assert pools["search"] | pools["heldout"] | pools["train"] == every
    if task == "mmlu":
        fewshot = {item["key"] for item in dataset_split(task, "dev")}
        evaluated = {k.rsplit("\n", 4)[0] for k in pools["search"] | pools["heldout"]}
        assert not fewshot & evaluated


def test_gsm8k_searches_on_train_and_holds_out_test():
    test_questions = {item["question"] for item in select("gsm8k", "heldout", None, 0)}
    assert len(test_questions) == 1319
    assert not test_questions & {item["question"] for item in select("gsm8k", "search", None, 0)}


@pytest.mark.e2e
def test_splits_are_seeded_prefix_stable_and_disjoint():
    a = select("mmlu", "search", 50, seed=3)
    assert [i["key"] for i in a] == [i["key"] for i in select("mmlu", "search", 50, seed=3)]
    assert [i["key"] for i in select("mmlu", "search", 20, seed=3)] == [i["key"] for i in a[:20]]
    assert [i["key"] for i in select("mmlu", "search", 50, seed=4)] != [i["key"] for i in a]
    held = {i["key"] for i in select("mmlu", "heldout", 3000, seed=3)}
    assert not held & {i["key"] for i in select("mmlu", "search", 3000, seed=3)}


@pytest.mark.e2e
def test_splits_do_not_depend_on_the_process():
    """Identical across runs and machines: no Python hash randomisation involved."""
    code = ("from evomerge.evaluation import task_items; "
            "print([i['key'][:30] for i in task_items('gsm8k', 'search', 5, 11)[0]])")
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1 and "[" in outputs.pop()


def test_split_errors_name_the_task():
    with pytest.raises(EvomergeError, match="humaneval: search split has 83 items, 500 asked for"):
        select("humaneval", "search", 500, 0)
    with pytest.raises(EvomergeError, match="unknown bogus_subject"):
        select("mmlu", "search", 5, 0, subjects=["bogus_subject"])


def test_humaneval_program_handles_bare_bodies_and_whole_functions():
    doc = {"prompt": "from typing import List\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n", "entry_point": "add"}
    assert humaneval_program(doc, "    return a + b\n").endswith("    return a + b\n")
    whole = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    program = humaneval_program(doc, whole)
    assert program.startswith("from typing import List") and "def add(a, b)" in program and "```" not in program


def test_gold_choice_normalises_over_the_choices():
    scores = gold_choice(2, [(-3.0, False), (-2.0, False), (-1.0, True), (-4.0, False)])
    expected = -1.0 - torch.logsumexp(torch.tensor([-3.0, -2.0, -1.0, -4.0]), 0).item()
    assert scores["gold_loglik"] == pytest.approx(expected)


@pytest.fixture(scope="module")
def tiny_model(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_family["base"]).eval(), AutoTokenizer.from_pretrained(tiny_family["base"])


@pytest.mark.e2e
def test_every_task_runs_offline_end_to_end_on_the_tiny_model(tiny_model, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("evaluation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model, tokenizer = tiny_model
    requests = [TaskRequest("gsm8k", "accuracy", size=3), TaskRequest("mmlu", "accuracy", size=6),
                TaskRequest("humaneval", "accuracy", size=3, max_gen_toks=96)]
    scores = Evaluator(requests, tokenizer, batch_size=4).evaluate(model, per_item=True)
    assert set(scores.scores) == {"gsm8k", "mmlu", "humaneval"}
    for task, value in scores.scores.items():  # item-level scores (pass@1: the judge's verdicts) average to the score
        assert len(scores.per_item[task]) == scores.items[task] and np.mean(scores.per_item[task]) == pytest.approx(value)
    assert scores.items == {"gsm8k": 3, "mmlu": 6, "humaneval": 3}
    for task, value in scores.scores.items():  # an accuracy is a count of items over the items
        n = scores.items[task]
        assert 0 <= round(value * n) <= n and math.isclose(value * n, round(value * n), abs_tol=1e-9), (task, value)
    # the gsm8k accuracy is lm-eval's flexible-extract exact match, read from its own results
    assert scores.scores["gsm8k"] == scores.results["gsm8k"]["exact_match,flexible-extract"]
    gold = Evaluator([TaskRequest("gsm8k", "gold_loglik", size=4), TaskRequest("mmlu", "gold_loglik", size=6),
                      TaskRequest("humaneval", "gold_loglik", size=3)], tokenizer).evaluate(model)
    assert all(v < 0 for v in gold.scores.values())  # mean log-probabilities


def test_scores_are_deterministic_and_follow_the_weights(tiny_model, tiny_family):
    """Same model, same scores; a different model object (other weights) gets a new HFLM and new scores."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_model
    evaluator = Evaluator([TaskRequest("gsm8k", "gold_loglik", size=4), TaskRequest("mmlu", "gold_loglik", size=5)],
                          tokenizer)
    first, second = evaluator.evaluate(model), evaluator.evaluate(model)
    assert first.scores == second.scores
    other = AutoModelForCausalLM.from_pretrained(tiny_family["ft_code"]).eval()
    assert evaluator.evaluate(other).scores != first.scores
    with torch.no_grad():  # in-place weight changes (what the engine does) are seen by the same HFLM
        for p in model.parameters():
            p.mul_(1.5)
    try:
        assert evaluator.evaluate(model).scores != first.scores
    finally:
        with torch.no_grad():
            for p in model.parameters():
                p.div_(1.5)


def test_limit_keeps_the_first_items(tiny_model):
    model, tokenizer = tiny_model
    evaluator = Evaluator([TaskRequest("mmlu", "gold_loglik", size=8)], tokenizer)
    assert evaluator.evaluate(model, limit=3).items == {"mmlu": 3}


def test_cli_eval_writes_lm_eval_layout(tiny_family, tmp_path):
    from evomerge.cli import main

    out = tmp_path / "scores.json"
    before = torch.get_num_threads()
    try:  # --threads on every command that loads a model, not only on search
        assert main(["eval", tiny_family["base"], "--tasks", "gsm8k,mmlu", "--metric", "gold_loglik", "--limit", "3",
                     "--split", "heldout", "--output", str(out), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    report = json.loads(out.read_text())
    assert report["split"] == "heldout" and set(report["scores"]) == {"gsm8k", "mmlu"}
    assert "gold_loglik,none" in report["results"]["gsm8k"]
    assert report["items"]["gsm8k"] == {"from": "test", "rule": "the task's own split", "items": 3, "of": 1319}


def test_bad_task_requests_are_named(tiny_model):
    _model, tokenizer = tiny_model
    with pytest.raises(EvomergeError, match="unknown task 'bogus_task'"):
        Evaluator([TaskRequest("bogus_task")], tokenizer)
    with pytest.raises(EvomergeError, match="gsm8k.metric: gsm8k.s metrics are accuracy, exact_match, gold_loglik"):
        Evaluator([TaskRequest("gsm8k", "bleu")], tokenizer)


@pytest.mark.slow
def test_smollm2_runs_every_task_on_both_splits():
    from evomerge.demo.smollm2 import ensure_base
    from evomerge.evaluation import load_model

    model, tokenizer = load_model(str(ensure_base()), device="cpu")
    for split in ("search", "heldout"):
        requests = [TaskRequest("gsm8k", "gold_loglik", size=4), TaskRequest("mmlu", "accuracy", size=8),
                    TaskRequest("humaneval", "accuracy", size=2)]
        scores = Evaluator(requests, tokenizer, split=split).evaluate(model)
        mmlu_correct = scores.scores["mmlu"] * 8
        assert -5 < scores.scores["gsm8k"] < 0 and math.isclose(mmlu_correct, round(mmlu_correct), abs_tol=1e-9)


def test_a_generation_budget_longer_than_the_context_is_halved_to_fit(tiny_model):
    """lm-eval's HumanEval asks for 1024 new tokens, which a 1024-token model cannot give after a
    prompt; lm-eval would refuse the whole evaluation."""
    _model, tokenizer = tiny_model
    evaluator = Evaluator([TaskRequest("humaneval", "accuracy", size=1), TaskRequest("mmlu", "accuracy", size=1)],
                          tokenizer)
    task = evaluator.tasks["humaneval"]
    assert task.config.generation_kwargs["max_gen_toks"] == 1024
    evaluator._fit_generation(4096)
    assert task.config.generation_kwargs["max_gen_toks"] == 1024
    evaluator._fit_generation(1024)
    assert task.config.generation_kwargs["max_gen_toks"] == 512


@pytest.mark.parametrize("task,shots,message", [
    ("mmlu", 6, "mmlu.num_fewshot: at most 5 exemplars, got 6"),  # a subject's dev questions: 5
    ("humaneval", 1, "humaneval.num_fewshot: at most 0 exemplars, got 1"),
])
def test_more_exemplars_than_a_task_has_is_refused_naming_the_field(task, shots, message, tiny_model):
    with pytest.raises(EvomergeError, match=message):
        Evaluator([TaskRequest(task, "accuracy", num_fewshot=shots)], tiny_model[1])
