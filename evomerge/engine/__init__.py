"""The merge engine: load sources once, materialise recipes into one resident model."""

from __future__ import annotations

from pathlib import Path

from evomerge.engine.engine import MergeEngine, MergeStats
from evomerge.checkpoint import locate
from evomerge.engine.export import check_output_dir, save_checkpoint
from evomerge.methods import get as get_method
from evomerge.recipe import Recipe

__all__ = ["MergeEngine", "MergeStats", "merge_to_checkpoint", "save_checkpoint"]


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
) -> Path:
    """`mergekit-yaml` equivalent: merge a recipe and write a Hugging Face checkpoint (`card`: more
    Markdown for its model card; `gguf`: GGUF types to write beside it, checked before merging;
    `mergekit_exact`: mergekit 0.1.5's arithmetic, so the tensors are mergekit's bit for bit)."""
    from evomerge.engine.gguf import check_config, check_types

    gguf = check_types(gguf)
    check_output_dir(out_dir, [locate(ref, allow_bin=allow_bin).path for ref in recipe.referenced_models()])
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
                           vocabulary=engine.vocabulary)
