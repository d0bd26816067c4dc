"""evomerge's offline GSM8K and MMLU tasks are lm-eval's standard `gsm8k` and `mmlu_<subject>`
tasks on evomerge's items: the same prompts (few-shot exemplars included), the same requests,
the same filters and metrics, so the same scores. The reference is lm-eval's own installed task
YAML, with only its dataset pointed at the same items (the hub is unreachable offline)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from evomerge.evaluation import Evaluator, TaskRequest, dataset_split, task_items

pytestmark = pytest.mark.oracle

SEED = 0


def lm_eval_task(relative: str, splits: dict[str, list[dict]], num_fewshot: int):
    """lm-eval's task from its installed YAML (includes resolved), reading `splits` instead of the hub."""
    import lm_eval
    from datasets import Dataset
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / relative)
    for key in ("dataset_path", "dataset_name", "tag"):
        config.pop(key, None)
    config["custom_dataset"] = lambda **_: {name: Dataset.from_list(items) for name, items in splits.items()}
    task = ConfigurableTask(config=config)
    task.set_config(key="num_fewshot", value=num_fewshot)
    return task


def standard_gsm8k(items: list[dict], num_fewshot: int):
    # the train split lm-eval samples exemplars from is evomerge's training pool (never evaluated)
    return lm_eval_task("gsm8k/gsm8k.yaml", {"test": items, "train": dataset_split("gsm8k", "train")}, num_fewshot)


def standard_mmlu(items: list[dict], num_fewshot: int) -> dict[str, object]:
    """One lm-eval subject task per subject among `items`, each on its items in evomerge's order."""
    tasks = {}
    for subject in dict.fromkeys(item["subject"] for item in items):
        dev = [item for item in dataset_split("mmlu", "dev") if item["subject"] == subject]
        tasks[subject] = lm_eval_task(f"mmlu/default/mmlu_{subject}.yaml",
                                      {"test": [i for i in items if i["subject"] == subject], "dev": dev}, num_fewshot)
    return tasks


def contexts(task, shots: int, *, chat_template=None) -> list[str]:
    """The prompt lm-eval builds for each item, in order, after the evaluator's seeding."""
    task.set_fewshot_seed(seed=SEED)
    return [task.fewshot_context(doc, shots, apply_chat_template=chat_template is not None,
                                 fewshot_as_multiturn=chat_template is not None, chat_template=chat_template)
            for doc in task.eval_docs]


def run(lm, tasks: list, *, chat: bool) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False), bootstrap_iters=0,
                           log_samples=True, apply_chat_template=chat, fewshot_as_multiturn=chat,
                           random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
                           fewshot_random_seed=SEED)


