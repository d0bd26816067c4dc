"""Reproducibility: the record a results folder keeps, and `evomerge search --reproduce`.

The record (summary.json, `reproduce`) holds what a re-run needs and what it must find equal: the
space as loaded, its seed, the threads and device the trials ran with, sha256 of every source
model's weights and of the evaluation items of each split. `reproduce(results_dir)` checks the
sources and items, runs the same space from scratch in a scratch study (never the original's),
and compares trial by trial: the same parameters, the same state, and the largest score
difference, per trial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import optuna

from evomerge.errors import EvomergeError
from evomerge.evaluation import task_items
from evomerge.evaluation.data import docs_sha256
from evomerge.search import storage as store
from evomerge.search.space import SearchSpace
from evomerge.trials import TrialRecord

log = logging.getLogger(__name__)

TOLERANCE = 1e-6


def sources_sha256(space: SearchSpace) -> dict[str, str | None]:
    """{model as the space names it: sha256 of its weights}, base included (None: not on this machine,
    e.g. a search interrupted before the demo family was built)."""
    from evomerge.checkpoint import weights_sha256
    from evomerge.errors import CheckpointError

    found = {}
    for path in dict.fromkeys([*space.models.values(), *([space.base] if space.base else [])]):
        try:
            found[space.portable_refs.get(path, path)] = weights_sha256(path)
        except CheckpointError:
            found[space.portable_refs.get(path, path)] = None
    return found


def items_record(space: SearchSpace) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, Any]]]:
    """({split: {task/metric: sha256 of its items}}, {split: {task/metric: which items: the dataset
    split they come from, the rule that chose them, how many of how many}}) for the search tasks and
    the held-out entries."""
    seed = space.config.seed
    splits = {"search": space.config.tasks, "heldout": space.heldout_entries()}
    digests: dict[str, dict[str, str]] = {}
    described: dict[str, dict[str, Any]] = {}
    for split, entries in splits.items():
        for e in entries:
            items, records = task_items(e.task, split, e.size, seed, e.subjects, space.task_paths)
            digests.setdefault(split, {})[f"{e.task}/{e.metric}"] = docs_sha256(items)
            described.setdefault(split, {})[f"{e.task}/{e.metric}"] = (
                next(iter(records.values())) if len(records) == 1 else records)
    return digests, described


NUMERIC_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "lm_eval", "datasets", "numpy",
                    "optuna", "cmaes", "safetensors")  # the libraries whose version can change a score


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from evomerge import __version__

    found = {"evomerge": __version__, "python": platform.python_version()}
    for name in NUMERIC_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def hardware(device: str) -> dict[str, Any]:
    """What computed the scores: CPU model and cores, and the GPU when one did."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    found: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine()}
    if device.startswith("cuda") and torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return found


def record(space: SearchSpace, *, threads: int, device: str, results_dir: Path | None = None) -> dict[str, Any]:
    digests, described = items_record(space)
    found = {"space": space.config.model_dump(mode="json"), "seed": space.config.seed, "threads": threads,
             "device": device, "sources_sha256": sources_sha256(space), "items_sha256": digests, "items": described,
             "versions": package_versions(), "hardware": hardware(device)}
    if space.source is not None and results_dir is not None:  # relative paths of the space resolve from there
        found["space_dir"] = os.path.relpath(Path(space.source).resolve().parent, Path(results_dir).resolve())
    return found


def changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a recorded input and today's, each named with both values: a source's
    weights, a split's items, a library's version, the hardware."""
    found = []
    for key in ("sources_sha256", "items_sha256", "versions", "hardware"):
        before, after = saved.get(key), now.get(key)
        if before is None or before == after:
            continue
        flat_before, flat_after = _flat(before), _flat(after)
        for name in sorted(set(flat_before) | set(flat_after)):
            a, b = flat_before.get(name), flat_after.get(name)
            if a != b:
                shown = (lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v)  # noqa: E731
                found.append(f"{key.removesuffix('_sha256')}: {name} {shown(a)} -> {shown(b)}")
    return found


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in _flat(inner, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): value}


def _trials(study: optuna.Study) -> dict[int, TrialRecord]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return {t.number: TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=states)}


def _largest_difference(a: dict[str, float], b: dict[str, float]) -> float:
    if set(a) != set(b):
        return math.inf
    return max((abs(a[k] - b[k]) if not (math.isnan(a[k]) and math.isnan(b[k])) else 0.0 for k in a), default=0.0)


def compare(original: dict[int, TrialRecord], again: dict[int, TrialRecord], tolerance: float = TOLERANCE) -> list[dict]:
    """One row per original trial: same state, same parameters, the largest score difference."""
    rows = []
    for number, first in sorted(original.items()):
        second = again.get(number)
        if second is None:
            rows.append({"trial": number, "state": first.state.name, "same_params": False, "same_state": False,
                         "largest_difference": None, "ok": False})
            continue
        scores_a = first.scores if first.scores else first.first_rung_scores
        scores_b = second.scores if second.scores else second.first_rung_scores
        difference = _largest_difference(scores_a, scores_b)
        same_params, same_state = first.params == second.params, first.state == second.state
        rows.append({"trial": number, "state": first.state.name, "same_params": same_params, "same_state": same_state,
                     "largest_difference": difference,
                     "ok": same_params and same_state and difference <= tolerance})
    return rows


def reproduce(results_dir: str | Path, *, device: str | None = None, threads: int | None = None,
              progress: bool = True, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Re-runs the finished study of `results_dir` from scratch; writes reproduce.json/.md there."""
    from evomerge.report.tables import markdown_table
    from evomerge.search.runner import Searcher

    folder = Path(results_dir)
    summary, study = store.open_results(folder, "--reproduce")
    saved = summary.get("reproduce")
    if not saved:
        raise EvomergeError(f"--reproduce: {folder / 'summary.json'} has no reproducibility record; "
                            "rerun the search to write one")
    if summary.get("this_run", {}).get("workers", 1) > 1:
        log.warning("this study ran with several workers: trial order, hence proposals, may differ")
    space_file = folder / saved["space_dir"] / "space.yaml" if saved.get("space_dir") else None
    space = SearchSpace.from_dict(saved["space"], source=space_file)
    original = _trials(study)

    now = {"sources_sha256": sources_sha256(space), "items_sha256": items_record(space)[0],
           "versions": package_versions(), "hardware": hardware(device or saved.get("device") or "cpu")}
    found = changes(saved, now)
    for line in found:
        log.warning("differs from the record: %s", line)
    # the inputs (models, items) must be the same; the environment (versions, hardware) is why scores may move
    changed = [line for line in found if line.startswith(("sources:", "items:"))]
    environment = [line for line in found if line not in changed]
    with tempfile.TemporaryDirectory(prefix="evomerge-reproduce-") as scratch:
        searcher = Searcher(space, results_root=scratch, device=device or saved.get("device"), progress=progress,
                            threads=threads)
        outcome = searcher.run(n_trials=len(original))
        again = _trials(outcome.study)
    rows = compare(original, again, tolerance)
    report = {"study": summary["study"], "tolerance": tolerance, "changed_inputs": changed, "environment": environment,
              "trials": len(rows), "reproduced": sum(r["ok"] for r in rows),
              "largest_difference": max((r["largest_difference"] for r in rows if r["largest_difference"] is not None),
                                        default=None),
              "threads": searcher.threads, "rows": rows}
    (folder / "reproduce.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(["trial", "state", "same parameters", "same state", "largest score difference"],
                           [[r["trial"], r["state"], r["same_params"], r["same_state"],
                             "missing" if r["largest_difference"] is None else f"{r['largest_difference']:.3g}"]
                            for r in rows])
    (folder / "reproduce.md").write_text(
        f"# Reproduction of study `{summary['study']}`\n\n{report['reproduced']} of {len(rows)} trials reproduced "
        f"(same parameters and state, scores within {tolerance:g}); inputs changed: {', '.join(changed) or 'none'}; "
        f"environment changed: {', '.join(environment) or 'none'}.\n\n"
        f"{table}\n", encoding="utf-8")
    return report
