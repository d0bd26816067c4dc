"""Per-trial overhead of a custom task against a built-in one (issue: any lm-eval task).

The same items scored two ways on SmolLM2-135M-Instruct (bf16, this device): through the built-in
task (`gsm8k` gold log-likelihood, `mmlu` accuracy, on their search split) and through a task YAML
of the user's kind over a JSON-lines copy of exactly those items (`dataset_path: json`, lm-eval's
own templates), read with `--split all`. A trial pays `Evaluator.evaluate`; a search pays the
evaluator's construction once. Prints seconds (median of --reps, alternating) and the ratios.

Usage: python benchmarks/task_overhead.py [--items 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.evaluation import Evaluator, TaskRequest, load_model, task_items  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402

GSM8K = """\
task: my_gsm8k
dataset_path: json
dataset_kwargs: {data_files: {test: gsm8k.jsonl}}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["Question:", "</s>", "<|im_end|>"], do_sample: false}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
"""

MMLU = """\
task: my_mmlu
dataset_path: json
dataset_kwargs: {data_files: {test: mmlu.jsonl}}
output_type: multiple_choice
test_split: test
description: "{{mmlu_context}}"
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    from evomerge.demo.smollm2 import ensure_base

    model, tokenizer = load_model(str(ensure_base()), device="auto", dtype="bfloat16")
    folder = Path(tempfile.mkdtemp(prefix="evomerge-task-overhead-"))
    for name, text in (("gsm8k", GSM8K), ("mmlu", MMLU)):
        items = task_items(name, "search", args.items, 0)[0]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        (folder / f"my_{name}.yaml").write_text(text)
    setups = {
        "built-in": ([TaskRequest("gsm8k", "gold_loglik", size=args.items),
                      TaskRequest("mmlu", "accuracy", size=args.items)], "search", ()),
        "custom": ([TaskRequest("my_gsm8k", "gold_loglik"), TaskRequest("my_mmlu", "accuracy")], "all", (folder,)),
    }
    built, evaluators = {}, {}
    for name, (requests, split, paths) in setups.items():
        start = time.perf_counter()
        evaluators[name] = Evaluator(requests, tokenizer, split=split, task_paths=paths)
        built[name] = time.perf_counter() - start
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    scores = {}
    for _ in range(args.reps):
        for name, evaluator in evaluators.items():
            start = time.perf_counter()
            scores[name] = evaluator.evaluate(model).scores
            seconds[name].append(time.perf_counter() - start)
    same = [round(v, 6) for v in scores["built-in"].values()] == [round(v, 6) for v in scores["custom"].values()]
    rows = [[name, f"{built[name]:.2f}", f"{statistics.median(seconds[name]):.2f}",
             f"{min(seconds[name]):.2f}", ", ".join(f"{k}={v:.4f}" for k, v in scores[name].items())]
            for name in setups]
    print(markdown_table(["task definition", "evaluator built (s, once per search)", "trial: evaluate (s, median)",
                          "min", "scores"], rows))
    ratio = statistics.median(seconds["custom"]) / statistics.median(seconds["built-in"])
    print(f"\ncustom / built-in per trial: {ratio:.2f}x ({args.items} GSM8K gold log-likelihood + {args.items} "
          f"MMLU accuracy items, {args.reps} reps); same scores: {same}")


if __name__ == "__main__":
    main()
