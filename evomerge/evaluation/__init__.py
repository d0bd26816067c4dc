"""Evaluation: any lm-eval task (evomerge's GSM8K, MMLU and HumanEval built in) on a model held in
memory, offline."""

from __future__ import annotations

from evomerge.evaluation.catalog import ACCURACY, GOLD, TaskCatalog
from evomerge.evaluation.harness import Evaluator, Scores, TaskRequest, dataset_split, runs_generated_code, task_items

__all__ = ["ACCURACY", "GOLD", "Evaluator", "Scores", "TaskCatalog", "TaskRequest", "dataset_split", "load_model", "task_items",
           "runs_generated_code"]


def load_model(ref: str, *, device: str = "auto", dtype: str | None = None):
    """(model, tokenizer) from a recipe-style reference: directory, .gguf file or cached hub id."""
    from transformers import AutoModelForCausalLM

    from evomerge.checkpoint import locate
    from evomerge.device import parse_dtype, resolve_device

    source = locate(ref)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    torch_dtype = parse_dtype(dtype) or source.stored_dtype()
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, **kwargs)
    model.to(resolve_device(device)).eval()
    return model, source.tokenizer()
