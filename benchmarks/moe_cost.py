"""What a mixture-of-experts candidate costs beside a dense merge, on the demo family (bf16, this device).

In one run, one engine over the demo family (as a search holds it), for each candidate kind:
  - build seconds (dense: the task-arithmetic merge of docs/demo-results/best.yaml; MoE: the
    assembly of a 3-expert Mixtral, 1 or 2 experts per token, gates from prompts already computed),
  - seconds to score the demo's search tasks (gold log-likelihood, the same items),
  - the resident model's bytes, and the process's resident memory after it (psutil),
  - the one-time cost of `hidden` and `cheap_embed` gates for the demo's prompt pool;
and the ratios MoE / dense. `mergekit-moe` (the oracle, when installed) writes the same 3-expert
MoE to disk for a reference time: it loads the base for hidden gates and writes every tensor.

Usage: python benchmarks/moe_cost.py [--reps 2]   (prints Markdown)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.demo.family import build_family, resolve_members  # noqa: E402
from evomerge.engine import MergeEngine  # noqa: E402
from evomerge.evaluation import Evaluator  # noqa: E402
from evomerge.moe import MoEConfig, load_candidate  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402
from evomerge.search import SearchSpace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    from evomerge.log import setup_logging

    setup_logging()
    build_family(progress=False)
    space = SearchSpace.load(REPO / "search_spaces" / "demo_moe.yaml")
    refs = [space.base, *space.models.values()]
    engine = MergeEngine(refs, base_model=space.base, device="cpu", dtype="bfloat16", delta_cache=False, progress=False)
    tokenizer = engine.sources[space.base].tokenizer()
    evaluator = Evaluator(space.task_requests(), tokenizer, split="search", seed=0, batch_size=8)

    started = time.perf_counter()
    engine.moe.prepare_gates(space.base, [s for s in space.moe_prompt_sets() if s[0] == "hidden"])
    hidden_s = time.perf_counter() - started
    started = time.perf_counter()
    engine.moe.prepare_gates(space.base, [s for s in space.moe_prompt_sets() if s[0] == "cheap_embed"])
    cheap_s = time.perf_counter() - started

    dense = space.compare["dense_best"]
    middle = space.recipe("moe", space.default_values("moe"))  # all three experts, own prompts
    candidates = {"dense (demo.yaml's best, task arithmetic)": dense}
    for per_token in (1, 2):
        config = MoEConfig.from_dict({**middle.to_dict(), "experts_per_token": per_token, "gate_mode": "hidden"})
        candidates[f"MoE, 3 experts, {per_token} per token"] = config
    rows, seconds = [], {}
    base_rss = rss()
    for name, candidate in candidates.items():
        build = score = 0.0
        for _ in range(args.reps):
            started = time.perf_counter()
            model = engine.materialize(candidate, seed=0)
            build += time.perf_counter() - started
            result = evaluator.evaluate(model)
            score += result.seconds
        build, score = build / args.reps, score / args.reps
        seconds[name] = build + score
        rows.append([name, f"{build:.2f}", f"{score:.1f}", f"{build + score:.1f}", f"{model_bytes(model) / 1e6:.0f}",
                     f"{(rss() - base_rss) / 1e6:+.0f}"])
        print(f"<!-- {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.scores.items()) + " -->", flush=True)
    dense_s = seconds[next(iter(candidates))]
    for row, name in zip(rows, candidates):
        row.append(f"{seconds[name] / dense_s:.2f}")

    print(f"# moe_cost: demo family (SmolLM2-135M, 30 layers), bf16, {engine.device}, {torch.get_num_threads()} "
          f"threads, search tasks of demo_moe.yaml ({sum(r.size for r in space.task_requests())} items), "
          f"mean of {args.reps}\n")
    print(markdown_table(["candidate", "build s", "score s", "s/candidate", "model MB",
                          "process RSS vs start MB", "× dense"], rows))
    print(f"\nGates, once per search (the pool of {len(space.config.moe.prompts)} prompt sets): hidden "
          f"{hidden_s:.2f} s (the base loaded in bf16, one forward pass per set), cheap_embed {cheap_s:.2f} s.")

    try:
        from mergekit.moe.config import MoEMergeConfig
        from mergekit.options import MergeOptions
        from mergekit.scripts.moe import build
    except ImportError:
        return
    from evomerge.engine import moe_to_checkpoint

    config = resolve_members(load_candidate(candidates["MoE, 3 experts, 2 per token"].to_yaml()), progress=False)
    data = config.to_dict()
    for expert in data["experts"]:
        expert.pop("gate_scale", None)  # mergekit's fields only
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        build(MoEMergeConfig.model_validate(data), f"{tmp}/mk", MergeOptions(device="cpu", quiet=True), device="cpu")
        theirs = time.perf_counter() - started
        started = time.perf_counter()
        moe_to_checkpoint(MoEConfig.from_dict(data), f"{tmp}/ours", device="cpu", progress=False)
        ours = time.perf_counter() - started
    print(f"\nTo disk, the same 3-expert MoE (2 per token, hidden gates): `evomerge moe` {ours:.1f} s, mergekit-moe "
          f"{theirs:.1f} s (ratio {ours / theirs:.2f}); in memory the search rebuilds it in "
          f"{float(rows[2][1]):.2f} s.")


if __name__ == "__main__":
    main()
