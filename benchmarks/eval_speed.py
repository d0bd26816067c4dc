"""Evaluation speed and the gold log-likelihood proxy, on SmolLM2-135M-Instruct (bf16, this device).

In one run:
  1. generation tokens/s through evomerge (lm-eval's generate_until on the resident model) against
     bare `model.generate` on the same prompts, batch and token budget (target >= 0.8);
  2. items/s of every task and metric;
  3. whether gold log-likelihood can stand in for accuracy: across >= 10 merge candidates (the demo
     family's members and random task-arithmetic merges of them), the Spearman rank correlation of
     the two per task, and the proxy's speed-up;
  4. SmolLM2-135M-Instruct's baseline scores on both splits.

Usage: python benchmarks/eval_speed.py [--candidates 12] [--gen-items 24]   (prints Markdown)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.demo.family import build_family  # noqa: E402
from evomerge.engine import MergeEngine  # noqa: E402
from evomerge.evaluation import Evaluator, TaskRequest, task_items  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402


def bare_generate(model, tokenizer, prompts: list[str], batch: int, max_new: int) -> tuple[int, float]:
    """Tokens generated (up to EOS) and seconds, plain HF generate with KV cache and left padding."""
    tokenizer.padding_side = "left"
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        encoded = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(next(model.parameters()).device)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, encoded["input_ids"].shape[1]:]
        for row in new:
            ids = row.tolist()
            tokens += ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
    return tokens, time.perf_counter() - start


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": f"Question: {question}\nAnswer:"}],
                                         tokenize=False, add_generation_prompt=True)


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--gen-items", type=int, default=24)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    args = parser.parse_args()
    from evomerge.log import setup_logging

    setup_logging()
    family = build_family(progress=False, device=args.device)
    refs = [str(p) for p in family.members.values()]
    engine = MergeEngine(refs, base_model=refs[0], device=args.device, dtype="bfloat16", progress=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family.base)
    base = engine.materialize(Recipe.from_dict({"merge_method": "linear", "dtype": "bfloat16",
                                                "models": [{"model": refs[0], "parameters": {"weight": 1.0}}]}))
    print(f"# eval_speed: SmolLM2-135M-Instruct, bf16, {engine.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, torch {torch.__version__}\n")

    # 1. generation throughput, same prompts, batch and budget
    n = args.gen_items
    evaluator = Evaluator([TaskRequest("gsm8k", "accuracy", size=n, max_gen_toks=args.max_gen_toks)], tokenizer,
                          batch_size=args.batch)
    evaluator.evaluate(base, limit=args.batch)  # warm-up
    scores = evaluator.evaluate(base, per_item=True)
    responses = [s["resps"][0][0] for s in scores.samples["gsm8k"]]
    ours_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)
    prompts = [chat_prompt(tokenizer, item["question"]) for item in task_items("gsm8k", "search", n, 0)[0]]
    bare_tokens, bare_s = bare_generate(base, tokenizer, prompts, args.batch, args.max_gen_toks)
    ours_rate, bare_rate = ours_tokens / scores.seconds, bare_tokens / bare_s
    print("## Generation throughput (GSM8K prompts, greedy)\n")
    print(markdown_table(["path", "items", "tokens generated", "seconds", "tokens/s"], [
        ["bare model.generate", n, bare_tokens, f"{bare_s:.1f}", f"{bare_rate:.1f}"],
        ["evomerge (lm-eval generate_until)", n, ours_tokens, f"{scores.seconds:.1f}", f"{ours_rate:.1f}"],
    ]))
    print(f"\nRatio evomerge / bare: **{ours_rate / bare_rate:.2f}** (lm-eval also stops at stop sequences, so it "
          "generates fewer tokens per item; tokens/s is the like-for-like figure)\n")

    # 2 + 3. items/s per task and metric, proxy quality over candidates
    sizes = {"gsm8k": args.gen_items, "humaneval": min(args.gen_items, 24), "mmlu": 64}
    evaluators = {
        "gold_loglik": Evaluator([TaskRequest(t, "gold_loglik", size=s) for t, s in sizes.items()], tokenizer,
                                 batch_size=args.batch),
        "accuracy": Evaluator([TaskRequest(t, "accuracy", size=s, max_gen_toks=args.max_gen_toks)
                               for t, s in sizes.items()], tokenizer, batch_size=args.batch),
    }
    rng = random.Random(0)
    candidates = {name: Recipe.from_dict({"merge_method": "linear", "dtype": "bfloat16",
                                          "models": [{"model": path, "parameters": {"weight": 1.0}}]})
                  for name, path in zip(family.members, refs)}
    while len(candidates) < args.candidates:
        weights = [round(rng.uniform(0, 1), 3) for _ in refs[1:]]
        candidates[f"ta{len(candidates)}"] = Recipe.from_dict({
            "merge_method": "task_arithmetic", "base_model": refs[0], "dtype": "bfloat16",
            "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(refs[1:], weights)]})
    table, timing = {}, {"gold_loglik": {t: 0.0 for t in sizes}, "accuracy": {t: 0.0 for t in sizes}}
    for name, recipe in candidates.items():
        model = engine.materialize(recipe)
        row = {}
        for metric, ev in evaluators.items():
            for task, size in sizes.items():  # one task at a time, to time each
                single = Evaluator([r for r in ev.requests if r.task == task], tokenizer, batch_size=args.batch)
                result = single.evaluate(model)
                row[f"{task}/{metric}"] = result.scores[task]
                timing[metric][task] += result.seconds
        table[name] = row
        print(f"<!-- {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()) + " -->", flush=True)
    count = len(candidates)
    print("## Items per second (search split)\n")
    rows = []
    for task, size in sizes.items():
        gold_rate = size * count / timing["gold_loglik"][task]
        acc_rate = size * count / timing["accuracy"][task]
        how = "log-likelihood of A-D" if task == "mmlu" else ("generation + sandbox" if task == "humaneval" else "generation")
        rows.append([task, f"{gold_rate:.2f}", f"{acc_rate:.2f} ({how})", f"{gold_rate / acc_rate:.1f}x"])
    print(markdown_table(["task", "gold_loglik items/s", "accuracy items/s", "proxy speed-up"], rows))
    print(f"\n## Gold log-likelihood as a proxy for accuracy ({count} candidates)\n")
    rows = []
    for task in sizes:
        gold = [table[c][f"{task}/gold_loglik"] for c in table]
        acc = [table[c][f"{task}/accuracy"] for c in table]
        distinct = len(set(acc))
        rho = spearman(gold, acc) if distinct > 1 else float("nan")
        rows.append([task, f"{rho:.2f}", f"{min(acc):.3f} - {max(acc):.3f}", distinct])
    print(markdown_table(["task", "Spearman(gold_loglik, accuracy)", "accuracy range", "distinct accuracies"], rows))
    print("\n<details><summary>per-candidate scores</summary>\n")
    columns = list(next(iter(table.values())))
    print(markdown_table(["candidate", *columns], [[c, *(f"{r[k]:.4f}" for k in columns)] for c, r in table.items()]))
    print("</details>\n")

    # 4. baselines on both splits (the resident model holds the last candidate: write the base back)
    base = engine.materialize(candidates["base"])
    print("## SmolLM2-135M-Instruct baseline\n")
    rows = []
    for split in ("search", "heldout"):
        requests = [TaskRequest("gsm8k", "accuracy", size=64, max_gen_toks=256), TaskRequest("mmlu", "accuracy", size=256),
                    TaskRequest("humaneval", "accuracy", size=40, max_gen_toks=384)]
        acc = Evaluator(requests, tokenizer, split=split, batch_size=args.batch).evaluate(base).scores
        gold = Evaluator([TaskRequest("gsm8k", "gold_loglik", size=64), TaskRequest("mmlu", "gold_loglik", size=256),
                          TaskRequest("humaneval", "gold_loglik", size=40)], tokenizer, split=split).evaluate(base).scores
        rows.append([split, *(f"{acc[t]:.3f}" for t in ("gsm8k", "mmlu", "humaneval")),
                     *(f"{gold[t]:.3f}" for t in ("gsm8k", "mmlu", "humaneval"))])
    print(markdown_table(["split", "GSM8K acc (64, 0-shot chat)", "MMLU acc (256)", "HumanEval pass@1 (40)",
                          "GSM8K gold", "MMLU gold", "HumanEval gold"], rows))


if __name__ == "__main__":
    main()
