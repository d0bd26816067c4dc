"""What the lm-eval task YAMLs in evomerge/tasks call: datasets, scoring and aggregation.

lm-eval imports the YAMLs' `!function utils.*` under a path-derived module name, so the
functions (and the one piece of state, the token counter) live here, in a normal module,
and tasks/utils.py only re-exports them.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, Callable

from evomerge.evaluation import data

# Set by the evaluator to the model's tokenizer: gold log-likelihoods are per token.
_token_counter: Callable[[str], int] | None = None
_sandbox_options: dict[str, Any] = {}
_verdicts: dict[Any, bool] = {}  # the last pass@1 aggregation: job -> passed (per-item scores)


def set_token_counter(counter: Callable[[str], int] | None) -> None:
    global _token_counter
    _token_counter = counter


def set_sandbox_options(**options: Any) -> None:
    _sandbox_options.clear()
    _sandbox_options.update(options)


def _count_tokens(text: str) -> int:
    if _token_counter is None:
        raise RuntimeError("gold log-likelihood needs a token counter; evaluate through evomerge.evaluation")
    return max(1, _token_counter(text))


# ----------------------------------------------------------------------------- datasets


def _dataset(task: str, items: list[dict], fewshot: list[dict]):
    from datasets import Dataset

    splits = {"test": Dataset.from_list(items)}
    if fewshot:
        splits["fewshot"] = Dataset.from_list(fewshot)
    return splits


def _items(task: str, **meta: Any) -> list[dict]:
    split, seed = meta.get("split", "search"), int(meta.get("seed", 0))
    size = (meta.get("sizes") or {}).get(task)
    subjects = meta.get("subjects") if task == "mmlu" else None
    return data.select(task, split, size, seed, subjects=subjects)


def gsm8k_dataset(**meta: Any):
    """The split's items; few-shot exemplars are drawn (lm-eval's seeded sampler) from the training pool."""
    return _dataset("gsm8k", _items("gsm8k", **meta), list(data.pool("gsm8k", "train")))


MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
MMLU_LETTERS = "ABCD"


def mmlu_question(doc: dict) -> str:
    """lm-eval's standard MMLU question text (its `doc_to_text`)."""
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, doc["choices"]))
    return f"{doc['question'].strip()}{choices}\nAnswer:"


@lru_cache(maxsize=None)
def mmlu_context(subject: str, shots: int) -> str:
    """What lm-eval puts before an item of `subject` with `shots` exemplars: the subject's
    description, then its first dev questions, each with its answer letter."""
    exemplars = [item for item in data.pool("mmlu", "fewshot") if item["subject"] == subject][:shots]
    if len(exemplars) < shots:
        raise ValueError(f"mmlu: {subject} has {len(exemplars)} few-shot exemplars, {shots} asked for")
    text = MMLU_DESCRIPTION.format(subject=subject.replace("_", " "))
    return text + "".join(f"{mmlu_question(ex)} {MMLU_LETTERS[ex['answer']]}\n\n" for ex in exemplars)


def mmlu_dataset(**meta: Any):
    shots = int((meta.get("fewshot") or {}).get("mmlu", 0))
    items = [{**item, "mmlu_context": mmlu_context(item["subject"], shots)} for item in _items("mmlu", **meta)]
    return _dataset("mmlu", items, [])


def humaneval_dataset(**meta: Any):
    return _dataset("humaneval", _items("humaneval", **meta), [])


# ----------------------------------------------------------------------------- GSM8K


def gold_loglik(doc: dict, results: list, target_field: str) -> dict[str, float]:
    loglik, _greedy = results[0]
    return {"gold_loglik": loglik / _count_tokens(doc[target_field])}


def gsm8k_gold(doc: dict, results: list) -> dict[str, float]:
    return gold_loglik(doc, results, "answer")


# ----------------------------------------------------------------------------- MMLU


def mmlu_scores(doc: dict, results: list) -> dict[str, float]:
    """Accuracy, and the log-probability of the right letter normalised over the four letters."""
    lls = [ll for ll, _ in results]
    gold = doc["answer"]
    top = max(lls)
    log_norm = top + math.log(sum(math.exp(ll - top) for ll in lls))
    return {"acc": float(lls.index(top) == gold), "gold_loglik": lls[gold] - log_norm}


# ----------------------------------------------------------------------------- HumanEval

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def humaneval_program(doc: dict, completion: str) -> str:
    """The program to run: prompt + completion, or the completion alone when it restates the
    function (chat models answer with whole functions, often inside a markdown fence)."""
    fenced = _FENCE.findall(completion)
    if fenced:
        completion = fenced[0]
    if re.search(rf"^def {re.escape(doc['entry_point'])}\s*\(", completion, re.MULTILINE):
        imports = "\n".join(line for line in doc["prompt"].splitlines() if line.startswith(("import ", "from ")))
        return imports + "\n" + completion
    return doc["prompt"] + completion


def humaneval_job(doc: dict, completion: str):
    """The program (untrusted: prompt + completion) and what the judge runs against it (trusted:
    the prompt's imports and helpers, and the tests, which never reach the program)."""
    from evomerge.evaluation.sandbox import Job

    return Job(humaneval_program(doc, completion), doc["test"] + f"\ncheck({doc['entry_point']})\n",
               entry_point=doc["entry_point"], helpers=doc["prompt"])


def humaneval_generation(doc: dict, results: list[str]) -> dict[str, Any]:
    return {"pass@1": humaneval_job(doc, results[0])}


def pass_at_1(items: list) -> float:
    """Runs every program in the sandbox, in parallel, and returns the fraction that passed."""
    from evomerge.evaluation.sandbox import Limits, run_jobs

    limits = _sandbox_options.get("limits", Limits())
    results = run_jobs(list(items), limits=limits, workers=_sandbox_options.get("workers"))
    _verdicts.clear()
    _verdicts.update(zip(items, (r.passed for r in results)))
    return sum(r.passed for r in results) / max(1, len(results))


def passed(job: Any) -> bool:
    """The judge's verdict on a job of the last pass@1 aggregation."""
    return _verdicts[job]


def humaneval_gold(doc: dict, results: list) -> dict[str, float]:
    return gold_loglik(doc, results, "canonical_solution")

