"""Published mergekit recipes, tried as a user would: each one mergekit 0.1.5 runs, evomerge accepts,
and `--mergekit-exact` gives mergekit's tensors (bit for bit; in distribution for DARE and DELLA draws).

tests/published_recipes/ holds real configs from model cards, mergekit's examples and merge guides,
as published (each file names its source and the architecture and layer count of its models). Each
is mapped onto tiny random models of that architecture and layer count — every model reference
to a fine-tune of one tiny base, the recipe's base_model to the base, `model+adapter` to a tiny
LoRA adapter — and merged by both tools. A recipe mergekit refuses must be refused by evomerge too,
with an error that names the problem (such files say why in a `# refused:` line).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe
from tests.conftest import run_mergekit

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.oracle]

CORPUS = sorted((Path(__file__).parent / "published_recipes").glob("*.yaml"))
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
_ARCH = re.compile(r"(\w+), (\d+) layers(, tied embeddings)?")


def _architectures(text: str) -> tuple[tuple, dict[str, tuple]]:
    """`# architecture: llama, 32 layers[, tied embeddings][; MODEL: arch, N layers ...]`."""
    line = next(x for x in text.splitlines() if x.startswith("# architecture:"))
    default, *others = line.split(":", 1)[1].split(";")
    parse = lambda spec: (lambda m: (m[1], int(m[2]), bool(m[3])))(_ARCH.search(spec))  # noqa: E731
    overrides = {}
    for other in others:
        name, spec = other.split(":", 1)
        overrides[name.strip()] = parse(spec)
    return parse(default), overrides


class _Families:
    """Tiny families by (architecture, layers, tied), built once per test session, with adapters."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[tuple, list[str]] = {}
        self.adapters: dict[str, str] = {}

    def members(self, arch: tuple) -> list[str]:
        if arch not in self.built:
            from evomerge.demo.tiny import build_tiny_arch_family

            kind, layers, tied = arch
            paths = build_tiny_arch_family(self.root / f"{kind}-{layers}{'-tied' if tied else ''}", kind, layers,
                                           members=7, tie_word_embeddings=tied)
            self.built[arch] = [str(p) for p in paths]
        return self.built[arch]

    def adapter(self, base: str) -> str:
        if base not in self.adapters:
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            torch.manual_seed(len(self.adapters))
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                   LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False))
            folder = Path(base).parent / f"{Path(base).name}-lora"
            model.save_pretrained(folder)
            self.adapters[base] = str(folder)
        return self.adapters[base]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return _Families(tmp_path_factory.mktemp("published"))


def _mapped(text: str, families: _Families) -> dict:
    """The recipe with every model reference replaced by a tiny model of its architecture."""
    data = yaml.safe_load(text)
    arch, overrides = _architectures(text)
    names: dict[str, str] = {}
    used: dict[tuple, int] = {}

    def tiny(ref: str, *, base: bool = False) -> str:
        ref = str(ref)
        if "+" in ref:  # mergekit's model+adapter
            model, _, _adapter = ref.partition("+")
            mapped = tiny(model, base=base)
            return f"{mapped}+{families.adapter(mapped)}"
        if ref not in names:
            kind = overrides.get(ref, arch)
            members = families.members(kind)
            if base:
                names[ref] = members[0]
            else:
                used[kind] = used.get(kind, 0) + 1
                names[ref] = members[used[kind]]
        return names[ref]

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("model", "base_model") and isinstance(value, str):
                    continue
                walk(value)
            for key in ("model", "base_model"):
                if isinstance(node.get(key), str):
                    node[key] = tiny(node[key], base=key == "base_model")
            if isinstance(node.get("source"), str) and node["source"] not in ("base", "union"):
                node["source"] = tiny(node["source"])
        elif isinstance(node, list):
            for item in node:
                walk(item)

    if isinstance(data.get("base_model"), str):
        data["base_model"] = tiny(data["base_model"], base=True)
    for slice_ in data.get("slices") or []:
        if isinstance(slice_.get("base_model"), str):
            slice_["base_model"] = tiny(slice_["base_model"], base=True)
    walk(data)
    source = data.get("tokenizer_source")
    if isinstance(source, str) and source not in ("base", "union"):
        data["tokenizer_source"] = tiny(source)
    return data


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _as_loaded(folder: Path) -> dict[str, torch.Tensor]:
    """The model's parameters as transformers loads them (for checkpoints saved under other names:
    mergekit writes Mixtral's fused expert tensors, evomerge the published per-expert ones)."""
    from transformers import AutoModelForCausalLM

    return {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(folder, dtype="auto").state_dict().items()}


def _base_state(recipe: dict) -> dict[str, torch.Tensor]:
    base = str(recipe.get("base_model") or "").partition("+")[0]
    return _state(Path(base)) if base else {}


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_published_recipe(path, families, tmp_path):
    text = path.read_text()
    recipe_data = _mapped(text, families)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    from evomerge.engine import merge_to_checkpoint

    refused = "\n# refused:" in text  # the file says why mergekit refuses it as published
    try:
        theirs = run_mergekit(recipe_file, tmp_path / "mergekit")
    except Exception:
        assert refused, "mergekit refuses a recipe the corpus says it runs"
        with pytest.raises(EvomergeError) as ours:  # so must evomerge, with a one-line reason
            merge_to_checkpoint(Recipe.load(recipe_file), tmp_path / "evomerge", device="cpu", progress=False,
                                mergekit_exact=True)
        assert "\n" not in str(ours.value), str(ours.value)
        return
    assert not refused, "mergekit runs a recipe the corpus says it refuses"

    out = merge_to_checkpoint(Recipe.load(recipe_file), tmp_path / "evomerge", device="cpu", progress=False,
                              mergekit_exact=True)
    ours = _state(out)
    if set(ours) != set(theirs):
        ours, theirs = _as_loaded(out), _as_loaded(tmp_path / "mergekit")
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:5]
    method = recipe_data["merge_method"]
    densities = re.findall(r"density: *([0-9.]+)", text)
    drops = method in RANDOM_METHODS and (not densities or any(float(d) < 1 for d in densities))
    if not drops:
        for name, expected in theirs.items():
            got = ours[name]
            differ = int((got.view(-1) != expected.to(got.dtype).view(-1)).sum())
            assert differ == 0, f"{name}: {differ} of {got.numel()} entries differ from mergekit"
        return
    # Random drops: both keep the same fraction of each delta and the same L1 mass (rescaled).
    base = _base_state(recipe_data)
    kept = {}
    for tool, state in (("ours", ours), ("theirs", theirs)):
        changed = total = l1 = 0.0
        for name, tensor in state.items():
            if name in base:
                delta = tensor.float() - base[name].float()
                changed += int((delta != 0).sum())
                total += delta.numel()
                l1 += float(delta.abs().sum())
        kept[tool] = (changed / total, l1)
    assert abs(kept["ours"][0] - kept["theirs"][0]) < 0.02, kept
    assert abs(kept["ours"][1] - kept["theirs"][1]) / kept["theirs"][1] < 0.05, kept


def test_the_corpus_covers_the_methods_mergekit_users_publish():
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in CORPUS}
    assert len(CORPUS) >= 40
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
            "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "arcee_fusion",
            "sce", "nearswap", "passthrough"} <= methods
    assert any("mixtral" in p.read_text().split("\n")[1] for p in CORPUS)
