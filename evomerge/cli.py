"""Command line: thin wiring from arguments to library calls.

Errors the user can fix (EvomergeError) print as one line without a traceback; --debug shows it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from evomerge import __version__
from evomerge.errors import EvomergeError
from evomerge.search.storage import STORAGE_ENV

log = logging.getLogger("evomerge")


def _cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.demo.family import resolve_members
    from evomerge.engine import merge_to_checkpoint
    from evomerge.recipe import Recipe

    recipe = resolve_members(Recipe.load(args.recipe, strict=args.strict), device=args.device,
                             progress=not args.quiet)
    for unknown in recipe.unknown_parameters():
        log.warning("%s: not a parameter of %s; ignored (as mergekit does)", unknown, recipe.merge_method)
    memory = {"placement": args.placement, "device_memory": args.device_memory, "host_memory": args.host_memory}
    if args.dry_run:
        from evomerge.engine import plan_family

        plan = plan_family(recipe.referenced_models(), base_model=recipe.base_model, device=args.device,
                           dtype=recipe.dtype, out_dtype=recipe.out_dtype, mergekit_exact=args.mergekit_exact,
                           mapped_vocab=recipe.vocabulary() is not None, delta_cache=False, **memory)
        print(plan.render())
        return 0
    out = merge_to_checkpoint(
        recipe, args.out_dir, device=args.device, seed=args.seed, allow_bin=args.allow_bin,
        progress=not args.quiet, gguf=args.gguf, mergekit_exact=args.mergekit_exact, **memory,
    )
    print(f"merged model written to {out}")
    return 0


def _cmd_moe(args: argparse.Namespace) -> int:
    from evomerge.demo.family import resolve_members
    from evomerge.engine import moe_to_checkpoint
    from evomerge.moe import MoEConfig

    config = resolve_members(MoEConfig.load(args.config), device=args.device, progress=not args.quiet)
    out = moe_to_checkpoint(config, args.out_dir, device=args.device, seed=args.seed, allow_bin=args.allow_bin,
                            progress=not args.quiet, placement=args.placement, device_memory=args.device_memory,
                            host_memory=args.host_memory)
    print(f"mixture of experts written to {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from evomerge.search.export import export

    out = export(args.results_dir, args.out_dir, trial=args.trial, device=args.device, progress=not args.quiet,
                 gguf=args.gguf)
    print(f"exported to {out}")
    return 0


def parse_tasks(spec: str | list[str], metric: str, limit: int | None, num_fewshot: int, subjects: str | None,
                task_paths: list[str] | None = None, filter: str | None = None):
    """'gsm8k,mmlu:accuracy,humaneval' -> TaskRequests; a ':metric' suffix overrides --metric;
    --subjects applies to the tasks that have subsets."""
    from evomerge.evaluation import TaskRequest
    from evomerge.evaluation.catalog import for_paths

    found = for_paths(task_paths or [])
    requests = []
    spec = ",".join(spec) if isinstance(spec, (list, tuple)) else spec  # --tasks a,b or --tasks a b
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        task, _, own_metric = part.partition(":")
        subsets = subjects and found.info(task).rules.get("subset_field")
        if not found.metric(task, own_metric or metric, filter).gold:  # before any model loads
            found.check_code(task)
        requests.append(TaskRequest(task, own_metric or metric, size=limit, num_fewshot=num_fewshot, filter=filter,
                                    subjects=tuple(subjects.split(",")) if subsets else None))
    return requests


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from evomerge.evaluation import Evaluator, load_model

    if args.output:
        _writable_file(args.output)
    paths = [os.path.abspath(p) for p in args.include_path]
    requests = parse_tasks(args.tasks, args.metric, args.limit, args.num_fewshot, args.subjects, paths, args.filter)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    evaluator = Evaluator(requests, tokenizer, split=args.split, seed=args.seed, batch_size=args.batch_size,
                          progress=True, task_paths=paths, apply_chat_template=args.apply_chat_template)
    scores = evaluator.evaluate(model)
    report = {"model": args.model, "split": args.split, "seed": args.seed, "items": evaluator.describe_splits(),
              "apply_chat_template": evaluator.apply_chat_template, **scores.to_json()}
    text = json.dumps(report, indent=2, default=str)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    for task, value in scores.scores.items():
        print(f"{task:10s} {next(r.metric for r in requests if r.task == task):12s} {value:.4f}")
    print(f"({scores.seconds:.1f} s{', written to ' + args.output if args.output else ''})")
    return 0


def _cmd_demo_family(args: argparse.Namespace) -> int:
    import time

    from evomerge.demo.family import FAMILIES, build_family, score_family
    from evomerge.report.tables import print_table

    start = time.perf_counter()
    family = build_family(args.output, recipe=FAMILIES[f"{args.family}-family"], device=args.device)
    built = time.perf_counter() - start
    print(f"{args.family} family ready in {family.root} ({built:.0f} s)")
    for name, path in family.members.items():
        print(f"  {name:10s} {path}")
    if not args.no_scores:
        table = score_family(family, device=args.device)
        columns = list(next(iter(table.values())))
        print_table("search-split scores (higher is better)", ["member", *columns],
                    [[name, *(f"{row[c]:.4f}" for c in columns)] for name, row in table.items()])
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from evomerge.search import SearchJob, SearchSpace, dry_run, run, run_worker

    if args.reproduce:
        return _reproduce(args)
    count = args.dry_run
    if count is not None and not count.isdigit() and args.space is None:
        args.space, count = count, "3"  # `--dry-run SPACE.yaml`: the file, not a count
    if args.space is None:
        raise EvomergeError("search: give the search space file (SPACE.yaml)")
    space = SearchSpace.load(args.space, task_paths=[os.path.abspath(p) for p in args.include_path]).with_settings(
        sampler=args.sampler, placement=args.placement, device_memory=args.device_memory, host_memory=args.host_memory)
    if count is not None:
        from evomerge.search import memory_plan

        if not count.isdigit() or int(count) < 1:
            raise EvomergeError(f"--dry-run: N must be a whole number above 0, got {count!r}")
        for i, recipe in enumerate(dry_run(space, int(count))):
            print(f"# candidate {i} ({recipe.merge_method})")
            print(recipe.to_yaml())
        print(memory_plan(space, args.device).render())
        return 0
    common = {"storage": args.storage, "study_name": args.study_name, "n_trials": args.n_trials,
              "timeout": args.timeout, "device": args.device, "results_root": args.results, "threads": args.threads}
    if args.worker:
        return run_worker(space, **common)
    summary = run(SearchJob(space, heldout=not args.no_heldout, progress=not args.quiet, workers=args.workers,
                            space_file=args.space, **common))
    _print_summary(summary)
    this_run = summary.get("this_run", {})
    return 130 if this_run.get("interrupted") else 1 if this_run.get("stopped") else 0


def _reproduce(args: argparse.Namespace) -> int:
    from evomerge.search.reproduce import reproduce

    if args.space:
        raise EvomergeError("--reproduce: give the results folder only (its summary.json holds the space)")
    report = reproduce(args.reproduce, device=args.device, threads=args.threads, progress=not args.quiet)
    for row in report["rows"]:
        difference = row["largest_difference"]
        print(f"trial {row['trial']:>4}  {row['state']:<8}  params {'same' if row['same_params'] else 'DIFFER'}  "
              f"state {'same' if row['same_state'] else 'DIFFERS'}  largest score difference "
              f"{'missing' if difference is None else f'{difference:.3g}'}")
    print(f"{report['reproduced']} of {report['trials']} trials reproduced within {report['tolerance']:g} "
          f"(largest difference {report['largest_difference']}); inputs changed: "
          f"{', '.join(report['changed_inputs']) or 'none'}; environment changed: "
          f"{', '.join(report['environment']) or 'none'}; written to {args.reproduce}/reproduce.md")
    return 0 if report["reproduced"] == report["trials"] and not report["changed_inputs"] else 1


def _print_summary(summary: dict) -> None:
    best = summary.get("best")
    trials = summary["trials"]
    print(f"study {summary['study']}: {trials.get('COMPLETE', 0)} complete, {trials.get('PRUNED', 0)} pruned, "
          f"{trials.get('FAIL', 0)} failed" + (f", {trials['INTERRUPTED']} interrupted" if trials.get("INTERRUPTED") else ""))
    if best:
        print(f"best: trial {best['trial']} ({best['method']}) score {best['value']:.4f}  "
              + "  ".join(f"{k}={v:.4f}" for k, v in (best.get("scores") or {}).items()))
    held = summary.get("heldout")
    if held:
        for metric in held["combined_over"]:
            verdicts = {source: c[metric]["verdict"] for source, c in held.get("comparisons", {}).items()}
            print(f"held-out combined {metric}: winner {held['rows']['winner']['combined'][metric]:.4f}; vs sources "
                  + ", ".join(f"{source} {verdict}" for source, verdict in verdicts.items()) + " (95 % paired intervals)")
    if summary.get("this_run", {}).get("stopped"):
        print(f"stopped early: {summary['this_run']['stopped']}")
    if summary.get("heldout_skipped"):
        print(f"held-out: skipped ({summary['heldout_skipped']})")


def _cmd_report(args: argparse.Namespace) -> int:
    from evomerge.search import SearchSpace, write_report
    from evomerge.search.storage import normalize_url, sqlite_path

    space = SearchSpace.load(args.heldout) if args.heldout else None
    results = args.results
    if results is None:  # where the search wrote it: the space's results folder, else beside a SQLite study
        database = sqlite_path(normalize_url(args.storage))
        results = space.results_root if space else database.parent.parent if database else "results"
    summary = write_report(args.storage, args.study_name, results, heldout_space=space)
    _print_summary(summary)
    return 0


def _positive(kind):
    """An argparse type: a number above zero (a budget of 0 or -5 trials is a typo, not a request)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def _at_least(low: int):
    """An argparse type: a whole number of at least `low` (--num-fewshot -1 is a typo, not 'the default')."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


def _batch_size(text: str):
    return "auto" if text == "auto" else _positive(int)(text)


def _worker_count(text: str) -> int:
    """--workers: above 0 and at most one per core (or per GPU, where there are more GPUs): each worker
    holds every source model, so more only divide the machine's memory between copies."""
    from evomerge.device import available_cores

    value = _positive(int)(text)
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch build with CUDA: cores alone bound it
        gpus = 0
    most = max(available_cores(), gpus)
    if value > most:
        raise argparse.ArgumentTypeError(f"at most {most} (one per core{' or GPU' if gpus else ''} this process may "
                                         f"use; each worker holds every source), got {text}")
    return value


