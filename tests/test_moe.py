"""Mixtures of experts: `evomerge moe` against mergekit-moe 0.1.5 (the oracle), the in-memory MoE
against what `evomerge moe` writes, a MoE search end to end, and bad configs named by their field."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.errors import EvomergeError, SpaceError
from evomerge.moe import MoEConfig, MoEConfigError
from tests.conftest import REPO, WRITE_AUDIT_HOOK, oracle

PROMPTS = {
    "math": {"positive": ["Question: how many clips did she sell", "48 + 24 = 72"], "negative": ["def add"]},
    "code": {"positive": ["def add(a, b):", "for i in range(10):"]},
    "know": {"positive": ["The capital of France is Paris."]},
    "mixed": {"positive": ["Answer: A", "print(i * 2)"]},
}


def _config(family: dict[str, str], *, arch: str = "mixtral", mode: str = "hidden", dtype: str = "float32",
            per_token: int = 2) -> dict:
    experts = [{"source_model": family[name], "positive_prompts": PROMPTS[key]["positive"],
                **({"negative_prompts": PROMPTS[key]["negative"]} if "negative" in PROMPTS[key] else {})}
               for name, key in (("ft_math", "math"), ("ft_code", "code"), ("ft_knowledge", "know"))]
    config = {"base_model": family["base"], "gate_mode": mode, "dtype": dtype, "experts_per_token": per_token,
              "experts": experts}
    if arch == "qwen":  # the architecture with a shared expert (residual-scaled, gated by its own prompts)
        config["architecture"] = "qwen"
        config["shared_experts"] = [{"source_model": family["base"], "positive_prompts": PROMPTS["mixed"]["positive"],
                                     "residual_scale": 0.5}]
    return config


def _run_mergekit_moe(config: dict, out: Path, seed: int = 0) -> None:
    oracle("mergekit.moe")
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    torch.manual_seed(seed)  # what `mergekit-moe --random-seed seed` sets first
    build(MoEMergeConfig.model_validate(config), str(out), MergeOptions(device="cpu", quiet=True), device="cpu")


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def qwen3_family(tmp_path_factory) -> dict[str, str]:
    from evomerge.demo.tiny import build_tiny_arch_family

    base, *fts = build_tiny_arch_family(tmp_path_factory.mktemp("qwen3"), "qwen3", layers=3, members=3)
    return {"base": str(base), "ft_math": str(fts[0]), "ft_code": str(fts[1]), "ft_knowledge": str(fts[2])}


# ----------------------------------------------------------------------------- the oracle


@pytest.mark.oracle
@pytest.mark.parametrize("arch,mode,dtype", [
    ("mixtral", "hidden", "float32"), ("mixtral", "cheap_embed", "float32"), ("mixtral", "hidden", "bfloat16"),
    ("qwen", "hidden", "float32"), ("qwen", "cheap_embed", "bfloat16"), ("qwen3", "hidden", "float32"),
])
def test_moe_equals_mergekit_moe_tensor_by_tensor(arch, mode, dtype, tiny_family, qwen3_family, tmp_path):
    family = qwen3_family if arch == "qwen3" else tiny_family
    config = _config(family, arch=arch, mode=mode, dtype=dtype)
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    assert main(["moe", str(tmp_path / "moe.yaml"), str(tmp_path / "ours"), "--device", "cpu", "-q"]) == 0
    _run_mergekit_moe(config, tmp_path / "theirs")
    ours, theirs = _state(tmp_path / "ours"), _state(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    assert any(".experts." in name for name in ours) and any("mlp.gate.weight" in name for name in ours)
    if arch == "qwen":
        assert any("shared_expert_gate" in name for name in ours)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype == getattr(torch, dtype), name
        assert torch.equal(ours[name], theirs[name]), name
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    expected = json.loads((tmp_path / "theirs" / "config.json").read_text())
    for key in ("architectures", "model_type", "num_local_experts", "num_experts", "num_experts_per_tok",
                "hidden_size", "num_hidden_layers", "sliding_window", "norm_topk_prob", "use_sliding_window"):
        if key == "sliding_window" and arch == "qwen":  # ours: a width, so batched padded inference runs
            assert written[key] == written["max_position_embeddings"] and not written["use_sliding_window"]
            continue
        assert written.get(key) == expected.get(key), key
    card = (tmp_path / "ours" / "README.md").read_text()
    assert MoEConfig.from_yaml((tmp_path / "ours" / "mergekit_moe_config.yml").read_text()) == MoEConfig.from_dict(config)
    assert "```yaml" in card and f"{config['experts_per_token']} of\n3 experts per token" in card


@pytest.mark.oracle
def test_random_gates_equal_mergekit_but_for_the_draws_and_are_seeded(tiny_family, tmp_path):
    config = _config(tiny_family, mode="random")
    for expert in config["experts"]:
        expert.pop("positive_prompts"), expert.pop("negative_prompts", None)
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(config))
    for seed in (0, 0, 1):
        out = tmp_path / f"ours{seed}"
        assert main(["moe", str(tmp_path / "moe.yaml"), str(out), "--device", "cpu", "-q", "--seed", str(seed)]) == 0
    _run_mergekit_moe(config, tmp_path / "theirs", seed=7)
    ours, again, other, theirs = (_state(tmp_path / n) for n in ("ours0", "ours0", "ours1", "theirs"))
    assert ours.keys() == theirs.keys()
    gates = [n for n in ours if n.endswith("mlp.gate.weight")]
    assert len(gates) == 4
    for name in ours:
        assert ours[name].shape == theirs[name].shape
        if name in gates:
            assert torch.equal(ours[name], again[name]) and not torch.equal(ours[name], other[name])
        else:
            assert torch.equal(ours[name], theirs[name]), name


def test_the_moe_loads_and_generates(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(_config(tiny_family, arch="qwen")))
    assert main(["moe", str(tmp_path / "moe.yaml"), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    # written as every published Qwen MoE checkpoint (and mergekit-moe) names its tensors: one per expert
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names and "model.layers.0.mlp.experts.1.down_proj.weight" in names
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in names)
    inputs = tokenizer("def add(a, b):", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6


# ----------------------------------------------------------------------------- in memory

NO_WRITE_SCRIPT = r"""
import hashlib, json, os, sys
""" + WRITE_AUDIT_HOOK + r"""import torch
import torch._dynamo  # torch makes its (empty) compile-cache directory on this import: a framework side effect
torch.set_num_threads(2)
from evomerge.engine import MergeEngine
from evomerge.moe import MoEConfig
configs = [MoEConfig.from_yaml(text) for text in json.loads(sys.argv[1])]
refs = list(dict.fromkeys(r for c in configs for r in c.referenced_models()))
sys.addaudithook(hook)
engine = MergeEngine(refs, base_model=configs[0].base_model, device="cpu", dtype="bfloat16", progress=False)
hashes = []
for config in configs:  # one engine, several candidates: the search's way
    model = engine.materialize(config, seed=0)
    assert torch.isfinite(model(torch.arange(12).unsqueeze(0)).logits).all()
    hashes.append({n: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                   for n, t in model.state_dict().items()})
