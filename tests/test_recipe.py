"""Recipe parsing, parameter resolution and YAML round trips."""

from __future__ import annotations

import pytest

from evomerge.engine.plan import Layout, plan_recipe
from evomerge.errors import RecipeError
from evomerge.methods.registry import Param
from evomerge.recipe import Recipe, evaluate_setting

FLOAT = Param("x", float).coerce


@pytest.mark.parametrize(
    "setting,t,expected",
    [
        (0.5, 0.3, 0.5),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 1.0, 0.0], 0.5, 1.0),
        ([0.0, 1.0, 0.0], 0.75, 0.5),
        ([0.2, 0.4, 0.6, 0.8], 1.0, 0.8),
        ([0.2, 0.4, 0.6, 0.8], 0.0, 0.2),
    ],
)
def test_gradients_interpolate_piecewise_linearly(setting, t, expected):
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", t, FLOAT) == pytest.approx(expected)


def test_filters_match_substrings_first_match_wins():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.5, FLOAT) == 0.1
    assert evaluate_setting(setting, "model.layers.0.mlp.down_proj.weight", 0.5, FLOAT) == 0.5
    assert evaluate_setting(setting, "model.norm.weight", 0.5, FLOAT) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0, FLOAT) is None


def test_boolean_gradients_pick_by_position():
    coerce = Param("b", bool).coerce
    assert evaluate_setting([True, False], "x", 0.4, coerce) is True
    assert evaluate_setting([True, False], "x", 1.0, coerce) is False


def _layout(layers=4):
    suffixes = ("self_attn.q_proj.weight", "mlp.up_proj.weight")
    return Layout("model.layers.", suffixes, ("model.embed_tokens.weight",), ("model.norm.weight", "lm_head.weight"))


def test_precedence_source_over_slice_over_global():
    recipe = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "slices": [
                {
                    "sources": [
                        {"model": "b", "layer_range": [0, 4]},
                        {"model": "x", "layer_range": [0, 4], "parameters": {"weight": [{"filter": "q_proj", "value": 3}]}},
                        {"model": "y", "layer_range": [0, 4]},
                    ],
                    "parameters": {"weight": [{"filter": "mlp", "value": 2}]},
                }
            ],
            "parameters": {"weight": 1, "lambda": 0.5},
        }
    )
    plan = plan_recipe(recipe, _layout(), {"b": 4, "x": 4, "y": 4})
    jobs = {job.name: job for job in plan.jobs}
    q = jobs["model.layers.2.self_attn.q_proj.weight"]
    up = jobs["model.layers.2.mlp.up_proj.weight"]
    assert q.params["weight"] == (3.0, 1.0)  # x: its own filter; y: falls through to global
    assert up.params["weight"] == (2.0, 2.0)  # slice filter beats global
    assert q.params["lambda"] == 0.5
    assert q.base_index == 0


def test_models_become_one_slice_with_base_appended_and_layer_t():
    recipe = Recipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "x", "parameters": {"weight": [0, 1], "density": 0.5}}],
        }
    )
    plan = plan_recipe(recipe, _layout(), {"b": 4, "x": 4})
    jobs = {job.name: job for job in plan.jobs}
    assert jobs["model.layers.0.mlp.up_proj.weight"].sources == (("x", "model.layers.0.mlp.up_proj.weight"),
                                                                  ("b", "model.layers.0.mlp.up_proj.weight"))
    # t = layer / (n - 1) inside the slice; weights outside the layers use t = 0.
    assert jobs["model.layers.0.mlp.up_proj.weight"].params["weight"] == (0.0,)
    assert jobs["model.layers.3.mlp.up_proj.weight"].params["weight"] == (1.0,)
    assert jobs["model.layers.1.mlp.up_proj.weight"].params["weight"] == pytest.approx((1 / 3,))
    assert jobs["lm_head.weight"].params["weight"] == (0.0,)


def test_passthrough_slices_stack_layers_from_source_ranges():
    recipe = Recipe.from_dict(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 3]}]},
                {"sources": [{"model": "b", "layer_range": [1, 4]}]},
            ],
        }
    )
    plan = plan_recipe(recipe, _layout(), {"a": 4, "b": 4})
    assert plan.num_layers == 6
    jobs = {job.name: job for job in plan.jobs}
    assert jobs["model.layers.3.mlp.up_proj.weight"].sources == (("b", "model.layers.1.mlp.up_proj.weight"),)
    assert jobs["model.layers.5.mlp.up_proj.weight"].sources == (("b", "model.layers.3.mlp.up_proj.weight"),)
    assert jobs["model.embed_tokens.weight"].sources == (("a", "model.embed_tokens.weight"),)
    assert jobs["model.norm.weight"].sources == (("b", "model.norm.weight"),)
    assert plan.layer_origin[3] == ("b", 1)


