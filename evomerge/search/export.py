"""`evomerge export RESULTS_DIR OUT_DIR [--trial N] [--gguf TYPE ...]`: a finished study's winner (or
any completed trial) as a Hugging Face checkpoint (and GGUF files): exactly what `evomerge merge` writes for the trial's recipe,
with a model card that also holds the trial's search scores, the held-out table (for the winner)
and the versions that made it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from evomerge.errors import EvomergeError
from evomerge.moe import MoEConfig, load_candidate
from evomerge.search import storage as store
from evomerge.trials import STUDY_SPACE, TrialRecord

log = logging.getLogger(__name__)


def chosen_trial(study: optuna.Study, number: int | None) -> TrialRecord:
    from evomerge.report.results import best_trial

    if number is None:
        best = best_trial(study)
        if best is None:
            raise EvomergeError(f"study '{study.study_name}' has no completed trial to export")
        return best
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found:
        raise EvomergeError(f"--trial: study '{study.study_name}' has no trial {number}")
    record = TrialRecord.of(found[0])
    if record.state != TrialState.COMPLETE or not record.recipe:
        raise EvomergeError(f"--trial: trial {number} is {record.state.name.lower()}, not a completed trial")
    return record


def card(folder: Path, record: TrialRecord) -> str:
    """The model card's evomerge section: search scores, the held-out table, versions."""
    from evomerge.report.results import versions

    lines = [f"\n## Search\n\nTrial {record.number} of study `{folder.name}` ({record.label}), search-split "
             f"score {record.score:.4f}:\n"]
    lines += [f"- {task}: {value:.4f}" for task, value in record.scores.items()]
    heldout = folder / "heldout.json"
    if heldout.is_file() and json.loads(heldout.read_text()).get("trial") == record.number:
        table = (folder / "heldout.md").read_text(encoding="utf-8").split("\n", 2)[-1].replace("\n## ", "\n### ")
        lines += ["\n## Held-out scores\n", table.strip()]
    lines += ["\n## Versions\n", *(f"- {name} {version}" for name, version in versions().items())]
    return "\n".join(lines) + "\n"


def export(results_dir: str | Path, out_dir: str | Path, *, trial: int | None = None, device: str = "auto",
           progress: bool = True, gguf: list[str] | tuple[str, ...] = ()) -> Path:
    from evomerge.demo.family import resolve_members
    from evomerge.engine import merge_to_checkpoint

    folder = Path(results_dir)
    _summary, study = store.open_results(folder, "RESULTS_DIR")
    record = chosen_trial(study, trial)
    stored = load_candidate(record.recipe)
    recipe = resolve_members(stored, device=device, progress=progress)
    if isinstance(recipe, MoEConfig):
        if gguf:
            raise EvomergeError("--gguf: GGUF export of a mixture of experts is not built; export it without --gguf")
        from evomerge.engine import moe_to_checkpoint

        log.info("exporting trial %d (mixture of experts) to %s", record.number, out_dir)
        return moe_to_checkpoint(recipe, out_dir, device=device, seed=record.seed or 0, progress=progress,
                                 card=card(folder, record))
    exact = bool(study.user_attrs.get(STUDY_SPACE, {}).get("mergekit_exact"))  # merged as the search scored it
    log.info("exporting trial %d (%s) to %s%s", record.number, record.label, out_dir,
             " with mergekit's arithmetic" if exact else "")
    from evomerge.demo.family import is_member_ref
    from evomerge.search import _portable_refs

    names = _portable_refs(study)  # the space's names for its models (demo-family members by name)
    names.update({path: ref for ref, path in zip(stored.referenced_models(), recipe.referenced_models())
                  if is_member_ref(ref)})
    return merge_to_checkpoint(recipe, out_dir, device=device, seed=record.seed or 0, progress=progress,
                               card=card(folder, record), gguf=gguf, mergekit_exact=exact, names=names)
