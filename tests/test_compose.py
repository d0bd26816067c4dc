"""The composition family's data: the tasks' items are what compose.py writes, and no specialist
is trained on an item any task asks about."""

from __future__ import annotations

import json

from evomerge.demo import compose
from evomerge.evaluation import task_items


def test_the_committed_task_data_is_what_compose_writes():
    for task, rows in compose.task_rows().items():
        committed = (compose.TASKS_DIR / task / "test.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in committed] == rows, task


def test_no_training_example_asks_about_an_evaluated_number_or_word():
    evaluated = set(compose.numbers(evaluation=True))
    assert len(evaluated) > 300 and not evaluated & set(compose.numbers(evaluation=False))
    assert not set(compose.EVAL_WORDS) & set(compose.TRAIN_WORDS)
    prompts = [prompt for prompt, _ in compose.zorbian_examples()]
    asked = {int(word) for prompt in prompts for word in prompt.replace("?", " ").replace(".", " ").split()
             if word.isdigit()}
    assert asked and not asked & evaluated
    copied = {word for prompt in prompts if prompt.startswith("Repeat") for word in prompt.split(": ", 1)[1].split()}
    assert copied and not copied & set(compose.EVAL_WORDS)
    bracket = [prompt for prompt, _ in zip((p for p, _ in compose.bracket_examples()), range(400))]
    copied = {word for prompt in bracket if prompt.startswith("Repeat") for word in prompt.split(": ", 1)[1].split()}
    assert not copied & set(compose.EVAL_WORDS) and not any("Zorbian" in prompt for prompt in bracket)


def test_a_composite_item_holds_the_skills_answers():
    """The composite's answer is the format around the knowledge; a held-out number of one Zorbian
    task is never a search number of the other."""
    search = {r["number"] for r in task_items("zorbian", "search", None, 0)[0]}
    held = task_items("zorbian_bracket", "heldout", None, 0)[0]
    assert len(held) >= 120 and not {r["number"] for r in held} & search
    for row in held:
        assert row["answer"] == compose.bracket(compose.zorbian(row["number"]))
    assert compose.zorbian(47) == "mi-ne" and compose.bracket("mi-ne") == "[mi-ne]"
