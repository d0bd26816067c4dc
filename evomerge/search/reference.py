"""The space.yaml reference, generated from the schema (`SpaceConfig`) so it cannot drift:

    python -m evomerge.search.reference > docs/space-reference.md

Every field of the schema, nested ones included, with its type and default, and one line from
DESCRIPTIONS below; a field the schema gains without a line here fails the test that regenerates
the committed file (tests/test_search.py).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Iterator

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

DESCRIPTIONS = {
    "name": "study name (default: the file's name); names the results folder and the study",
    "models": "the fine-tunes: local folders, .gguf files, `model+adapter`, Hugging Face ids or `demo-family:<member>`",
    "models.name": "what the recipe, plots and tables call the model",
    "models.path": "where it is (relative to this file)",
    "base_model": "the shared base: a name in `models` or a path; needed by task-vector methods",
    "methods": "merge method(s) searched, one sampler per method (docs/methods.md)",
    "parameters": "search ranges by parameter (`density`) or for one method (`ties.density`)",
    "parameters.low": "lower end of the range",
    "parameters.high": "upper end of the range",
    "parameters.log": "sample on a log scale",
    "layer_schedule": "control points per parameter over the layers (1: one global value)",
    "filters": "separate schedules for self_attn and mlp weights",
    "stacking": "layer stacking: `slots` output blocks of `block` layers, each from any source's layer range",
    "stacking.slots": "output blocks",
    "stacking.block": "layers per block",
    "tasks": "what the search scores (the search split)",
    "tasks.task": "any lm-eval task: built-in, in `task_paths`, or lm-eval's registry (README, Your own benchmark)",
    "tasks.metric": "accuracy (the task's first metric), gold_loglik, or any metric the task declares",
    "tasks.filter": "the lm-eval filter the metric is read through (default: the task's)",
    "tasks.weight": "weight in the weighted-sum objective",
    "tasks.size": "items scored per trial (a group: per task)",
    "tasks.num_fewshot": "few-shot exemplars per prompt",
    "tasks.max_gen_toks": "cap on generated tokens (generation tasks)",
    "tasks.subjects": "subsets to keep, for tasks that have them (MMLU subjects)",
    "heldout": "what the winner and every source are scored on at the end (default: each search task by accuracy)",
    "heldout.task": "as tasks.task",
    "heldout.metric": "as tasks.metric (default accuracy)",
    "heldout.filter": "as tasks.filter",
    "heldout.size": "held-out items",
    "heldout.num_fewshot": "as tasks.num_fewshot",
    "heldout.max_gen_toks": "as tasks.max_gen_toks",
    "heldout.subjects": "as tasks.subjects",
    "task_paths": "folders of your own lm-eval task YAMLs (relative to this file), searched first",
    "objective": "weighted_sum (one value) or multi (one per task, a Pareto front)",
    "winner": "with objective: multi, the Pareto-front trial called the winner: mean (best mean) or a task's name",
    "sampler": "one of evomerge.search.sampler.SAMPLERS (the table below; default cmaes, nsga2 with objective: multi)",
    "n_trials": "trial budget (n_trials or timeout is required, except for soups)",
    "timeout": "seconds the search may run",
    "seed": "seeds the samplers, the random-drop methods and which items form each split",
    "threads": "CPU threads for torch and tokenizers (default: the cores available; --threads)",
    "device": "cpu, cuda, cuda:N or auto",
    "dtype": "dtype the sources are held and merged in",
    "out_dtype": "dtype of the merged model (default: dtype)",
    "tokenizer_source": "output vocabulary when vocabularies differ: base, union or a model (mergekit's setting)",
    "tokenizer": "mergekit's tokenizer block (source, tokens, pad_to_multiple_of); not with tokenizer_source",
    "tokenizer.source": "base, union or a model",
    "tokenizer.tokens": "per-token embedding sources: {token: {source, force}}",
    "tokenizer.pad_to_multiple_of": "pad the vocabulary to a multiple of this",
    "tokenizer.tokens.source": "a model (its row for the token), {kind: model_token, model, token or token_id} or {kind: zero}",
    "tokenizer.tokens.source.kind": "model_token or zero",
    "tokenizer.tokens.source.model": "the model lending the row",
    "tokenizer.tokens.source.token": "the token whose row it lends",
    "tokenizer.tokens.source.token_id": "or that row's id",
    "tokenizer.tokens.force": "apply the source to every model, even those that have the token",
    "mergekit_exact": "merge with mergekit 0.1.5's arithmetic (bit for bit with mergekit-yaml)",
    "batch_size": "evaluation batch size (auto: largest that fits on a GPU, 8 on a CPU)",
    "apply_chat_template": "prompts through the model's chat template: auto (when it has one), true or false",
    "placement": "where the sources live: auto, device, host or disk (the memory plan)",
    "device_memory": "memory the plan may use on the device, e.g. 80GB (default: its free memory)",
    "host_memory": "host memory the plan may use (default: the free memory)",
    "storage": "Optuna storage URL (default: SQLite in the results folder; PostgreSQL for many workers)",
    "pruning": "stop weak trials after a first rung of every task",
    "pruning.enabled": "prune at all",
    "pruning.first_rung": "fraction of every task's items scored first",
    "pruning.quantile": "pruned when the first rung is below this quantile of the others'",
    "pruning.min_trials": "trials through the first rung before anything is pruned",
    "results_dir": "where results/<study> folders go, relative to this file",
    "moe": "search mixtures of experts instead of merges (README, Mixtures of experts)",
    "moe.experts": "names in `models`, or {name, recipe} for an expert that is a merge",
    "moe.experts.name": "the expert's name",
    "moe.experts.recipe": "a mergekit recipe naming models by their names in `models`",
    "moe.count": "experts per candidate, a subset chosen per trial (default: all)",
    "moe.count.low": "fewest",
    "moe.count.high": "most",
    "moe.experts_per_token": "experts each token is routed to: a number or {low, high}",
    "moe.experts_per_token.low": "fewest",
    "moe.experts_per_token.high": "most",
    "moe.gate_mode": "hidden, cheap_embed, random, uniform_random, ... (one or a list searched)",
    "moe.prompts": "the pool of prompt sets; each expert's own set is named after it",
    "moe.prompts.positive": "prompts that route to the expert",
    "moe.prompts.negative": "prompts that route away from it",
    "moe.shared": "a name in `models`: a shared expert every token passes through (Qwen MoE needs one)",
    "moe.gate_scale": "a searched scale on each expert's router row",
    "moe.gate_scale.points": "control points over the layers",
    "moe.gate_scale.low": "smallest scale",
    "moe.gate_scale.high": "largest scale",
    "moe.gate_scale.log": "sample on a log scale",
    "moe.architecture": "output architecture: mixtral, qwen or qwen3 (default: as mergekit-moe chooses)",
    "warm_start": "a new study's first trials: true (each source alone, the uniform soup) or a mapping; CMA-ES starts from the best",
    "warm_start.sources": "each source alone",
    "warm_start.uniform_soup": "every source, equal weights",
    "warm_start.recipes": "recipe files of your own (relative to this file; models by their names in models)",
    "compare": "more rows for the held-out table: name -> a recipe or MoE config file (relative to this file)",
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    found = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.append(annotation)
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted name, type, default) of every field, nested models' fields after their own."""
    for name, info in model.model_fields.items():
        if info.is_required():
            default = "required"
        elif info.default is not PydanticUndefined:
            default = "—" if info.default is None else str(info.default).lower() if isinstance(info.default, bool) \
                else str(info.default)
        else:
            default = str(info.default_factory())
        yield f"{prefix}{name}", _type(info.annotation), default
        for sub in dict.fromkeys(_models_in(info.annotation)):
            yield from fields(sub, f"{prefix}{name}.")