def _writable_file(path: str) -> None:
    """Refuses an output file that cannot be written, before any work: a missing folder, a folder."""
    target = Path(path)
    if target.is_dir():
        raise EvomergeError(f"--output {path}: is a folder; give a file name (e.g. {target / 'scores.json'})")
    parent = target.parent
    if not parent.is_dir():
        raise EvomergeError(f"--output {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EvomergeError(f"--output {path}: the folder {parent} is not writable")


def _gguf_option(parser: argparse.ArgumentParser) -> None:
    from evomerge.engine.gguf import K_QUANTS, TYPES

    parser.add_argument("--gguf", nargs="+", default=[], metavar="TYPE", type=str.lower,
                        help=f"also write OUT_DIR/<name>-<TYPE>.gguf for llama.cpp / Ollama: {', '.join(TYPES)} "
                             f"({', '.join(K_QUANTS[:2])}, ... need llama.cpp's llama-quantize on PATH)")


def _memory_options(parser: argparse.ArgumentParser, *, where: str) -> None:
    from evomerge.engine.memory import PLACEMENTS

    parser.add_argument("--placement", choices=PLACEMENTS, default=None if where == "search" else "auto",
                        help="where the sources live: auto (the fastest tier that fits: device, then host memory, then "
                             "memory-mapped from disk) or one tier for all" + (" (default: the space's)" if where == "search" else ""))
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="memory the plan may use on the device, e.g. 80GB (default: its free memory; needed to "
                             "plan for a device this machine does not have)")
    parser.add_argument("--host-memory", default=None, metavar="SIZE",
                        help="host memory the plan may use (default: the free memory)")


