"""Writing a merged model as a Hugging Face checkpoint: safetensors, config, tokenizer, and a
model card embedding the recipe (plus mergekit_config.yml, so the folder reads like mergekit's)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch.nn as nn

from evomerge import __version__
from evomerge.checkpoint import TOKENIZER_FILES, SourceModel
from evomerge.engine.vocab import Vocabulary
from evomerge.errors import OutputError, PartialOutput
from evomerge.paths import atomic_directory
from evomerge.recipe import Recipe, chat_template_text

log = logging.getLogger(__name__)


def save_tokenizer(recipe: Recipe, sources: dict[str, SourceModel], out_dir: Path,
                   vocabulary: Vocabulary | None = None) -> None:
    """The checkpoint's tokenizer: the output vocabulary's when the recipe has a tokenizer setting
    (saved as mergekit saves it), else the base model's files; with the recipe's chat template."""
    template = chat_template_text(recipe.chat_template)
    if recipe.chat_template == "auto":
        templates = [t for t in (s.tokenizer().chat_template for s in sources.values()) if t]
        template = Counter(t.strip() for t in templates).most_common(1)[0][0] if templates else None
    if vocabulary is not None:
        tokenizer = vocabulary.tokenizer
        kept = tokenizer.chat_template
        try:
            if template is not None:
                tokenizer.chat_template = template
            tokenizer.save_pretrained(out_dir)
        finally:
            tokenizer.chat_template = kept  # the engine's tokenizer (which evaluation uses) stays as it was
        return
    copy_tokenizer(sources[recipe.base_model or recipe.referenced_models()[0]], out_dir, template)


def copy_tokenizer(donor: SourceModel, out_dir: Path, template: str | None = None) -> None:
    """`donor`'s tokenizer files into out_dir (saved through transformers for a GGUF donor or a new chat template)."""
    if donor.gguf_file is None and donor.tokenizer_dir() is None:
        log.warning("model '%s' has no tokenizer files; the merged checkpoint has none either", donor.ref)
        return
    if donor.gguf_file is None and template is None:
        for name in TOKENIZER_FILES:
            if (donor.path / name).exists():
                shutil.copy(donor.path / name, out_dir / name)
        return
    tokenizer = donor.tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)


def card_names(refs: list[str], out: Path, names: dict[str, str] | None = None) -> dict[str, str]:
    """How a model card names each model: as the search named it (`names`, e.g. `demo-family:math`),
    else a local folder relative to the checkpoint (a card carries no path of the machine it was
    made on), else as given (a Hugging Face id)."""
    found = {}
    for ref in refs:
        if names and ref in names:
            found[ref] = names[ref]
        elif Path(ref.split("+")[0]).is_absolute():
            found[ref] = "+".join(os.path.relpath(part, out) for part in ref.split("+"))
        else:
            found[ref] = ref
    return found


def model_card(recipe: Recipe, name: str, extra: str = "") -> str:
    models = "\n".join(f"- {ref}" for ref in recipe.referenced_models())
    return f"""---
library_name: transformers
tags:
- merge
- evomerge
- mergekit
---
# {name}

This model was merged with evomerge {__version__}
using the **{recipe.merge_method}** method. The recipe below is a mergekit configuration:
`mergekit-yaml mergekit_config.yml OUT` or `evomerge merge mergekit_config.yml OUT` reproduces it.

## Models merged
{models}

## Configuration

```yaml
{recipe.to_yaml().rstrip()}
```
{extra}"""


def moe_card(config, name: str, architecture: str, seed: int) -> str:
    """The model card of a mixture of experts: what it is built from, and its config."""
    experts = "\n".join(f"- {e.source_model or 'a merge recipe of ' + ', '.join(e.recipe.referenced_models())}"
                         for e in config.experts)
    shared = "".join(f"\n- shared: {e.source_model or 'a merge recipe'}" for e in config.shared_experts or [])
    random = (f" Router rows were drawn at random with seed {seed} (`evomerge moe --seed {seed}` redraws them)."
              if not config.routed_by_prompts else "")
    extension = ("" if not config.uses_extensions() else
                 " It uses evomerge's own expert fields (`recipe`, `gate_scale`), which mergekit-moe ignores: "
                 "rebuild it with `evomerge moe`.")
    return f"""---
library_name: transformers
tags:
- merge
- moe
- evomerge
- mergekit
---
# {name}

A {architecture} mixture of experts built with evomerge {__version__}: attention, norms and embeddings
from `{config.base_model}`, each expert's MLP from its source, {config.experts_per_token} of
{len(config.experts)} experts per token, router rows from `{config.gate_mode}` gates.{random}
`evomerge moe mergekit_moe_config.yml OUT` (or `mergekit-moe`) rebuilds it.{extension}

## Experts
{experts}{shared}

## Configuration

```yaml
{config.to_yaml().rstrip()}
```
"""


