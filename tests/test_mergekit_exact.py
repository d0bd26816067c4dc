"""--mergekit-exact: every method, fed the same 16-bit recipe, gives mergekit 0.1.5's tensors bit for bit.

The default arithmetic (float32 accumulation, one rounding) differs from mergekit's in 16-bit
recipes by design; these tests check that the mergekit-exact path removes every difference: the
same bits in bfloat16 and float16 for each deterministic case of the oracle suite (where mergekit
leaves a method's result in float32 — arcee_fusion, ramplus_tl — its tensors rounded to the output
dtype, and with `out_dtype: float32` the same float32 bits), and the same statistics for the
random-drop methods, whose draws come from another generator.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.engine import MergeEngine
from evomerge.errors import MergeFailure
from evomerge.recipe import Recipe
from tests.conftest import delta_statistics, recipe_text, run_mergekit
from tests.oracle_cases import DETERMINISTIC, RANDOM

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.oracle]

# Cases where float16 arithmetic in mergekit itself gives NaN (a zero task vector normalised by
# 0 + eps, which underflows): mergekit writes the NaN, evomerge refuses the merge (below).
NAN_IN_FLOAT16 = {"multislerp_with_base"}


def _exact_merge(recipe_file, **engine_options) -> dict[str, torch.Tensor]:
    recipe = Recipe.load(recipe_file)
    engine = MergeEngine(recipe.referenced_models(), base_model=recipe.base_model, device="cpu", dtype=recipe.dtype,
                         out_dtype=recipe.out_dtype, progress=False, mergekit_exact=True, **engine_options)
    return {k: v.detach().clone() for k, v in engine.materialize(recipe).state_dict().items()}


def _assert_same_bits(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))[:5]
    for name, expected in theirs.items():
        got = ours[name]
        # mergekit leaves float32 results (arcee_fusion, ramplus_tl) uncast without out_dtype:
        # a loader in the recipe's dtype rounds them, as evomerge does
        expected = expected.to(got.dtype)
        differ = int((got.view(-1) != expected.view(-1)).sum())
        assert differ == 0, f"{name}: {differ} of {got.numel()} entries differ from mergekit"


def _recipe_file(tmp_path, template: str, family, dtype: str, out_dtype: str | None = None):
    text = recipe_text(template, family).replace("dtype: float32", f"dtype: {dtype}")
    if out_dtype:
        text += f"out_dtype: {out_dtype}\n"
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_bfloat16_merges_are_mergekits_bit_for_bit(case, tiny_family, tmp_path):
    recipe_file = _recipe_file(tmp_path, DETERMINISTIC[case], tiny_family, "bfloat16")
    theirs = run_mergekit(recipe_file, tmp_path / "mk")
    ours = _exact_merge(recipe_file)
    assert next(iter(ours.values())).dtype == torch.bfloat16
    _assert_same_bits(ours, theirs)


@pytest.mark.parametrize("case", sorted(set(DETERMINISTIC) - NAN_IN_FLOAT16))
def test_float16_merges_are_mergekits_bit_for_bit(case, tiny_family, tmp_path):
    recipe_file = _recipe_file(tmp_path, DETERMINISTIC[case], tiny_family, "float16")
    _assert_same_bits(_exact_merge(recipe_file), run_mergekit(recipe_file, tmp_path / "mk"))


@pytest.mark.parametrize("case", ["arcee_fusion", "ramplus_tl", "ties"])
def test_float32_output_of_a_bfloat16_merge_is_mergekits(case, tiny_family, tmp_path):
    """With out_dtype: float32 mergekit writes arcee_fusion's and ramplus_tl's float32 results
    unrounded; so does evomerge."""
    recipe_file = _recipe_file(tmp_path, DETERMINISTIC[case], tiny_family, "bfloat16", out_dtype="float32")
    theirs = run_mergekit(recipe_file, tmp_path / "mk")
    ours = _exact_merge(recipe_file)
    assert all(t.dtype == torch.float32 for t in theirs.values())
    _assert_same_bits(ours, theirs)


def test_the_default_arithmetic_differs_where_the_exact_one_does_not(tiny_family, tmp_path):
    """The property the flag exists for: without it a bf16 ties merge differs from mergekit's."""
    recipe_file = _recipe_file(tmp_path, DETERMINISTIC["ties"], tiny_family, "bfloat16")
    theirs = run_mergekit(recipe_file, tmp_path / "mk")
    recipe = Recipe.load(recipe_file)
    engine = MergeEngine(recipe.referenced_models(), base_model=recipe.base_model, device="cpu", dtype="bfloat16",
                         progress=False)
    default = engine.materialize(recipe).state_dict()
    assert sum(int((default[k] != v).sum()) for k, v in theirs.items()) > 1000
    _assert_same_bits(_exact_merge(recipe_file), theirs)


