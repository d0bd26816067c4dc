"""Differing vocabularies: mergekit 0.1.5's tokenizer settings, against mergekit itself.

The family: the tiny base, and fine-tunes that added tokens in different orders (as chat
fine-tunes add a pad token and tool tokens), so each source lacks some output tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.engine import MergeEngine
from tests.conftest import assert_close, oracle


@pytest.fixture(scope="module")
def vocab_family(tiny_family, tiny_family_tied, tmp_path_factory):
    """base (384 tokens); chat_a = ft_math + <tool>, <|pad|> (386); chat_b = ft_code + <|pad|>, <tool>,
    <think> (387); plain = ft_knowledge + a regular (non-special) token; tied_* the same on the tied
    family; lora = the base with a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from evomerge.demo.tiny import with_added_tokens

    folder = tmp_path_factory.mktemp("vocab_family")
    family = {"base": tiny_family["base"], "tied_base": tiny_family_tied["base"]}
    for name, source, tokens, special in (("chat_a", tiny_family["ft_math"], ["<tool>", "<|pad|>"], True),
                                          ("chat_b", tiny_family["ft_code"], ["<|pad|>", "<tool>", "<think>"], True),
                                          ("plain", tiny_family["ft_knowledge"], ["merged"], False),
                                          ("tied_a", tiny_family_tied["ft_math"], ["<tool>"], True),
                                          ("tied_b", tiny_family_tied["ft_code"], ["<think>", "<tool>"], True)):
        family[name] = str(with_added_tokens(source, folder / name, tokens, seed=len(family), special=special))
    torch.manual_seed(0)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_family["base"]),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(folder / "adapter")
    family["lora"] = f"{tiny_family['base']}+{folder / 'adapter'}"
    return family


def _models(*refs, weights=(0.5, 0.3, 0.2)):
    return [{"model": ref, "parameters": {"weight": w}} for ref, w in zip(refs, weights)]


