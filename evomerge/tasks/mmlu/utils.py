"""MMLU's items and pools (lm-eval imports this file for mmlu.yaml's `!function utils.*`).

| pool    | items                          | used for                                      |
|---------|--------------------------------|-----------------------------------------------|
| search  | 1/3 of test, by content hash   | the search                                    |
| heldout | 1/3 of test                    | the held-out table                            |
| train   | 1/3 of test                    | the demo family's training                    |
| dev     | dev (5 per subject)            | few-shot exemplars                            |

`test` is all of test (`--split all`). lm-eval's sampler cannot choose exemplars per subject, so
each item carries its subject's description and first `num_fewshot` dev questions (`mmlu_context`,
the text lm-eval's `mmlu_<subject>` tasks build; metadata.evomerge.exemplars_in_items).
"""

from functools import lru_cache
from pathlib import Path

from evomerge.evaluation.tasklib import dataset, pool_of, read_jsonl

HERE = Path(__file__).resolve().parent
DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
LETTERS = "ABCD"


@lru_cache(maxsize=None)
def pools() -> dict[str, tuple[dict, ...]]:
    found: dict[str, list[dict]] = {"search": [], "heldout": [], "train": [], "test": []}
    for row in read_jsonl(HERE / "test.jsonl.gz"):
        item = {"key": row["subject"] + "\n" + row["question"] + "\n" + "\n".join(row["choices"]), **row}
        found[("search", "heldout", "train")[pool_of(item["key"], "mmlu-pool:", 3)]].append(item)
        found["test"].append(item)
    found["dev"] = [{"key": row["subject"] + "\n" + row["question"], **row}
                    for row in read_jsonl(HERE / "dev.jsonl.gz")]
    return {name: tuple(items) for name, items in found.items()}


def mmlu_question(doc: dict) -> str:
    """lm-eval's standard MMLU question text (its `doc_to_text`)."""
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"]))
    return f"{doc['question'].strip()}{choices}\nAnswer:"


@lru_cache(maxsize=None)
def mmlu_context(subject: str, shots: int) -> str:
    """What lm-eval puts before an item of `subject` with `shots` exemplars: the subject's
    description, then its first dev questions, each with its answer letter."""
    exemplars = [item for item in pools()["dev"] if item["subject"] == subject][:shots]
    if len(exemplars) < shots:
        raise ValueError(f"mmlu: {subject} has {len(exemplars)} few-shot exemplars, {shots} asked for")
    text = DESCRIPTION.format(subject=subject.replace("_", " "))
    return text + "".join(f"{mmlu_question(ex)} {LETTERS[ex['answer']]}\n\n" for ex in exemplars)


def mmlu_dataset(**meta):
    return _dataset(int((meta.get("fewshot") or {}).get("mmlu", 0)))


@lru_cache(maxsize=None)
def _dataset(shots: int):  # built once per process and exemplar count: every evaluator reads the same rows
    return dataset({name: [{**item, "mmlu_context": mmlu_context(item["subject"], shots)} for item in items]
                    if name != "dev" else items for name, items in pools().items()})
