"""Which items of a task each side scores: disjoint, seeded splits for any lm-eval task.

A task's items are divided between the search and the held-out table by the first rule that applies:

1. the task declares the dataset split of each side (`metadata: evomerge: {search: S, heldout: H}`;
   the built-ins do: their pool rules live beside them, in evomerge/tasks/<name>/utils.py);
2. the task has a validation and a test split: the search scores validation, the table test;
3. otherwise its one split is divided by a hash of each item's content, never by the seed:
   sha256("evomerge-pool:" + key) even -> search, odd -> held-out.

Either way no item can be on both sides, whatever seed or size is asked for. A side of size n is
the first n of its items ordered by sha256(seed, key): the same on every run and machine, and a
smaller side is a prefix of a larger one. `all` is every item of the task's evaluation split, in
lm-eval's order (what `lm_eval --tasks NAME` scores).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from evomerge.errors import EvomergeError

SPLITS = ("search", "heldout", "all")
POOL_SALT = "evomerge-pool:"


def digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def item_key(doc: dict, rules: dict) -> str:
    """What identifies an item: the field the task names, else its whole content."""
    field = rules.get("key")
    if field:
        if field not in doc:
            raise EvomergeError(f"metadata.evomerge.key: the documents have no field {field!r}")
        return str(doc[field])
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, default=str)


def named_split(task, name: str):
    """A dataset split of the task as lm-eval would read it (its process_docs applied)."""
    dataset = task.dataset
    if name not in dataset:
        raise EvomergeError(f"{task.config.task}: metadata.evomerge names split {name!r}; the dataset has "
                            f"{', '.join(dataset)}")
    docs = dataset[name]
    process = task.config.process_docs
    return process(docs) if process is not None else docs


def side_docs(task, rules: dict, split: str) -> tuple[Any, dict[str, Any]]:
    """The documents one side may use, before seed and size, and how they were chosen."""
    if split not in SPLITS:
        raise EvomergeError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    config = task.config
    if split == "all":
        return task.eval_docs, {"from": config.test_split or config.validation_split, "rule": "every item"}
    if rules.get(split):
        return named_split(task, rules[split]), {"from": rules[split], "rule": "the task's own split"}
    if config.validation_split and config.test_split:
        name = config.validation_split if split == "search" else config.test_split
        return named_split(task, name), {"from": name, "rule": "validation searches, test is held out"}
    docs = task.eval_docs
    wanted = 0 if split == "search" else 1
    keep = [i for i, doc in enumerate(docs) if digest(POOL_SALT + item_key(doc, rules)) % 2 == wanted]
    return _select(docs, keep), {"from": config.test_split or config.validation_split,
                                 "rule": f"{'even' if wanted == 0 else 'odd'} content hashes (half of the split)"}


def _select(docs, indices: list[int]):
    if hasattr(docs, "select"):
        return docs.select(indices)
    return [docs[i] for i in indices]


def choose(task, rules: dict, split: str, seed: int, size: int | None,
           subjects: list[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The documents a split scores, in order, and a record of the choice (for summary.json)."""
    name = task.config.task
    docs, record = side_docs(task, rules, split)
    indices = list(range(len(docs)))
    if subjects:
        field = rules.get("subset_field")
        if not field:
            raise EvomergeError(f"{name}.subjects: the task has no subsets (metadata.evomerge.subset_field)")
        values = [doc[field] for doc in docs]
        unknown = sorted(set(subjects) - set(values))
        if unknown:
            raise EvomergeError(f"{name} subjects: unknown {', '.join(unknown)}")
        indices = [i for i in indices if values[i] in subjects]
        record["subjects"] = sorted(subjects)
    if split != "all":
        keys = {i: digest(f"{seed}:{item_key(docs[i], rules)}") for i in indices}
        indices.sort(key=keys.__getitem__)
    available = len(indices)
    if size is not None:
        if size < 1:
            raise EvomergeError(f"{name}: split size must be at least 1, got {size}")
        if size > available:
            raise EvomergeError(f"{name}: {split} split has {available} items, {size} asked for")
        indices = indices[:size]
    if not indices:
        raise EvomergeError(f"{name}: the {split} split has no items")
    chosen = _select(docs, indices)
    record.update(items=len(indices), of=available)
    return chosen, record


def docs_sha256(docs) -> str:
    """sha256 of documents (their full content, in order): equal digests, equal items."""
    rows = [dict(doc) for doc in docs]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()
