"""Recipe parsing, parameter resolution and YAML round trips."""

from __future__ import annotations

import re

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


def test_tokenizer_settings_as_mergekit_reads_them():
    """`tokenizer_source: X` is `tokenizer: {source: X}`; the block defaults to the union, round-trips
    through YAML, and follows renamed models; malformed token sources are named."""
    models = [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}]
    short = Recipe.from_dict({"merge_method": "linear", "models": models, "tokenizer_source": "b"})
    assert short.vocabulary() == Recipe.from_dict({"merge_method": "linear", "models": models,
                                                   "tokenizer": {"source": "b"}}).vocabulary()
    assert Recipe.from_dict({"merge_method": "linear", "models": models}).vocabulary() is None
    block = {"pad_to_multiple_of": 64, "tokens": {"<tool>": {"source": "b", "force": True},
                                                   "<x>": {"source": {"kind": "model_token", "model": "a", "token_id": 3}},
                                                   "<z>": {"source": {"kind": "zero"}}}}
    recipe = Recipe.from_dict({"merge_method": "linear", "models": models, "tokenizer": block})
    assert recipe.vocabulary().source == "union"
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    renamed = recipe.with_models({"a": "A", "b": "B"}).vocabulary()
    assert renamed.tokens["<tool>"].source == "B" and renamed.tokens["<x>"].source.model == "A"
    assert short.with_models({"b": "B"}).tokenizer_source == "B"
    for tokens, message in (({"<x>": {"source": {"kind": "model_token", "model": "a"}}}, "exactly one of token or token_id"),
                            ({"<x>": {"force": True}}, "force: true needs a source"),
                            ({"<x>": {"source": {"kind": "mean"}}}, "tokenizer.tokens.<x>.source")):
        with pytest.raises(RecipeError, match=re.escape(message)):
            Recipe.from_dict({"merge_method": "linear", "models": models, "tokenizer": {"tokens": tokens}})


def test_keys_mergekit_ignores_are_dropped_with_a_warning_or_refused_with_strict(caplog):
    """mergekit silently ignores keys it does not know (a top-level `int8_mask` that belongs under
    `parameters`, a typo): evomerge names each, and `strict` refuses them and unknown parameters."""
    data = {"merge_method": "ties", "base_model": "b", "int8_mask": True,
            "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}, "note": "x"}]}
    with caplog.at_level("WARNING", logger="evomerge.recipe"):
        recipe = Recipe.from_dict(data, source="r.yaml")
    assert recipe == Recipe.from_dict({**{k: v for k, v in data.items() if k != "int8_mask"},
                                       "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}]})
    warned = [r.getMessage() for r in caplog.records]
    assert "r.yaml: int8_mask: not a mergekit setting; ignored, as mergekit ignores it (--strict refuses it)" in warned
    assert any(w.startswith("r.yaml: models.0.note: not a mergekit setting") for w in warned)
    with pytest.raises(RecipeError, match=r"^r.yaml: models.0.note: unknown field; int8_mask: unknown field \(mergekit "
                                          r"would ignore it; without --strict it is dropped with a warning\)"):
        Recipe.from_dict(data, source="r.yaml", strict=True)
    typo = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"wieght": 1}}]}
    assert Recipe.from_dict(typo).unknown_parameters() == ["models.0.parameters.wieght"]
    with pytest.raises(RecipeError, match=r"models.0.parameters.wieght: not a parameter of ties"):
        Recipe.from_dict(typo, strict=True)


def test_named_chat_templates_and_their_errors():
    from evomerge.recipe import chat_template_names, chat_template_text

    assert chat_template_names() == ["alpaca", "chatml", "exaone", "llama3", "mistral"]
    recipe = Recipe.from_dict({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": "chatml"})
    assert "<|im_start|>" in chat_template_text(recipe.chat_template)
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_template_text(jinja) == jinja and chat_template_text("auto") is None
    with pytest.raises(RecipeError, match=r"chat_template: unknown chat template 'chatlm': name one of alpaca, chatml"):
        Recipe.from_dict({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": "chatlm"})


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " Sum 2+2 "}],
    [{"role": "system", "content": " s1 "}, {"role": "user", "content": "q"}, {"role": "user_context", "content": " c\n"},
     {"role": "assistant", "content": "a "}, {"role": "system", "content": "s2"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "first"}],
    [{"role": "system", "content": "only"}],
]


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_named_chat_templates_render_as_mergekits(name):
    """evomerge's own templates, written for it, render every conversation (and raise on the same
    bad ones) exactly as mergekit's files of the same name."""
    import importlib.resources

    from transformers.utils.chat_template_utils import _compile_jinja_template

    from evomerge.recipe import chat_template_text
    from tests.conftest import oracle

    theirs = importlib.resources.files(oracle("mergekit._data.chat_templates")).joinpath(f"{name}.jinja").read_text()

    def render(text, messages, prompt):
        try:
            return _compile_jinja_template(text).render(messages=messages, add_generation_prompt=prompt,
                                                        bos_token="<s>", eos_token="</s>")
        except Exception as exc:  # the templates' own raise_exception
            return f"raised: {exc}"

    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert render(chat_template_text(name), messages, prompt) == render(theirs, messages, prompt), messages


def test_keys_mergekit_ignores_in_a_conditional_setting_warn_or_are_refused(caplog):
    """`pattern:` (mergekit's examples/gradient-slerp.yml): mergekit ignores the key, so the entry
    applies to every tensor; evomerge does the same and says so, and --strict refuses it."""
    text = """
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters:
  t:
    - pattern: self_attn
      value: [0, 1]
    - value: 0.5
"""
    with caplog.at_level("WARNING"):
        recipe = Recipe.from_yaml(text)
    assert recipe.parameters["t"][0] == {"value": [0, 1]}
    assert "parameters.t.0.pattern: not a key of a conditional setting" in caplog.text
    with pytest.raises(RecipeError, match=r"parameters\.t\.0\.pattern: not a key of a conditional setting"):
        Recipe.from_yaml(text, strict=True)


def test_a_single_default_module_is_the_same_recipe_and_other_modules_are_refused():
    plain = """
merge_method: ties
base_model: a
models: [{model: a}, {model: b, parameters: {weight: 0.5, density: 0.5}}]
parameters: {lambda: 0.9}
"""
    moduled = """
merge_method: ties
base_model: a
modules:
  default:
    models: [{model: a}, {model: b, parameters: {weight: 0.5, density: 0.5}}]
    parameters: {lambda: 0.9}
"""
    assert Recipe.from_yaml(moduled) == Recipe.from_yaml(plain)
    with pytest.raises(RecipeError, match="modules: only the `default` module"):
        Recipe.from_yaml(moduled.replace("default:", "vision_tower:"))
    with pytest.raises(RecipeError, match=r"modules.default.parameters.lambda: also set in the top-level"):
        Recipe.from_yaml(moduled + "parameters: {lambda: 1.0}\n")
