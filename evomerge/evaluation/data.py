"""Benchmark items and their disjoint, seeded splits.

Every item belongs to exactly one *pool*, fixed by a hash of its content (never by the seed), so
the pools can never overlap whatever seed or size is asked for:

| task      | search pool            | held-out pool          | training pool (demo family, few-shot) |
|-----------|------------------------|------------------------|-------------------------------|
| gsm8k     | 1/5 of train           | all of test            | the other 4/5 of train (+ few-shot)   |
| mmlu      | 1/3 of test            | 1/3 of test            | 1/3 of test (+ dev: few-shot) |
| humaneval | 1/2                    | 1/2                    | none (code trains on stdlib)  |

A split of size n is the first n items of its pool ordered by sha256(seed, item key): the
same on every run and machine, and a smaller split is a prefix of a larger one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from pathlib import Path

from evomerge.errors import EvomergeError

DATA = Path(__file__).resolve().parents[1] / "data"
TASKS = ("gsm8k", "mmlu", "humaneval")
SPLITS = ("search", "heldout")


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


@lru_cache(maxsize=None)
def _pools(task: str) -> dict[str, tuple[dict, ...]]:
    pools: dict[str, list[dict]] = {"search": [], "heldout": [], "train": [], "fewshot": []}
    if task == "gsm8k":
        for row in _read(DATA / "gsm8k" / "train.jsonl.gz"):
            item = {"key": row["question"], "question": row["question"], "answer": row["answer"]}
            pools["search" if _digest("gsm8k-pool:" + item["key"]) % 5 == 0 else "train"].append(item)
        for row in _read(DATA / "gsm8k" / "test.jsonl.gz"):
            pools["heldout"].append({"key": row["question"], "question": row["question"], "answer": row["answer"]})
    elif task == "mmlu":
        for row in _read(DATA / "mmlu" / "test.jsonl.gz"):
            item = {"key": row["subject"] + "\n" + row["question"] + "\n" + "\n".join(row["choices"]), **row}
            pools[("search", "heldout", "train")[_digest("mmlu-pool:" + item["key"]) % 3]].append(item)
        for row in _read(DATA / "mmlu" / "dev.jsonl.gz"):
            pools["fewshot"].append({"key": row["subject"] + "\n" + row["question"], **row})
    elif task == "humaneval":
        for row in _read(DATA / "humaneval" / "HumanEval.jsonl.gz"):
            item = {"key": row["task_id"], **row}
            pools["search" if _digest("humaneval-pool:" + item["key"]) % 2 == 0 else "heldout"].append(item)
    else:
        raise EvomergeError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return {name: tuple(items) for name, items in pools.items()}


def pool(task: str, name: str) -> tuple[dict, ...]:
    return _pools(task)[name]


def mmlu_subjects() -> list[str]:
    return sorted({item["subject"] for item in _pools("mmlu")["search"]})


def select(task: str, split: str, size: int | None, seed: int, subjects: list[str] | None = None) -> list[dict]:
    """The `size` items of `split` for `seed` (all of the pool when size is None)."""
    if split not in SPLITS:
        raise EvomergeError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    items = list(pool(task, split))
    if subjects:
        unknown = sorted(set(subjects) - set(mmlu_subjects()))
        if unknown:
            raise EvomergeError(f"mmlu subjects: unknown {', '.join(unknown)}")
        items = [item for item in items if item["subject"] in subjects]
    items.sort(key=lambda item: _digest(f"{seed}:{item['key']}"))
    if size is not None:
        if size < 1:
            raise EvomergeError(f"{task}: split size must be at least 1, got {size}")
        if size > len(items):
            raise EvomergeError(f"{task}: {split} split has {len(items)} items, {size} asked for")
        items = items[:size]
    return items


def training_items(task: str) -> tuple[dict, ...]:
    """Items no evaluation split can ever use (the demo family trains on these)."""
    return pool(task, "train")


def items_sha256(task: str, split: str, size: int | None, seed: int, subjects: list[str] | None = None) -> str:
    """sha256 of the items a split selects (their full content, in order): equal digests, equal items."""
    items = select(task, split, size, seed, subjects=subjects)
    return hashlib.sha256(json.dumps(items, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def max_fewshot(task: str) -> int:
    """How many exemplars a prompt can take: MMLU's are its subject's dev questions (5 each),
    GSM8K's come from the training pool, HumanEval has none."""
    if task == "mmlu":
        counts: dict[str, int] = {}
        for item in pool("mmlu", "fewshot"):
            counts[item["subject"]] = counts.get(item["subject"], 0) + 1
        return min(counts.values())
    if task == "gsm8k":
        return len(pool("gsm8k", "train"))
    return 0