def render() -> str:
    from evomerge.search.space import SpaceConfig

    rows = []
    for name, kind, default in dict.fromkeys(fields(SpaceConfig)):
        if name not in DESCRIPTIONS:
            raise KeyError(f"space.yaml field {name!r} has no line in evomerge.search.reference.DESCRIPTIONS")
        rows.append(f"| `{name}` | {kind.replace('|', '&#124;')} | {default.replace('|', '&#124;')} | "
                    f"{DESCRIPTIONS[name].replace('|', '&#124;')} |")
    return ("# space.yaml reference\n\nEvery field `evomerge search` reads, generated from the schema "
            "(`python -m evomerge.search.reference > docs/space-reference.md`). Nested fields are dotted; a field "
            "of a list's entries (`tasks.metric`) applies to each entry. Unknown fields are refused by name.\n\n"
            "| field | type | default | what it does |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
            + _sampler_table())


def _sampler_table() -> str:
    from evomerge.search.sampler import SAMPLERS

    yes = {True: "yes", False: "no"}
    rows = [f"| `{name}` | {entry.help} | {yes[entry.multi_objective]} | {yes[entry.parallel]} | {yes[entry.prunable]} |"
            for name, entry in SAMPLERS.items()]
    return ("\n## Samplers\n\n`sampler:` (or `--sampler`) names one of these (`evomerge/search/sampler.py`, "
            "`SAMPLERS`).\n\n| sampler | what it proposes | objective: multi | several workers | pruned trials |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    print(render(), end="")
