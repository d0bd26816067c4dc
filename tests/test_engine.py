"""The engine end to end: sources, in-memory merging, checkpoints, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evomerge.cli import main
from evomerge.engine import MergeEngine
from evomerge.errors import ArchitectureMismatch, CheckpointError
from evomerge.recipe import Recipe
from tests.conftest import REPO, WRITE_AUDIT_HOOK, oracle

TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {math}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {code}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: float32
"""


def _fmt(template: str, family: dict[str, str]) -> str:
    return textwrap.dedent(template).format(
        base=family["base"], math=family["ft_math"], code=family["ft_code"], know=family["ft_knowledge"]
    )


@pytest.mark.oracle
def test_same_recipe_file_through_mergekit_yaml_and_evomerge_merge(tiny_family, tmp_path):
    """The real `mergekit-yaml` command and `evomerge merge` on one file give the same checkpoint."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    oracle("mergekit.merge")  # skipped without the oracle, failed under CI=true
    assert shutil.which("mergekit-yaml"), "mergekit is installed but its mergekit-yaml command is not on PATH"
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(_fmt(TIES, tiny_family))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(["mergekit-yaml", str(recipe), str(tmp_path / "mk"), "--no-copy-tokenizer"], check=True,
                   env=env, capture_output=True)
    assert main(["merge", str(recipe), str(tmp_path / "evo"), "--device", "cpu", "-q"]) == 0
    ours, theirs = load_file(tmp_path / "evo/model.safetensors"), load_file(tmp_path / "mk/model.safetensors")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=1e-6 * theirs[name].abs().max().item())
    # A usable Hugging Face checkpoint: loads, has a tokenizer, and the card embeds the recipe.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "evo")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "evo")
    prompt = tokenizer("48 + 24 =", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 3
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "mk")  # mergekit's checkpoint says the same
    assert torch.equal(out, reference.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False))
    card = (tmp_path / "evo/README.md").read_text()
    assert "merge_method: ties" in card and "```yaml" in card
    # ...and mergekit accepts the recipe evomerge wrote next to it.
    subprocess.run(["mergekit-yaml", str(tmp_path / "evo/mergekit_config.yml"), str(tmp_path / "mk2"),
                    "--no-copy-tokenizer"], check=True, env=env, capture_output=True)


def test_stacked_layers_give_a_working_deeper_model(tiny_engine, tiny_family):
    recipe = Recipe.from_yaml(
        _fmt(
            """
            merge_method: passthrough
            slices:
              - sources: [{{model: {base}, layer_range: [0, 4]}}]
              - sources: [{{model: {math}, layer_range: [1, 4]}}]
            """,
            tiny_family,
        )
    )
    model = tiny_engine.materialize(recipe)
    assert model.config.num_hidden_layers == 7 and len(model.model.layers) == 7
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(
        model.model.layers[5].mlp.up_proj.weight, tiny_engine.source_tensor(tiny_family["ft_math"], "model.layers.2.mlp.up_proj.weight")
    )
    # Back to a plain 4-layer recipe: the resident model is rebuilt with 4 layers.
    model = tiny_engine.materialize(Recipe.from_yaml(_fmt(TIES, tiny_family)))
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4


def test_task_vector_cache_changes_nothing(tiny_family):
    recipe = Recipe.from_yaml(_fmt(TIES, tiny_family))
    refs = recipe.referenced_models()
    cached = MergeEngine(refs, device="cpu", delta_cache=True, progress=False)
    uncached = MergeEngine(refs, device="cpu", delta_cache=False, progress=False)
    a = cached.materialize(recipe).state_dict()
    b = uncached.materialize(recipe).state_dict()
    assert cached._delta_base == tiny_family["base"] and not uncached._deltas
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_path_is_used_for_linear_and_task_arithmetic(tiny_engine, tiny_family):
    recipe = Recipe.from_yaml(_fmt(TIES.replace("ties", "task_arithmetic"), tiny_family))
    tiny_engine.materialize(recipe)
    assert tiny_engine.last_stats.fused == tiny_engine.last_stats.tensors > 0


def test_nan_weights_fail_the_merge_with_the_tensor_name(tiny_engine, tiny_family):
    from evomerge.errors import MergeFailure

    recipe = Recipe.from_yaml(
        _fmt(
            """
            merge_method: linear
            models:
              - model: {math}
                parameters: {{weight: 1.0}}
              - model: {code}
                parameters: {{weight: -1.0}}
            """,
            tiny_family,
        )
    )
    with pytest.raises(MergeFailure, match="NaN/inf in tensor model.embed_tokens.weight"):
        tiny_engine.materialize(recipe)


def test_a_method_bug_is_not_a_bad_candidate(tiny_engine, tiny_family, monkeypatch):
    """A ValueError from a method fails the candidate (MergeFailure); any other exception is a bug
    and reaches the caller as itself, traceback and all."""
    from dataclasses import replace

    from evomerge.errors import MergeFailure
    from evomerge.methods import registry

    recipe = Recipe.from_yaml(_fmt(TIES, tiny_family))
    ties = registry.get("ties")

    def failing(exc):
        def fn(inputs, **params):
            raise exc
        return fn

    monkeypatch.setitem(registry._REGISTRY, "ties", replace(ties, fn=failing(ValueError("density too low"))))
    with pytest.raises(MergeFailure, match="ties failed on tensor .*: density too low"):
        tiny_engine.materialize(recipe)
    monkeypatch.setitem(registry._REGISTRY, "ties", replace(ties, fn=failing(KeyError("oops"))))
    with pytest.raises(KeyError, match="oops"):
        tiny_engine.materialize(recipe)


def test_sharded_safetensors_and_hub_cache_ids(tiny_family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_family["ft_math"]).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    # A Hugging Face cache entry for "evo/tiny-code", laid out as huggingface_hub writes it.
    cache = tmp_path / "hub"
    snapshot = cache / "models--evo--tiny-code" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_family["ft_code"], snapshot)
    (cache / "models--evo--tiny-code" / "refs").mkdir()
    (cache / "models--evo--tiny-code" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    recipe = Recipe.from_dict(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(sharded), "parameters": {"weight": 1}},
                {"model": "evo/tiny-code", "parameters": {"weight": 1}},
            ],
        }
    )
    engine = MergeEngine(recipe.referenced_models(), device="cpu", progress=False)
    merged = engine.materialize(recipe).state_dict()
    direct = MergeEngine([tiny_family["ft_math"], tiny_family["ft_code"]], device="cpu", progress=False)
    name = "model.layers.2.mlp.down_proj.weight"
    expected = (direct.source_tensor(tiny_family["ft_math"], name) + direct.source_tensor(tiny_family["ft_code"], name)) / 2
    torch.testing.assert_close(merged[name], expected)
    with pytest.raises(CheckpointError, match="'evo/missing': not a local directory and not in the Hugging Face cache"):
        MergeEngine(["evo/missing"], device="cpu", progress=False)


# ----------------------------------------------------------------------------- bad input


def _bad_sources(family: dict[str, str], tmp: Path) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    from evomerge.demo.tiny import tiny_config

    truncated = tmp / "truncated"
    shutil.copytree(family["ft_code"], truncated)
    file = truncated / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])

    wide = tmp / "wide"
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_config(384, hidden=96)).save_pretrained(wide)

    mistral = tmp / "mistral"
    cfg = tiny_config(384).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        cfg.pop(key, None)
    MistralForCausalLM(MistralConfig(**cfg)).save_pretrained(mistral)

    pickled = tmp / "pickled"  # transformers 5 writes only safetensors: pickle by hand
    pickled.mkdir()
    shutil.copy(Path(family["ft_math"]) / "config.json", pickled / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(family["ft_math"]).state_dict(), pickled / "pytorch_model.bin")

    missing = tmp / "missing_tensor"
    shutil.copytree(family["ft_math"], missing)
    from safetensors.torch import load_file, save_file

    state = load_file(missing / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    corrupt = {}
    for name, payload in (
        ("random_bytes", bytes(range(256)) * 64),  # its "header length" is larger than the file
        ("list_header", _header([["model.embed_tokens.weight", "F32"]])),
        ("no_offsets", _header({"model.embed_tokens.weight": {"dtype": "F32", "shape": [384, 64]}})),
    ):
        folder = tmp / name
        shutil.copytree(family["ft_math"], folder)
        (folder / "model.safetensors").write_bytes(payload)
        corrupt[name] = str(folder)
    other_vocab = tmp / "other_vocab"  # the same weights, one token renamed: another vocabulary
    shutil.copytree(family["ft_math"], other_vocab)
    spec = json.loads((other_vocab / "tokenizer.json").read_text())
    token = next(t for t in spec["model"]["vocab"] if t.isalpha() and len(t) > 2)
    spec["model"]["vocab"]["zzz" + token] = spec["model"]["vocab"].pop(token)
    (other_vocab / "tokenizer.json").write_text(json.dumps(spec))
    from evomerge.demo.tiny import with_added_tokens

    added = with_added_tokens(family["ft_math"], tmp / "added", ["<tool>"])
    return {"truncated": str(truncated), "wide": str(wide), "mistral": str(mistral), "pickled": str(pickled),
            "missing": str(missing), "other_vocab": str(other_vocab), "added": str(added), **corrupt}


def _header(header) -> bytes:
    import json
    import struct

    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\0" * 64


BAD_RECIPES = [
    ("unknown_method", "merge_method: frankenmerge\nmodels: [{{model: {base}}}]\n",
     "merge_method: unknown merge method 'frankenmerge'"),
    ("missing_base", "merge_method: ties\nmodels: [{{model: {math}, parameters: {{weight: 1, density: 0.5}}}}]\n",
     "base_model: merge_method 'ties' needs a base_model"),
    ("density", "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {math}, parameters: {{weight: 1, density: 1.5}}}}]\n",
     "models.0.parameters.density: must be in (0, 1], got 1.5"),
    ("layer_range", "merge_method: passthrough\nslices: [{{sources: [{{model: {base}, layer_range: [2, 9]}}]}}]\n",
     "layer_range: [2, 9) exceeds model"),
    ("other_arch", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {mistral}, parameters: {{weight: 1}}}}]\n",
     "is a mistral model, but"),
    ("other_shape", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {wide}, parameters: {{weight: 1}}}}]\n",
     "has hidden_size=96, but"),
    ("truncated", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {truncated}, parameters: {{weight: 1}}}}]\n",
     "model.safetensors is truncated"),
    ("pickled", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {pickled}, parameters: {{weight: 1}}}}]\n",
     "only pickled .bin weights found"),
    ("missing_tensor", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {missing}, parameters: {{weight: 1}}}}]\n",
     "has no tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("no_such_model", "merge_method: linear\nmodels: [{{model: /nowhere/model, parameters: {{weight: 1}}}}]\n",
     "'/nowhere/model': no such directory"),
    ("random_bytes", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {random_bytes}, parameters: {{weight: 1}}}}]\n",
     "model.safetensors is not a valid safetensors file: its header length"),
    ("list_header", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {list_header}, parameters: {{weight: 1}}}}]\n",
     "model.safetensors is not a valid safetensors file: its header is a JSON list, not an object"),
    ("no_offsets", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {no_offsets}, parameters: {{weight: 1}}}}]\n",
     "tensor 'model.embed_tokens.weight' has no valid data_offsets"),
    ("vocab_size", "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {added}, parameters: {{weight: 1}}}}]\n",
     "has vocab_size=385, but '{base}' has vocab_size=384: their vocabularies differ; add `tokenizer_source: union`"),
    ("token_source", "merge_method: linear\ntokenizer: {{tokens: {{'<tool>': {{source: {{kind: model_token, model: {base}, token: '<nope>'}}}}}}}}\n"
     "models: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {added}, parameters: {{weight: 1}}}}]\n",
     "tokenizer.tokens.<tool>: model '{base}' has no token '<nope>'"),
    ("token_model", "merge_method: linear\ntokenizer: {{tokens: {{'<tool>': {{source: {other_vocab}}}}}}}\n"
     "models: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {added}, parameters: {{weight: 1}}}}]\n",
     "tokenizer.tokens.<tool>: takes its row from model '{other_vocab}', which is not one of the recipe's models"),
    ("both_tokenizer", "merge_method: linear\ntokenizer_source: base\ntokenizer: {{source: union}}\n"
     "models: [{{model: {base}, parameters: {{weight: 1}}}}]\n",
     "give tokenizer_source or a tokenizer block, not both"),
    ("chat_template", "merge_method: linear\nchat_template: chatlm\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}]\n",
     "chat_template: unknown chat template 'chatlm'"),
]


@pytest.fixture(scope="module")
def bad_sources(tiny_family, tmp_path_factory):
    return _bad_sources(tiny_family, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case,template,message", BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_input_is_one_line_naming_the_culprit(case, template, message, tiny_family, bad_sources, tmp_path, capsys):
    recipe = tmp_path / f"{case}.yaml"
    names = dict(base=tiny_family["base"], math=tiny_family["ft_math"], **bad_sources)
    recipe.write_text(template.format(**names))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge:")]
    assert len(err) == 1 and err[0].startswith("evomerge: error: "), err
    assert message.format(**names) in err[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_tokenizer_settings_are_refused_before_the_merge_runs(tiny_family, bad_sources, tmp_path, monkeypatch, capsys):
    def no_merge(*args, **kwargs):
        raise AssertionError("the merge ran before the tokenizer setting was refused")

    monkeypatch.setattr(MergeEngine, "materialize", no_merge)
    recipe = tmp_path / "r.yaml"
    template = dict((case, template) for case, template, _ in BAD_RECIPES)["token_source"]
    recipe.write_text(template.format(base=tiny_family["base"], math=tiny_family["ft_math"], **bad_sources))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 2
    assert "has no token '<nope>'" in capsys.readouterr().err


@pytest.mark.oracle
def test_a_tokenizer_from_outside_the_recipe_and_a_named_template_as_mergekit_writes_them(tiny_family, tmp_path):
    """`tokenizer_source` naming a model the recipe does not merge (same vocabulary) lends its
    tokenizer; `chat_template: chatml` gives the checkpoint a template that renders every
    conversation as mergekit's output checkpoint does."""
    from transformers import AutoTokenizer

    mergekit_merge = oracle("mergekit.merge")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    recipe = {"merge_method": "linear", "tokenizer_source": tiny_family["ft_knowledge"], "chat_template": "chatml",
              "models": [{"model": tiny_family["base"], "parameters": {"weight": 1}},
                         {"model": tiny_family["ft_math"], "parameters": {"weight": 1}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "ours"), "--device", "cpu", "-q"]) == 0
    mergekit_merge.run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "theirs"),
                             MergeOptions(quiet=True, copy_tokenizer=True, write_model_card=False))
    ours, theirs = (AutoTokenizer.from_pretrained(tmp_path / name) for name in ("ours", "theirs"))
    assert ours.get_vocab() == theirs.get_vocab() == AutoTokenizer.from_pretrained(tiny_family["ft_knowledge"]).get_vocab()
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 + 3?"}]
    for prompt in (False, True):
        assert ours.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt) == \
            theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)