def check_against_lm_eval(model, tokenizer, *, gsm8k: int, mmlu: int, shots: int, mmlu_shots: int | None = None,
                          chat: bool = False) -> dict:
    """Scores the model with evomerge's tasks and with lm-eval's standard ones on the same items,
    asserts the prompts, the per-item log-likelihoods and the task scores agree; returns the scores.
    (With a chat template lm-eval makes MMLU's exemplars turns of a conversation, evomerge one turn:
    there the two agree at 0 shots, which is what is compared.)"""
    mmlu_shots = shots if mmlu_shots is None else mmlu_shots
    assert not (chat and mmlu_shots), "with a chat template, few-shot MMLU prompts differ by design"
    evaluator = Evaluator([TaskRequest("gsm8k", "accuracy", size=gsm8k, num_fewshot=shots),
                           TaskRequest("mmlu", "accuracy", size=mmlu, num_fewshot=mmlu_shots)],
                          tokenizer, seed=SEED, batch_size=1, apply_chat_template=chat)
    ours = evaluator.evaluate(model, per_item=True)
    lm = evaluator.lm(model)
    template = lm.apply_chat_template if chat else None

    gsm8k_items = task_items("gsm8k", "search", gsm8k, SEED)[0]
    reference = standard_gsm8k(gsm8k_items, shots)
    ours_config = evaluator.tasks["gsm8k"].config
    for key in ("output_type", "doc_to_text", "doc_to_target", "target_delimiter", "fewshot_delimiter",
                "generation_kwargs", "filter_list", "metric_list", "repeats"):
        assert getattr(ours_config, key) == getattr(reference.config, key), key
    assert contexts(evaluator.tasks["gsm8k"], shots, chat_template=template) == \
        contexts(reference, shots, chat_template=template)
    standard_output = run(lm, [reference], chat=chat)
    theirs = standard_output["results"]["gsm8k"]
    for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert ours.results["gsm8k"][metric] == theirs[metric], metric
    assert ours.scores["gsm8k"] == theirs["exact_match,flexible-extract"]
    answers = {s["doc"]["question"]: s["resps"] for s in ours.samples["gsm8k"]}
    standard_answers = {s["doc"]["question"]: s["resps"] for s in standard_output["samples"]["gsm8k"]}
    assert answers == standard_answers  # the generations themselves, item by item

    mmlu_items = task_items("mmlu", "search", mmlu, SEED)[0]
    subjects = standard_mmlu(mmlu_items, mmlu_shots)
    mine = dict(zip((i["key"] for i in mmlu_items), contexts(evaluator.tasks["mmlu"], 0,
                                                             chat_template=template)))
    for task in subjects.values():
        assert [mine[doc["key"]] for doc in task.eval_docs] == contexts(task, mmlu_shots, chat_template=template)
    output = run(lm, list(subjects.values()), chat=chat)
    by_key = {s["doc"]["key"]: s for s in output["samples"].values() for s in s}
    assert len(by_key) == len(mmlu_items)
    for sample in ours.samples["mmlu"]:
        standard = by_key[sample["doc"]["key"]]
        assert sample["acc"] == standard["acc"]
        ours_ll = [ll for (ll, _greedy), in sample["resps"]]
        their_ll = [ll for (ll, _greedy), in standard["resps"]]
        assert ours_ll == pytest.approx(their_ll, abs=1e-6)
    # lm-eval's mmlu group: accuracy weighted by each subject's size, i.e. the mean over items
    results = output["results"]
    weighted = sum(results[f"mmlu_{s}"]["acc,none"] * len(t.eval_docs) for s, t in subjects.items()) / len(mmlu_items)
    assert math.isclose(ours.scores["mmlu"], weighted, abs_tol=1e-12)
    return {"gsm8k": ours.scores["gsm8k"], "mmlu": ours.scores["mmlu"]}


def test_offline_tasks_are_lm_evals_standard_tasks_on_the_tiny_model(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_family["base"])
    check_against_lm_eval(model, tokenizer, gsm8k=3, mmlu=12, shots=5)


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_offline_tasks_give_lm_evals_standard_scores_for_smollm2(chat):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.demo.smollm2 import ensure_base

    base = ensure_base()
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    mmlu_shots = 0 if chat else 5
    scores = check_against_lm_eval(model, tokenizer, gsm8k=8, mmlu=40, shots=5, mmlu_shots=mmlu_shots, chat=chat)
    print(f"SmolLM2 ({'chat' if chat else 'plain'}; gsm8k 5-shot, mmlu {mmlu_shots}-shot): {scores}")


def test_humaneval_generates_as_lm_evals_standard_task():
    """Same prompt, stop sequences, token budget and decoding as lm-eval's `humaneval`; only the
    judge differs (evomerge's sandbox runs prompt + completion, tests/test_sandbox.py)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    from evomerge.evaluation.catalog import BUILTIN_DIR

    standard = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "humaneval.yaml", resolve_func=False)
    ours = load_yaml(BUILTIN_DIR / "humaneval" / "humaneval.yaml", resolve_func=False)
    for key in ("output_type", "doc_to_text", "generation_kwargs", "test_split"):
        assert ours[key] == standard[key], key
    assert ours.get("num_fewshot", 0) == standard["num_fewshot"] == 0