def test_nan_that_mergekit_writes_is_refused(tiny_family, tmp_path):
    recipe_file = _recipe_file(tmp_path, DETERMINISTIC["multislerp_with_base"], tiny_family, "float16")
    theirs = run_mergekit(recipe_file, tmp_path / "mk")
    assert any(not torch.isfinite(t).all() for t in theirs.values())  # mergekit's own float16 arithmetic
    with pytest.raises(MergeFailure, match="multislerp produced NaN/inf in tensor model.layers"):
        _exact_merge(recipe_file)


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_random_methods_match_mergekit_statistically_in_bfloat16(case, tiny_family, tmp_path):
    """DARE and DELLA draw from evomerge's generator: the kept fraction and the rescaled L1 mass of
    the merged deltas agree with mergekit's over seeds (bf16, mergekit's arithmetic otherwise)."""
    from safetensors.torch import load_file

    base = {k: v.bfloat16() for k, v in load_file(f"{tiny_family['base']}/model.safetensors").items()}
    recipe_file = _recipe_file(tmp_path, RANDOM[case], tiny_family, "bfloat16")
    recipe = Recipe.load(recipe_file)
    engine = MergeEngine(recipe.referenced_models(), base_model=recipe.base_model, device="cpu", dtype="bfloat16",
                         progress=False, mergekit_exact=True)
    runs = 4
    ours = [delta_statistics(engine.materialize(recipe, seed=s).state_dict(), base) for s in range(runs)]
    theirs = [delta_statistics(run_mergekit(recipe_file, tmp_path / f"mk{s}", seed=s), base) for s in range(runs)]
    kept_ours, kept_theirs = (sum(s["kept"] for s in stats) / runs for stats in (ours, theirs))
    l1_ours, l1_theirs = (sum(s["l1"] for s in stats) / runs for stats in (ours, theirs))
    assert abs(kept_ours - kept_theirs) < 0.01, (kept_ours, kept_theirs)
    assert abs(l1_ours - l1_theirs) / l1_theirs < 0.02, (l1_ours, l1_theirs)


def test_evomerge_merge_with_the_flag_writes_mergekits_checkpoint(tiny_family, tmp_path):
    from safetensors.torch import load_file

    from evomerge.cli import main

    recipe_file = _recipe_file(tmp_path, DETERMINISTIC["breadcrumbs_ties_rescaled"], tiny_family, "bfloat16")
    theirs = run_mergekit(recipe_file, tmp_path / "mk")
    out = tmp_path / "ours"
    assert main(["merge", str(recipe_file), str(out), "--device", "cpu", "--mergekit-exact", "-q"]) == 0
    _assert_same_bits(load_file(out / "model.safetensors"), theirs)
    assert "--mergekit-exact" in (out / "README.md").read_text()


def test_a_mergekit_exact_search_scores_and_exports_mergekits_tensors(tiny_family, tmp_path, monkeypatch):
    """`mergekit_exact: true` in space.yaml: candidates are merged with mergekit's arithmetic, the
    study remembers it, and `evomerge export` writes the winner as mergekit-yaml does."""
    import yaml
    from safetensors.torch import load_file

    from evomerge.search import run_search
    from evomerge.search.export import export
    from evomerge.search.space import SearchSpace
    from tests.conftest import tiny_space

    space = tiny_space(tiny_family, tmp_path, methods=["ties"], dtype="bfloat16", mergekit_exact=True, n_trials=2,
                   heldout=None, tasks=[{"task": "mmlu", "metric": "gold_loglik", "size": 2}])
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    engines = []
    original = MergeEngine.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append(self.mergekit_exact)

    monkeypatch.setattr(MergeEngine, "__init__", recording)
    summary = run_search(SearchSpace.load(space_file), heldout=False, progress=False)
    results = tmp_path / "results" / "tiny"
    theirs = run_mergekit(results / "best.yaml", tmp_path / "mk")
    out = export(results, tmp_path / "winner", device="cpu", progress=False)
    _assert_same_bits(load_file(out / "model.safetensors"), theirs)
    assert summary["trials"]["COMPLETE"] == 2
    assert engines == [True, True]  # the search's engine, then the export's