def _thread_count(text: str) -> int:
    """--threads: above 0 and at most 8 threads per core this process may use (more only thrashes,
    and a huge count aborts inside OpenMP)."""
    from evomerge.device import available_cores

    value = _positive(int)(text)
    most = 8 * available_cores()
    if value > most:
        raise argparse.ArgumentTypeError(f"at most {most} (8 per core of the {available_cores()} this process may use), "
                                         f"got {text}")
    return value


def _threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="CPU threads for torch and the tokenizers (default: the cores available to this process)")


def _chat_setting(text: str):
    value = {"auto": "auto", "true": True, "false": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"auto, true or false, got {text!r}")
    return value


def _include_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAMLs (repeatable; like lm_eval's --include_path)")


def _build_options(parser: argparse.ArgumentParser, *, seed: str) -> None:
    """OUT_DIR and the options of a command that builds a checkpoint from sources (merge, moe)."""
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    parser.add_argument("--seed", type=int, default=0, help=seed)
    parser.add_argument("--allow-bin", action="store_true", help="allow pickled pytorch_model.bin sources")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser("merge", help="merge a mergekit recipe into a Hugging Face checkpoint (like mergekit-yaml)")
    merge.add_argument("recipe", help="mergekit YAML recipe")
    _build_options(merge, seed="seed for random-drop methods (dare, della)")
    merge.add_argument("--strict", action="store_true",
                       help="refuse keys and parameters mergekit would silently ignore (default: warn and drop them)")
    merge.add_argument("--mergekit-exact", action="store_true",
                       help="merge with mergekit 0.1.5's arithmetic (in the recipe's dtype, its tie-breaking): the tensors "
                            "mergekit-yaml writes, bit for bit (default: float32 accumulation, one rounding)")
    merge.add_argument("--dry-run", action="store_true",
                       help="print the memory plan (GB per part, the tier of each source, seconds per merge) and stop; "
                            "nothing is loaded")
    _memory_options(merge, where="merge")
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _threads_option(merge)
    _gguf_option(merge)
    merge.set_defaults(func=_cmd_merge)

    moe = sub.add_parser("moe", help="build a mixture of experts from a mergekit-moe config (like mergekit-moe)")
    moe.add_argument("config", help="mergekit-moe YAML config (base_model, experts with prompts, gate_mode, ...)")
    _build_options(moe, seed="seed of random gates (gate_mode: random) and noise_scale")
    _memory_options(moe, where="moe")
    moe.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _threads_option(moe)
    moe.set_defaults(func=_cmd_moe)

    exp = sub.add_parser("export", help="write a study's winner (or --trial N) as a Hugging Face checkpoint")
    exp.add_argument("results_dir", help="a results folder of evomerge search (results/<study>)")
    exp.add_argument("out_dir")
    exp.add_argument("--trial", type=int, default=None, help="a completed trial's number (default: the winner)")
    exp.add_argument("--device", default="auto")
    exp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _threads_option(exp)
    _gguf_option(exp)
    exp.set_defaults(func=_cmd_export)

    ev = sub.add_parser("eval", help="score a model on any lm-eval task (GSM8K / MMLU / HumanEval built in; offline)")
    ev.add_argument("model", help="model directory, .gguf file or cached Hugging Face id")
    ev.add_argument("--tasks", default=["gsm8k,mmlu,humaneval"], nargs="+",
                    help="task names, by commas or spaces (built-in, --include-path folders, lm-eval's registry); "
                         "task:metric overrides --metric")
    ev.add_argument("--metric", default="accuracy",
                    help="accuracy (the task's first metric), gold_loglik, or any metric the task declares (acc_norm, ...)")
    ev.add_argument("--filter", default=None, help="the filter the metric is read through (default: the task's)")
    _include_option(ev)
    ev.add_argument("--split", default="search", choices=["search", "heldout", "all"],
                    help="search, heldout (disjoint, seeded; README: splits) or all (every item, as lm_eval scores it)")
    ev.add_argument("--limit", type=_positive(int), default=None, help="items per task (default: the whole split)")
    ev.add_argument("--num-fewshot", type=_at_least(0), default=0)
    ev.add_argument("--subjects", default=None,
                    help="subsets (MMLU subjects), comma separated, for the tasks that have them (default: all)")
    ev.add_argument("--seed", type=int, default=0, help="which items form the split")
    ev.add_argument("--batch-size", default="auto", type=_batch_size,
                    help="auto (default): largest that fits on a GPU, 8 on a CPU")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    ev.add_argument("--apply-chat-template", default="auto", type=_chat_setting, metavar="auto|true|false",
                    help="prompts through the model's chat template: auto (when it has one, the default), true, false")
    ev.add_argument("--output", default=None, help="write scores (lm-eval results layout) to this JSON file")
    _threads_option(ev)
    ev.set_defaults(func=_cmd_eval)

    demo = sub.add_parser("demo-family", help="build a family of SmolLM2-135M fine-tunes offline (cached): the demo's "
                                              "3 specialists, or the composition family's 2")
    demo.add_argument("--family", choices=["demo", "compose"], default="demo",
                      help="demo: math, code, knowledge; compose: zorbian (knowledge) and bracket (format), whose "
                           "skills the zorbian_bracket task needs together")
    demo.add_argument("--output", default=None, help="directory (default: the user cache, keyed by recipe)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--no-scores", action="store_true", help="skip the score table")
    _threads_option(demo)
    demo.set_defaults(func=_cmd_demo_family)

    search = sub.add_parser("search", help="evolutionary search over merge recipes (resumable)")
    search.add_argument("space", nargs="?", help="search space YAML (see search_spaces/)")
    search.add_argument("--storage", default=os.environ.get(STORAGE_ENV),
                        help=f"Optuna storage URL (default: ${STORAGE_ENV}, else SQLite in the results folder); "
                             f"prefer ${STORAGE_ENV} for URLs with a password: arguments are visible to every user")
    search.add_argument("--study-name", default=None, help="default: the space's name")
    search.add_argument("--n-trials", type=_positive(int), default=None, help="override the space's n_trials")
    search.add_argument("--timeout", type=_positive(float), default=None, help="seconds; override the space's timeout")
    search.add_argument("--device", default=None, help="override the space's device")
    search.add_argument("--threads", type=_thread_count, default=None,
                        help="CPU threads for torch and the tokenizers (default: the space's threads, else the cores "
                             "available to this process)")
    search.add_argument("--results", default=None, help="results root (default: the space's results_dir)")
    _include_option(search)
    search.add_argument("--no-heldout", action="store_true", help="skip the held-out evaluation at the end")
    search.add_argument("--dry-run", nargs="?", const="3", default=None, metavar="N",
                        help="print the first N recipes (default 3) and the memory plan, without loading models")
    search.add_argument("--workers", type=_worker_count, default=1,
                        help="local worker processes on the study (one per GPU when there are several)")
    search.add_argument("--worker", action="store_true",
                        help="run as one worker of a shared study: trials only, no held-out or results folder")
    from evomerge.search.sampler import SAMPLERS

    search.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                        help="override the space's sampler; the trials join the same study (e.g. a soup baseline "
                             "beside a CMA-ES search): " + "; ".join(f"{n}: {e.help}" for n, e in SAMPLERS.items()))
    _memory_options(search, where="search")
    search.add_argument("--reproduce", default=None, metavar="RESULTS_DIR",
                        help="re-run the finished study of a results folder from scratch and report, per trial, "
                             "whether parameters match and the largest score difference")
    search.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    search.set_defaults(func=_cmd_search)

    report = sub.add_parser("report", help="write the results folder of a study from its database")
    report.add_argument("--storage", default=os.environ.get(STORAGE_ENV), required=STORAGE_ENV not in os.environ,
                        help=f"Optuna storage URL (default: ${STORAGE_ENV})")
    report.add_argument("--study-name", required=True)
    report.add_argument("--results", default=None,
                        help="results root (default: the --heldout space's results_dir, else the folder above a "
                             "SQLite study's own, else ./results)")
    report.add_argument("--heldout", default=None, metavar="SPACE",
                        help="the study's space.yaml: also score the winner and sources on the held-out split")
    _threads_option(report)
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from evomerge.log import setup_logging, to_log_files

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        if args.command != "search":  # a search sets its own (the space's threads, or --threads)
            from evomerge.device import use_threads

            use_threads(getattr(args, "threads", None))
        return args.func(args)
    except EvomergeError as exc:
        message = f"evomerge: error: {' '.join(str(exc).split())}"
        to_log_files(logging.ERROR, message)
        if args.debug:
            raise
        print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        to_log_files(logging.WARNING, "evomerge: interrupted")
        print("evomerge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        to_log_files(logging.CRITICAL, f"evomerge: {type(exc).__name__}: {exc}", exc_info=sys.exc_info())
        if _damaged_database(exc) and not args.debug:
            print(f"evomerge: error: the study database cannot be read: {' '.join(str(exc).split()[:30])}; the "
                  "trials finished before are in it as far as it can be read (a copy of it, or --storage another "
                  "file, starts clean)", file=sys.stderr)
            return 2
        if not _disk_full(exc) or args.debug:
            raise
        where = getattr(exc, "filename", None)
        print(f"evomerge: error: no space left on device{f' writing {where}' if where else ''}; what was finished "
              "is kept (a merge leaves OUT_DIR as it was, a search keeps its trials in the study database): "
              "free some space and rerun the same command", file=sys.stderr)
        return 1


def _damaged_database(exc: BaseException) -> bool:
    """SQLite's own words for a file that is not (or no longer) a database."""
    text = str(exc).lower()
    return type(exc).__module__.startswith("sqlalchemy") and any(
        s in text for s in ("database disk image is malformed", "file is not a database", "database is locked"))


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, raised directly or by SQLite (\"database or disk is full\") through SQLAlchemy."""
    import errno

    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    raise SystemExit(main())
