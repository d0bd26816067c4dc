"""How fast does a candidate materialise? SmolLM2-135M, base + 3 derived copies.

Per method, in one run:
  - evomerge: time to write one candidate into the resident model (median of --reps, after a warm-up)
  - its effective bandwidth: (bytes of inputs read + bytes written) / time, as a ratio of this
    machine's copy bandwidth measured in the same run the same way: (read + write) / time of copy_
    of one source's tensors into the resident model (the same memory a merge moves), beside each method
  - mergekit: `run_merge` writing the same recipe to disk + `from_pretrained` of the result (what a
    mergekit-based search pays per candidate; import time excluded), and the ratio to evomerge.

`--shape 7b` times the same recipes on Llama-2-7B-shaped sources instead (hidden 4096, MLP 11008,
vocabulary 32000; `--layers` of them, 2 by default: the per-layer cost of a 7B merge without 4 x 13 GB
of checkpoints), written once into the cache from random weights; on a GPU the ratio column is then
against HBM copy bandwidth (benchmarks/gpu_check.sh runs it).

Usage: python benchmarks/merge_speed.py [--device cpu] [--dtype float32] [--reps 3] [--no-mergekit]
                                        [--shape smollm2|7b] [--layers 2]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.demo.smollm2 import ensure_base  # noqa: E402
from evomerge.demo.tiny import synthetic_finetune  # noqa: E402
from evomerge.engine import MergeEngine  # noqa: E402
from evomerge.paths import atomic_directory, cache_dir  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402


def derived_copies(base: Path, n: int = 3) -> list[Path]:
    """Three synthetic fine-tunes of the base (dense / sparse / low-rank changes), cached."""
    from safetensors.torch import load_file, save_file

    state = None
    paths = []
    for i in range(n):
        target = cache_dir() / "bench" / f"smollm2-derived-{i}"
        if not (target / "model.safetensors").exists():
            state = state if state is not None else load_file(base / "model.safetensors")
            generator = torch.Generator().manual_seed(100 + i)
            with atomic_directory(target) as scratch:
                for f in base.iterdir():
                    if f.name != "model.safetensors":
                        shutil.copy(f, scratch / f.name)
                save_file(synthetic_finetune(state, i, generator), scratch / "model.safetensors", metadata={"format": "pt"})
        paths.append(target)
    return paths


SEVEN_B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
           "vocab_size": 32000, "max_position_embeddings": 4096}


def seven_b_shaped(layers: int, n: int = 3, hidden: int | None = None) -> tuple[Path, list[Path]]:
    """A Llama-2-7B-shaped base with `layers` decoder layers and `n` derived copies (the base plus a
    different small random change each), random weights in bfloat16, cached. `hidden` shrinks every
    dimension by the same factor (to check this path on a small machine)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SEVEN_B)
    if hidden is not None:
        scale = hidden / SEVEN_B["hidden_size"]
        dims.update(hidden_size=hidden, intermediate_size=int(SEVEN_B["intermediate_size"] * scale) // 8 * 8,
                    num_attention_heads=max(1, int(32 * scale)), num_key_value_heads=max(1, int(32 * scale)))
    tag = f"7b-shaped-{layers}l" + (f"-h{hidden}" if hidden else "")
    base = cache_dir() / "bench" / f"{tag}-base"
    if not (base / "model.safetensors").exists():
        config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **dims)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        with atomic_directory(base) as scratch:
            model.save_pretrained(scratch, safe_serialization=True, max_shard_size="100GB")
        del model
    paths = []
    for i in range(n):
        target = cache_dir() / "bench" / f"{tag}-derived-{i}"
        if not (target / "model.safetensors").exists():
            state = load_file(base / "model.safetensors")
            generator = torch.Generator().manual_seed(100 + i)
            changed = {k: (v.float() + 0.01 * v.float().std() * torch.randn(v.shape, generator=generator)).to(v.dtype)
                       for k, v in state.items()}
            with atomic_directory(target) as scratch:
                shutil.copy(base / "config.json", scratch / "config.json")
                save_file(changed, scratch / "model.safetensors", metadata={"format": "pt"})
        paths.append(target)
    return base, paths


def recipes(base: str, a: str, b: str, c: str, dtype: str) -> dict[str, dict]:
    three = [a, b, c]

    def models(**params):
        return [{"model": m, "parameters": dict(params)} for m in three]

    def with_base(method, **params):
        return {"merge_method": method, "base_model": base, "models": models(**params)}

    table = {
        "linear": {"merge_method": "linear", "models": models(weight=1 / 3)},
        "task_arithmetic": with_base("task_arithmetic", weight=0.5),
        "ties": with_base("ties", weight=0.5, density=0.5),
        "dare_linear": with_base("dare_linear", weight=0.5, density=0.5),
        "dare_ties": with_base("dare_ties", weight=0.5, density=0.5),
        "della": with_base("della", weight=0.5, density=0.5, epsilon=0.1),
        "della_linear": with_base("della_linear", weight=0.5, density=0.5, epsilon=0.1),
        "breadcrumbs": with_base("breadcrumbs", weight=0.5, density=0.8, gamma=0.05),
        "breadcrumbs_ties": with_base("breadcrumbs_ties", weight=0.5, density=0.8, gamma=0.05),
        "sce": {"merge_method": "sce", "base_model": base, "models": [{"model": m} for m in three],
                "parameters": {"select_topk": 0.5}},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": m} for m in three]},
        "ram": {"merge_method": "ram", "base_model": base, "models": [{"model": m} for m in three]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": [{"model": m} for m in three]},
        "multislerp": with_base("multislerp", weight=1.0),
        "karcher": {"merge_method": "karcher", "models": [{"model": m} for m in three]},
        "slerp": {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": a}],
                  "parameters": {"t": [0.2, 0.8]}},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base,
                    "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "models": [{"model": a}], "parameters": {"t": 0.001}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": a}]},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": a}]},
    }
    for recipe in table.values():
        recipe["dtype"] = dtype
    return table


