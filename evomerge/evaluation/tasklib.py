"""What task YAMLs may call from evomerge: data helpers, gold log-likelihoods and sandboxed code scoring.

lm-eval imports a YAML's `!function utils.*` from the utils.py beside it, under a path-derived
module name; state the evaluator shares with those functions (the token counter, the sandbox's
verdicts) lives here, in a normal module, and a task's utils.py imports what it uses from here.
A task of your own scores generated code through evomerge's sandbox with

    process_results: !function utils.code_generation   # HumanEval-shaped documents
    metric_list:
      - metric: pass@1
        aggregation: !function utils.pass_at_1
        higher_is_better: true

and a utils.py holding `from evomerge.evaluation.tasklib import code_generation, pass_at_1`.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

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


def count_tokens(text: str) -> int:
    if _token_counter is None:
        raise RuntimeError("gold log-likelihood needs a token counter; evaluate through evomerge.evaluation")
    return max(1, _token_counter(text))


# ----------------------------------------------------------------------------- datasets


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a (gzipped) JSON-lines file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def pool_of(key: str, salt: str, parts: int) -> int:
    """Which of `parts` pools an item belongs to, fixed by its content (never by a seed)."""
    from evomerge.evaluation.data import digest

    return digest(salt + key) % parts


def dataset(splits: dict[str, Iterable[dict]]):
    """A DatasetDict of the given splits, as a task's `custom_dataset` returns it."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(list(rows)) for name, rows in splits.items()})


# ----------------------------------------------------------------------------- gold log-likelihood


def gold_continuation(doc: dict, results: list, target: str) -> dict[str, float]:
    """Generation and log-likelihood tasks: the gold continuation's log-probability per token."""
    loglik, _greedy = results[0]
    return {"gold_loglik": loglik / count_tokens(target)}


def gold_choice(gold: int, results: list) -> dict[str, float]:
    """Multiple choice: the log-probability of the gold choice, normalised over the choices."""
    lls = [ll for ll, _ in results]
    top = max(lls)
    return {"gold_loglik": lls[gold] - (top + math.log(sum(math.exp(ll - top) for ll in lls)))}


# ----------------------------------------------------------------------------- generated code

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


def code_generation(doc: dict, results: list[str]) -> dict[str, Any]:
    """process_results of a HumanEval-shaped task (fields prompt, test, entry_point): the job the
    sandbox judges when pass@1 is aggregated."""
    return {"pass@1": humaneval_job(doc, results[0])}


def pass_at_1(items: list) -> float:
    """Runs every program in the sandbox, in parallel, and returns the fraction that passed."""
    from evomerge.evaluation.sandbox import Limits, run_jobs

    limits = _sandbox_options.get("limits", Limits())
    results = run_jobs(list(items), limits=limits, workers=_sandbox_options.get("workers"))
    _verdicts.clear()
    _verdicts.update(zip(items, (r.passed for r in results)))
    return sum(r.passed for r in results) / max(1, len(results))


def passed(job: Any) -> float:
    """The judge's verdict on a job of the last pass@1 aggregation, as an item score."""
    return float(_verdicts[job])


pass_at_1.per_item = passed  # type: ignore[attr-defined]  # how the evaluator reads one item's score