def test_yaml_round_trip_is_exact():
    text = """
merge_method: della
base_model: base
models:
  - model: a
    parameters:
      weight: [0.1, 0.5, 0.9]
      density: [{filter: self_attn, value: 0.3}, {value: [0.5, 0.7]}]
      epsilon: 0.1
  - model: b
    parameters: {weight: 0.4, density: 0.6}
parameters: {lambda: 1.1, normalize: false}
dtype: bfloat16
out_dtype: float16
tokenizer_source: base
"""
    recipe = Recipe.from_yaml(text)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()
    assert "weight: [0.1, 0.5, 0.9]" in recipe.to_yaml()  # gradients in flow style, like mergekit


def test_round_trip_of_slices():
    recipe = Recipe.from_dict(
        {
            "merge_method": "slerp",
            "base_model": "a",
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 8]}, {"model": "b", "layer_range": [0, 8]}]}],
            "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]},
        }
    )
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert "layer_range: [0, 8]" in recipe.to_yaml()


@pytest.mark.parametrize(
    "data,message",
    [
        ({"merge_method": "frankenmerge", "models": [{"model": "a"}]}, "merge_method: unknown merge method 'frankenmerge'"),
        ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]}, "base_model: merge_method 'ties' needs a base_model"),
        ({"merge_method": "dare_ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1, "density": 0}}]},
         "models.0.parameters.density: must be in (0, 1]"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1, "density": [0.5, 1.2]}}]},
         "models.0.parameters.density: must be in (0, 1], got 1.2"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]},
         "slices.0.sources.0.layer_range"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]},
         "exactly one of 'models' or 'slices'"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": "heavy"}}]},
         "models.0.parameters.weight: weight must be a number"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "float8"}, "dtype: unknown dtype 'float8'"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": float("nan")}}]},
         "models.0.parameters: weight: must be a finite number, got nan"),
        ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}],
          "parameters": {"lambda": [1.0, float("inf")]}}, "parameters: lambda: must be a finite number, got inf"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {
            "weight": [{"filter": "mlp", "value": float("-inf")}, {"value": 1}]}}]}, "weight: must be a finite number, got -inf"),
        ({"merge_method": "linear", "modelz": []}, "modelz: unknown field"),
        ({"merge_method": "slerp", "base_model": "a", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
          "parameters": {"t": 0.5}}, "slices.0: all sources of a slice must span the same number of layers"),
    ],
)
def test_bad_recipes_name_the_field(data, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data, source="r.yaml")
    assert str(info.value).startswith("r.yaml: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "recipe,layers,message",
    [
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 9]}]}]},
         {"a": 4}, "slices.0.sources.0.layer_range: [0, 9) exceeds model 'a', which has 4 layers"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b"}]},
         {"a": 4, "b": 4}, "model 'b' has no 'weight'"),
        ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}],
          "parameters": {"t": 0.5}}, {"a": 4, "b": 4, "c": 4}, "takes at most 2 inputs, got 3"),
        ({"merge_method": "linear", "models": [{"model": "zzz", "parameters": {"weight": 1}}]},
         {"a": 4}, "model 'zzz' is not among the loaded sources"),
        ({"merge_method": "nuslerp", "base_model": "a",
          "slices": [{"sources": [{"model": "b", "layer_range": [0, 4]}, {"model": "c", "layer_range": [0, 4]}]}],
          "parameters": {"weight": 1}}, {"a": 4, "b": 4, "c": 4}, "base_model 'a' is not among this slice's sources"),
    ],
)
def test_plan_errors_name_the_culprit(recipe, layers, message):
    with pytest.raises(RecipeError, match=None) as info:
        plan_recipe(Recipe.from_dict(recipe), _layout(), layers)
    assert message in str(info.value)


def test_unknown_parameters_are_reported_not_fatal():
    recipe = Recipe.from_dict({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                               "parameters": {"t": 0.5, "densty": 0.3}})
    assert recipe.unknown_parameters() == ["parameters.densty"]


def test_tokenizer_block_maps_to_tokenizer_source():
    recipe = Recipe.from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                               "tokenizer": {"source": "base"}})
    assert recipe.tokenizer_source == "base"
    with pytest.raises(RecipeError, match="token surgery"):
        Recipe.from_dict({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "union", "tokens": {}}})