def copy_bandwidth(engine: MergeEngine, reps: int = 5) -> float:
    """(bytes read + bytes written) per second of copy_ from one source's resident tensors into the
    resident model's parameters: the same tensors, sizes and memory a merge moves, no arithmetic."""
    params = dict(engine._model.named_parameters())
    pairs = [(params[name].data, engine.store.row(engine.refs[0], name)) for name in params if name in engine.store.rows]
    moved = 2 * sum(p.numel() * p.element_size() for p, _ in pairs)
    times = []
    for _ in range(reps + 1):
        _sync(engine.device)
        start = time.perf_counter()
        for target, source in pairs:
            target.copy_(source)
        _sync(engine.device)
        times.append(time.perf_counter() - start)
    return moved / statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_evomerge(engine: MergeEngine, recipe: Recipe, reps: int) -> tuple[float, int]:
    engine.materialize(recipe, seed=0)  # warm-up: builds the task-vector cache when the method uses it
    times = []
    for rep in range(reps):
        _sync(engine.device)
        start = time.perf_counter()
        engine.materialize(recipe, seed=rep + 1)
        _sync(engine.device)
        times.append(time.perf_counter() - start)
    stats = engine.last_stats
    return statistics.median(times), stats.bytes_read + stats.bytes_written


def time_mergekit(recipe: dict, device: str) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_merge(MergeConfiguration.model_validate(recipe), out,
                  MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, device=device))
        model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, recipe["dtype"]), device_map=device)
        elapsed = time.perf_counter() - start
        del model
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", nargs="*", help="subset of methods (default: all 20)")
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit comparison")
    parser.add_argument("--shape", choices=["smollm2", "7b"], default="smollm2",
                        help="smollm2: SmolLM2-135M and 3 derived copies; 7b: Llama-2-7B-shaped layers (random weights)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped sources")
    parser.add_argument("--hidden", type=int, default=None, help=argparse.SUPPRESS)  # a shrunken 7b shape, for tests
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.shape == "7b":
        base, derived = seven_b_shaped(args.layers, hidden=args.hidden)
    else:
        base = ensure_base()
        derived = derived_copies(base)
    a, b, c = (str(p) for p in derived)
    table = recipes(str(base), a, b, c, args.dtype)
    selected = args.methods or list(table)

    start = time.perf_counter()
    engine = MergeEngine([str(base), a, b, c], base_model=str(base), device=args.device, dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - start
    device = engine.device
    engine.materialize(Recipe.from_dict(table["linear"]))  # the resident model at its usual size
    bandwidth = copy_bandwidth(engine)  # also measured again beside each method: drift cancels
    params = sum(p.numel() for p in engine._model.parameters())
    shape = "SmolLM2-135M" if args.shape == "smollm2" else f"Llama-2-7B-shaped, {args.layers} layers"
    print(f"# merge_speed: {shape} ({params / 1e6:.1f}M params), base + 3 derived copies, {args.dtype}, "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# sources loaded once in {load_s:.1f} s ({engine.source_bytes / 1e9:.2f} GB resident)")
    print(f"# copy bandwidth (read + write, copy_ of one source's tensors into the resident model, median): "
          f"{bandwidth / 1e9:.1f} GB/s at start; re-measured beside every method (column 4); the ratio uses that one")
    print()
    print("| method | evomerge (s) | effective GB/s | copy GB/s (same moment) | / copy bandwidth | "
          "mergekit write + load (s) | mergekit / evomerge |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in selected:
        recipe = Recipe.from_dict(table[name])
        seconds, traffic = time_evomerge(engine, recipe, args.reps)
        bandwidth = copy_bandwidth(engine)  # right beside this method's timing
        effective = traffic / seconds
        row = f"| {name} | {seconds:.3f} | {effective / 1e9:.1f} | {bandwidth / 1e9:.1f} | {effective / bandwidth:.2f} |"
        if args.no_mergekit:
            row += " – | – |"
        else:
            gc.collect()
            theirs = time_mergekit(yaml.safe_load(recipe.to_yaml()), "cuda" if device.type == "cuda" else "cpu")
            row += f" {theirs:.1f} | {theirs / seconds:.0f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
