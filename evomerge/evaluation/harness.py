"""The evaluation harness: scores a model held in memory with lm-eval, offline.

Tasks are lm-eval task YAMLs shipped in evomerge/tasks, loaded once through
`TaskManager(include_path=...)`; each evaluation is one `lm_eval.simple_evaluate` call on an
`HFLM` wrapped around the very model object the merge engine writes into (rebuilt only when the
engine hands over a different object, e.g. a different layer count). The search and
`evomerge eval` call the same `Evaluator.evaluate`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError
from evomerge.evaluation import data, tasklib

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
METRICS = ("accuracy", "gold_loglik")

# (task, metric) -> (lm-eval task name, the number that is "the score", lm-eval's filter for it)
TASK_TABLE = {
    ("gsm8k", "accuracy"): ("evomerge_gsm8k", "exact_match", "flexible-extract"),
    ("gsm8k", "gold_loglik"): ("evomerge_gsm8k_gold", "gold_loglik", "none"),
    ("mmlu", "accuracy"): ("evomerge_mmlu", "acc", "none"),
    ("mmlu", "gold_loglik"): ("evomerge_mmlu", "gold_loglik", "none"),
    ("humaneval", "accuracy"): ("evomerge_humaneval", "pass@1", "none"),
    ("humaneval", "gold_loglik"): ("evomerge_humaneval_gold", "gold_loglik", "none"),
}


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


def runs_generated_code(task: str, metric: str) -> bool:
    """Whether scoring this task executes what the model writes (HumanEval's pass@1)."""
    return TASK_TABLE[(task, metric)][1] == "pass@1"


@dataclass(frozen=True)
class TaskRequest:
    """One task to score: which benchmark, which metric, how many items, how many shots."""

    task: str
    metric: str = "accuracy"
    size: int | None = None
    num_fewshot: int = 0
    subjects: tuple[str, ...] | None = None  # MMLU only
    max_gen_toks: int | None = None  # generation tasks: cap on new tokens (default: the task's)

    def __post_init__(self):
        if self.task not in data.TASKS:
            raise EvomergeError(f"tasks: unknown task {self.task!r}; known: {', '.join(data.TASKS)}")
        if self.metric not in METRICS:
            raise EvomergeError(f"{self.task}.metric: must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.num_fewshot > data.max_fewshot(self.task):
            raise EvomergeError(f"{self.task}.num_fewshot: at most {data.max_fewshot(self.task)} exemplars, "
                                f"got {self.num_fewshot}")

    @property
    def lm_eval_task(self) -> str:
        return TASK_TABLE[(self.task, self.metric)][0]

    @property
    def primary(self) -> str:
        return TASK_TABLE[(self.task, self.metric)][1]

    @property
    def filter(self) -> str:
        return TASK_TABLE[(self.task, self.metric)][2]


@dataclass
class Scores:
    """Per-task primary scores plus lm-eval's full results layout."""

    scores: dict[str, float]  # "task" -> primary value for the requested metric
    results: dict[str, dict[str, Any]]  # lm-eval's "results" section
    seconds: float
    items: dict[str, int] = field(default_factory=dict)
    per_item: dict[str, list[float]] = field(default_factory=dict)  # with evaluate(per_item=True)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # lm-eval's logged samples, per_item=True

    def to_json(self) -> dict[str, Any]:
        return {"scores": self.scores, "results": self.results, "seconds": self.seconds, "n_items": self.items}

    @staticmethod
    def combine(first: "Scores", rest: "Scores") -> "Scores":
        """Scores of two disjoint item sets as one (every metric here is a mean over items)."""
        scores, items = {}, {}
        for task, value in first.scores.items():
            a, b = first.items.get(task, 0), rest.items.get(task, 0)
            items[task] = a + b
            scores[task] = value if b == 0 else (rest.scores[task] if a == 0 else (a * value + b * rest.scores[task]) / (a + b))
        return Scores(scores, {"first": first.results, "rest": rest.results}, first.seconds + rest.seconds, items)


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
    ):
        offline()
        if not requests:
            raise EvomergeError("tasks: nothing to evaluate")
        names = [r.task for r in requests]
        if len(set(names)) != len(names):
            raise EvomergeError(f"tasks: each task once, got {names}")
        self.requests = list(requests)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.split, self.seed = split, seed
        self.batch_size = batch_size
        self.max_length = max_length
        if apply_chat_template == "auto":
            apply_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.apply_chat_template = apply_chat_template
        self.progress = progress
        self._lm = None
        self._model = None
        tasklib.set_token_counter(lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        tasklib.set_sandbox_options(workers=sandbox_workers)
        if any(runs_generated_code(r.task, r.metric) for r in self.requests):
            from evomerge.evaluation.sandbox import require_isolation

            require_isolation()  # before any generation: refused here, not after minutes of it
        _cache_env_info()
        self._tasks = self._load_tasks()

    def _load_tasks(self) -> dict[str, Any]:
        from lm_eval.tasks import TaskManager

        sizes = {r.task: r.size for r in self.requests}
        subjects = next((list(r.subjects) for r in self.requests if r.task == "mmlu" and r.subjects), None)
        for r in self.requests:  # fail early on impossible sizes, naming the task
            data.select(r.task, self.split, r.size, self.seed, subjects=list(r.subjects) if r.subjects else None)
        manager = TaskManager(
            include_path=str(TASKS_DIR), include_defaults=False,
            metadata={"split": self.split, "seed": self.seed, "sizes": sizes, "subjects": subjects,
                      "fewshot": {r.task: r.num_fewshot for r in self.requests}},
        )
        self._manager = manager
        wanted = sorted({r.lm_eval_task for r in self.requests})
        loaded = manager.load(wanted)
        tasks = dict(_leaf_tasks(loaded))
        for r in self.requests:
            task = tasks[r.lm_eval_task]
            # MMLU's exemplars are its subject's, which lm-eval's sampler cannot choose per item:
            # the dataset puts them in each item (from the metadata above), so the sampler adds none.
            exemplars_in_items = (task.config.metadata or {}).get("exemplars_in_items", False)
            task.set_config(key="num_fewshot", value=0 if exemplars_in_items else r.num_fewshot)
            if r.max_gen_toks and task.config.output_type == "generate_until":
                generation = dict(task.config.generation_kwargs or {})
                generation["max_gen_toks"] = r.max_gen_toks
                task.set_config(key="generation_kwargs", value=generation)
        return tasks

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
        for name, task in self._tasks.items():
            generation = dict(task.config.generation_kwargs or {})
            budget = generation.get("max_gen_toks", 256)
            if task.config.output_type == "generate_until" and budget >= max_length:
                log.warning("%s: %d new tokens do not fit a %d-token context; generating up to %d", name,
                            budget, max_length, max_length // 2)
                generation["max_gen_toks"] = max_length // 2
                task.set_config(key="generation_kwargs", value=generation)

    def evaluate(self, model, *, limit: int | float | None = None, part: tuple[float, float] | None = None,
                 per_item: bool = False) -> Scores:
        """Scores `model`. `limit` keeps the first items of each task; `part=(a, b)` scores the
        items at relative positions [a, b) of each task (rungs of a staged evaluation, combined
        with `Scores.combine`)."""
        from lm_eval import simple_evaluate

        start = time.perf_counter()
        tasks = sorted({r.lm_eval_task for r in self.requests})
        subset = None
        if part is not None:
            subset = {}
            for name in tasks:
                n = len(self._tasks[name].eval_docs)
                lo, hi = _position(part[0], n), _position(part[1], n)
                subset[name] = list(range(lo, max(hi, lo)))
            if not any(subset.values()):
                return Scores({r.task: math.nan for r in self.requests}, {}, 0.0, {r.task: 0 for r in self.requests})
        lm = self.lm(model)
        self._fit_generation(lm.max_length)
        with torch.inference_mode(), _bars(self.progress):
            output = simple_evaluate(
                model=lm,
                tasks=[self._tasks[name] for name in tasks],
                task_manager=self._manager,  # else lm-eval indexes its 26k built-in YAMLs (~10 s) per call
                limit=limit,
                samples=subset,
                bootstrap_iters=0,
                log_samples=per_item,
                apply_chat_template=self.apply_chat_template,
                fewshot_as_multiturn=bool(self.apply_chat_template),
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
                confirm_run_unsafe_code=True,  # HumanEval runs in evomerge's sandbox
            )
        results = output["results"]
        scores, items = {}, {}
        for r in self.requests:
            row = results[r.lm_eval_task]
            value = row.get(f"{r.primary},{r.filter}", row.get(r.primary))
            scores[r.task] = float(value)
            items[r.task] = int(output.get("n-samples", {}).get(r.lm_eval_task, {}).get("effective", 0))
        details = {}
        if per_item:
            for r in self.requests:
                if r.primary == "pass@1":  # a job per sample, judged when lm-eval aggregated them
                    details[r.task] = [float(tasklib.passed(s[r.primary])) for s in _samples(output, r)]
                else:
                    details[r.task] = [float(s[r.primary]) for s in _samples(output, r)]
        samples = {r.task: _samples(output, r) for r in self.requests} if per_item else {}
        return Scores(scores, results, time.perf_counter() - start, items, details, samples)


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


def _samples(output: dict, request: TaskRequest) -> list[dict]:
    """lm-eval's logged samples of one request, in item order (one per item: its filter's)."""
    logged = [s for s in output["samples"][request.lm_eval_task] if s.get("filter", "none") == request.filter]
    return sorted(logged, key=lambda s: s["doc_id"])


def _position(fraction: float, n: int) -> int:
    """Item index at a relative position; a first rung always has at least one item."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return n
    return min(n, max(1, round(fraction * n)))


def _leaf_tasks(tree) -> list[tuple[str, Any]]:
    from lm_eval.api.task import Task

    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found.extend(_leaf_tasks(value))
        elif isinstance(value, Task):
            found.append((key if isinstance(key, str) else value.config.task, value))
    return found


def _device_of(model) -> torch.device:
    return next(model.parameters()).device
