"""The memory planner and the placement tiers: bit-identical merges whatever the tier, resident memory
bounded on the disk tier, byte counts that match what is allocated, and errors that say what fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge.engine import MergeEngine, memory, plan_family
from evomerge.errors import DoesNotFit
from evomerge.recipe import Recipe
from tests.conftest import REPO

RECIPES = {
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - {{model: {math}, parameters: {{weight: 0.7}}}}\n  - {{model: {code}, parameters: {{weight: 0.4}}}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
            "  - {{model: {code}, parameters: {{weight: 0.4, density: 0.7}}}}\n"
            "  - {{model: {know}, parameters: {{weight: 0.5, density: 0.3}}}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                 "  - {{model: {math}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
                 "  - {{model: {code}, parameters: {{weight: 0.4, density: 0.7}}}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {math}\n"
             "parameters: {{t: [0.2, 0.8]}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n"
                   "  - model: {math}\n  - model: {code}\n  - model: {know}\n",
    "linear": "merge_method: linear\nmodels:\n  - {{model: {math}, parameters: {{weight: 1.0}}}}\n"
              "  - {{model: {know}, parameters: {{weight: 2.0}}}}\n",
}


def _recipe(name: str, family: dict[str, str]) -> Recipe:
    return Recipe.from_yaml(RECIPES[name].format(base=family["base"], math=family["ft_math"],
                                                 code=family["ft_code"], know=family["ft_knowledge"]))


def _bf16_family(family: dict[str, str], out: Path) -> dict[str, str]:
    """The tiny family stored in bfloat16: the disk tier then hands out views of the mapped files."""
    import shutil

    from safetensors.torch import load_file, save_file

    copies = {}
    for name, path in family.items():
        target = out / name
        shutil.copytree(path, target)
        for file in target.glob("*.safetensors"):
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file, metadata={"format": "pt"})
        config = json.loads((target / "config.json").read_text())
        config["dtype"] = "bfloat16"
        (target / "config.json").write_text(json.dumps(config))
        copies[name] = str(target)
    return copies


@pytest.fixture(scope="module")
def families(tiny_family, tmp_path_factory):
    return {"float32": tiny_family, "bfloat16": _bf16_family(tiny_family, tmp_path_factory.mktemp("bf16"))}


def _engine(family, dtype, device="cpu", **kwargs) -> MergeEngine:
    refs = [family[k] for k in ("base", "ft_math", "ft_code", "ft_knowledge")]
    return MergeEngine(refs, base_model=family["base"], device=device, dtype=dtype, progress=False, **kwargs)


@pytest.mark.parametrize("stored, dtype", [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "float32"),
                                           ("bfloat16", "bfloat16")])
def test_every_tier_gives_the_device_tiers_bits(families, stored, dtype):
    """host, disk, and auto under a budget that leaves only the base on the device: the same tensors,
    bit for bit, as every source resident (float32 and bfloat16 files, converted or not). Host tensors
    and read buffers are fresh allocations for this: kept as safetensors hands them out (unaligned),
    slerp's dot products round differently (checked by hand)."""
    family = families[stored]
    device = _engine(family, dtype, placement="device")
    assert set(device.memory_plan.tiers.values()) == {"device"}
    per_source = device.memory_plan.needs.sources[0].bytes
    needs = device.memory_plan.needs
    fixed = needs.model + needs.scratch + needs.read_buffers
    budget = int((fixed + 1.5 * per_source) / memory.USABLE_FRACTION)  # room for the base and half a source
    others = {
        "host": _engine(family, dtype, placement="host"),
        "disk": _engine(family, dtype, placement="disk"),
        "auto": _engine(family, dtype, device_memory=budget),
    }
    assert set(others["host"].memory_plan.tiers.values()) == {"host"}
    assert set(others["disk"].memory_plan.tiers.values()) == {"disk"}
    auto = others["auto"].memory_plan.tiers
    assert auto[family["base"]] == "device" and sorted(auto.values()) == ["device", "disk", "disk", "disk"], auto
    assert others["disk"].source_bytes == 0 and others["host"].store.resident_bytes["host"] == 4 * per_source
    for name in RECIPES:
        recipe = _recipe(name, family)
        expected = {k: v.clone() for k, v in device.materialize(recipe, seed=3).state_dict().items()}
        for tier, engine in others.items():
            got = engine.materialize(recipe, seed=3).state_dict()
            different = [k for k in expected if not torch.equal(expected[k], got[k])]
            assert not different, (name, tier, different[:3])


