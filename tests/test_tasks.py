"""Any lm-eval task: the user's own task YAMLs over local JSON-lines data (one per output type), a
task of lm-eval's registry read from a datasets cache, their splits, metrics and errors, and a
search over a custom task end to end. lm-eval's own CLI is the oracle for the scores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.evaluation import Evaluator, TaskRequest, task_items
from evomerge.evaluation.catalog import for_paths

WORDS = ["red", "blue", "green", "amber", "violet", "silver", "copper", "ivory", "olive", "coral", "scarlet", "teal"]

MC_TASK = """\
task: quiz_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: data/quiz_mc_validation.jsonl
    test: data/quiz_mc_test.jsonl
output_type: multiple_choice
validation_split: validation
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_TASK = """\
task: quiz_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/quiz_gen.jsonl
output_type: generate_until
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  max_gen_toks: 12
  do_sample: false
filter_list:
  - name: first-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
  - name: whole
    filter:
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
metadata:
  version: 1.0
"""

LL_TASK = """\
task: quiz_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/quiz_ll.jsonl
output_type: loglikelihood
test_split: test
doc_to_text: "{{context}}"
doc_to_target: " {{target}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GROUP = """\
group: quiz
task: [quiz_mc, quiz_ll]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
"""


def _rows_mc(count: int, offset: int) -> list[dict]:
    return [{"question": f"Which colour is number {i}?", "answer": i % 4,
             "choices": [WORDS[(i + k) % len(WORDS)] for k in range(4)]} for i in range(offset, offset + count)]


def write_tasks(folder: Path) -> Path:
    """A folder of task YAMLs and their data, as a user would write it (data beside the YAMLs)."""
    (folder / "data").mkdir(parents=True)
    for name, text in (("quiz_mc.yaml", MC_TASK), ("quiz_gen.yaml", GEN_TASK), ("quiz_ll.yaml", LL_TASK),
                       ("_quiz.yaml", GROUP)):
        (folder / name).write_text(text)
    files = {
        "quiz_mc_validation.jsonl": _rows_mc(24, 0),
        "quiz_mc_test.jsonl": _rows_mc(30, 100),
        "quiz_gen.jsonl": [{"question": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)} for a in range(40)],
        "quiz_ll.jsonl": [{"context": f"The {WORDS[i % 12]} key opens door", "target": str(i)} for i in range(36)],
    }
    for name, rows in files.items():
        (folder / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("my_tasks"))


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_family["base"])


def lm_eval_cli(model: str, task_dir: Path, task: str, out: Path, extra: list[str] = (), chat: bool = True) -> dict:
    """lm-eval's own CLI on `task` (run from the task folder: lm-eval reads relative data_files from
    the working directory); its results section."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model}",
               "--include_path", str(task_dir), "--tasks", task, "--batch_size", "8", "--device", "cpu",
               *(["--apply_chat_template"] if chat else []), "--output_path", str(out), *extra]
    done = subprocess.run(command, cwd=task_dir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.rglob("results_*.json")
    return json.loads(found.read_text())["results"]


def evomerge_eval(model: str, task_dir: Path, spec: str, out: Path, *extra: str) -> dict:
    from evomerge.cli import main

    assert main(["eval", model, "--tasks", spec, "--include-path", str(task_dir), "--split", "all",
                 "--batch-size", "8", "--device", "cpu", "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- lm-eval is the oracle


@pytest.mark.oracle
@pytest.mark.parametrize("task,metrics", [
    ("quiz_mc", ["acc,none", "acc_norm,none"]),
    ("quiz_gen", ["exact_match,first-number", "exact_match,whole"]),
    ("quiz_ll", ["perplexity,none", "acc,none"]),
])
def test_split_all_equals_lm_evals_cli(task, metrics, task_dir, tiny_family, tmp_path):
    """`evomerge eval --split all` scores every item as `lm_eval --include_path DIR --tasks NAME
    --apply_chat_template` does (the tiny model has a chat template): each metric to 1e-6."""
    theirs = lm_eval_cli(tiny_family["base"], task_dir, task, tmp_path / "lm_eval")[task]
    report = evomerge_eval(tiny_family["base"], task_dir, task, tmp_path / "ours.json")
    ours = report["results"][task]
    for metric in metrics:
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-6), metric
    assert report["items"][task]["rule"] == "every item"
    # the score evomerge reports is the task's first metric through its first filter
    assert report["scores"][task] == pytest.approx(theirs[metrics[0]], abs=1e-6)


@pytest.mark.oracle
def test_without_the_chat_template_too(task_dir, tiny_family, tmp_path):
    """--apply-chat-template false scores as lm_eval does without --apply_chat_template, and says so."""
    theirs = lm_eval_cli(tiny_family["base"], task_dir, "quiz_mc", tmp_path / "lm_eval", chat=False)["quiz_mc"]
    report = evomerge_eval(tiny_family["base"], task_dir, "quiz_mc", tmp_path / "ours.json",
                           "--apply-chat-template", "false")
    assert report["apply_chat_template"] is False
    assert report["results"]["quiz_mc"]["acc,none"] == pytest.approx(theirs["acc,none"], abs=1e-6)
    chat = evomerge_eval(tiny_family["base"], task_dir, "quiz_mc", tmp_path / "chat.json")
    assert chat["apply_chat_template"] is True
    assert chat["results"]["quiz_mc"]["acc,none"] != report["results"]["quiz_mc"]["acc,none"] or \
        chat["results"]["quiz_mc"]["acc_norm,none"] != report["results"]["quiz_mc"]["acc_norm,none"]


@pytest.mark.oracle
def test_a_group_scores_its_tasks_items_as_lm_eval_aggregates_them(task_dir, tiny_family, tmp_path):
    theirs = lm_eval_cli(tiny_family["base"], task_dir, "quiz", tmp_path / "lm_eval")
    report = evomerge_eval(tiny_family["base"], task_dir, "quiz", tmp_path / "ours.json", "--metric", "acc")
    assert report["n_items"]["quiz"] == 30 + 36
    assert set(report["items"]["quiz"]) == {"quiz_mc", "quiz_ll"}
    assert report["scores"]["quiz"] == pytest.approx(theirs["quiz"]["acc,none"], abs=1e-6)


# ----------------------------------------------------------------------------- splits


def test_validation_searches_and_test_is_held_out(task_dir):
    search, record = task_items("quiz_mc", "search", None, 0, task_paths=[task_dir])
    held, held_record = task_items("quiz_mc", "heldout", None, 0, task_paths=[task_dir])
    assert len(search) == 24 and len(held) == 30
    assert {r["question"] for r in search} == {r["question"] for r in _rows_mc(24, 0)}
    assert record["quiz_mc"]["from"] == "validation" and held_record["quiz_mc"]["from"] == "test"


def test_one_split_is_divided_by_content_hash(task_dir):
    search = task_items("quiz_gen", "search", None, 0, task_paths=[task_dir])[0]
    held = task_items("quiz_gen", "heldout", None, 0, task_paths=[task_dir])[0]
    every = task_items("quiz_gen", "all", None, 0, task_paths=[task_dir])[0]
    questions = lambda rows: {r["question"] for r in rows}  # noqa: E731
    assert search and held and not questions(search) & questions(held)
    assert questions(search) | questions(held) == questions(every) and len(every) == 40
    # seeded order, prefix-stable; the pools themselves never depend on the seed
    assert task_items("quiz_gen", "search", 5, 1, task_paths=[task_dir])[0] == \
        task_items("quiz_gen", "search", None, 1, task_paths=[task_dir])[0][:5]
    assert questions(task_items("quiz_gen", "search", None, 7, task_paths=[task_dir])[0]) == questions(search)
    assert [r["question"] for r in task_items("quiz_gen", "search", None, 7, task_paths=[task_dir])[0]] != \
        [r["question"] for r in search]


# ----------------------------------------------------------------------------- metrics


def test_metrics_as_the_task_declares_them(task_dir):
    found = for_paths([task_dir])
    assert found.metric("quiz_mc", "accuracy").key == "acc,none"
    assert found.metric("quiz_mc", "acc_norm").key == "acc_norm,none"
    assert found.metric("quiz_gen", "accuracy").key == "exact_match,first-number"
    assert found.metric("quiz_gen", "exact_match", "whole").key == "exact_match,whole"
    perplexity = found.metric("quiz_ll", "perplexity")
    assert perplexity.key == "perplexity,none" and not perplexity.higher_is_better
    assert found.metric("quiz_gen", "gold_loglik").gold and found.metric("quiz_mc", "gold_loglik").gold


def test_gold_loglik_for_every_output_type(task_dir, tiny_family, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"]).eval()
    requests = [TaskRequest(t, "gold_loglik", size=6) for t in ("quiz_mc", "quiz_gen", "quiz_ll")]
    scores = Evaluator(requests, tokenizer, task_paths=[task_dir], batch_size=4).evaluate(model, per_item=True)
    for task in ("quiz_mc", "quiz_gen", "quiz_ll"):
        assert len(scores.per_item[task]) == 6 and all(v < 0 for v in scores.per_item[task]), task
    # multiple choice: the gold choice's log-probability normalised over the choices, so at most 0
    # and above log(1/4) on average only if the model prefers the gold choice
    assert all(v <= 0 for v in scores.per_item["quiz_mc"])


# ----------------------------------------------------------------------------- errors


def _eval_error(capsys, *args: str) -> str:
    from evomerge.cli import main

    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("evomerge: error:")]
    return line


def test_unknown_task_names_the_paths_and_close_matches(task_dir, tiny_family, capsys):
    err = _eval_error(capsys, tiny_family["base"], "--tasks", "quiz_mcq", "--include-path", str(task_dir))
    assert "unknown task 'quiz_mcq'" in err and str(task_dir) in err and "quiz_mc" in err
    assert "lm-eval's registry" in err


def test_data_not_on_disk_names_the_dataset(tmp_path, tiny_family, capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "t.yaml").write_text(MC_TASK.replace(
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: data/quiz_mc_validation.jsonl\n"
        "    test: data/quiz_mc_test.jsonl\n", "dataset_path: someone/private_quiz\n").replace("quiz_mc", "hub_only"))
    (folder / "missing.yaml").write_text(MC_TASK.replace("quiz_mc", "no_files"))
    err = _eval_error(capsys, tiny_family["base"], "--tasks", "hub_only", "--include-path", str(folder))
    assert err.startswith("evomerge: error: hub_only: the data of someone/private_quiz are not on this machine")
    assert "datasets cache" in err and "data_files" in err
    err = _eval_error(capsys, tiny_family["base"], "--tasks", "no_files", "--include-path", str(folder))
    assert err.startswith("evomerge: error: no_files: its data_files {'validation': 'data/no_files_validation.jsonl'")
    assert "are not found" in err


@pytest.mark.parametrize("text,message", [
    ("task: broken\ndataset_path: [unclosed\n", "not valid YAML"),
    (MC_TASK.replace("quiz_mc", "typo_task").replace("doc_to_text", "doc_to_txt"), "doc_to_txt: not a field"),
])
def test_a_malformed_task_names_the_file_and_field(text, message, tmp_path, tiny_family, capsys):
    folder = write_tasks(tmp_path / "tasks")
    (folder / "broken.yaml").write_text(text)
    name = "typo_task" if "typo_task" in text else "broken"
    err = _eval_error(capsys, tiny_family["base"], "--tasks", name, "--include-path", str(folder))
    assert str(folder / "broken.yaml") in err and message in err


def test_lm_evals_unconfined_code_tasks_are_refused_by_name(tiny_family, capsys):
    """lm-eval's mbpp runs programs with code_eval, unconfined: evomerge refuses it before loading it."""
    err = _eval_error(capsys, tiny_family["base"], "--tasks", "mbpp")
    assert "mbpp: scoring it runs generated code outside evomerge's sandbox (pass_at_1 aggregated by mean)" in err


# ----------------------------------------------------------------------------- lm-eval's registry


def build_arc_cache(home: Path) -> None:
    """What `load_dataset("allenai/ai2_arc", "ARC-Easy")` leaves in the datasets cache on a machine
    online, for a small made-up ARC: lm-eval's arc_easy then loads offline."""
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, offset in (("train", 0), ("validation", 200), ("test", 400)):
        rows = [{"id": f"q{i}", "question": f"Which colour is number {i}?", "answerKey": "ABCD"[i % 4],
                 "choices": {"text": [WORDS[(i + k) % 12] for k in range(4)], "label": list("ABCD")}}
                for i in range(offset, offset + 20)]
        files[split] = str(home / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(dataset_name="ai2_arc", config_name="ARC-Easy", data_files=files, cache_dir=str(home / "build"))
    builder.download_and_prepare()
    target = home / "datasets" / "allenai___ai2_arc" / "ARC-Easy" / "0.0.0" / "0123456789abcdef"
    shutil.copytree(builder.cache_dir, target)


@pytest.mark.e2e
def test_a_registry_task_runs_from_the_datasets_cache(tmp_path, tiny_family):
    build_arc_cache(tmp_path)
    code = f"""
import json, os
from evomerge.evaluation import Evaluator, TaskRequest, load_model
model, tokenizer = load_model({tiny_family['base']!r}, device="cpu")
evaluator = Evaluator([TaskRequest("arc_easy", "acc_norm", size=8)], tokenizer, split="heldout", batch_size=4)
scores = evaluator.evaluate(model, per_item=True)
print(json.dumps({{"score": scores.scores["arc_easy"], "items": scores.items["arc_easy"],
                  "split": evaluator.describe_splits()["arc_easy"]}}))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["items"] == 8 and 0 <= found["score"] <= 1
    assert found["split"]["from"] == "test" and found["split"]["of"] == 20  # validation searches, test is held out


# ----------------------------------------------------------------------------- search


def test_a_search_over_a_custom_task_end_to_end(task_dir, tiny_family, tmp_path):
    """A space naming the user's tasks by a relative task_paths folder: trials, the held-out table
    with paired intervals on the custom tasks, which items each side used, perplexity minimised."""
    from evomerge.search import SearchSpace, run_search

    work = tmp_path / "project"
    shutil.copytree(task_dir, work / "my_tasks")
    space = {
        "name": "custom", "base_model": tiny_family["base"], "methods": "task_arithmetic",
        "models": [{"name": "math", "path": tiny_family["ft_math"]}, {"name": "code", "path": tiny_family["ft_code"]}],
        "task_paths": ["my_tasks"],
        "tasks": [{"task": "quiz_ll", "metric": "perplexity", "size": 8}],
        "heldout": [{"task": "quiz_mc", "metric": "accuracy", "size": 12},
                    {"task": "quiz_ll", "metric": "perplexity", "size": 10}],
        "n_trials": 4, "dtype": "float32", "pruning": {"enabled": False}, "apply_chat_template": False,
        "results_dir": str(tmp_path / "results"),
    }
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    summary = run_search(SearchSpace.load(work / "space.yaml"), progress=False)
    folder = tmp_path / "results" / "custom"
    leaderboard = json.loads((folder / "summary.json").read_text())
    assert leaderboard["trials"]["COMPLETE"] == 4
    assert leaderboard["apply_chat_template"] == {"setting": False, "applied": False}
    # the objective is minus the perplexity: the best trial has the lowest
    import optuna

    study = optuna.load_study(study_name="custom", storage=f"sqlite:///{folder / 'study.db'}")
    perplexities = {t.number: t.user_attrs["scores"]["quiz_ll"] for t in study.trials}
    best = min(perplexities, key=perplexities.get)
    assert summary["best"]["trial"] == best and summary["best"]["value"] == pytest.approx(-perplexities[best])
    held = summary["heldout"]
    assert held["columns"] == ["quiz_mc/accuracy", "quiz_ll/perplexity"]
    assert held["higher_is_better"] == {"quiz_mc/accuracy": True, "quiz_ll/perplexity": False}
    for source in ("math", "code", "base"):
        found = held["comparisons"][source]["quiz_ll/perplexity"]
        winner, theirs = (held["rows"][n]["scores"]["quiz_ll/perplexity"] for n in ("winner", source))
        assert found["difference"] == pytest.approx(theirs - winner)  # positive: the winner's is lower
        assert found["low"] <= found["difference"] <= found["high"] and found["items"] == 10
    items = leaderboard["reproduce"]["items"]
    assert items["search"]["quiz_ll/perplexity"]["rule"].startswith("even content hashes")
    assert items["heldout"]["quiz_mc/accuracy"]["from"] == "test"
    assert "Lower is better for quiz_ll/perplexity" in (folder / "heldout.md").read_text()


def test_the_readmes_own_benchmark_runs_as_written(tiny_family, tmp_path):
    """The README's "Your own benchmark" task YAML, copied verbatim, scores through evomerge eval."""
    import re

    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n# my_tasks/quiz.yaml\n(.*?)```", readme, re.DOTALL).group(1)
    folder = tmp_path / "my_tasks"
    (folder / "data").mkdir(parents=True)
    (folder / "quiz.yaml").write_text(block)
    (folder / "data" / "quiz.jsonl").write_text("".join(
        json.dumps({"question": f"What is {a} plus {a + 1}?", "answer": str(2 * a + 1)}) + "\n" for a in range(12)))
    report = evomerge_eval(tiny_family["base"], folder, "quiz", tmp_path / "ours.json", "--limit", "4")
    assert report["n_items"] == {"quiz": 4} and 0 <= report["scores"]["quiz"] <= 1


CODE_TASK = """\
task: my_code
dataset_path: json
dataset_kwargs: {data_files: {test: data/code.jsonl}}
unsafe_code: true
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{canonical_solution}}"
generation_kwargs: {until: ["\\ndef"], max_gen_toks: 24, do_sample: false}
process_results: !function utils.code_generation
metric_list:
  - metric: pass@1
    aggregation: !function utils.AGGREGATION
    higher_is_better: true
metadata:
  version: 1.0
"""


OWN_UTILS = "from evomerge.evaluation.tasklib import code_generation, pass_at_1\n"
FORGED_UTILS = "from evomerge.evaluation.tasklib import code_generation\ndef pass_at_1(items):\n    return 1.0\n"


@pytest.mark.parametrize("aggregation,utils,sandboxed,message", [
    ("pass_at_1", OWN_UTILS, True, None),
    ("my_own_pass_at_1", OWN_UTILS + "def my_own_pass_at_1(items):\n    return 0.0\n", False,
     "my_code: scoring it runs generated code outside evomerge's sandbox \\(pass@1 aggregated by utils.my_own_pass_at_1\\)"),
    ("pass_at_1", FORGED_UTILS, False, "my_code: runs generated code \\(unsafe_code\\) and its metric pass@1 is not evomerge's"),
], ids=["sandboxed", "own-aggregation", "same-name-not-ours"])
def test_a_code_task_of_ones_own_is_judged_by_the_sandbox_only(aggregation, utils, sandboxed, message, tmp_path,
                                                               tiny_family, tokenizer):
    """A HumanEval-shaped task of the user's scores pass@1 through evomerge's sandbox (the judge's
    verdicts, item by item); the same task aggregated by its own function, which could run the
    program anywhere, is refused by name before anything is generated."""
    from transformers import AutoModelForCausalLM

    from evomerge.evaluation import tasklib
    from evomerge.evaluation.sandbox import bubblewrap

    if sandboxed and bubblewrap() is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("bubblewrap is missing: CI scores generated code under kernel isolation", pytrace=False)
        pytest.skip("needs bubblewrap (apt-get install bubblewrap); CI installs it")
    folder = tmp_path / "code_tasks"
    (folder / "data").mkdir(parents=True)
    (folder / "code.yaml").write_text(CODE_TASK.replace("AGGREGATION", aggregation))
    (folder / "utils.py").write_text(utils)
    rows = [{"task_id": f"t{i}", "entry_point": f"add{i}", "canonical_solution": f"    return a + b + {i}\n",
             "prompt": f"def add{i}(a, b):\n    \"\"\"a + b + {i}\"\"\"\n",
             "test": f"def check(candidate):\n    assert candidate(1, 2) == {3 + i}\n"} for i in range(4)]
    (folder / "data" / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = AutoModelForCausalLM.from_pretrained(tiny_family["base"]).eval()
    if not sandboxed:
        with pytest.raises(EvomergeError, match=message):
            Evaluator([TaskRequest("my_code", "accuracy")], tokenizer, task_paths=[folder], split="all")
        return
    evaluator = Evaluator([TaskRequest("my_code", "accuracy")], tokenizer, task_paths=[folder], split="all")
    scores = evaluator.evaluate(model, per_item=True)
    jobs = [sample["pass@1"] for sample in scores.samples["my_code"]]
    assert len(jobs) == 4 and all(job in tasklib._verdicts for job in jobs)  # judged by the sandbox
    assert scores.per_item["my_code"] == [float(tasklib._verdicts[job]) for job in jobs]
    assert scores.scores["my_code"] == sum(scores.per_item["my_code"]) / 4


def test_search_takes_include_path_like_eval(task_dir, tiny_family, tmp_path, capsys):
    from evomerge.cli import main

    space = {"name": "inc", "base_model": tiny_family["base"], "models": [tiny_family["ft_math"], tiny_family["ft_code"]],
             "tasks": [{"task": "quiz_gen", "metric": "gold_loglik", "size": 4}], "n_trials": 2,
             "results_dir": str(tmp_path / "results")}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert main(["search", str(tmp_path / "space.yaml"), "--dry-run", "1"]) == 2
    assert "tasks.0.task: unknown task 'quiz_gen'" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "space.yaml"), "--include-path", str(task_dir), "--dry-run", "1"]) == 0
    assert "# candidate 0 (task_arithmetic)" in capsys.readouterr().out
