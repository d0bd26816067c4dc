"""The package's shape: layers import only downwards, no import circles, one home for the trial record.

Imports are read from the source (module level and inside functions alike), so a lazy import that
breaks a layer fails here even if no test happens to run it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "evomerge"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the evomerge modules it imports (`from pkg import sub` counts as `pkg.sub`)."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, file in files.items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [s for s in subs if s in files] or [node.module]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    assert cycles(import_graph()) == []


# A layer may import only what lies below it.
FORBIDDEN = {
    "evomerge.methods": ("evomerge.recipe", "evomerge.engine", "evomerge.evaluation", "evomerge.search",
                         "evomerge.report", "evomerge.cli"),
    "evomerge.engine": ("evomerge.evaluation", "evomerge.search", "evomerge.report", "evomerge.cli"),
    "evomerge.evaluation": ("evomerge.engine", "evomerge.search", "evomerge.report", "evomerge.cli"),
    "evomerge.report": ("evomerge.engine", "evomerge.search", "evomerge.cli"),
    "evomerge.search": ("evomerge.cli",),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    graph = import_graph()
    offending = sorted(f"{module} -> {target}" for module, targets in graph.items()
                       if module == layer or module.startswith(layer + ".")
                       for target in targets if target.startswith(FORBIDDEN[layer]))
    assert offending == []


def test_the_registry_does_not_import_the_methods():
    assert import_graph()["evomerge.methods.registry"] <= {"evomerge.methods.kernels"}


def test_trial_record_keys_are_spelled_in_one_module():
    """Attribute keys ("evomerge:…") live in evomerge/trials.py alone; nowhere else spells one."""
    spelled = []
    for file in PACKAGE.rglob("*.py"):
        if file.name == "trials.py":
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"evomerge:\w+:?", node.value):
                spelled.append(f"{file.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert spelled == []


# What the repository ships must run for its reader: no folder of the machine it was made on.
MACHINE_PATH = re.compile(r"(?<![\w.])(/tmp/|/home/|/root/|/work/|/Users/|[A-Z]:\\\\)")


def test_shipped_files_name_no_machine_paths():
    shipped = [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *(REPO / "search_spaces").glob("*.yaml"),
               *(p for p in (REPO / "docs").rglob("*") if p.suffix in (".yaml", ".csv", ".json"))]
    found = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in shipped
             for m in MACHINE_PATH.finditer(p.read_text(encoding="utf-8"))]
    assert found == []


def test_shipped_demo_recipe_names_the_family_and_resolves_on_any_machine(tmp_path, monkeypatch):
    from evomerge.demo.family import is_member_ref, member_path
    from evomerge.recipe import Recipe

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    recipe = Recipe.load(REPO / "docs" / "demo-results" / "best.yaml")
    refs = recipe.referenced_models()
    assert refs and all(map(is_member_ref, refs))
    resolved = recipe.with_models({ref: member_path(ref) for ref in refs})
    assert all(Path(ref).is_relative_to(tmp_path / "cache") for ref in resolved.referenced_models())
    assert resolved.to_dict()["models"][0]["parameters"] == recipe.to_dict()["models"][0]["parameters"]


def test_the_readme_command_writes_where_the_repository_tracks_nothing():
    """`evomerge search search_spaces/demo.yaml` (the README's main command) writes results/<study>/:
    a git-ignored folder holding no tracked file, so running it leaves `git status` clean."""
    import subprocess

    from evomerge.search.space import SearchSpace

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    assert "evomerge search search_spaces/demo.yaml" in (REPO / "README.md").read_text(encoding="utf-8")
    space = SearchSpace.load(REPO / "search_spaces" / "demo.yaml")
    written = space.results_root / space.config.name
    assert written.is_relative_to(REPO.absolute()), f"{written} is outside the repository"
    written = written.relative_to(REPO.absolute())
    for name in ("best.yaml", "summary.json", "study.db", "search.log", "history.png"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(written / name)], cwd=REPO)
        assert ignored.returncode == 0, f"{written / name} is not ignored by git"
    tracked = subprocess.run(["git", "ls-files", str(written)], cwd=REPO, capture_output=True, text=True, check=True)
    assert tracked.stdout == ""


def test_the_code_is_lint_clean():
    """ruff, as pyproject.toml configures it, over the package, the tests and the benchmarks."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is missing: it comes with the test extra (pip install -e '.[test]')", pytrace=False)
    found = subprocess.run([ruff, "check", "--no-cache", "evomerge", "tests", "benchmarks"], cwd=REPO,
                           capture_output=True, text=True)
    assert found.returncode == 0, found.stdout[-3000:]