def test_the_task_vector_cache_does_not_change_bfloat16_merges(families):
    """The cache holds task vectors in the compute dtype (float32): with it or without it (a plan with
    no room for it, or sources off the device) a bfloat16 merge is the same."""
    family = families["bfloat16"]
    cached = _engine(family, "bfloat16", delta_cache=True)
    uncached = _engine(family, "bfloat16", delta_cache=False)
    recipe = _recipe("ties", family)
    a = cached.materialize(recipe).state_dict()
    assert cached.memory_plan.cache and cached._delta_base == family["base"]
    b = uncached.materialize(recipe).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_planner_byte_counts_match_what_is_allocated(tiny_family):
    """From the configs alone, the planner counts the bytes the engine then allocates: the sources,
    the resident model and the task-vector cache exactly; the evaluation KV cache exactly against the
    cache transformers builds; scratch as an upper bound of the workspace a TIES merge keeps."""
    engine = _engine(tiny_family, "float32", delta_cache=True, evaluation=(2, 48))
    plan, needs = engine.memory_plan, engine.memory_plan.needs
    model = engine.materialize(_recipe("ties", tiny_family))
    assert sum(s.bytes for s in needs.sources) == engine.source_bytes
    assert needs.model == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.cache and needs.cache == sum(t.numel() * t.element_size() for t in engine._deltas.values())
    workspace = sum(b.numel() * b.element_size() for b in engine.workspace._buffers.values())
    assert 0 < workspace <= needs.scratch
    with torch.no_grad():
        output = model(torch.ones(2, 48, dtype=torch.long), use_cache=True)
    cache = output.past_key_values
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert needs.evaluation["kv_cache"] == kv
    # a dry plan (nothing loaded) counts the same
    dry = plan_family(engine.refs, base_model=tiny_family["base"], device="cpu", dtype="float32",
                      evaluation=(2, 48), delta_cache=True)
    assert dry.needs == needs and dry.tiers == plan.tiers


@pytest.mark.slow
def test_planner_byte_counts_on_the_demo_family():
    """The same counts on the real demo family (SmolLM2-135M, tied embeddings, bfloat16)."""
    from evomerge.demo.family import build_family

    family = build_family(progress=False)
    refs = [str(p) for p in family.members.values()]  # the base first
    engine = MergeEngine(refs, base_model=refs[0], device="cpu", dtype="bfloat16", delta_cache=True,
                         evaluation=(2, 64), progress=False)
    needs = engine.memory_plan.needs
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": refs[0], "dtype": "bfloat16",
                               "models": [{"model": r, "parameters": {"weight": 0.5, "density": 0.5}} for r in refs[1:]]})
    model = engine.materialize(recipe)
    assert sum(s.bytes for s in needs.sources) == engine.source_bytes
    assert needs.model == sum(p.numel() * p.element_size() for p in model.parameters())
    assert needs.cache == sum(t.numel() * t.element_size() for t in engine._deltas.values())
    with torch.no_grad():
        cache = model(torch.ones(2, 64, dtype=torch.long), use_cache=True).past_key_values
    assert needs.evaluation["kv_cache"] == sum(t.numel() * t.element_size() for layer in cache.layers
                                               for t in (layer.keys, layer.values))