# What a checkpoint folder evomerge (or mergekit) writes may hold: an earlier one is replaced only when
# it holds nothing else (a user's notes or evaluations beside it are never deleted).
WRITTEN = re.compile(r"(mergekit_config\.yml|mergekit_moe_config\.yml|README\.md|config\.json|generation_config\.json"
                     r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?"
                     r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|vocab\.json|merges\.txt"
                     r"|tokenizer\.model|added_tokens\.json|chat_template\.(jinja|json)|[^/]+\.gguf)")


def check_output_dir(out_dir: str | Path, sources: list[Path]) -> Path:
    """Where a checkpoint may be written without losing anything: not a file, not a source model's
    folder (nor inside one, nor holding one), somewhere a folder can be made, and, when it exists,
    empty or an earlier merge's output holding nothing else. Checked before any work."""
    from evomerge.paths import recover_directory

    out = Path(out_dir).resolve()
    try:
        os.stat(out)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a name too long, a path through a file, ...
        raise OutputError(f"OUT_DIR {out_dir}: cannot write a folder there: {exc.strerror or exc}") from None
    if out.exists() and not out.is_dir():
        raise OutputError(f"OUT_DIR {out_dir}: is an existing file, not a folder")
    for source in sources:
        source = Path(source).resolve()
        if out == source or source in out.parents or out in source.parents:
            raise OutputError(f"OUT_DIR {out_dir}: would overwrite source model {source}; choose another folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(out)  # a replacement killed before: the old folder back, scratch removed
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        probe.rmdir()
    except OSError as exc:
        raise OutputError(f"OUT_DIR {out_dir}: cannot write a folder there: {exc.strerror or exc}") from None
    if out.is_dir() and any(out.iterdir()):
        if not any((out / m).exists() for m in (MERGE_MARKER, MOE_MARKER)):
            raise OutputError(f"OUT_DIR {out_dir}: exists and holds files that are not an earlier merge; "
                              "choose a new folder")
        foreign = sorted(p.name for p in out.iterdir() if p.is_dir() or not WRITTEN.fullmatch(p.name))
        if foreign:
            raise OutputError(f"OUT_DIR {out_dir}: an earlier merge, but it also holds {', '.join(foreign[:5])}"
                              f"{' and more' if len(foreign) > 5 else ''}, which evomerge did not write and would "
                              "delete; move them or choose a new folder")
    return out


MERGE_MARKER = "mergekit_config.yml"  # every checkpoint evomerge (or mergekit) writes has one
MOE_MARKER = "mergekit_moe_config.yml"  # as mergekit-moe names the config it copies beside a MoE


def save_checkpoint(model: nn.Module, recipe: Recipe, sources: dict[str, SourceModel], out_dir: str | Path,
                    card: str = "", gguf: list[str] | tuple[str, ...] = (), progress: bool = True,
                    vocabulary: Vocabulary | None = None, names: dict[str, str] | None = None) -> Path:
    """Writes the checkpoint (and a `<name>-<TYPE>.gguf` for each of `gguf`) into a scratch folder
    beside OUT_DIR that replaces it only when complete: an interrupted or failed write leaves OUT_DIR
    as it was."""
    from evomerge.engine.gguf import gguf_card, write_ggufs

    out = check_output_dir(out_dir, [s.path for s in sources.values()])
    with atomic_directory(out) as scratch:
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(scratch, safe_serialization=True)
        save_tokenizer(recipe, sources, scratch, vocabulary)
        recipe.save(scratch / MERGE_MARKER)
        written, refused = write_ggufs(scratch, list(gguf), out.name, progress=progress) if gguf else ([], {})
        shown = recipe.with_models(card_names(recipe.referenced_models(), out, names))
        (scratch / "README.md").write_text(model_card(shown, out.name, card + gguf_card(written, refused)),
                                           encoding="utf-8")
    log.info("wrote %s", out)
    if refused:  # the checkpoint (and every other file) stays: say what is missing and why
        raise PartialOutput(f"wrote {out_dir} ({len(written)} GGUF file(s)); not written: "
                            + "; ".join(f"GGUF {kind}: {why}" for kind, why in refused.items()))
    return Path(out_dir)
