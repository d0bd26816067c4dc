"""Mixture-of-experts checkpoints as sources: stored as published (one tensor per expert, Mixtral's
`block_sparse_moe.experts.E.w1.weight`), merged as mergekit 0.1.5 merges them (on the per-layer
expert tensors transformers 5 builds from them)."""

from __future__ import annotations

import pytest
import yaml

from evomerge.cli import main
from tests.conftest import assert_close, oracle

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe_family(request, tmp_path_factory):
    from evomerge.demo.tiny import build_tiny_moe_family

    paths = build_tiny_moe_family(tmp_path_factory.mktemp(request.param), model_type=request.param)
    return request.param, {name: str(path) for name, path in paths.items()}


def _recipes(f: dict[str, str]) -> dict[str, dict]:
    ft = [f["ft_math"], f["ft_code"]]
    return {
        "ties": {"merge_method": "ties", "base_model": f["base"], "dtype": "float32",
                 "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.4}} for m in ft]},
        "slerp": {"merge_method": "slerp", "base_model": f["base"], "dtype": "float32", "parameters": {"t": [0.2, 0.8]},
                  "models": [{"model": f["base"]}, {"model": f["ft_knowledge"]}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": f["base"], "dtype": "float32",
                             "models": [{"model": m, "parameters": {"weight": 0.8, "density": 0.5, "gamma": 0.05}} for m in ft]},
        "model_stock": {"merge_method": "model_stock", "base_model": f["base"], "dtype": "float32",
                        "models": [{"model": m} for m in [*ft, f["ft_knowledge"]]]},
    }


@pytest.mark.parametrize("method", ["ties", "slerp", "breadcrumbs_ties", "model_stock"])
def test_moe_checkpoints_merge_as_mergekit_merges_them(moe_family, method, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    mergekit_merge = oracle("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    model_type, family = moe_family
    with safe_open(f"{family['base']}/model.safetensors", "pt") as handle:  # stored one tensor per expert
        assert any(".experts.0." in name for name in handle.keys())
    recipe = _recipes(family)[method]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "ours"), "--device", "cpu", "-q"]) == 0
    mergekit_merge.run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "theirs"),
                             MergeOptions(quiet=True, write_model_card=False))
    # mergekit writes transformers 5's fused names, evomerge the names the sources were published
    # under; both load as the same model
    ours, theirs = (AutoModelForCausalLM.from_pretrained(tmp_path / side).state_dict() for side in ("ours", "theirs"))
    assert ours.keys() == theirs.keys() and any("experts" in name for name in ours)
    assert_close(ours, theirs, rel=1e-5)
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as handle:
        assert any(".experts.0." in name for name in handle.keys())  # saved as the sources were
