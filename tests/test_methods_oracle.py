"""Every mergekit method, fed the same recipe file, gives the same tensors in evomerge.

Deterministic methods: <= 1e-5 relative (max |diff| / max |mergekit|, per tensor) in float32.
Random-drop methods: the same kept fraction, rescaling and expected delta (statistically), and
bit-identical across two evomerge runs with one seed.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.recipe import Recipe
from tests.conftest import assert_close, delta_statistics, oracle, recipe_text, run_mergekit
from tests.oracle_cases import DETERMINISTIC, RANDOM

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.oracle]







def _merge_both(case: str, template: str, family, engine_for, tmp_path, seed=None):
    recipe_file = tmp_path / f"{case}.yaml"
    recipe_file.write_text(recipe_text(template, family))
    theirs = run_mergekit(recipe_file, tmp_path / "mergekit_out", seed=seed)
    recipe = Recipe.load(recipe_file)
    model = engine_for(recipe).materialize(recipe, seed=seed or 0)
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return recipe, ours, theirs


@pytest.fixture
def engine_for(tiny_engine):
    return lambda recipe: tiny_engine


@pytest.mark.parametrize("case", sorted(DETERMINISTIC))
def test_matches_mergekit(case, tiny_family, engine_for, tmp_path):
    recipe, ours, theirs = _merge_both(case, DETERMINISTIC[case], tiny_family, engine_for, tmp_path)
    assert_close(ours, theirs, rel=1e-5)
    if case == "passthrough_stack":
        assert sum(1 for k in theirs if k.endswith("input_layernorm.weight")) == 7


def test_tied_embeddings_match_and_save_the_same_tensors(tiny_family_tied, tmp_path):
    from safetensors.torch import load_file

    from evomerge.engine import merge_to_checkpoint

    template = """
        merge_method: ties
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 0.5, density: 0.5}}
          - model: {know}
            parameters: {{weight: 0.5, density: 0.8}}
        dtype: float32
    """
    recipe_file = tmp_path / "tied.yaml"
    recipe_file.write_text(recipe_text(template, tiny_family_tied))
    theirs = run_mergekit(recipe_file, tmp_path / "mk")
    out = merge_to_checkpoint(Recipe.load(recipe_file), tmp_path / "ours", device="cpu", progress=False)
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(theirs)  # no lm_head.weight: it stays tied
    assert_close(ours, theirs, rel=1e-5)


def _bf16_rounded_family(family: dict[str, str], out) -> dict[str, str]:
    """The family's weights rounded to bfloat16 but stored as float32: a float32 merge of these
    is the exact reference for a bfloat16 merge of the originals."""
    import shutil

    from safetensors.torch import load_file, save_file

    paths = {}
    for name, path in family.items():
        target = out / name
        shutil.copytree(path, target)
        state = load_file(f"{path}/model.safetensors")
        save_file({k: v.bfloat16().float() for k, v in state.items()}, f"{target}/model.safetensors",
                  metadata={"format": "pt"})
        paths[name] = str(target)
    return paths


@pytest.mark.parametrize("case", ["task_arithmetic", "linear_gradients_filters", "slerp_slices_filters"])
def test_bfloat16_is_at_least_as_accurate_as_mergekit(case, tiny_family, tmp_path):
    """With bf16 sources mergekit does part of the arithmetic in bf16 (several roundings);
    evomerge accumulates in float32 and rounds once. Against the float32 merge of the same
    bf16-rounded inputs, evomerge's error must not exceed mergekit's."""
    from evomerge.engine import MergeEngine

    recipe_file = tmp_path / "bf16.yaml"
    recipe_file.write_text(recipe_text(DETERMINISTIC[case].replace("float32", "bfloat16"), tiny_family))
    theirs = run_mergekit(recipe_file, tmp_path / "mk")
    reference_file = tmp_path / "reference.yaml"
    rounded = _bf16_rounded_family(tiny_family, tmp_path)
    reference_file.write_text(recipe_text(DETERMINISTIC[case], rounded))
    reference = run_mergekit(reference_file, tmp_path / "ref")
    recipe = Recipe.load(recipe_file)
    engine = MergeEngine(recipe.referenced_models(), base_model=recipe.base_model, device="cpu", dtype="bfloat16",
                         progress=False)
    ours = engine.materialize(recipe).state_dict()
    assert next(iter(ours.values())).dtype == torch.bfloat16
    error_ours = sum((ours[k].float() - v).abs().sum().item() for k, v in reference.items())
    error_theirs = sum((theirs[k].float() - v).abs().sum().item() for k, v in reference.items())
    assert error_ours <= error_theirs * 1.02 + 1e-6, (error_ours, error_theirs)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_selection_keeps_the_same_magnitudes_under_ties(density):
    """bf16 task vectors are full of exactly equal magnitudes. Which of several equal entries
    survives the density cut is an artefact of torch's unstable sort in mergekit; evomerge breaks
    ties by index. Either way the kept magnitudes (as a multiset) and the L1 rescaling are equal."""
    sparsify = oracle("mergekit.sparsify")
    from evomerge.methods.task_arithmetic import keep_largest, keep_middle

    generator = torch.Generator().manual_seed(0)
    delta = (torch.randn(64, 300, generator=generator) * 0.01).bfloat16().float()
    assert delta.abs().unique().numel() < delta.numel() / 10  # heavily tied
    pairs = [
        (keep_largest(delta, density, rescale=True),
         sparsify.magnitude(delta, density, rescale_norm=sparsify.RescaleNorm.l1)),
        (keep_middle(delta, density, gamma=0.05, rescale=True),
         sparsify.magnitude_outliers(delta, density, rescale_norm=sparsify.RescaleNorm.l1, gamma=0.05)),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours.abs().flatten().sort().values, theirs.abs().flatten().sort().values)


# ----------------------------------------------------------------------------- random drop





def _flatten(state: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([state[n].float().reshape(-1) for n in names])


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_random_methods_match_mergekit_statistically(case, tiny_family, tiny_engine, tmp_path):
    from safetensors.torch import load_file

    base = load_file(f"{tiny_family['base']}/model.safetensors")
    recipe_file = tmp_path / f"{case}.yaml"
    recipe_file.write_text(recipe_text(RANDOM[case], tiny_family))
    recipe = Recipe.load(recipe_file)
    runs = 6
    ours, theirs = [], []
    for seed in range(runs):
        theirs.append(run_mergekit(recipe_file, tmp_path / f"mk{seed}", seed=seed))
        model = tiny_engine.materialize(recipe, seed=seed)
        ours.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    names = sorted(theirs[0])
    stats_ours = [delta_statistics(s, base) for s in ours]
    stats_theirs = [delta_statistics(s, base) for s in theirs]

    # Kept fraction: ~400k entries per run, so the binomial noise is far below 1%.
    kept_ours = sum(s["kept"] for s in stats_ours) / runs
    kept_theirs = sum(s["kept"] for s in stats_theirs) / runs
    assert abs(kept_ours - kept_theirs) < 0.01, (kept_ours, kept_theirs)
    # Rescaling: the L1 mass of the merged delta agrees run to run.
    l1_ours = sum(s["l1"] for s in stats_ours) / runs
    l1_theirs = sum(s["l1"] for s in stats_theirs) / runs
    assert abs(l1_ours - l1_theirs) / l1_theirs < 0.02, (l1_ours, l1_theirs)
    # Expected delta: the mean over seeds of both tools points the same way, as closely as
    # two independent means of `runs` draws can (compared against the spread within one tool).
    base_flat = _flatten(base, names)
    mean_ours = torch.stack([_flatten(s, names) - base_flat for s in ours]).mean(0)
    mean_theirs = torch.stack([_flatten(s, names) - base_flat for s in theirs]).mean(0)
    half_a = torch.stack([_flatten(s, names) - base_flat for s in theirs[: runs // 2]]).mean(0)
    half_b = torch.stack([_flatten(s, names) - base_flat for s in theirs[runs // 2 :]]).mean(0)
    across = torch.nn.functional.cosine_similarity(mean_ours, mean_theirs, dim=0).item()
    within = torch.nn.functional.cosine_similarity(half_a, half_b, dim=0).item()
    assert across >= within - 0.02, (across, within)


@pytest.mark.parametrize("case", sorted(RANDOM))
def test_random_methods_are_reproducible_with_a_seed(case, tiny_family, tiny_engine, tmp_path):
    recipe = Recipe.from_yaml(recipe_text(RANDOM[case], tiny_family))
    first = {k: v.clone() for k, v in tiny_engine.materialize(recipe, seed=7).state_dict().items()}
    second = tiny_engine.materialize(recipe, seed=7).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    third = tiny_engine.materialize(recipe, seed=8).state_dict()
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_density_is_kept_fraction_for_a_single_model(tiny_family, tiny_engine, tmp_path):
    """DARE on one dense task vector keeps `density` of its entries, rescaled to the same L1."""
    from safetensors.torch import load_file

    template = """
        merge_method: dare_linear
        base_model: {base}
        models:
          - model: {math}
            parameters: {{weight: 1.0, density: 0.3}}
        dtype: float32
    """
    recipe_file = tmp_path / "single.yaml"
    recipe_file.write_text(recipe_text(template, tiny_family))
    theirs = run_mergekit(recipe_file, tmp_path / "mk", seed=3)
    ours = tiny_engine.materialize(Recipe.load(recipe_file), seed=3).state_dict()
    base = load_file(f"{tiny_family['base']}/model.safetensors")
    source = load_file(f"{tiny_family['ft_math']}/model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    delta = source[name] - base[name]
    for merged in (ours[name], theirs[name]):
        kept = merged - base[name]
        fraction = ((kept != 0).sum() / (delta != 0).sum()).item()
        assert abs(fraction - 0.3) < 0.03
        assert abs(kept.abs().sum() / delta.abs().sum() - 1) < 1e-4
