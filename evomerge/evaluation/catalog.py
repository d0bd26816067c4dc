"""Where tasks come from, and what a request for one means.

A benchmark is an lm-eval task YAML (data + template + metric), never code of evomerge's. A name
is looked up, first match wins, in:

1. the user's folders (`task_paths:` in space.yaml, `--include-path`), as lm-eval's
   `--include_path` reads them (a later folder overrides an earlier one);
2. evomerge's built-in benchmarks, one folder each in evomerge/tasks (gsm8k, mmlu, humaneval);
3. lm-eval's own registry (~14k YAMLs): found by a text scan of its folder (a fraction of a second)
   instead of lm-eval's full index (~10 s), then read through lm-eval's own loader.

Only the folders holding what was asked for are indexed, once per process. `TaskCatalog.resolve`
turns a request (task, metric, filter) into what lm-eval reports: the metric key, its filter,
whether higher is better, and whether evomerge's gold log-likelihood variant is scored.

evomerge reads an optional `metadata: evomerge:` block in a task YAML (lm-eval ignores it):

    metadata:
      evomerge:
        search: <dataset split>   # what the search scores; default: validation when the task has
        heldout: <dataset split>  #   validation and test, else one half of its split by content hash
        key: <doc field>          # what identifies an item (default: the whole document)
        subset_field: <doc field> # `subjects:` keeps items whose field is one of them
        max_fewshot: <n>          # the most exemplars a prompt can take
        filter: <filter name>     # the filter `accuracy` reads (default: the task's first)
        exemplars_in_items: true  # the dataset puts num_fewshot exemplars in each item itself
        public_split: test        # the search's own split is drawn from this public split (a warning)
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from evomerge.errors import EvomergeError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "tasks"
GOLD = "gold_loglik"  # evomerge's teacher-forced metric: mean per-token log-probability of the gold answer
ACCURACY = "accuracy"  # the task's first metric, read through its default filter
# Metrics that run what the model writes; evomerge scores them only through its sandbox.
CODE_METRICS = ("pass@1", "pass@k", "pass_at_1", "pass_at_k", "code_eval")
RULE_KEYS = ("search", "heldout", "key", "subset_field", "max_fewshot", "filter", "exemplars_in_items",
             "public_split")
_LINE = re.compile(r"""^["']?(task|group)["']?\s*:\s*["']?([^"'\s#\[][^"'#]*?)["']?\s*(?:#.*)?$""", re.MULTILINE)


class TaskError(EvomergeError):
    """A request that names a task, metric or filter the task does not have: `field` is the
    request's field at fault, `detail` the rest; str() reads `task.field: detail`."""

    def __init__(self, task: str, field: str, detail: str):
        self.task, self.field, self.detail = task, field, detail
        super().__init__(f"{task}.{field}: {detail}" if field != "task" else detail)


@dataclass(frozen=True)
class MetricSpec:
    """What one request scores, in lm-eval's words."""

    name: str  # lm-eval's metric key: "exact_match", "acc", "gold_loglik", "pass@1", ...
    filter: str  # lm-eval's filter name ("none" when the task has no filter_list)
    higher_is_better: bool
    gold: bool = False  # scored on evomerge's gold log-likelihood variant of the task

    @property
    def key(self) -> str:
        return f"{self.name},{self.filter}"


@dataclass(frozen=True)
class TaskInfo:
    """A task or group as its YAML declares it, read without loading any data."""

    name: str
    file: Path | None
    source: str  # "task_paths", "built-in" or "lm-eval"
    kind: str  # "task" or "group"
    leaves: tuple[str, ...]  # the tasks scored: the task itself, or a group's (and subgroups') tasks
    config: dict = field(compare=False, hash=False, repr=False)  # raw: includes resolved, functions as paths
    rules: dict = field(compare=False, hash=False, repr=False)  # `metadata: evomerge:`

    @property
    def output_type(self) -> str:
        return self.config.get("output_type") or "generate_until"

    @property
    def unsafe_code(self) -> bool:
        return bool(self.config.get("unsafe_code"))


def _metric_entries(config: dict) -> list[dict]:
    """The task's metric_list, or lm-eval's defaults for its output type."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    listed = config.get("metric_list")
    if listed:
        return [entry for entry in listed if isinstance(entry, dict)]
    return [{"metric": name} for name in DEFAULT_METRIC_REGISTRY.get(config.get("output_type") or "generate_until", [])]


def metric_name(entry: dict) -> str:
    """A metric_list entry's name (a `!function` metric is named after its function, as lm-eval does)."""
    name = str(entry.get("metric"))
    return name.rpartition(".")[2] if "/" in name else name


def _higher_is_better(entry: dict) -> bool:
    from lm_eval.api.registry import is_higher_better

    if "higher_is_better" in entry:
        return bool(entry["higher_is_better"])
    found = is_higher_better(metric_name(entry))
    return True if found is None else bool(found)


def filter_names(config: dict) -> list[str]:
    return [str(f.get("name")) for f in config.get("filter_list") or [] if isinstance(f, dict)] or ["none"]


def is_sandboxed(config: dict) -> bool:
    """Whether every code-running metric of the task is evomerge's sandboxed pass@1 (its aggregation
    `tasklib.pass_at_1`), never lm-eval's `code_eval`, which runs the program unconfined."""
    for entry in _metric_entries(config):
        aggregation = str(entry.get("aggregation", ""))
        if metric_name(entry) in CODE_METRICS or config.get("unsafe_code"):
            if not aggregation.endswith(".pass_at_1") or "/" not in aggregation:
                return False
    return True


class TaskCatalog:
    """The tasks reachable from some folders (plus the built-ins and lm-eval's registry)."""

    def __init__(self, paths: Sequence[str | Path] = ()):
        self.paths = tuple(dict.fromkeys(Path(p).expanduser().resolve() for p in paths))
        for path in self.paths:
            if not path.is_dir():
                raise EvomergeError(f"task_paths: {path} is not a folder of task YAMLs")
        self._lm_eval_dirs: list[Path] = []
        self._index: dict[str, Any] | None = None
        self._unreadable: dict[Path, str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ finding

    @property
    def roots(self) -> list[Path]:
        """The folders indexed, lowest precedence first (lm-eval's rule: later folders override)."""
        return [*self._lm_eval_dirs, BUILTIN_DIR, *self.paths]

    def _source(self, file: Path | None) -> str:
        if file is None:
            return "lm-eval"
        if any(file.is_relative_to(p) for p in self.paths):
            return "task_paths"
        return "built-in" if file.is_relative_to(BUILTIN_DIR) else "lm-eval"

    def index(self) -> dict[str, Any]:
        """lm-eval's index (name -> Entry) of the folders found so far."""
        if self._index is None:
            from lm_eval.tasks._index import TaskIndex

            self._index = TaskIndex.build(self.roots)
            self._unreadable = {}
            for root in (BUILTIN_DIR, *self.paths):
                for file in sorted(root.glob("**/*.yaml")):
                    try:
                        _load(file, resolve=False)
                    except EvomergeError as exc:
                        self._unreadable[file] = str(exc)
        return self._index

    def _find(self, name: str):
        with self._lock:
            entry = self.index().get(name)
            if entry is None:
                found = _scan_lm_eval().get(name)
                if found:
                    new = [d for d in found if d not in self._lm_eval_dirs]
                    if new:
                        self._lm_eval_dirs.extend(new)
                        self._index = None
                        entry = self.index().get(name)
            return entry

    def _unknown(self, name: str) -> EvomergeError:
        known = set(self.index()) | set(_scan_lm_eval())
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
        builtins = ", ".join(sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")))
        searched = [str(p) for p in self.paths] + [f"evomerge's built-in tasks ({builtins})", "lm-eval's registry"]
        broken = [f"{file}: {problem}" for file, problem in self._unreadable.items()]
        return TaskError(name, "task",
            f"unknown task {name!r}; searched {', '.join(searched)}"
            + (f"; close matches: {', '.join(close)}" if close else "")
            + (f"; unreadable task files: {'; '.join(broken)}" if broken else ""))

    def info(self, name: str) -> TaskInfo:
        """The task or group `name`, read from its YAML (no data loaded)."""
        from lm_eval.tasks._index import Kind

        entry = self._find(name)
        if entry is None:
            raise self._unknown(name)
        if entry.kind is Kind.TAG:
            leaves = tuple(sorted(entry.tags))
            first = self.info(leaves[0])
            return TaskInfo(name, None, first.source, "group", leaves, first.config, first.rules)
        file = Path(entry.yaml_path) if entry.yaml_path else None
        config = _load(file, resolve=False) if file else dict(entry.cfg or {})
        if entry.kind is Kind.PY_TASK:
            raise EvomergeError(f"{file}: task {name!r} is a Python class (class:); evomerge scores YAML tasks, "
                                "whose documents it can divide into search and held-out items")
        if entry.kind is Kind.GROUP:
            leaves = tuple(dict.fromkeys(leaf for member in _members(config, file)
                                         for leaf in self.info(member).leaves))
            first = self.info(leaves[0]) if leaves else None
            if first is None:
                raise EvomergeError(f"{file}: group {name!r} lists no tasks")
            return TaskInfo(name, file, self._source(file), "group", leaves, first.config, first.rules)
        rules = rules_of(config.get("metadata"), file)
        return TaskInfo(name, file, self._source(file), "task", (name,), config, rules)

    # ------------------------------------------------------------------ meaning of a request

    def metric(self, task: str, metric: str, filter: str | None = None) -> MetricSpec:
        """What `metric` (with `filter`) of `task` means; errors name what the task has."""
        info = self.info(task)
        config = info.config
        entries = _metric_entries(config)
        names = [metric_name(e) for e in entries]
        filters = filter_names(config)
        default_filter = info.rules.get("filter") or filters[0]
        if filter is not None and filter not in filters:
            raise TaskError(task, "filter", f"{task}'s filters are {', '.join(filters)}, got {filter!r}")
        if metric == GOLD:
            if GOLD in names:
                return MetricSpec(GOLD, filter or "none", True)
            if info.output_type == "loglikelihood_rolling":
                raise TaskError(task, "metric", f"gold_loglik needs a gold answer to score; {task} is a "
                                f"loglikelihood_rolling task (use one of {', '.join(names)})")
            return MetricSpec(GOLD, "none", True, gold=True)
        if metric == ACCURACY:
            if not entries:
                raise TaskError(task, "metric", f"{task} declares no metric")
            entry = entries[0]
        else:
            entry = next((e for e in entries if metric_name(e) == metric), None)
            if entry is None:
                raise TaskError(task, "metric", f"{task}'s metrics are {', '.join([ACCURACY, *names, GOLD])}, "
                                f"got {metric!r}")
        return MetricSpec(metric_name(entry), filter or default_filter, _higher_is_better(entry))

    def max_fewshot(self, task: str) -> int | None:
        """The most exemplars a prompt of `task` can take, where the task declares it (else its
        few-shot split decides when loaded)."""
        value = self.info(task).rules.get("max_fewshot")
        return None if value is None else int(value)

    def check_code(self, task: str) -> bool:
        """Whether scoring `task` runs generated code; refuses, naming the task, code that evomerge's
        sandbox would not be the one to run."""
        info = self.info(task)
        runs = False
        for leaf in info.leaves:
            config = self.info(leaf).config if leaf != task else info.config
            unsafe = bool(config.get("unsafe_code")) or any(
                metric_name(e) in CODE_METRICS for e in _metric_entries(config))
            if unsafe and not is_sandboxed(config):
                used = ", ".join(f"{metric_name(e)} aggregated by {str(e.get('aggregation', 'default')).rpartition('/')[2]}"
                                 for e in _metric_entries(config))
                raise EvomergeError(
                    f"{leaf}: scoring it runs generated code outside evomerge's sandbox ({used}); evomerge runs "
                    "generated code only in its sandbox: use the built-in humaneval, or score the task with "
                    "evomerge's sandboxed pass@1 (README, \"Your own benchmark\")")
            runs = runs or unsafe
        return runs

    def fingerprint(self, task: str) -> str:
        """sha256 of what defines `task`'s scores: every file in the folders of its YAMLs (the YAMLs,
        their includes and utils.py, data beside them) and local data files named elsewhere."""
        info = self.info(task)
        files: set[Path] = set()
        for leaf in info.leaves:
            leaf_info = self.info(leaf) if leaf != task else info
            if leaf_info.file is not None:
                files.update(p for p in leaf_info.file.parent.iterdir() if p.is_file())
            kwargs = leaf_info.config.get("dataset_kwargs") or {}
            for value in _flatten(kwargs.get("data_files")):
                where = Path(value) if Path(value).is_absolute() else (
                    leaf_info.file.parent / value if leaf_info.file else Path(value))
                if where.is_file():
                    files.add(where)
        digest = hashlib.sha256(task.encode())
        for file in sorted(files):
            digest.update(str(file.name).encode() + b"\0" + _file_digest(file).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------ building

    def manager(self, metadata: dict[str, Any] | None = None):
        """An lm-eval TaskManager over the indexed folders only (relative `data_files` of the user's
        tasks and the built-ins resolved against their YAML's folder, so a search runs from any
        directory)."""
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._index import Entry, Kind

        manager = TaskManager(include_path=[str(p) for p in self.roots], include_defaults=False, metadata=metadata)
        index = manager.task_index
        for name, entry in list(index.items()):
            if entry.kind is Kind.TASK and entry.yaml_path and self._source(Path(entry.yaml_path)) != "lm-eval":
                config = _load(Path(entry.yaml_path), resolve=True)
                if _anchor_data_files(config, Path(entry.yaml_path).parent):
                    index[name] = Entry(name=name, kind=entry.kind, yaml_path=None, cfg=config, tags=entry.tags)
        return manager


def _load(file: Path, *, resolve: bool) -> dict:
    """A task YAML through lm-eval's loader (includes merged); errors name the file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(file, resolve_func=resolve)
    except yaml.YAMLError as exc:
        raise EvomergeError(f"{file}: not valid YAML: {' '.join(str(exc).split())}") from None
    except (OSError, ValueError, ImportError, AttributeError, SyntaxError) as exc:
        raise EvomergeError(f"{file}: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise EvomergeError(f"{file}: a task YAML is a mapping")
    return config


def rules_of(metadata: Any, file: Path | str | None) -> dict:
    """A task's `metadata: evomerge:` block, checked."""
    rules = (metadata or {}).get("evomerge") if isinstance(metadata, dict) else None
    if rules is None:
        return {}
    if not isinstance(rules, dict):
        raise EvomergeError(f"{file}: metadata.evomerge: a mapping of {', '.join(RULE_KEYS)}")
    unknown = sorted(set(rules) - set(RULE_KEYS))
    if unknown:
        raise EvomergeError(f"{file}: metadata.evomerge.{unknown[0]}: not a field (fields: {', '.join(RULE_KEYS)})")
    return dict(rules)


def _members(config: dict, file: Path | None) -> list[str]:
    members = config.get("task")
    if not isinstance(members, list) or not members:
        raise EvomergeError(f"{file}: group {config.get('group')!r}: task: lists no tasks")
    names = []
    for member in members:
        if isinstance(member, str):
            names.append(member)
        elif isinstance(member, dict) and isinstance(member.get("task"), str):
            names.append(member["task"])
        elif isinstance(member, dict) and isinstance(member.get("group"), str):
            names.append(member["group"])
        else:
            raise EvomergeError(f"{file}: group {config.get('group')!r}: task: entries are names or "
                                f"{{task: NAME}}, got {member!r}")
    return names


def _anchor_data_files(config: dict, folder: Path) -> bool:
    """Relative local `data_files` that exist beside the YAML point there; True when any changed."""
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or kwargs.get("data_files") is None:
        return False
    changed = False

    def anchor(value):
        nonlocal changed
        if isinstance(value, str) and not Path(value).is_absolute() and "://" not in value \
                and (folder / value).exists() and not Path(value).exists():
            changed = True
            return str(folder / value)
        if isinstance(value, list):
            return [anchor(v) for v in value]
        if isinstance(value, dict):
            return {k: anchor(v) for k, v in value.items()}
        return value

    kwargs["data_files"] = anchor(kwargs["data_files"])
    return changed


def _flatten(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _flatten(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flatten(item)]
    return []


def _file_digest(file: Path) -> str:
    stat = file.stat()
    return _digest_of(str(file), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _digest_of(file: str, _size: int, _mtime: int) -> str:
    """A file's sha256, computed once per version of it (size and modification time)."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _scan_lm_eval() -> dict[str, tuple[Path, ...]]:
    """Task and group names of lm-eval's registry -> the folders of the YAMLs that declare them, by a
    text scan (lm-eval's own index parses all ~14k files, ~10 s)."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    found: dict[str, list[Path]] = {}
    for file in root.glob("**/*.yaml"):
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for _kind, name in _LINE.findall(text):
            found.setdefault(name.strip(), []).append(file.parent)
        for tag in _tags(text):
            found.setdefault(tag, []).append(file.parent)
    return {name: tuple(dict.fromkeys(dirs)) for name, dirs in found.items()}


def _tags(text: str) -> Iterable[str]:
    match = re.search(r"""^["']?tag["']?\s*:\s*(.*)$""", text, re.MULTILINE)
    if not match:
        return []
    value = match.group(1).strip()
    if value:
        return [t.strip(" '\"") for t in value.strip("[]").split(",") if t.strip(" '\"")]
    following = text[match.end():].splitlines()[1:]
    tags = []
    for line in following:
        item = re.match(r"""^\s+-\s*["']?([^"'\s]+)["']?\s*$""", line)
        if not item:
            break
        tags.append(item.group(1))
    return tags


_CATALOGS: dict[tuple[Path, ...], TaskCatalog] = {}


def for_paths(paths: Sequence[str | Path] = ()) -> TaskCatalog:
    """The catalog of these folders, built once per process."""
    key = tuple(dict.fromkeys(Path(p).expanduser().resolve() for p in paths))
    if key not in _CATALOGS:
        _CATALOGS[key] = TaskCatalog(key)
    return _CATALOGS[key]
