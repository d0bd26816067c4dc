"""GSM8K's items and pools (lm-eval imports this file for gsm8k.yaml's `!function utils.*`).

| pool    | items                          | used for                                      |
|---------|--------------------------------|-----------------------------------------------|
| search  | 1/5 of train, by content hash  | the search                                    |
| test    | all of test                    | the held-out table (and `--split all`)        |
| train   | the other 4/5 of train         | few-shot exemplars, the demo family's training |
"""

from functools import lru_cache
from pathlib import Path

from evomerge.evaluation.tasklib import dataset, pool_of, read_jsonl

HERE = Path(__file__).resolve().parent


def _item(row: dict) -> dict:
    return {"key": row["question"], "question": row["question"], "answer": row["answer"]}


def pools() -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {"search": [], "train": []}
    for row in read_jsonl(HERE / "train.jsonl.gz"):
        item = _item(row)
        found["search" if pool_of(item["key"], "gsm8k-pool:", 5) == 0 else "train"].append(item)
    found["test"] = [_item(row) for row in read_jsonl(HERE / "test.jsonl.gz")]
    return found


@lru_cache(maxsize=None)
def _dataset():
    return dataset(pools())  # built once per process: every evaluator reads the same rows


def gsm8k_dataset(**_meta):
    return _dataset()
