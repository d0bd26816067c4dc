"""Shared fixtures: the tiny random Llama family, and mergekit as the oracle."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, str]:
    """base + ft_math, ft_code, ft_knowledge: 4 layers, untied lm_head. Absolute paths."""
    from evomerge.demo.tiny import build_tiny_family

    paths = build_tiny_family(tmp_path_factory.mktemp("tiny_family"), seed=0)
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="session")
def tiny_family_tied(tmp_path_factory) -> dict[str, str]:
    from evomerge.demo.tiny import build_tiny_family

    paths = build_tiny_family(tmp_path_factory.mktemp("tiny_family_tied"), seed=1, layers=3, tie_word_embeddings=True)
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="session")
def tiny_engine(tiny_family):
    from evomerge.engine import MergeEngine

    return MergeEngine(
        [tiny_family[k] for k in ("base", "ft_math", "ft_code", "ft_knowledge")],
        base_model=tiny_family["base"],
        device="cpu",
        progress=False,
    )


# Records every file opened for writing and every directory or file made, moved or removed: `writes`,
# a list of (event, path); installed by the script that embeds it with sys.addaudithook(hook).
WRITE_AUDIT_HOOK = r"""
writes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS):
            if path not in (None, "/dev/null") and not str(path).startswith("/proc/"):
                writes.append((event, str(path)))
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.copyfile",
                   "shutil.rmtree", "os.symlink", "os.link"):
        writes.append((event, str(args[0])))
"""


def oracle(module: str = "mergekit.merge"):
    """A module of mergekit, the oracle. Without it the test is skipped, except under CI=true, where
    a missing oracle fails: a green CI must mean every method was compared with mergekit."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{module} is missing: CI runs the oracle tests (pip install -e '.[test]')", pytrace=False)
        pytest.skip("mergekit (the oracle) is a test extra: pip install -e '.[test]'")


def run_mergekit(recipe_file: Path, out_dir: Path, seed: int | None = None) -> dict[str, torch.Tensor]:
    """What `mergekit-yaml recipe_file out_dir [--random-seed seed]` computes, in-process."""
    mergekit_merge = oracle("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_file.read_text()))
    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=seed,
                           lora_merge_cache=str(out_dir.parent / "mergekit_lora_cache"))
    mergekit_merge.run_merge(config, str(out_dir), options)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server: $EVOMERGE_TEST_POSTGRES_URL (what .ci/run starts), else a throwaway
    one started here with Debian's postgresql binaries, else the test is skipped with the reason."""
    import socket
    import subprocess

    url = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("needs PostgreSQL: apt-get install postgresql (CI installs and starts it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = subprocess.run([str(REPO / ".ci" / "postgres")], capture_output=True, text=True,
                             env={**os.environ, "PGPORT_EVOMERGE": str(port)})
    if started.returncode != 0:
        pytest.skip(f"could not start PostgreSQL: {started.stderr.strip()[-300:]}")
    url, directory = started.stdout.split()
    yield url
    subprocess.run([str(REPO / ".ci" / "postgres"), "stop", directory], capture_output=True)


# ----------------------------------------------------------------------------- shared helpers


def recipe_text(template: str, family: dict[str, str]) -> str:
    return textwrap.dedent(template).format(
        base=family["base"], math=family["ft_math"], code=family["ft_code"], know=family["ft_knowledge"]
    )


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], rel: float) -> None:
    assert set(theirs) <= set(ours), f"missing tensors: {sorted(set(theirs) - set(ours))[:5]}"
    for name, expected in theirs.items():
        got = ours[name].to(expected.dtype)
        assert got.shape == expected.shape, name
        scale = expected.abs().max().clamp(min=1e-12)
        error = ((got - expected).abs().max() / scale).item()
        assert error <= rel, f"{name}: relative error {error:.3g} > {rel:g}"


def delta_statistics(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, float]:
    changed = total = l1 = 0.0
    for name, tensor in merged.items():
        if name not in base:
            continue
        delta = tensor.float() - base[name].float()
        changed += (delta != 0).sum().item()
        total += delta.numel()
        l1 += delta.abs().sum().item()
    return {"kept": changed / total, "l1": l1}


def tiny_space(family: dict[str, str], tmp: Path, **overrides) -> dict:
    space = {
        "name": "tiny",
        "models": [{"name": "math", "path": family["ft_math"]}, {"name": "code", "path": family["ft_code"]},
                   {"name": "know", "path": family["ft_knowledge"]}],
        "base_model": family["base"],
        "methods": ["task_arithmetic"],
        "tasks": [{"task": "gsm8k", "metric": "gold_loglik", "size": 4},
                  {"task": "mmlu", "metric": "gold_loglik", "size": 6}],
        "heldout": [{"task": "mmlu", "metric": "accuracy", "size": 4}, {"task": "gsm8k", "metric": "gold_loglik", "size": 3}],
        "n_trials": 6,
        "dtype": "float32",
        "pruning": {"min_trials": 3},
        "results_dir": str(tmp / "results"),
    }
    space.update(overrides)
    return space


def write_yaml(space: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path
