"""The evaluation harness: scores a model held in memory with lm-eval, offline.

Tasks are lm-eval task YAMLs (evomerge's built-ins, the user's folders, lm-eval's registry:
`evomerge.evaluation.catalog`), built once per evaluator through lm-eval's TaskManager; each
task's documents are narrowed to the split's items (`evomerge.evaluation.data`). Each evaluation is
one `lm_eval.simple_evaluate` call on an `HFLM` wrapped around the very model object the merge
engine writes into (rebuilt only when the engine hands over a different object, e.g. a different
layer count). The search and `evomerge eval` call the same `Evaluator.evaluate`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evomerge.errors import EvomergeError
from evomerge.evaluation import catalog, data, tasklib

log = logging.getLogger(__name__)

_ENV_INFO: dict[str, Any] = {}


def _cache_env_info() -> None:
    """lm-eval's simple_evaluate records the environment (it runs `pip list` and friends in
    subprocesses, ~0.5 s) on every call; it cannot change between candidates, so collect it once.
    evomerge records its own provenance (recipe, seed, versions) in the results folder."""
    import lm_eval.evaluator as evaluator

    original = evaluator.add_env_info
    if getattr(original, "_evomerge_cached", False):
        return

    def add_env_info(results: dict) -> None:
        if not _ENV_INFO:
            original(_ENV_INFO)
        results.update(_ENV_INFO)

    add_env_info._evomerge_cached = True  # type: ignore[attr-defined]
    evaluator.add_env_info = add_env_info
    # Likewise the git hash (a `git describe` subprocess that prints "fatal" outside a repository).
    evaluator.get_git_commit_hash = lambda: None


def offline() -> None:
    """Nothing is downloaded at evaluation time."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def runs_generated_code(task: str, metric: str = "accuracy", task_paths: tuple = ()) -> bool:
    """Whether scoring this task executes what the model writes (refused, naming the task, when
    evomerge's sandbox would not be the one to run it)."""
    if metric == catalog.GOLD:
        return False
    return catalog.for_paths(task_paths).check_code(task)


@dataclass(frozen=True)
class TaskRequest:
    """One task to score: which task, which metric (and filter), how many items, how many shots."""

    task: str
    metric: str = "accuracy"
    size: int | None = None
    num_fewshot: int = 0
    subjects: tuple[str, ...] | None = None  # tasks with subsets (metadata.evomerge.subset_field)
    max_gen_toks: int | None = None  # generation tasks: cap on new tokens (default: the task's)
    filter: str | None = None  # lm-eval's filter the metric is read through (default: the task's)

    def __post_init__(self):
        if not isinstance(self.task, str) or not self.task.strip():
            raise EvomergeError(f"tasks: a task name, got {self.task!r}")
        if self.num_fewshot < 0:
            raise EvomergeError(f"{self.task}.num_fewshot: at least 0, got {self.num_fewshot}")


@dataclass(frozen=True)
class Aggregate:
    """How one request's per-item values become its score (lm-eval's aggregation, or the mean of
    the sandbox's verdicts), over one task or a group's tasks."""

    name: str  # "mean", "perplexity", ... (the function's name for a `!function` aggregation)
    function: Callable[[list], float] = field(compare=False)
    higher_is_better: bool = True
    by_size: bool = True  # a group: the mean over all items (lm-eval's weight_by_size), else over tasks
    per_item: Callable[[Any], float] | None = field(default=None, compare=False)  # a logged value -> the item's score

    def __call__(self, parts: list[list]) -> float:
        parts = [p for p in parts if p]
        if not parts:
            return math.nan
        if self.name == "mean" and not self.by_size:
            return float(sum(sum(p) / len(p) for p in parts) / len(parts))
        return float(self.function([v for p in parts for v in p]))