print(json.dumps({"writes": writes, "hashes": hashes}))
"""


def _hashes(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for n, t in state.items()}


@pytest.mark.e2e
def test_in_memory_moe_writes_nothing_and_equals_what_evomerge_moe_writes(tiny_family, tmp_path):
    f = tiny_family
    recipe_expert = {"merge_method": "task_arithmetic", "base_model": f["base"], "dtype": "bfloat16",
                     "models": [{"model": f["ft_math"], "parameters": {"weight": 0.7}},
                                {"model": f["ft_code"], "parameters": {"weight": 0.4}}]}
    first = _config(f, dtype="bfloat16")
    first["experts"][2] = {"recipe": recipe_expert, "positive_prompts": PROMPTS["mixed"]["positive"],
                           "gate_scale": [0.5, 2.0]}  # evomerge's own fields: an expert that is a merge
    second = _config(f, mode="cheap_embed", dtype="bfloat16", per_token=1)
    second["experts"] = second["experts"][:2]
    configs = [MoEConfig.from_dict(c) for c in (first, second)]
    empty = tmp_path / "scratch"
    empty.mkdir()
    env = {**os.environ, "TMPDIR": str(empty), "HOME": str(empty), "HF_HOME": str(empty / "hf"),
           "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", NO_WRITE_SCRIPT, json.dumps([c.to_yaml() for c in configs])],
                            capture_output=True, text=True, cwd=empty, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["writes"] == [] and not any(empty.iterdir())
    for i, config in enumerate(configs):
        config.save(tmp_path / f"c{i}.yaml")
        assert main(["moe", str(tmp_path / f"c{i}.yaml"), str(tmp_path / f"out{i}"), "--device", "cpu", "-q"]) == 0
        written = _hashes(_state(tmp_path / f"out{i}"))
        assert written == report["hashes"][i]
    # the gate scale reached the router rows: the third expert's row differs by its scale per layer
    state = _state(tmp_path / "out0")
    unscaled = MoEConfig.from_dict({**first, "experts": [*first["experts"][:2], {**first["experts"][2], "gate_scale": None}]})
    unscaled.save(tmp_path / "u.yaml")
    assert main(["moe", str(tmp_path / "u.yaml"), str(tmp_path / "u"), "--device", "cpu", "-q"]) == 0
    plain = _state(tmp_path / "u")
    first_layer, last_layer = "model.layers.0.mlp.gate.weight", "model.layers.3.mlp.gate.weight"
    assert torch.equal(state[first_layer][:2], plain[first_layer][:2])
    torch.testing.assert_close(state[first_layer][2].float(), plain[first_layer][2].float() * 0.5, rtol=1e-2, atol=0)
    torch.testing.assert_close(state[last_layer][2].float(), plain[last_layer][2].float() * 2.0, rtol=1e-2, atol=0)


# ----------------------------------------------------------------------------- bad configs


@pytest.fixture(scope="module")
def qwen2_family(tmp_path_factory) -> list[Path]:
    from evomerge.demo.tiny import build_tiny_arch_family

    return build_tiny_arch_family(tmp_path_factory.mktemp("qwen2"), "qwen2", layers=2, members=1)


def test_bad_configs_name_the_field(tiny_family, qwen2_family, tmp_path, capsys):
    def refused(config: dict) -> str:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
        assert main(["moe", str(tmp_path / "bad.yaml"), str(tmp_path / "out"), "--device", "cpu", "-q"]) == 2
        assert not (tmp_path / "out").exists()
        return capsys.readouterr().err.strip()

    other = _config(tiny_family)
    other["experts"][1]["source_model"] = str(qwen2_family[1])
    assert "experts.1.source_model: a qwen2 model, but base_model is llama" in refused(other)
    empty = _config(tiny_family)
    empty["experts"][0]["positive_prompts"] = []
    assert "experts.0.positive_prompts: gate_mode hidden" in refused(empty)
    assert "experts_per_token: 4 is more than the 3 experts" in refused(_config(tiny_family, per_token=4))
    same = _config(tiny_family)
    for expert in same["experts"]:
        expert["positive_prompts"], expert["negative_prompts"] = ["x"], ["y"]
    assert "experts: every expert has the same prompts" in refused(same)
    deepseek = _config(tiny_family)
    deepseek["shared_experts"] = [{"source_model": tiny_family["base"]}]
    assert "architecture: DeepSeek MoE needs modeling code from the Hugging Face hub" in refused(deepseek)
    assert "shared_experts: Mixtral takes no shared experts, got 1" in refused({**deepseek, "architecture": "mixtral"})
    assert "architecture: 'switch' is none of" in refused({**_config(tiny_family), "architecture": "switch"})
    both = _config(tiny_family)
    both["experts"][0]["recipe"] = {"merge_method": "linear", "models": [{"model": tiny_family["base"]}]}
    assert "experts.0: give source_model or recipe (exactly one)" in refused(both)
    with pytest.raises(MoEConfigError, match="experts_per_token: must be at least 1"):
        MoEConfig.from_dict(_config(tiny_family, per_token=0))


# ----------------------------------------------------------------------------- the search


def _moe_space(family: dict[str, str], tmp: Path, compare: dict | None = None, **moe) -> dict:
    block = {"experts": ["math", "code", "know", {"name": "blend", "recipe": {
                 "merge_method": "task_arithmetic", "base_model": "base",
                 "models": [{"model": "math", "parameters": {"weight": 0.5}},
                            {"model": "code", "parameters": {"weight": 0.5}}]}}],
             "count": {"low": 2, "high": 3}, "experts_per_token": {"low": 1, "high": 2},
             "gate_mode": ["hidden", "cheap_embed"], "prompts": {**PROMPTS, "blend": {"positive": ["48 / 2 = 24", "return a + b"]}},
             "gate_scale": {"points": 2}}
    block.update(moe)
    return {"name": "tinymoe", "models": [{"name": "base", "path": family["base"]},
                                          {"name": "math", "path": family["ft_math"]},
                                          {"name": "code", "path": family["ft_code"]},
                                          {"name": "know", "path": family["ft_knowledge"]}],
            "base_model": "base", "moe": block,
            "tasks": [{"task": "gsm8k", "metric": "gold_loglik", "size": 4},
                      {"task": "mmlu", "metric": "gold_loglik", "size": 6}],
            "heldout": [{"task": "mmlu", "metric": "gold_loglik", "size": 4}],
            "n_trials": 5, "dtype": "float32", "pruning": {"min_trials": 3}, "results_dir": str(tmp / "results"),
            **({"compare": compare} if compare else {})}


@pytest.mark.e2e
def test_moe_search_end_to_end_resumes_and_its_winner_rebuilds(tiny_family, tmp_path, monkeypatch):
    from evomerge.search import SearchSpace, run_search

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    dense = {"merge_method": "task_arithmetic", "base_model": "../base", "dtype": "float32",
             "models": [{"model": "../ft_math", "parameters": {"weight": 0.5}}]}
    recipes = Path(tiny_family["base"]).parent / "recipes"  # its models named relative to the recipe file
    recipes.mkdir(exist_ok=True)
    (recipes / "dense.yaml").write_text(yaml.safe_dump(dense))
    space = _moe_space(tiny_family, tmp_path, compare={"dense": str(recipes / "dense.yaml")})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    space = SearchSpace.load(tmp_path / "s.yaml")
    assert space.methods == ["moe"]
    dims = {d.name for d in space.dimensions("moe")}
    assert {"moe.math.use", "moe.all.experts_per_token", "moe.all.gate_mode", "moe.blend.prompts",
            "moe.know.gate_scale.rest.1"} <= dims
    # the middle of every range: every expert (capped at 3), each with its own prompt set
    middle = space.recipe("moe", space.default_values("moe"))
    assert [e.positive_prompts for e in middle.experts] == [PROMPTS[k]["positive"] for k in ("math", "code", "know")]
    summary = run_search(space, n_trials=3, progress=False)
    results = tmp_path / "results" / "tinymoe"
    study = optuna.load_study(study_name="tinymoe", storage=f"sqlite:///{results / 'study.db'}")
    first = {t.number: (t.params, t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert first and all(t.user_attrs["method"] == "moe" for t in study.get_trials())
    configs = [MoEConfig.from_yaml(t.user_attrs["recipe"]) for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert all(2 <= len(c.experts) <= 3 and c.experts_per_token <= len(c.experts) for c in configs)
    heldout = json.loads((results / "heldout.json").read_text())
    assert set(heldout["rows"]) == {"winner", "dense", "base", "math", "code", "know"}
    assert set(heldout["comparisons"]) == {"dense", "base", "math", "code", "know"}
    assert heldout["rows"]["dense"]["scores"] != heldout["rows"]["math"]["scores"]
    assert MoEConfig.load(results / "best.yaml") == MoEConfig.from_yaml(
        study.trials[summary["best"]["trial"]].user_attrs["recipe"])
    # resumed with a bigger budget: the first trials stay as they were
    run_search(space, n_trials=5, heldout=False, progress=False)
    study = optuna.load_study(study_name="tinymoe", storage=f"sqlite:///{results / 'study.db'}")
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 5
    after = {t.number: (t.params, t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert all(after[n] == v for n, v in first.items())
    # the winner's record rebuilds with `evomerge moe` and `evomerge export`, to the same tensors
    assert main(["export", str(results), str(tmp_path / "exported"), "--device", "cpu", "-q"]) == 0
    best = MoEConfig.load(tmp_path / "exported" / "mergekit_moe_config.yml")
    assert main(["moe", str(results / "best.yaml"), str(tmp_path / "rebuilt"), "--device", "cpu", "-q"]) == 0
    assert _hashes(_state(tmp_path / "exported")) == _hashes(_state(tmp_path / "rebuilt"))
    assert best == MoEConfig.load(results / "best.yaml")


@pytest.mark.parametrize("override,message", [
    ({"methods": ["ties"]}, "methods: a moe: search builds mixtures of experts"),
    ({"moe": {"experts": ["math", "nobody"], "gate_mode": "random"}}, "moe.experts.1: 'nobody' is not a name in models"),
    ({"moe": {"experts": ["math", "code"], "prompts": {**PROMPTS, "again": PROMPTS["code"]}}},
     "prompts.again: the same prompts as 'code'"),
    ({"moe": {"experts": ["math", "code"], "prompts": {"math": PROMPTS["math"]}}}, "moe: prompts: gate_mode hidden routes"),
    ({"moe": {"experts": ["math", "code"], "experts_per_token": 3, "prompts": PROMPTS}},
     "experts_per_token: 3 is more than the 2 experts"),
    ({"moe": {"experts": ["math", "code"], "count": {"low": 1, "high": 2}, "prompts": PROMPTS}},
     "count.low: a MoE routed by prompts needs at least two experts"),
    ({"moe": {"experts": ["math", {"name": "b", "recipe": {"merge_method": "linear", "models": [{"model": "zed"}]}}],
              "gate_mode": "random"}}, "moe.experts.1.recipe: 'zed' is not a name in models"),
    ({"compare": {"dense": "nowhere.yaml"}}, "compare.dense: cannot read nowhere.yaml"),
    ({"compare": {"math": "nowhere.yaml"}}, "compare.math: the name of another row"),
])
def test_bad_moe_spaces_name_the_field(override, message, tiny_family, tmp_path):
    from evomerge.search import SearchSpace

    space = _moe_space(tiny_family, tmp_path)
    for key, value in override.items():
        space[key] = value
    with pytest.raises(SpaceError, match=message.replace("(", r"\(")):
        SearchSpace.from_dict(space)


def test_moe_config_round_trips_and_names_its_extensions(tiny_family):
    config = MoEConfig.from_dict(_config(tiny_family))
    assert MoEConfig.from_yaml(config.to_yaml()) == config and not config.to_yaml().startswith("#")
    extended = _config(tiny_family)
    extended["experts"][0]["gate_scale"] = [1.0, 2.0]
    text = MoEConfig.from_dict(extended).to_yaml()
    assert text.startswith("# evomerge MoE config") and MoEConfig.from_yaml(text) == MoEConfig.from_dict(extended)
    with pytest.raises(EvomergeError, match="not valid YAML"):
        MoEConfig.from_yaml("experts: [")


@pytest.mark.e2e
def test_a_qwen2_moe_search_needs_a_shared_expert_and_can_have_one(tmp_path_factory, tmp_path, capsys):
    """Qwen2 experts make a Qwen MoE, which has one gated shared expert: a `moe:` block without one is
    refused before trial 1 (and by --dry-run) saying what to set; with `shared:` it builds, and the
    checkpoint is written as published Qwen MoE checkpoints are."""
    from evomerge.demo.tiny import build_tiny_arch_family
    from evomerge.search import SearchSpace, run_search

    base, *fts = build_tiny_arch_family(tmp_path_factory.mktemp("qwen2moe"), "qwen2", layers=2, members=3)
    space = {"name": "qmoe", "base_model": "base", "models": [{"name": "base", "path": str(base)},
             *({"name": name, "path": str(path)} for name, path in zip(("math", "code", "know"), fts))],
             "moe": {"experts": ["math", "code"], "gate_mode": "hidden", "prompts": PROMPTS},
             "tasks": [{"task": "mmlu", "metric": "gold_loglik", "size": 3}], "n_trials": 1, "dtype": "float32",
             "results_dir": str(tmp_path / "results")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    assert main(["search", str(tmp_path / "s.yaml"), "--dry-run", "1"]) == 2
    err = capsys.readouterr().err
    assert "moe: shared_experts: Qwen MoE takes exactly 1 shared expert, got 0" in err and "moe.shared" in err
    space["moe"]["shared"] = "know"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    assert main(["search", str(tmp_path / "s.yaml"), "--dry-run", "1"]) == 0
    assert "shared_experts" in capsys.readouterr().out
    summary = run_search(SearchSpace.load(tmp_path / "s.yaml"), heldout=False, progress=False)
    assert summary["trials"]["COMPLETE"] == 1
    best = MoEConfig.load(tmp_path / "results" / "qmoe" / "best.yaml")
    assert best.shared_experts[0].positive_prompts == PROMPTS["know"]["positive"]
