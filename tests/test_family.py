"""The demo family: clean training data, deterministic builds, no half-written members."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.demo import family as fam
from evomerge.demo.family import FamilyRecipe, Specialist, build_family
from evomerge.evaluation import task_items

TINY_RECIPE = FamilyRecipe(specialists=(
    Specialist("math", "gsm8k", steps=2, seed=1, batch_size=2, max_tokens=160, lora_rank=4, lora_alpha=8),
    Specialist("code", "humaneval", steps=2, seed=2, batch_size=2, max_tokens=160, lora_rank=4, lora_alpha=8),
    Specialist("knowledge", "mmlu", steps=2, seed=3, batch_size=2, max_tokens=160, lora_rank=4, lora_alpha=8),
))


def select(task: str, split: str) -> list[dict]:
    return task_items(task, split, None, 0)[0]


@pytest.mark.e2e
def test_no_training_example_is_in_any_evaluation_split():
    evaluated = {task: select(task, "search") + select(task, "heldout") for task in ("gsm8k", "mmlu", "humaneval")}
    gsm8k_questions = {item["question"] for item in evaluated["gsm8k"]}
    for prompt, _ in fam.math_examples():
        assert prompt.removeprefix("Question: ").removesuffix("\nAnswer:") not in gsm8k_questions
    mmlu_prompts = {fam.mmlu_prompt(item) for item in evaluated["mmlu"]}
    assert not {prompt for prompt, _ in fam.knowledge_examples()} & mmlu_prompts
    code = [prompt + body for prompt, body in fam.code_examples()]
    assert len(code) > 300
    for item in evaluated["humaneval"]:
        signature = f"def {item['entry_point']}("
        docstring = item["prompt"].split('"""')[1].strip()[:60] if '"""' in item["prompt"] else item["prompt"][-60:]
        assert not any(signature in source and docstring in source for source in code), item["task_id"]


@pytest.mark.e2e
def test_two_builds_with_one_seed_give_identical_weights(tiny_family, tmp_path):
    first = build_family(tmp_path / "a", recipe=TINY_RECIPE, base_dir=Path(tiny_family["base"]), device="cpu",
                         progress=False)
    second = build_family(tmp_path / "b", recipe=TINY_RECIPE, base_dir=Path(tiny_family["base"]), device="cpu",
                          progress=False)
    base = load_file(Path(tiny_family["base"]) / "model.safetensors")
    for name in ("math", "code", "knowledge"):
        a = load_file(first.members[name] / "model.safetensors")
        b = load_file(second.members[name] / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], base[k]) for k in a)  # and training did change the weights
    manifest = json.loads((tmp_path / "a" / f"manifest-{TINY_RECIPE.digest()}.json").read_text())
    for record in manifest["members"].values():
        assert {"spec", "data_sha256", "seconds", "losses", "path"} <= set(record)
    # A cached run keeps what the build took (it used to overwrite it with the reuse's ~0 s), and the
    # members are ordinary files, readable by others (not mkdtemp's 0700).
    build_family(tmp_path / "a", recipe=TINY_RECIPE, base_dir=Path(tiny_family["base"]), device="cpu", progress=False)
    again = json.loads((tmp_path / "a" / f"manifest-{TINY_RECIPE.digest()}.json").read_text())
    assert again["build_seconds"] == manifest["build_seconds"] > 0
    assert first.members["math"].stat().st_mode & 0o005 == 0o005


@pytest.mark.e2e
def test_an_interrupted_build_leaves_no_member_to_trust(tiny_family, tmp_path, monkeypatch):
    calls = []
    original = fam.train_specialist

    def flaky(base_dir, spec, target, **kwargs):
        calls.append(spec.name)
        if spec.name == "code":
            # fail while writing: after the scratch directory exists, before it replaces the target
            from transformers import PreTrainedModel

            monkeypatch.setattr(PreTrainedModel, "save_pretrained", _explode)
        return original(base_dir, spec, target, **kwargs)

    monkeypatch.setattr(fam, "train_specialist", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_family(tmp_path, recipe=TINY_RECIPE, base_dir=Path(tiny_family["base"]), device="cpu", progress=False)
    spec = {s.name: s for s in TINY_RECIPE.specialists}
    assert (fam.member_dir(spec["math"], TINY_RECIPE, tmp_path) / "model.safetensors").exists()
    assert not fam.member_dir(spec["code"], TINY_RECIPE, tmp_path).exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # scratch cleaned up
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(fam, "train_specialist", lambda *a, **k: calls.append(a[1].name) or original(*a, **k))
    family = build_family(tmp_path, recipe=TINY_RECIPE, base_dir=Path(tiny_family["base"]), device="cpu",
                          progress=False)
    assert calls == ["code", "knowledge"]  # math was complete and is reused; code is rebuilt
    assert all((family.members[n] / "model.safetensors").exists() for n in ("math", "code", "knowledge"))


def _explode(*args, **kwargs):
    raise KeyboardInterrupt("interrupted while saving")


@pytest.mark.slow
def test_gguf_file_is_a_source_and_matches_its_conversion():
    from evomerge.demo.smollm2 import ensure_base, gguf_path
    from evomerge.engine import MergeEngine

    engine = MergeEngine([str(gguf_path()), str(ensure_base())], device="cpu", dtype="float32", progress=False)
    for name in ("model.embed_tokens.weight", "model.layers.7.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(engine.source_tensor(str(gguf_path()), name), engine.source_tensor(str(ensure_base()), name))


@pytest.mark.slow
def test_the_demo_family_builds_to_the_same_bytes_with_1_and_2_threads(tmp_path, monkeypatch):
    """Same recipe, same weights, whatever the core count: the family is built from scratch (GGUF
    conversion included) in two empty caches, with 1 and with 2 threads, and the manifests'
    weight hashes are compared (~30 minutes on 2 cores: the 1-thread build is the slow one)."""
    from evomerge.device import use_threads

    before = torch.get_num_threads()
    hashes = {}
    try:
        for threads in (1, 2):
            monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / f"cache-{threads}"))
            use_threads(threads)
            manifest = build_family(progress=False).manifest
            hashes[threads] = {"base": manifest["base"]["weights_sha256"],
                               **{name: m["weights_sha256"] for name, m in manifest["members"].items()}}
    finally:
        use_threads(before)
    assert set(hashes[1]) == {"base", "math", "code", "knowledge"}
    assert hashes[1] == hashes[2]