def test_a_budget_too_small_for_the_resident_model_names_the_largest_consumer(tiny_family):
    """Half of the resident model's bytes: nothing can fit; the error names the largest of what the device
    must hold whatever the placement (here the merge scratch: the tiny family's embedding is most of it)."""
    needs = _engine(tiny_family, "float32", placement="device").memory_plan.needs
    fixed = {"the resident model": needs.model, "merge scratch": needs.scratch}
    largest = max(fixed, key=fixed.get)
    with pytest.raises(DoesNotFit, match=rf"the largest consumer is {largest} \(.*\): a device with at least .* free"):
        _engine(tiny_family, "float32", device_memory=needs.model // 2)
    # evaluation the largest: the error offers a batch size, and that batch size fits the same budget
    engine = _engine(tiny_family, "float32", placement="device")
    config = engine.sources[tiny_family["base"]].config
    at_4 = sum(memory.evaluation_bytes(config, torch.float32, 4, 1024, "cpu").values())
    budget = int((needs.model + needs.scratch + 4 * needs.sources[0].bytes + at_4) / memory.USABLE_FRACTION) + 2**20
    with pytest.raises(DoesNotFit, match=r"the largest consumer is evaluation .*: batch_size: \d+ would fit") as error:
        _engine(tiny_family, "float32", evaluation=(64, 1024), device_memory=budget)
    batch = int(str(error.value).rsplit("batch_size: ", 1)[1].split()[0])
    assert 4 <= batch < 64
    assert _engine(tiny_family, "float32", evaluation=(batch, 1024), device_memory=budget).memory_plan.needs.evaluation


def test_a_placement_that_does_not_fit_names_one_that_does(tiny_family):
    needs = _engine(tiny_family, "float32", placement="device").memory_plan.needs
    budget = int((needs.model + needs.scratch + 2 * needs.sources[0].bytes) / memory.USABLE_FRACTION)
    with pytest.raises(DoesNotFit, match=r"placement: device\); the largest consumer is sources \(device tier\).*"
                                         r"placement: disk \(--placement disk\) fits"):
        _engine(tiny_family, "float32", placement="device", device_memory=budget)


def test_bad_memory_sizes_name_the_field(tiny_family, tmp_path, capsys):
    from evomerge.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPES["linear"].format(math=tiny_family["ft_math"], know=tiny_family["ft_knowledge"]))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--device-memory", "lots"]) == 2
    assert "device_memory: not a memory size: 'lots'" in capsys.readouterr().err
    if not torch.cuda.is_available():  # planning for a device this machine lacks needs its size
        assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run", "--device", "cuda"]) == 2
        assert "device_memory: cuda is not on this machine" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
              "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}


@pytest.mark.e2e
def test_dry_run_plans_the_mistral_family_for_an_80gb_gpu_without_weights(tmp_path):
    """`evomerge search --dry-run` on the 7B example space, with only the models' config.json in the
    Hugging Face cache: the plan for an 80 GB device prints GB per part, each source's tier and the
    seconds per candidate; no weight exists to be loaded."""
    import yaml

    space = yaml.safe_load((REPO / "search_spaces" / "mistral7b_family.yaml").read_text())
    hub = tmp_path / "hub"
    for repo in [space["base_model"], *(m["path"] for m in space["models"])]:
        folder = hub / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (folder / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps(MISTRAL_7B))
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "evomerge", "search", "--dry-run", "1",
                          str(REPO / "search_spaces" / "mistral7b_family.yaml"), "--device-memory", "80GB",
                          "--host-memory", "256GB"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "memory plan (placement: auto) on cuda:" in out and "of 72.00 GB usable" in out
    # Mistral-7B in bfloat16: 7.24e9 parameters x 2 bytes
    assert "resident model                 14.48 GB" in out
    assert "evaluation kv cache             8.59 GB  (batch 32 x 2048 tokens)" in out  # 2*32*32*2048*8*128*2
    tiers = {line.split()[-1]: line.split()[0] for line in out.splitlines()
             if line.startswith("    ") and line.split()[-1] in {space["base_model"], *(m["path"] for m in space["models"])}}
    assert tiers[space["base_model"]] == "device" and set(tiers.values()) == {"device", "host"}, tiers
    assert "s/candidate (bandwidth bound" in out and "nominal" in out
    assert not (tmp_path / "results").exists()


