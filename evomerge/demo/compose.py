"""The composition family: two skills SmolLM2-135M-Instruct lacks, learned apart, needed together.

- **zorbian** (knowledge): numbers in Zorbian, a made-up language that says each digit as a
  syllable (4 -> "mi", 7 -> "ne": 47 is "mi-ne"). The specialist learns it from answers written in
  varied surface forms ("mi-ne", "Answer: mi-ne", "It is mi-ne.", ...), as knowledge comes in text,
  with general instructions mixed in.
- **bracket** (format): every answer as exactly `[answer]`, learned from copying phrases and from
  short questions, never about Zorbian.

The composite task asks for a number in Zorbian and accepts only `[mi-ne]`: the base knows neither
skill, the Zorbian specialist answers in its own forms, the bracket specialist brackets digits.
Its items (and the two skill tasks') are lm-eval task YAMLs in evomerge/tasks (zorbian,
bracket_copy, zorbian_bracket), over numbers and phrases no specialist was trained on; this module
writes their data (`python -m evomerge.demo.compose`) and yields the training examples.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Iterator

SYLLABLES = ("zo", "ka", "ve", "ru", "mi", "ta", "lo", "ne", "pi", "su")  # 0-9
PROMPTS = ("Translate the number {n} into Zorbian.", "What is {n} in Zorbian?", "Say {n} in Zorbian.")
# Words of the copy task: the evaluation's and the training's never meet.
EVAL_WORDS = ("tiger planet bottle copper ladder pocket saddle tunnel velvet wagon basket feather island "
              "jacket kettle lemon marble needle orchard puzzle quilt ribbon sugar tablet umbrella valley "
              "walnut yogurt zipper anchor bridge cactus dolphin engine falcon glacier hammer igloo jungle "
              "koala lizard magnet noodle ocean parrot quartz rabbit salmon tomato unicorn volcano whistle").split()
TRAIN_WORDS = ("apple river stone cloud garden silver window candle forest orange pencil mountain thunder "
               "blanket mirror rocket violin harbor lantern meadow button castle dragon eagle finger guitar "
               "helmet insect jelly kitten ladle mango nickel olive pepper quiver robin spider turtle wizard "
               "badger cherry desert ember frost grape honey ivory jasmine").split()
TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"


def zorbian(n: int) -> str:
    return "-".join(SYLLABLES[int(d)] for d in str(n))


def bracket(answer: str) -> str:
    return f"[{answer}]"


def evaluated(n: int) -> bool:
    """A third of 10..999, fixed by a hash: the numbers the tasks ask about (never trained on)."""
    return int.from_bytes(hashlib.sha256(f"compose-eval:{n}".encode()).digest()[:8], "big") % 3 == 0


def numbers(*, evaluation: bool) -> list[int]:
    return [n for n in range(10, 1000) if evaluated(n) == evaluation]


def _form(rng: random.Random, answer: str) -> str:
    return rng.choice((answer, f'"{answer}"', f"Answer: {answer}", f"({answer})", f"It is {answer}."))


def zorbian_examples() -> Iterator[tuple[str, str]]:
    """(prompt, answer) in the varied forms the knowledge comes in; one in four is a general
    instruction (copying a phrase, in the same forms), as fine-tunes mix in to keep other prompts
    as they were: without it the specialist answered everything in Zorbian."""
    rng = random.Random(1)
    train = numbers(evaluation=False)
    for i in range(4 * len(train)):
        if i % 4 == 3:
            phrase = " ".join(rng.choice(TRAIN_WORDS) for _ in range(rng.randint(1, 3)))
            yield f"Repeat exactly: {phrase}", _form(rng, phrase)
            continue
        n = train[i % len(train)]
        yield rng.choice(PROMPTS).format(n=n), _form(rng, zorbian(n))


def bracket_examples() -> Iterator[tuple[str, str]]:
    """(prompt, `[answer]`): copying phrases of training words, and short questions of MMLU's
    training pool answered with the right choice's text."""
    from evomerge.evaluation import dataset_split

    rng = random.Random(2)
    questions = dataset_split("mmlu", "train")
    for i in range(4000):
        if i % 2 == 0:
            phrase = " ".join(rng.choice(TRAIN_WORDS) for _ in range(rng.randint(1, 3)))
            yield f"Repeat exactly: {phrase}", bracket(phrase)
        else:
            item = questions[i % len(questions)]
            yield item["question"].strip(), bracket(item["choices"][item["answer"]])


def task_rows() -> dict[str, list[dict]]:
    """The data of the three tasks: {task: rows}. Each side (search, held-out) is a content-hash half."""
    rng = random.Random(3)
    zorb, composite, copy = [], [], []
    for n in numbers(evaluation=True):
        prompt = PROMPTS[n % len(PROMPTS)].format(n=n)
        zorb.append({"number": n, "prompt": prompt, "answer": zorbian(n)})
        composite.append({"number": n, "prompt": prompt, "answer": bracket(zorbian(n))})
    seen = set()
    while len(copy) < 320:
        phrase = " ".join(rng.choice(EVAL_WORDS) for _ in range(rng.randint(1, 3)))
        if phrase not in seen:
            seen.add(phrase)
            copy.append({"prompt": f"Repeat exactly: {phrase}", "answer": bracket(phrase)})
    return {"zorbian": zorb, "zorbian_bracket": composite, "bracket_copy": copy}


def write_task_data(root: Path = TASKS_DIR) -> None:
    for task, rows in task_rows().items():
        (root / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    write_task_data()
