"""The merge engine: load sources once, materialise recipes into one resident model."""

from __future__ import annotations

import logging
from pathlib import Path

from evomerge.checkpoint import locate
from evomerge.engine.engine import MergeEngine, MergeStats
from evomerge.engine.export import check_output_dir, save_checkpoint
from evomerge.methods import get as get_method
from evomerge.moe import MoEConfig, MoEConfigError
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)

__all__ = ["MergeEngine", "MergeStats", "merge_to_checkpoint", "moe_to_checkpoint", "plan_family", "save_checkpoint"]


def plan_family(
    refs: list[str],
    *,
    base_model: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    out_dtype: str | None = None,
    mergekit_exact: bool = False,
    mapped_vocab: bool = False,
    placement: str = "auto",
    device_memory: int | str | None = None,
    host_memory: int | str | None = None,
    evaluation: tuple[int, int] | None = None,
    output_layers: int | None = None,
    delta_cache: bool | str = "auto",
):
    """The memory plan MergeEngine would make for these sources, without reading a weight: from their
    configs (models whose weights are not on this machine are planned from a cached config.json), for
    `device` whether or not it is here (an absent one needs `device_memory`; auto: what the engine would
    pick on this machine)."""
    import torch

    from evomerge.checkpoint import locate_for_plan
    from evomerge.device import target_device
    from evomerge.engine.engine import plan_sources, resolve_dtypes

    refs = list(dict.fromkeys([*([base_model] if base_model else []), *refs]))
    located = {ref: locate_for_plan(ref) for ref in refs}
    sources = {ref: source for ref, (source, _) in located.items()}
    reference = base_model or refs[0]
    target = target_device(device)
    plan = plan_sources(
        sources, reference=reference, device=target, present=target.type != "cuda" or torch.cuda.is_available(),
        dtypes=resolve_dtypes(sources[reference], dtype, out_dtype, mergekit_exact), mergekit_exact=mergekit_exact,
        base=base_model, delta_cache=delta_cache, placement=placement, device_memory=device_memory,
        host_memory=host_memory, mapped_vocab=mapped_vocab, output_layers=output_layers, evaluation=evaluation)
    absent = [ref for ref, (_, here) in located.items() if not here]
    if absent:
        plan.notes.append(f"weights not on this machine, planned from their configs as safetensors: {', '.join(absent)}")
    return plan


def merge_to_checkpoint(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "auto",
    seed: int = 0,
    allow_bin: bool = False,
    progress: bool = True,
    card: str = "",
    gguf: list[str] | tuple[str, ...] = (),
    mergekit_exact: bool = False,
    placement: str = "auto",
    device_memory: int | str | None = None,
    host_memory: int | str | None = None,
    names: dict[str, str] | None = None,
) -> Path:
    """`mergekit-yaml` equivalent: merge a recipe and write a Hugging Face checkpoint (`card`: more
    Markdown for its model card; `gguf`: GGUF types to write beside it, checked before merging;
    `mergekit_exact`: mergekit 0.1.5's arithmetic, so the tensors are mergekit's bit for bit; `placement`,
    `device_memory`, `host_memory`: where the sources live, see evomerge.engine.memory; `names`: how the
    model card names models, e.g. a search's `demo-family:math`)."""
    from evomerge.engine.gguf import check_config, check_types

    gguf = check_types(gguf)
    check_output_dir(out_dir, [locate(ref, allow_bin=allow_bin).path for ref in recipe.referenced_models()])
    donor = locate(recipe.base_model or recipe.referenced_models()[0], allow_bin=allow_bin)
    if recipe.vocabulary() is None and (donor.gguf_file is not None or donor.tokenizer_dir() is not None):
        donor.tokenizer()  # the tokenizer the checkpoint carries loads, or one line naming the model, before merging
    engine = MergeEngine(
        recipe.referenced_models(),
        base_model=recipe.base_model,
        device=device,
        dtype=recipe.dtype,
        out_dtype=recipe.out_dtype,
        allow_bin=allow_bin,
        delta_cache=False,  # one recipe: caching task vectors would only cost memory
        tokenizer=recipe.vocabulary(),  # the output vocabulary, built (or refused) before anything is merged
        mergekit_exact=mergekit_exact,
        placement=placement,
        device_memory=device_memory,
        host_memory=host_memory,
        progress=progress,
    )
    if mergekit_exact:
        card = ("\nMerged with mergekit 0.1.5's arithmetic (`--mergekit-exact`): the tensors mergekit-yaml "
                "writes for this recipe" + (", but for the random draws" if get_method(recipe.merge_method).random else "")
                + ".\n" + card)
    if gguf:
        check_config(engine.sources[recipe.base_model or recipe.referenced_models()[0]].config, "the merged model")
    model = engine.materialize(recipe, seed=seed, progress=progress)
    return save_checkpoint(model, recipe, engine.sources, out_dir, card, gguf=gguf, progress=progress,
                           vocabulary=engine.vocabulary, names=names)


def moe_to_checkpoint(config: MoEConfig, out_dir: str | Path, *, device: str = "auto", seed: int = 0,
                      allow_bin: bool = False, progress: bool = True, placement: str = "auto",
                      device_memory: int | str | None = None, host_memory: int | str | None = None,
                      card: str = "") -> Path:
    """`mergekit-moe CONFIG OUT` equivalent: the MoE built in memory (as a search builds its
    candidates), then saved with the base's tokenizer, the config and a model card. The sources are
    held in their stored dtype (or the expert recipes' dtype) and the MoE is cast to `dtype` (default: the
    base config's) last."""
    from evomerge.engine.export import MOE_MARKER, copy_tokenizer, moe_card
    from evomerge.engine.moe import MoEBuilder, check_inputs, config_dtype
    from evomerge.paths import atomic_directory

    refs = config.referenced_models()
    sources = {ref: locate(ref, allow_bin=allow_bin) for ref in refs}
    check_inputs(config, sources)  # before anything loads: a wrong expert is named by its field
    out = check_output_dir(out_dir, [s.path for s in sources.values()])
    # the sources are held as the expert recipes merge them (in their dtype), else as stored
    asked = {(where, e.recipe.dtype) for where, e in config.all_experts() if e.recipe is not None and e.recipe.dtype}
    if len({dtype for _, dtype in asked}) > 1:
        where = sorted(asked)[-1][0]
        raise MoEConfigError(f"{where}.recipe.dtype: the expert recipes ask for different dtypes "
                             f"({', '.join(sorted({d for _, d in asked}))}); they share one set of sources")
    engine = MergeEngine(refs, base_model=config.base_model, device=device,
                         dtype=next(iter(asked))[1] if asked else None,
                         out_dtype=config.dtype or config_dtype(sources[config.base_model]), allow_bin=allow_bin,
                         delta_cache=False, placement=placement, device_memory=device_memory,
                         host_memory=host_memory, progress=progress)
    builder = MoEBuilder(engine)
    model = builder.materialize(config, seed=seed, progress=progress)
    with atomic_directory(out) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        copy_tokenizer(engine.sources[config.base_model], scratch)
        config.save(scratch / MOE_MARKER)
        (scratch / "README.md").write_text(moe_card(config, out.name, builder.architecture.name, seed) + card,
                                           encoding="utf-8")
    log.info("wrote %s (%s, %d experts, %d per token)", out, builder.architecture.name, len(config.experts),
             config.experts_per_token)
    return Path(out_dir)