def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


LINEAR = "merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {math}, parameters: {{weight: 1}}}}]\n"


@pytest.mark.parametrize("where,message", [
    ("source", "would overwrite source model"),  # OUT_DIR is a source's folder
    ("inside_source", "would overwrite source model"),
    ("holds_source", "would overwrite source model"),  # OUT_DIR contains a source
    ("file", "is an existing file, not a folder"),
    ("foreign", "exists and holds files that are not an earlier merge"),
    # an earlier merge beside the user's own files: neither is deleted
    ("merge_and_notes", "an earlier merge, but it also holds evals, notes.md, which evomerge did not write"),
    ("proc", "cannot write a folder there"),
    ("long_name", "cannot write a folder there"),
])
def test_out_dir_never_loses_a_source_or_a_file(where, message, tmp_path, capsys):
    from evomerge.demo.tiny import build_tiny_family

    family = {k: str(v) for k, v in build_tiny_family(tmp_path / "family", seed=0).items()}
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("years of work")
    (tmp_path / "a_file").write_text("keep me")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name, text in (("mergekit_config.yml", "merge_method: linear\n"), ("notes.md", "my notes"),
                       ("model.safetensors", "x")):
        (earlier / name).write_text(text)
    (earlier / "evals").mkdir()
    (earlier / "evals" / "mmlu.json").write_text("{}")
    out = {"source": family["ft_math"], "inside_source": str(Path(family["ft_math"]) / "merged"),
           "holds_source": str(tmp_path / "family"), "file": str(tmp_path / "a_file"), "foreign": str(foreign),
           "merge_and_notes": str(earlier), "proc": "/proc/evomerge-out",
           "long_name": str(tmp_path / ("x" * 300))}[where]
    before = {p: _fingerprint(Path(p)) for p in (family["base"], family["ft_math"], str(foreign), str(earlier))}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LINEAR.format(base=family["base"], math=family["ft_math"]))
    assert main(["merge", str(recipe), out, "--device", "cpu", "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge:")]
    assert len(err) == 1 and message in err[0] and f"OUT_DIR {out}" in err[0], err
    assert {p: _fingerprint(Path(p)) for p in before} == before
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_a_merge_replaces_an_earlier_merge_whole(tiny_family, tmp_path):
    """An earlier output is replaced only once the new one is complete (written beside, then renamed),
    and only when it holds nothing but what a merge writes."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LINEAR.format(base=tiny_family["base"], math=tiny_family["ft_math"]))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--device", "cpu", "-q"]) == 0
    written = _fingerprint(out)
    (out / "model.safetensors").write_bytes(b"an older merge's weights")
    assert main(["merge", str(recipe), str(out), "--device", "cpu", "-q"]) == 0
    assert _fingerprint(out) == written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []  # no scratch left


@pytest.mark.parametrize("killed", ["after_the_old_moved_aside", "after_the_new_moved_in", "while_writing"])
def test_a_replacement_killed_at_any_point_leaves_a_whole_folder(killed, tiny_family, tmp_path):
    """SIGKILL during the swap (simulated by what it leaves: scratch folders of a process that is gone):
    the next run finds the old folder or the new one whole, removes the rest, and writes."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LINEAR.format(base=tiny_family["base"], math=tiny_family["ft_math"]))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--device", "cpu", "-q"]) == 0
    whole = _fingerprint(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid no process has any more
    partial = tmp_path / f".merged.partial-{dead}-abc"
    shutil.copytree(out, partial)
    (partial / "model.safetensors").write_bytes(b"half")
    if killed == "after_the_old_moved_aside":
        os.replace(out, tmp_path / f".merged.old-{dead}-def")
        assert not out.exists()
    elif killed == "after_the_new_moved_in":
        shutil.copytree(out, tmp_path / f".merged.old-{dead}-def")
    from evomerge.paths import recover_directory

    recover_directory(out)
    assert _fingerprint(out) == whole  # the old folder, whole, back in place
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
    assert main(["merge", str(recipe), str(out), "--device", "cpu", "-q"]) == 0 and _fingerprint(out) == whole


@pytest.mark.e2e
def test_bad_input_prints_no_traceback(tiny_family, bad_sources, tmp_path):
    recipe = tmp_path / "truncated.yaml"
    recipe.write_text(BAD_RECIPES[6][1].format(base=tiny_family["base"], **bad_sources))
    result = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(tmp_path / "o"), "-q"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("evomerge: error: model '")


def test_pickled_bin_loads_when_allowed(tiny_family, bad_sources):
    engine = MergeEngine([tiny_family["base"], bad_sources["pickled"]], device="cpu", allow_bin=True, progress=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    reference = MergeEngine([tiny_family["ft_math"]], device="cpu", progress=False)
    assert torch.equal(engine.source_tensor(bad_sources["pickled"], name), reference.source_tensor(tiny_family["ft_math"], name))


def test_architecture_checked_before_loading(tiny_family, bad_sources):
    with pytest.raises(ArchitectureMismatch, match="wide"):
        MergeEngine([tiny_family["base"], tiny_family["ft_math"], bad_sources["wide"]], device="cpu", progress=False)


# ----------------------------------------------------------------------------- no disk, no growth

NO_WRITE_SCRIPT = r"""
import json, os, sys
""" + WRITE_AUDIT_HOOK + r"""import psutil, torch
import torch._dynamo  # torch makes its (empty) compile-cache directory on this import: a framework side effect
torch.set_num_threads(2)
from evomerge.engine import MergeEngine
from evomerge.recipe import Recipe
family = json.loads(sys.argv[1])
sys.addaudithook(hook)
engine = MergeEngine(list(family.values()), base_model=family["base"], device="cpu", progress=False)
b, m, c, k = family["base"], family["ft_math"], family["ft_code"], family["ft_knowledge"]
recipes = [
    {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}}, {"model": c, "parameters": {"weight": 0.5}}]},
    {"merge_method": "ties", "base_model": b, "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.4}}, {"model": k, "parameters": {"weight": 0.5, "density": 0.6}}]},
    {"merge_method": "dare_ties", "base_model": b, "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.4}}, {"model": c, "parameters": {"weight": 0.5, "density": 0.6}}]},
    {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": k}], "parameters": {"t": [0.1, 0.9]}},
    {"merge_method": "della", "base_model": b, "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}}, {"model": k, "parameters": {"weight": 0.5, "density": 0.5}}]},
]
rss = []
process = psutil.Process()
for i in range(20):
    recipe = Recipe.from_dict(recipes[i % len(recipes)])
    model = engine.materialize(recipe, seed=i)
    logits = model(torch.arange(16).unsqueeze(0)).logits  # reading back: the model is usable
    assert torch.isfinite(logits).all()
    rss.append(process.memory_info().rss)
print(json.dumps({"writes": writes, "rss": rss, "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.mark.e2e
def test_merging_many_recipes_writes_nothing_and_memory_stays_flat(tmp_path):
    """Loading, 20 merges of 5 methods and forward passes: no file opened for writing, no
    directory created, and resident memory after the warm-up stays within a fraction of one model."""
    from evomerge.demo.tiny import build_tiny_family

    family = {k: str(v) for k, v in build_tiny_family(tmp_path / "family", hidden=384, layers=4).items()}
    before = sorted(p for p in tmp_path.rglob("*"))
    empty = tmp_path / "scratch"
    empty.mkdir()
    env = {**os.environ, "TMPDIR": str(empty), "HOME": str(empty), "HF_HOME": str(empty / "hf"),
           "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", NO_WRITE_SCRIPT, json.dumps(family)], capture_output=True,
                            text=True, cwd=empty, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["writes"] == []
    assert sorted(p for p in tmp_path.rglob("*") if p != empty) == before and not any(empty.iterdir())
    rss = report["rss"][5:]  # after warm-up (first recipes of each method allocate scratch once)
    steps = range(len(rss))
    mean_step, mean_rss = sum(steps) / len(rss), sum(rss) / len(rss)
    slope = sum((i - mean_step) * (r - mean_rss) for i, r in zip(steps, rss)) / sum((i - mean_step) ** 2 for i in steps)
    # A leak of 1/37 of a model per recipe measured 0.60 MB/recipe here, no leak +-0.02 MB/recipe.
    assert slope < report["model_bytes"] / 50, (slope, report["model_bytes"], rss)
    assert max(rss) - report["rss"][4] < report["model_bytes"] / 2, (report["model_bytes"], report["rss"])


def test_a_merged_checkpoint_has_ordinary_permissions(tiny_family, tmp_path):
    """Written through a scratch folder, the checkpoint still gets the umask's permissions (not 0700)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LINEAR.format(base=tiny_family["base"], math=tiny_family["ft_math"]))
    mask = os.umask(0o022)
    try:
        assert main(["merge", str(recipe), str(tmp_path / "merged"), "--device", "cpu", "-q"]) == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "merged" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_an_interrupted_small_file_write_leaves_the_old_file(tmp_path, monkeypatch):
    """Caches (the sha256 memo, held-out scores) are written whole or not at all."""
    from evomerge import paths

    target = tmp_path / "memo.json"
    paths.atomic_write_text(target, "old")
    mask = os.umask(0)
    os.umask(mask)
    assert target.read_text() == "old" and target.stat().st_mode & 0o777 == 0o666 & ~mask

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(paths.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        paths.atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["memo.json"]


@pytest.fixture(scope="module")
def tiny_adapters(tiny_family, tmp_path_factory):
    """Two peft LoRA adapters on the tiny base (random, non-zero B; one also on the embeddings and
    with rsLoRA scaling), saved as peft saves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapters")
    configs = {
        "attn": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
        "wide": LoraConfig(r=2, lora_alpha=3, target_modules=["gate_proj", "down_proj", "k_proj", "embed_tokens"],
                           use_rslora=True, init_lora_weights=False),
    }
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_family["base"]), config)
        model.save_pretrained(folder / name)
    return {name: str(folder / name) for name in configs}


@pytest.mark.oracle
def test_lora_adapters_as_sources_give_mergekits_tensors(tiny_family, tiny_adapters, tmp_path):
    """`model: base+adapter` (mergekit's syntax): the adapter merged into its model once at load, as
    mergekit merges it; recipes mixing adapters and full models give mergekit's tensors."""
    import yaml
    from safetensors.torch import load_file

    mergekit_merge = oracle("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    base = tiny_family["base"]
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
              "models": [{"model": f"{base}+{tiny_adapters['attn']}", "parameters": {"weight": 0.7}},
                         {"model": f"{base}+{tiny_adapters['wide']}", "parameters": {"weight": 0.5}},
                         {"model": tiny_family["ft_math"], "parameters": {"weight": 0.3}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "ours"), "--device", "cpu", "-q"]) == 0
    mergekit_merge.run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "theirs"),
                             MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                                          lora_merge_cache=str(tmp_path / "lora_cache")))
    from tests.conftest import assert_close

    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert_close(ours, theirs, rel=1e-5)  # float32 sums in another order, as for every oracle test
    # Each adapted source, as loaded, is bit for bit the model mergekit merged it into (its LoRA cache).
    engine = MergeEngine([base, *(f"{base}+{a}" for a in tiny_adapters.values())], device="cpu", progress=False)
    cached = [load_file(folder / "model.safetensors") for folder in (tmp_path / "lora_cache").iterdir()]
    assert len(cached) == 2
    for adapter in tiny_adapters.values():
        ref = f"{base}+{adapter}"
        matches = [c for c in cached if all(torch.equal(engine.source_tensor(ref, n), c[n]) for n in engine.shapes)]
        assert len(matches) == 1, adapter
    # the adapters changed something (attention, MLP, embeddings), or the comparison proves little
    wide = f"{base}+{tiny_adapters['wide']}"
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert not torch.equal(engine.source_tensor(base, name), engine.source_tensor(wide, name)), name
    assert not (Path(base) / "adapter_config.json").exists()  # nothing written beside the sources


def test_bad_adapter_references_are_named(tiny_family, tmp_path):
    from evomerge.checkpoint import locate

    with pytest.raises(CheckpointError, match=r"a LoRA reference is model\+adapter, with one '\+'"):
        locate(f"{tiny_family['base']}+a+b")
    with pytest.raises(CheckpointError, match=r"is not a peft adapter \(no adapter_config.json\)"):
        locate(f"{tiny_family['base']}+{tiny_family['ft_math']}")


@pytest.mark.e2e
def test_a_search_over_adapters_named_relative_to_its_space_file(tiny_family, tiny_adapters, tmp_path):
    """space.yaml names `base+adapter` sources relative to itself, like any model path; the search
    runs over them end to end."""
    import yaml

    from evomerge.search import SearchSpace, run_search

    for name, path in [("base", tiny_family["base"]), *tiny_adapters.items()]:
        shutil.copytree(path, tmp_path / "models" / name)
    space = {"name": "adapters", "base_model": "models/base", "methods": ["task_arithmetic"], "n_trials": 2,
             "models": [{"name": "attn", "path": "models/base+models/attn"},
                        {"name": "wide", "path": "models/base+models/wide"}],
             "tasks": [{"task": "mmlu", "metric": "gold_loglik", "size": 4}], "dtype": "float32",
             "pruning": {"enabled": False}, "results_dir": str(tmp_path / "results")}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    loaded = SearchSpace.load(tmp_path / "space.yaml")
    assert loaded.models["attn"] == f"{tmp_path / 'models' / 'base'}+{tmp_path / 'models' / 'attn'}"
    summary = run_search(loaded, heldout=False, progress=False)
    assert summary["trials"]["COMPLETE"] == 2
