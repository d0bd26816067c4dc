"""HumanEval's items and pools (lm-eval imports this file for humaneval.yaml's `!function utils.*`):
half of the 164 problems by content hash for the search, the other half held out; `test` is all
of them. Programs are judged by evomerge's sandbox (evomerge.evaluation.tasklib.pass_at_1)."""

from functools import lru_cache
from pathlib import Path

from evomerge.evaluation.tasklib import code_generation, dataset, pass_at_1, pool_of, read_jsonl  # noqa: F401

HERE = Path(__file__).resolve().parent


def pools() -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {"search": [], "heldout": [], "test": []}
    for row in read_jsonl(HERE / "HumanEval.jsonl.gz"):
        item = {"key": row["task_id"], **row}
        found["search" if pool_of(item["key"], "humaneval-pool:", 2) == 0 else "heldout"].append(item)
        found["test"].append(item)
    return found


@lru_cache(maxsize=None)
def _dataset():
    return dataset(pools())  # built once per process: every evaluator reads the same rows


def humaneval_dataset(**_meta):
    return _dataset()
