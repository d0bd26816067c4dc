#!/usr/bin/env python
"""The published-recipe corpus (tests/published_recipes/) merged three ways on tiny models of each
recipe's architecture: mergekit 0.1.5, evomerge's default arithmetic (float32 accumulation, one
rounding) and evomerge --mergekit-exact. Prints, per recipe mergekit runs, how many entries of the
default merge differ from mergekit's and by how much (max |diff| / max |mergekit| over tensors),
the same for the exact merge, and merge seconds (evomerge's engine, sources resident) of both
modes: what the exactness costs. Random-drop recipes (DARE/DELLA below density 1) are skipped.

    python benchmarks/published_recipes.py
"""
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
logging.disable(logging.WARNING)
from evomerge.engine import MergeEngine  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from tests.conftest import run_mergekit  # noqa: E402
from tests.test_published_recipes import CORPUS, RANDOM_METHODS, _Families, _mapped  # noqa: E402

torch.set_num_threads(2)
root = Path(tempfile.mkdtemp())
families = _Families(root)
rows = []
for path in CORPUS:
    text = path.read_text()
    if "\n# refused:" in text:
        continue
    data = _mapped(text, families)
    densities = [float(d) for d in re.findall(r"density: *([0-9.]+)", text)]
    if data["merge_method"] in RANDOM_METHODS and (not densities or min(densities) < 1):
        continue
    recipe_file = root / f"{path.stem}.yaml"
    recipe_file.write_text(yaml.safe_dump(data, sort_keys=False))
    theirs = run_mergekit(recipe_file, root / path.stem)
    recipe = Recipe.load(recipe_file)
    result = {}
    for exact in (False, True):
        engine = MergeEngine(recipe.referenced_models(), base_model=recipe.base_model, device="cpu", dtype=recipe.dtype,
                             out_dtype=recipe.out_dtype, tokenizer=recipe.vocabulary(), delta_cache=False,
                             mergekit_exact=exact, progress=False)
        engine.materialize(recipe)
        start = time.perf_counter()
        state = engine.materialize(recipe).state_dict()
        seconds = time.perf_counter() - start
        if set(theirs) - set(state):  # Mixtral: mergekit writes fused expert names; not compared here
            result[exact] = (None, None, seconds)
            continue
        differ = total = 0
        worst = 0.0
        for name, expected in theirs.items():
            got = state[name]
            # mergekit leaves some float32 results uncast (arcee_fusion, ramplus_tl): compared as a
            # loader in the recipe's dtype sees them
            expected = expected.to(got.dtype).float()
            got = got.float()
            differ += int((got != expected).sum())
            total += got.numel()
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)))
        result[exact] = (differ / total, worst, seconds)
    rows.append((path.stem, data["merge_method"], data.get("dtype") or "stored", result))

print("| recipe | method | dtype | default: entries differing | default: max rel. diff | exact: differing | "
      "default s | exact s |")
print("|---|---|---|---:|---:|---:|---:|---:|")
for name, method, dtype, r in rows:
    (d_frac, d_worst, d_s), (e_frac, _e_worst, e_s) = r[False], r[True]
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    print(f"| {name} | {method} | {dtype} | {fmt(d_frac and d_frac * 100, '.2f')}% | {fmt(d_worst, '.1e')} | "
          f"{fmt(e_frac and e_frac * 100, '.2f')}% | {d_s:.3f} | {e_s:.3f} |")
ratios = sorted(r[True][2] / r[False][2] for *_, r in rows)
print(f"\n{len(rows)} recipes; exact merges differing from mergekit: {sum(1 for *_, r in rows if r[True][0])}; "
      f"default merges differing: {sum(1 for *_, r in rows if r[False][0])}; merge time exact/default per recipe: "
      f"median {ratios[len(ratios) // 2]:.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
