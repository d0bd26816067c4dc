"""The demo family's scores: every member on the search split, gold log-likelihood and accuracy,
with paired per-item margins of each specialist over the base on its own task.

Usage: python benchmarks/demo_family_table.py [--gold-items 64] [--gen-items 16]   (prints Markdown)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.demo.family import FamilyRecipe, build_family  # noqa: E402
from evomerge.evaluation import Evaluator, TaskRequest, load_model  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402

OWN_TASK = {spec.name: spec.task for spec in FamilyRecipe().specialists}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gold-items", type=int, default=64)
    parser.add_argument("--mmlu-items", type=int, default=128)
    parser.add_argument("--gen-items", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=192)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    family = build_family(progress=False)
    gold = [TaskRequest("gsm8k", "gold_loglik", size=args.gold_items),
            TaskRequest("humaneval", "gold_loglik", size=min(args.gold_items, 83)),
            TaskRequest("mmlu", "gold_loglik", size=args.mmlu_items)]
    accuracy = [TaskRequest("gsm8k", "accuracy", size=args.gen_items, max_gen_toks=args.max_gen_toks),
                TaskRequest("humaneval", "accuracy", size=args.gen_items, max_gen_toks=args.max_gen_toks),
                TaskRequest("mmlu", "accuracy", size=args.mmlu_items)]
    table, items, seconds = {}, {}, {}
    for name, path in family.members.items():
        start = time.perf_counter()
        model, tokenizer = load_model(str(path), device="cpu", dtype="bfloat16")
        g = Evaluator(gold, tokenizer).evaluate(model, per_item=True)
        a = Evaluator(accuracy, tokenizer).evaluate(model)
        table[name] = {**{f"{t}/gold_loglik": v for t, v in g.scores.items()},
                       **{f"{t}/accuracy": v for t, v in a.scores.items()}}
        items[name] = g.per_item
        seconds[name] = time.perf_counter() - start
        del model
    columns = list(table["base"])
    print(f"Search split, seed 0; gold log-likelihood: mean per-token log-probability of the reference "
          f"({args.gold_items} GSM8K, {min(args.gold_items, 83)} HumanEval, {args.mmlu_items} MMLU items; MMLU: "
          f"log-probability of the right letter among A-D); accuracy: GSM8K flexible exact match and HumanEval "
          f"pass@1 on {args.gen_items} items each (greedy, {args.max_gen_toks} new tokens), MMLU on "
          f"{args.mmlu_items}. bf16 on CPU.\n")
    rows = []
    for name, row in table.items():
        cells = []
        for column in columns:
            best = max(table[m][column] for m in table)
            value = f"{row[column]:.3f}"
            cells.append(f"**{value}**" if row[column] == best else value)
        rows.append([name, *cells])
    print(markdown_table(["member", *columns], rows))
    print("\nPaired margins on the specialist's own task (gold log-likelihood, same items):\n")
    margin_rows = []
    for name, task in OWN_TASK.items():
        diffs = [a - b for a, b in zip(items[name][task], items["base"][task])]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        better = sum(d > 0 for d in diffs)
        margin_rows.append([name, task, len(diffs), f"{mean:+.3f}", f"{se:.3f}", f"{mean / se:.1f}",
                            f"{better}/{len(diffs)}"])
    print(markdown_table(["specialist", "task", "items", "mean gain", "std. error", "gain / s.e.",
                          "items improved"], margin_rows))
    print("\nSeconds to score each member: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