def _cases(f: dict[str, str], outside: str) -> dict[str, dict]:
    ta = {"merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "float32"}
    return {
        # <tool>, <|pad|>: in both fine-tunes, not the base -> their average where the base lacks it
        "union_linear": {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
                         "models": _models(f["base"], f["chat_a"], f["chat_b"])},
        # the base's rows fill what a fine-tune lacks; a regular added token from one model
        "union_task_arithmetic": {**ta, "tokenizer_source": "union", "models": _models(f["chat_a"], f["chat_b"], f["plain"])},
        # the base (chat_a) has <tool>, which the tiny base lacks: the base's row, not the average
        "chat_base_task_arithmetic": {**ta, "base_model": f["chat_a"], "tokenizer_source": "union",
                                      "models": _models(f["chat_b"], f["base"])},
        "base_ties": {"merge_method": "ties", "base_model": f["base"], "dtype": "float32", "tokenizer_source": "base",
                      "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in (f["chat_a"], f["chat_b"])]},
        "named_model": {"merge_method": "linear", "dtype": "float32", "tokenizer_source": f["chat_b"],
                        "models": _models(f["base"], f["chat_a"], f["chat_b"])},
        "outside_model": {"merge_method": "linear", "dtype": "float32", "tokenizer_source": outside,
                          "models": _models(f["base"], f["chat_a"])},
        "tokens_block": {**ta, "models": _models(f["chat_a"], f["chat_b"]), "tokenizer": {
            "source": "union", "pad_to_multiple_of": 16, "tokens": {
                "<tool>": {"source": f["chat_b"], "force": True},
                "<think>": {"source": {"kind": "model_token", "model": f["base"], "token": "<|im_start|>"}},
                "<new>": {"source": {"kind": "zero"}},
                "<|pad|>": {"source": {"kind": "model_token", "model": f["chat_a"], "token_id": 5}}}}},
        "union_bfloat16": {"merge_method": "linear", "dtype": "bfloat16", "tokenizer_source": "union",
                           "models": _models(f["base"], f["chat_a"], f["chat_b"])},
        "adapter_slerp": {"merge_method": "slerp", "base_model": f["lora"], "dtype": "float32", "tokenizer_source": "union",
                          "parameters": {"t": [0.2, 0.7]}, "models": [{"model": f["lora"]}, {"model": f["chat_b"]}]},
        "tied_union": {"merge_method": "task_arithmetic", "base_model": f["tied_base"], "dtype": "float32",
                       "tokenizer_source": "union", "models": _models(f["tied_a"], f["tied_b"])},
    }


def _run_both(recipe: dict, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    mergekit_merge = oracle("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "ours"), "--device", "cpu", "-q"]) == 0
    mergekit_merge.run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "theirs"),
                             MergeOptions(quiet=True, write_model_card=False, lora_merge_cache=str(tmp_path / "lora")))
    return tuple({"tensors": load_file(tmp_path / side / "model.safetensors"),
                  "vocab": AutoTokenizer.from_pretrained(tmp_path / side).get_vocab(),
                  "rows": AutoConfig.from_pretrained(tmp_path / side).vocab_size} for side in ("ours", "theirs"))


CASES = ["union_linear", "union_task_arithmetic", "chat_base_task_arithmetic", "base_ties", "named_model", "outside_model", "tokens_block",
         "union_bfloat16", "adapter_slerp", "tied_union"]


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES)
def test_vocabularies_as_mergekit_maps_them(case, vocab_family, tiny_family, tmp_path):
    """The same output vocabulary (the same tokens; union ids of regular tokens follow a hash order in
    mergekit, so rows are compared token by token), the same vocab_size, and every tensor equal:
    embedding and LM-head rows token by token, padding rows, and every other tensor."""
    outside = str(tmp_path / "outside")  # a model the recipe does not merge lends its tokenizer
    if case == "outside_model":
        from evomerge.demo.tiny import with_added_tokens

        with_added_tokens(tiny_family["ft_knowledge"], outside, ["<|pad|>", "<x>"], seed=9)
    recipe = _cases(vocab_family, outside)[case]
    ours, theirs = _run_both(recipe, tmp_path)
    assert set(ours["vocab"]) == set(theirs["vocab"])
    count = len(ours["vocab"])
    assert ours["rows"] == theirs["rows"] >= count
    assert ours["tensors"].keys() == theirs["tensors"].keys()
    rel = 0 if case in ("union_linear", "union_bfloat16", "named_model") else 1e-5  # else: float32 sums, another order
    vocab_tensors = [n for n in theirs["tensors"] if "embed_tokens" in n or "lm_head" in n]
    assert len(vocab_tensors) == (1 if case.startswith("tied") else 2)
    for name in vocab_tensors:
        mine, expected = ours["tensors"][name], theirs["tensors"][name]
        assert mine.shape == expected.shape == (ours["rows"], expected.shape[1])
        order = list(ours["vocab"])
        by_token = mine[[ours["vocab"][t] for t in order]], expected[[theirs["vocab"][t] for t in order]]
        assert_close({name: by_token[0]}, {name: by_token[1]}, rel=rel)
        if ours["rows"] > count:
            assert_close({name: mine[count:]}, {name: expected[count:]}, rel=rel)  # padding rows
    others = {n: t for n, t in theirs["tensors"].items() if n not in vocab_tensors}
    assert_close(ours["tensors"], others, rel=rel)
    expected_tokens = {"union_linear": 387, "union_task_arithmetic": 388, "base_ties": 384,
                       "tokens_block": 388, "tied_union": 386}
    if case in expected_tokens:  # the union really is one: what each model added, once
        assert count == expected_tokens[case]


def test_the_rows_a_model_lacks_follow_mergekits_rules(vocab_family, tmp_path):
    """Beyond agreeing with mergekit: in a linear merge of base, chat_a and chat_b over the union,
    <think> (chat_b's alone) is chat_b's row for all three, <tool> (both fine-tunes) is the base's...
    which the base lacks, so the two fine-tunes' average; a base token keeps each model's own row."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    f = vocab_family
    recipe = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
              "models": _models(f["base"], f["chat_a"], f["chat_b"], weights=(1.0, 0.0, 0.0))}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    embed = load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"]
    vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    own = {name: load_file(f"{f[name]}/model.safetensors")["model.embed_tokens.weight"] for name in ("base", "chat_a", "chat_b")}
    ids = {name: AutoTokenizer.from_pretrained(f[name]).get_vocab() for name in own}
    assert torch.equal(embed[vocab["<think>"]], own["chat_b"][ids["chat_b"]["<think>"]])
    average = (own["chat_a"][ids["chat_a"]["<tool>"]] + own["chat_b"][ids["chat_b"]["<tool>"]]) / 2
    assert torch.allclose(embed[vocab["<tool>"]], average, rtol=0, atol=1e-7)
    assert torch.equal(embed[vocab["ĠApril"]], own["base"][ids["base"]["ĠApril"]])


def test_the_mapping_is_computed_once_for_a_search(vocab_family, monkeypatch):
    """Each vocabulary tensor is mapped once (per set of merged models), not once per candidate."""
    from evomerge.engine.vocab import Vocabulary
    from evomerge.recipe import Recipe, TokenizerSetting

    calls = []
    original = Vocabulary.map
    monkeypatch.setattr(Vocabulary, "map", lambda self, name, *a, **k: calls.append(name) or original(self, name, *a, **k))
    f = vocab_family
    engine = MergeEngine([f["base"], f["chat_a"], f["chat_b"]], base_model=f["base"], device="cpu", dtype="float32",
                         tokenizer=TokenizerSetting(source="union"), progress=False)
    for weight in (0.2, 0.5, 0.9):
        recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "float32",
                                   "tokenizer_source": "union", "models": _models(f["chat_a"], f["chat_b"], weights=(weight, 0.3))})
        model = engine.materialize(recipe)
        assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == 387
    assert sorted(calls) == ["lm_head.weight", "model.embed_tokens.weight"]
    with pytest.raises(Exception, match="the recipe asks for every source's own vocabulary"):
        engine.materialize(Recipe.from_dict({"merge_method": "linear", "models": _models(f["base"]), "dtype": "float32"}))


@pytest.mark.e2e
def test_a_search_over_a_family_with_different_vocab_sizes(vocab_family, tmp_path):
    """space.yaml's `tokenizer_source` (models named as in `models:`): the search scores candidates
    with the output tokenizer, every trial's recipe carries the setting, and the exported winner is
    a checkpoint of the union vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    from evomerge.search import SearchSpace, run_search
    from evomerge.search.runner import Searcher

    f = vocab_family
    space = {"name": "vocab", "base_model": "base", "methods": ["task_arithmetic", "ties"], "n_trials": 3,
             "models": [{"name": "base", "path": f["base"]}, {"name": "chat_a", "path": f["chat_a"]},
                        {"name": "chat_b", "path": f["chat_b"]}],
             "tokenizer": {"source": "union", "tokens": {"<tool>": {"source": "chat_a", "force": True}}},
             "tasks": [{"task": "mmlu", "metric": "gold_loglik", "size": 4}], "dtype": "float32",
             "heldout": [{"task": "mmlu", "metric": "accuracy", "size": 3}],
             "pruning": {"enabled": False}, "results_dir": str(tmp_path / "results")}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    loaded = SearchSpace.load(tmp_path / "space.yaml")
    assert loaded.tokenizer.tokens["<tool>"].source == f["chat_a"]
    # held-out on: every source is scored (reference lines, the table) in the output vocabulary too
    summary = run_search(loaded, progress=False)
    assert summary["trials"]["COMPLETE"] == 3
    assert set(summary["heldout"]["rows"]) == {"winner", "base", "chat_a", "chat_b"}
    assert set(summary["sources_search"]) == {"base", "chat_a", "chat_b"}
    searcher = Searcher(loaded, progress=False)
    searcher.load()
    assert len(searcher.evaluator.tokenizer) == 387 == searcher.engine.vocabulary.size
    # a source alone in the output vocabulary: its own tensors, bit for bit, beside the mapped rows
    from safetensors.torch import load_file

    from evomerge.search.heldout import source_recipes

    alone = searcher.engine.materialize(source_recipes(loaded)["chat_b"]).state_dict()
    own = load_file(str(Path(f["chat_b"]) / "model.safetensors"))
    for name, tensor in own.items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(alone[name], tensor.to(alone[name].dtype)), name
    results = tmp_path / "results" / "vocab"
    recipe = yaml.safe_load((results / "best.yaml").read_text())
    assert recipe["tokenizer"]["source"] == "union" and recipe["tokenizer"]["tokens"]["<tool>"]["force"] is True
    assert main(["export", str(results), str(tmp_path / "winner"), "--device", "cpu", "-q"]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "winner").vocab_size == 387
    assert len(AutoTokenizer.from_pretrained(tmp_path / "winner")) == 387