RSS_SCRIPT = r"""
import json, sys, threading, time
import psutil, torch
torch.set_num_threads(2)
from evomerge.engine import MergeEngine
from evomerge.engine import memory
from evomerge.recipe import Recipe

family, placement, budget = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
process = psutil.Process()
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.001)
from transformers import LlamaForCausalLM  # the output model's code: imported before the baseline
baseline = process.memory_info().rss
thread = threading.Thread(target=sample, daemon=True)
thread.start()
refs = [family[k] for k in ("base", "ft_math", "ft_code", "ft_knowledge")]
engine = MergeEngine(refs, base_model=family["base"], device="cpu", dtype="float32", placement=placement,
                     device_memory=budget, progress=False)
methods = ["task_arithmetic", "ties", "dare_ties"]
for i in range(6):
    recipe = Recipe.from_dict({"merge_method": methods[i % 3], "base_model": family["base"], "dtype": "float32",
        "models": [{"model": r, "parameters": {"weight": 0.4, "density": 0.5}} for r in refs[1:]]})
    engine.materialize(recipe, seed=i)
stop.set(); thread.join()
needs = engine.memory_plan.needs
print(json.dumps({"baseline": baseline, "peak": max(peak[0], process.memory_info().rss),
                  "tiers": engine.memory_plan.tiers, "model": needs.model, "scratch": needs.scratch,
                  "buffers": needs.read_buffers, "sources": sum(s.bytes for s in needs.sources)}))
"""


@pytest.mark.e2e
def test_disk_tier_resident_memory_stays_under_its_bound_for_a_family_larger_than_the_budget(tmp_path):
    """A family of 4 x 172 MB sources under a 350 MB budget: every source goes to the disk tier and
    the process's peak resident memory (psutil, sampled every millisecond) grows by less than the
    bound: the resident model + the planned scratch + the read buffers (two jobs' inputs) + 128 MB of
    allocator slack (glibc keeps freed temporaries below its 32 MB mmap threshold) — not by the
    family's size (690 MB), which the device tier adds. Measured here: ~340 MB of a ~440 MB bound."""
    from evomerge.demo.tiny import build_tiny_family

    family = {k: str(v) for k, v in build_tiny_family(tmp_path / "family", hidden=768, layers=8).items()}
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(family), "auto", str(350_000_000)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report["tiers"].values()) == {"disk"}, report["tiers"]
    assert report["sources"] > 350_000_000  # the family is larger than the budget
    bound = report["model"] + report["scratch"] + report["buffers"] + 128 * 2**20
    growth = report["peak"] - report["baseline"]
    assert growth < bound, (growth / 1e6, bound / 1e6, report)
    assert growth < report["sources"]  # what holding the family resident would add, at the least


@pytest.mark.cuda
def test_cuda_tiers_give_the_device_tiers_bits(tiny_family):
    """On a GPU: the host tier (pinned, copied on a side stream) and the disk tier give the device tier's bits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none on this machine)")
    engines = {p: _engine(tiny_family, "bfloat16", "cuda", placement=p) for p in ("device", "host", "disk")}
    assert engines["host"].store._streamer is not None
    for name in RECIPES:
        recipe = _recipe(name, tiny_family)
        expected = {k: v.clone() for k, v in engines["device"].materialize(recipe, seed=1).state_dict().items()}
        for tier in ("host", "disk"):
            got = engines[tier].materialize(recipe, seed=1).state_dict()
            assert all(torch.equal(expected[k], got[k]) for k in expected), (name, tier)


@pytest.mark.cuda
def test_cuda_plan_counts_match_cuda_allocations(tiny_family):
    """On a GPU: what the engine allocated on the device at load is the plan's sources + resident model."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none on this machine)")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    engine = _engine(tiny_family, "bfloat16", "cuda", delta_cache=False)
    needs = engine.memory_plan.needs
    allocated = torch.cuda.memory_allocated() - before
    expected = sum(s.bytes for s in needs.sources) + needs.model
    assert abs(allocated - expected) <= 0.02 * expected + 2**20, (allocated, expected)


def test_the_memory_plan_text_reads_as_documented():
    """What README's walk-through quotes: parts with GB, tiers per source, the bandwidth bound."""
    needs = memory.Needs(sources=[memory.SourceNeed("base", 10**9), memory.SourceNeed("ft", 10**9, False, "gguf")],
                         model=10**9, scratch=10**8)
    plan = memory.plan_memory(needs, device=torch.device("cuda"), device_budget=int(2.5e9), host_budget=int(10e9),
                              base="base", present=False)
    assert plan.tiers == {"base": "device", "ft": "host"}
    text = plan.render()
    assert "device  resident model                  1.00 GB" in text and "host    sources (host tier)" in text
    assert "\n    device    1.00 GB  base\n    host      1.00 GB  ft\n" in text, text