@dataclass
class Scores:
    """Per-task scores, per-item values and lm-eval's full results layout."""

    scores: dict[str, float]  # task -> the requested metric's score
    results: dict[str, dict[str, Any]]  # lm-eval's "results" section
    seconds: float
    items: dict[str, int] = field(default_factory=dict)
    per_item: dict[str, list] = field(default_factory=dict)  # task -> each item's value (a group: its tasks')
    samples: dict[str, list[dict]] = field(default_factory=dict)  # lm-eval's logged samples, per_item=True
    parts: dict[str, list[list]] = field(default_factory=dict, repr=False)  # task -> per-item values per leaf

    def to_json(self) -> dict[str, Any]:
        return {"scores": self.scores, "results": self.results, "seconds": self.seconds, "n_items": self.items}


class Evaluator:
    def __init__(
        self,
        requests: list[TaskRequest],
        tokenizer,
        *,
        split: str = "search",
        seed: int = 0,
        batch_size: int | str = "auto",
        max_length: int | None = None,
        apply_chat_template: bool | str = "auto",
        sandbox_workers: int | None = None,
        progress: bool = False,
        task_paths: tuple | list = (),
    ):
        offline()
        if not requests:
            raise EvomergeError("tasks: nothing to evaluate")
        names = [r.task for r in requests]
        if len(set(names)) != len(names):
            raise EvomergeError(f"tasks: each task once, got {names}")
        if split not in data.SPLITS:
            raise EvomergeError(f"split must be one of {', '.join(data.SPLITS)}, got {split!r}")
        self.requests = list(requests)
        self.catalog = catalog.for_paths(task_paths)
        self.metrics = {r.task: _named(r.task, lambda r=r: self.catalog.metric(r.task, r.metric, r.filter))
                        for r in self.requests}
        for r in self.requests:
            most = _named(r.task, lambda r=r: self.catalog.max_fewshot(r.task))
            if most is not None and r.num_fewshot > most:
                raise EvomergeError(f"{r.task}.num_fewshot: at most {most} exemplars, got {r.num_fewshot}")
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.split, self.seed = split, seed
        self.batch_size = batch_size
        self.max_length = max_length
        if apply_chat_template == "auto":
            apply_chat_template = bool(getattr(tokenizer, "chat_template", None))
        elif apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise EvomergeError("apply_chat_template: true, but the model's tokenizer has no chat template "
                                "(set auto or false)")
        self.apply_chat_template = apply_chat_template
        self.progress = progress
        self._lm = None
        self._model = None
        tasklib.set_token_counter(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        tasklib.set_sandbox_options(workers=sandbox_workers)
        self.runs_code = any(not self.metrics[r.task].gold and _named(r.task, lambda r=r: self.catalog.check_code(r.task))
                             for r in self.requests)
        if self.runs_code:
            from evomerge.evaluation.sandbox import require_isolation

            require_isolation()  # before any generation: refused here, not after minutes of it
        _cache_env_info()
        self.leaves: dict[str, list[Any]] = {}  # task -> its lm-eval tasks (one, or a group's)
        self.aggregates: dict[str, Aggregate] = {}
        self.splits: dict[str, dict[str, Any]] = {}  # task -> leaf -> which items (summary.json)
        self._load_tasks()

    def _load_tasks(self) -> None:
        manager = self.catalog.manager(metadata={"fewshot": {r.task: r.num_fewshot for r in self.requests}})
        self._manager = manager
        for r in self.requests:
            loaded = _named(r.task, lambda r=r: _build(manager, r.task))
            spec = self.metrics[r.task]
            info = self.catalog.info(r.task)
            leaves = list(loaded["tasks"].values())
            records = {}
            for task in leaves:
                rules = _leaf_rules(task, r.task, info)
                if spec.gold:
                    make_gold(task)
                elif spec.name not in task._metric_fn_list:
                    raise EvomergeError(f"{r.task}.metric: {task.config.task} has no metric {spec.name!r}")
                if getattr(task, "UNSAFE_CODE", False) and not spec.gold:
                    _check_sandboxed(task, spec)
                task.set_config(key="num_fewshot", value=0 if rules.get("exemplars_in_items") else r.num_fewshot)
                if r.max_gen_toks and task.config.output_type == "generate_until":
                    generation = dict(task.config.generation_kwargs or {})
                    generation["max_gen_toks"] = r.max_gen_toks
                    task.set_config(key="generation_kwargs", value=generation)
                if r.num_fewshot and not rules.get("exemplars_in_items"):
                    available = len(list(task.fewshot_docs() or []))
                    if r.num_fewshot > available:
                        raise EvomergeError(f"{r.task}.num_fewshot: at most {available} exemplars, got {r.num_fewshot}")
                docs, record = _named(r.task, lambda task=task, rules=rules: data.choose(
                    task, rules, self.split, self.seed, r.size, list(r.subjects) if r.subjects else None))
                _narrow(task, docs)
                records[task.config.task] = record
            self.leaves[r.task] = leaves
            self.splits[r.task] = records
            first = leaves[0]
            function = first.aggregation()[spec.name]
            group = loaded["groups"].get(r.task)
            by_size = True
            if group is not None:
                listed = [m for m in (group.aggregate_metric_list or []) if _field(m, "metric") == spec.name]
                by_size = bool(_field(listed[0], "weight_by_size", True)) if listed else True
            per_item = getattr(function, "per_item", None)  # the sandbox's verdicts: scored item by item
            name = "mean" if per_item else getattr(function, "__name__", str(function))
            self.aggregates[r.task] = Aggregate(name, _mean if per_item else function, spec.higher_is_better,
                                                by_size, per_item)

    @property
    def tasks(self) -> dict[str, Any]:
        return {task.config.task: task for leaves in self.leaves.values() for task in leaves}

    def lm(self, model):
        """An HFLM around `model`, reused while the caller hands over the same object."""
        if self._lm is None or model is not self._model:
            from lm_eval.models.huggingface import HFLM

            model.eval()
            device = _device_of(model)
            batch_size = self.batch_size
            if batch_size == "auto":  # lm-eval finds the largest batch that fits a GPU; CPUs gain nothing past ~8
                batch_size = "auto" if device.type == "cuda" else 8
            self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=batch_size,
                            max_length=self.max_length, device=str(device))
            self._model = model
        return self._lm

    def _fit_generation(self, max_length: int) -> None:
        """A generation budget must leave room for the prompt (lm-eval refuses one that does not):
        on a model with a short context, a task's budget becomes half of it."""
        for name, task in self.tasks.items():
            generation = dict(task.config.generation_kwargs or {})
            budget = generation.get("max_gen_toks", 256)
            if task.OUTPUT_TYPE == "generate_until" and budget >= max_length:
                log.warning("%s: %d new tokens do not fit a %d-token context; generating up to %d", name,
                            budget, max_length, max_length // 2)
                generation["max_gen_toks"] = max_length // 2
                task.set_config(key="generation_kwargs", value=generation)

    def evaluate(self, model, *, limit: int | float | None = None, part: tuple[float, float] | None = None,
                 per_item: bool = False) -> Scores:
        """Scores `model`. `limit` keeps the first items of each task; `part=(a, b)` scores the
        items at relative positions [a, b) of each task (rungs of a staged evaluation, joined with
        `combine`)."""
        from lm_eval import simple_evaluate

        start = time.perf_counter()
        tasks = self.tasks
        subset = None
        if part is not None:
            subset = {}
            for name, task in tasks.items():
                n = len(task.eval_docs)
                lo, hi = _position(part[0], n), _position(part[1], n)
                subset[name] = list(range(lo, max(hi, lo)))
            if not any(subset.values()):
                return Scores({r.task: math.nan for r in self.requests}, {}, 0.0, {r.task: 0 for r in self.requests})
            tasks = {name: task for name, task in tasks.items() if subset[name]}
            subset = {name: subset[name] for name in tasks}
        lm = self.lm(model)
        self._fit_generation(lm.max_length)
        with torch.inference_mode(), _bars(self.progress):
            output = simple_evaluate(
                model=lm,
                tasks=list(tasks.values()),
                task_manager=self._manager,  # else lm-eval indexes its 14k built-in YAMLs (~10 s) per call
                limit=limit,
                samples=subset,
                bootstrap_iters=0,
                log_samples=True,  # each item's value: for intervals, rungs and groups
                apply_chat_template=self.apply_chat_template,
                fewshot_as_multiturn=bool(self.apply_chat_template),
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
                confirm_run_unsafe_code=self.runs_code,  # checked: evomerge's sandbox runs the code
            )
        results = output["results"]
        scores, items, values, parts, samples = {}, {}, {}, {}, {}
        for r in self.requests:
            spec = self.metrics[r.task]
            leaf_samples = [_samples(output, task.config.task, spec) if task.config.task in tasks else []
                            for task in self.leaves[r.task]]
            parts[r.task] = [[_item_value(s, spec, self.aggregates[r.task]) for s in logged] for logged in leaf_samples]
            values[r.task] = [v for p in parts[r.task] for v in p]
            items[r.task] = len(values[r.task])
            scores[r.task] = self.aggregates[r.task](parts[r.task])
            samples[r.task] = [s for logged in leaf_samples for s in logged]
        return Scores(scores, results, time.perf_counter() - start, items, values if per_item else {},
                      samples if per_item else {}, parts)

    def combine(self, first: Scores, rest: Scores) -> Scores:
        """The scores of two disjoint item sets of the same tasks (rungs) as one evaluation."""
        scores, items, parts = {}, {}, {}
        for r in self.requests:
            a, b = first.parts.get(r.task) or [], rest.parts.get(r.task) or []
            parts[r.task] = [x + y for x, y in zip(a, b)] if a and b else (a or b)
            items[r.task] = sum(len(p) for p in parts[r.task])
            scores[r.task] = self.aggregates[r.task](parts[r.task])
        return Scores(scores, {"first": first.results, "rest": rest.results}, first.seconds + rest.seconds, items,
                      parts=parts)

    def public_test_items(self) -> list[tuple[str, str]]:
        """(task, split) where this evaluator scores items of a public benchmark's test split (a
        built-in or lm-eval registry task; the user's own tasks are theirs to use)."""
        found = []
        for task, records in self.splits.items():
            source = self.catalog.info(task).source
            if source == "task_paths":  # the user's own data
                continue
            for leaf, record in records.items():
                task_obj = self.tasks[leaf]
                test = task_obj.config.test_split
                public = _leaf_rules(task_obj, task, self.catalog.info(task)).get("public_split")
                # a built-in says so itself; lm-eval's tasks are public benchmarks, their test split is
                if public or (source == "lm-eval" and record["from"] == test and test and "test" in str(test)):
                    found.append((task, str(public or test)))
                    break
        return found

    def describe_splits(self) -> dict[str, Any]:
        """Which items each task scores: its split, the rule that chose them, how many of how many."""
        return {task: (next(iter(records.values())) if len(records) == 1 else records)
                for task, records in self.splits.items()}


def task_items(task: str, split: str, size: int | None, seed: int, subjects: list[str] | None = None,
               task_paths: tuple | list = ()) -> tuple[list[dict], dict[str, Any]]:
    """The items a split of `task` scores, and how they were chosen (no model needed). A group's
    items are its tasks' in order."""
    found = build_task(task, task_paths)
    info = catalog.for_paths(task_paths).info(task)
    items, records = [], {}
    for leaf in found["tasks"].values():
        rules = _leaf_rules(leaf, task, info)
        docs, record = _named(task, lambda: data.choose(leaf, rules, split, seed, size, subjects))
        items.extend(dict(doc) for doc in docs)
        records[leaf.config.task] = record
    return items, records


def dataset_split(task: str, split: str, task_paths: tuple | list = ()) -> list[dict]:
    """Every document of one dataset split of `task` (e.g. a built-in's training pool)."""
    (leaf, *_rest) = build_task(task, task_paths)["tasks"].values()
    return [dict(doc) for doc in data.named_split(leaf, split)]


def build_task(task: str, task_paths: tuple | list = ()) -> dict:
    """lm-eval's tasks for `task`, built from the catalog of `task_paths`."""
    return _named(task, lambda: _build(catalog.for_paths(task_paths).manager(), task))


def _leaf_rules(leaf, task: str, info: catalog.TaskInfo) -> dict:
    """The `metadata: evomerge:` rules of one lm-eval task of a request (a group's task has its own)."""
    if leaf.config.task == task:
        return info.rules
    return catalog.rules_of(dict(leaf.config.metadata or {}), leaf.config.metadata.get("config_source")
                            if isinstance(leaf.config.metadata, dict) else None)


def _field(entry: Any, name: str, default: Any = None) -> Any:
    """A field of an lm-eval config entry, whether a dict or a dataclass."""
    return entry.get(name, default) if isinstance(entry, dict) else getattr(entry, name, default)


def _mean(values: list) -> float:
    return sum(values) / len(values)


def _named(task: str, call: Callable[[], Any]) -> Any:
    """Runs `call`; an error that does not already name the task gets its name in front."""
    try:
        return call()
    except EvomergeError as exc:
        message = str(exc)
        raise EvomergeError(message if message.startswith(task) or task in message.split(":")[0]
                            else f"{task}: {message}") from None


def _build(manager, name: str) -> dict:
    """lm-eval's tasks for `name`, built (their data loaded); data errors name the dataset and how to
    provide it offline, configuration errors the file and the field."""
    try:
        return manager.load([name])
    except EvomergeError:
        raise
    except Exception as exc:  # lm-eval and datasets raise many kinds; each becomes one line
        raise _load_error(manager, name, exc) from None


def _load_error(manager, name: str, exc: Exception) -> EvomergeError:
    entry = manager.task_index.get(name)
    file = getattr(entry, "yaml_path", None) or "inline config"
    config = dict(getattr(entry, "cfg", None) or {})
    text = " ".join(str(exc).split())[:400]
    chain, cause = [], exc
    while cause is not None:
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    missing_data = any(kind in ("DatasetNotFoundError", "ConnectionError", "LocalEntryNotFoundError",
                                "OfflineModeIsEnabled", "FileNotFoundError", "DataFilesNotFoundError",
                                "EmptyDatasetError", "HFValidationError") for kind in chain) \
        or "offline" in text.lower() or "couldn't reach" in text.lower()
    if missing_data:
        dataset = config.get("dataset_path") or "its dataset"
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if files and dataset in LOCAL_BUILDERS:
            return EvomergeError(f"{name}: its data_files {files} are not found (a relative path is read beside the "
                                 f"task YAML, else from the working directory) ({file}; {text})")
        subset = f" ({config['dataset_name']})" if config.get("dataset_name") else ""
        return EvomergeError(
            f"{name}: the data of {dataset}{subset} are not on this machine and nothing is downloaded: put them in "
            "the Hugging Face datasets cache (load_dataset on a machine online, then copy HF_HOME), or point the "
            f"task at local files (dataset_path: json, dataset_kwargs: {{data_files: ...}}) in a task_paths folder "
            f"({file}; {text})")
    field_match = re.search(r"unexpected keyword argument '([^']+)'", text)
    if field_match:
        return EvomergeError(f"{file}: {field_match.group(1)}: not a field of an lm-eval task")
    return EvomergeError(f"{file}: task {name!r} could not be built: {type(exc).__name__}: {text}")


LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders of local files


def make_gold(task) -> None:
    """Turns an lm-eval task into its gold log-likelihood variant, in place: the same prompts and
    exemplars; multiple choice keeps its requests and scores the gold choice's log-probability
    normalised over the choices; generation and log-likelihood tasks score `doc_to_target` as the
    continuation, per token (one forward pass instead of generating)."""
    from lm_eval.api.filter import FilterEnsemble  # noqa: F401  (the type _filters holds)
    from lm_eval.filters import build_filter_ensemble

    if task.OUTPUT_TYPE == "multiple_choice":
        def process(doc, results):
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            gold = gold[0] if isinstance(gold, list) else gold
            if isinstance(gold, str):
                gold = choices.index(gold) if gold in choices else int(gold)
            return tasklib.gold_choice(int(gold), results[:len(choices)])
    elif task.OUTPUT_TYPE in ("generate_until", "loglikelihood"):
        task.OUTPUT_TYPE = "loglikelihood"
        task.config.output_type = "loglikelihood"
        task._filters = [build_filter_ensemble("none", [["take_first", None]])]

        def process(doc, results):
            target = task.doc_to_target(doc)
            target = target[0] if isinstance(target, list) else target
            return tasklib.gold_continuation(doc, results, str(target))
    else:
        raise EvomergeError(f"{task.config.task}.metric: gold_loglik needs a gold answer; the task's output type is "
                            f"{task.OUTPUT_TYPE}")
    from lm_eval.api.metrics import mean

    task.config.process_results = process
    task.UNSAFE_CODE = False  # nothing the model writes is run: it is read, not executed
    task._metric_fn_list = {catalog.GOLD: None}
    task._metric_fn_kwargs = {catalog.GOLD: {}}
    task._aggregation_list = {catalog.GOLD: mean}
    task._higher_is_better = {catalog.GOLD: True}


def _check_sandboxed(task, spec: catalog.MetricSpec) -> None:
    """A task that runs generated code is scored only when evomerge's sandbox judges it: its
    aggregation is tasklib.pass_at_1 itself (never lm-eval's code_eval, which runs it unconfined)."""
    for name, function in task.aggregation().items():
        if function is not tasklib.pass_at_1 and getattr(function, "__wrapped__", None) is not tasklib.pass_at_1:
            raise EvomergeError(
                f"{task.config.task}: runs generated code (unsafe_code) and its metric {name} is not evomerge's "
                "sandboxed pass@1; evomerge runs generated code only in its sandbox (README, \"Your own benchmark\")")


def _narrow(task, docs) -> None:
    """The task scores exactly `docs`, in this order (lm-eval reads them through test_docs)."""
    task.test_docs = lambda: docs  # an instance attribute shadows the method
    if task.config.test_split is None:
        task.config.test_split = task.config.validation_split
    task.task_docs = docs


def _item_value(sample: dict, spec: catalog.MetricSpec, aggregate: Aggregate):
    value = sample[spec.name]
    if aggregate.per_item is not None:
        value = aggregate.per_item(value)
    return float(value) if isinstance(value, (int, float)) else value


@contextlib.contextmanager
def _bars(shown: bool):
    """lm-eval opens several progress bars per call (contexts, tokenizing, requests) and passes
    `disable` itself; inside a search they would bury its one bar, so unless asked for they go to
    the null device. Bars and log handlers made before keep their own stream; errors still raise."""
    if shown:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
        yield


def _samples(output: dict, name: str, spec: catalog.MetricSpec) -> list[dict]:
    """lm-eval's logged samples of one task, in item order (one per item: the metric's filter's)."""
    logged = [s for s in output["samples"].get(name, []) if s.get("filter", "none") == spec.filter]
    return sorted(logged, key=lambda s: s["doc_id"])


def _position(fraction: float, n: int) -> int:
    """Item index at a relative position; a first rung always has at least one item."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return n
    return min(n, max(1, round(fraction * n)))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device
