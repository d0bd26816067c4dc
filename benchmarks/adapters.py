"""The demo family's specialists as LoRA adapters (`base+adapter`) instead of full copies.

The specialists are LoRA fine-tunes merged into full weights (rank 16 on every projection), so
each one's difference from the base is exactly low-rank: an SVD of it gives back the adapter.
In one run:
  1. each specialist's adapter recovered (peft's format) and how closely it rebuilds the specialist;
  2. disk: adapter folder vs the full specialist checkpoint;
  3. load: the engine loading base + 3 full specialists vs base + 3 `base+adapter` sources, each in
     a fresh process (wall seconds, peak resident memory);
  4. the same task_arithmetic candidate merged from both: largest difference.

Usage: python benchmarks/adapters.py   (uses the cached demo family; prints Markdown)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.demo.family import LORA_TARGETS, build_family  # noqa: E402
from evomerge.report.tables import markdown_table  # noqa: E402

RANK, ALPHA = 16, 32

LOAD = """
import json, resource, sys, time
t = time.perf_counter()
from evomerge.engine import MergeEngine
from evomerge.recipe import Recipe
refs = json.loads(sys.argv[1])
engine = MergeEngine(refs, base_model=refs[0], device="cpu", progress=False)
seconds = time.perf_counter() - t
recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": refs[0], "dtype": "float32",
    "models": [{"model": r, "parameters": {"weight": w}} for r, w in zip(refs[1:], (0.5, 0.3, 0.4))]})
model = engine.materialize(recipe)
import torch
torch.save({k: v.clone() for k, v in model.state_dict().items()}, sys.argv[2])
print(json.dumps({"seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def recover_adapter(base: Path, specialist: Path, out: Path) -> float:
    """The rank-16 adapter whose merge gives `specialist`; returns the largest relative error of the
    rebuilt projection weights."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_weights, tuned = load_file(base / "model.safetensors"), load_file(specialist / "model.safetensors")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LORA_TARGETS)))
    worst = 0.0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = (tuned[key] - base_weights[key]).double()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            scale = ALPHA / RANK
            module.lora_B["default"].weight.copy_((u[:, :RANK] * s[:RANK] / scale).float())
            module.lora_A["default"].weight.copy_(vh[:RANK].float())
            rebuilt = base_weights[key] + scale * module.lora_B["default"].weight @ module.lora_A["default"].weight
            worst = max(worst, ((rebuilt - tuned[key]).abs().max() / tuned[key].abs().max()).item())
    model.save_pretrained(out)
    return worst


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    family = build_family(progress=False)
    base = family.base
    names = ["math", "code", "knowledge"]
    work = Path(tempfile.mkdtemp(prefix="adapters-"))
    rows, errors = [], {}
    for name in names:
        errors[name] = recover_adapter(base, family.members[name], work / name)
        rows.append([name, f"{size(family.members[name]) / 1e6:,.1f}", f"{size(work / name) / 1e6:,.1f}",
                     f"{size(family.members[name]) / size(work / name):.0f}x", f"{errors[name]:.1e}"])
    print("Recovered adapters (rank 16 on every projection, alpha 32) against the full specialists:\n")
    print(markdown_table(["specialist", "full checkpoint MB", "adapter MB", "smaller by", "rebuild error (rel.)"], rows))
    runs = {}
    for label, refs in (("full copies", [str(base), *(str(family.members[n]) for n in names)]),
                        ("base+adapter", [str(base), *(f"{base}+{work / n}" for n in names)])):
        result = subprocess.run([sys.executable, "-c", LOAD, json.dumps(refs), str(work / f"{label}.pt")],
                                capture_output=True, text=True, check=True)
        runs[label] = json.loads(result.stdout.strip().splitlines()[-1])
    full, adapted = torch.load(work / "full copies.pt"), torch.load(work / "base+adapter.pt")
    difference = max(((full[k] - adapted[k]).abs().max() / full[k].abs().max()).item() for k in full)
    print("\nThe engine loading base + 3 sources (fresh process each):\n")
    print(markdown_table(["sources", "load s", "peak RSS GB"],
                         [[label, f"{r['seconds']:.1f}", f"{r['peak_rss_gb']:.2f}"] for label, r in runs.items()]))
    print(f"\nSame task_arithmetic candidate from both: largest relative difference {difference:.1e}.")


if __name__ == "__main__":
    main()
