"""Hostile and mistaken input through the command line, round three: each is one line naming the
field, file or option, exit 2, before any work, and nothing is written or lost."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.cli import main


def _run(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    return code, err


def _recipe(family: dict[str, str], weight="1") -> str:
    return (f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {family['ft_math']}\n    parameters:\n"
            f"      weight: {weight}\n  - model: {family['ft_code']}\n    parameters:\n      weight: 1\n")


def _space(family: dict[str, str], tmp: Path, **overrides) -> dict:
    space = {"name": "bad", "models": [family["ft_math"], family["ft_code"]], "base_model": family["base"],
             "methods": ["task_arithmetic"], "tasks": [{"task": "gsm8k", "metric": "gold_loglik", "size": 2}],
             "n_trials": 2, "dtype": "float32", "results_dir": str(tmp / "results")}
    space.update(overrides)
    return space


FILES = {
    "nested_5000_deep": ("merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
    "nested_100_deep": ("merge_method: linear\nmodels: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64 levels"),
    "a_400_digit_weight": (None, "models.0.parameters.weight: 999999999999... (400 digits) is out of range"),
    "not_utf8": (b"merge_method: linear\n\xff\xfe\n", "is not UTF-8 text"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_recipe_file_that_would_break_the_reader(name, tiny_family, tmp_path, capsys):
    text, message = FILES[name]
    recipe = tmp_path / "r.yaml"
    if text is None:
        text = _recipe(tiny_family, "9" * 400)
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, err = _run(["merge", str(recipe), str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder", "huge"])
def test_a_recipe_or_space_that_is_not_a_small_regular_file(kind, tmp_path, capsys):
    """/dev/zero was read until memory ran out, a FIFO blocked forever."""
    if kind == "dev_zero":
        path, message = Path("/dev/zero"), "is a device, not a regular file"
    elif kind == "fifo":
        path, message = tmp_path / "fifo.yaml", "is a FIFO, not a regular file"
        os.mkfifo(path)
    elif kind == "folder":
        path, message = tmp_path, "is a folder, not a regular file"
    else:
        path, message = tmp_path / "huge.yaml", "a configuration file is at most 16 MiB"
        with open(path, "wb") as handle:
            handle.truncate(17 << 20)
    for command in (["merge", str(path), str(tmp_path / "out")], ["search", str(path), "--dry-run"]):
        code, err = _run(command, capsys)
        assert code == 2 and message in err and str(path) in err, err
    assert not (tmp_path / "out").exists()


def test_a_space_with_a_5000_digit_count_or_one_model_twice(tiny_family, tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(_space(tiny_family, tmp_path)).replace("n_trials: 2", "n_trials: " + "9" * 5000))
    code, err = _run(["search", str(space), "--dry-run"], capsys)
    assert code == 2 and "a number too long to read" in err and str(space) in err, err
    again = tmp_path / "alias"  # the same folder under another name: its trials would all fail
    again.symlink_to(tiny_family["ft_math"])
    space.write_text(yaml.safe_dump(_space(tiny_family, tmp_path, models=[tiny_family["ft_math"], str(again)])))
    code, err = _run(["search", str(space), "--dry-run"], capsys)
    assert code == 2 and f"models.1: {again} is the model 'ft_math' again" in err, err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("args,message", [
    (["--num-fewshot", "-1"], "argument --num-fewshot: must be at least 0, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be above 0, got 0"),
    (["--limit", "0"], "argument --limit: must be above 0, got 0"),
    (["--output", "{tmp}/missing/scores.json"], "the folder {tmp}/missing does not exist"),
    (["--output", "{tmp}"], "--output {tmp}: is a folder"),
])
def test_bad_eval_options_are_refused_before_scoring(args, message, tiny_family, tmp_path, capsys, monkeypatch):
    """--output into a missing folder crashed after scoring (the scores were lost); -1 few-shot meant 4."""
    from evomerge.evaluation import harness

    monkeypatch.setattr(harness.Evaluator, "evaluate", lambda *a, **k: pytest.fail("scored before refusing"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, err = _run(["eval", tiny_family["base"], "--tasks", "gsm8k", *args], capsys)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in err, err


@pytest.mark.parametrize("workers,message", [("0", "must be above 0"), ("5000", "at most")])
def test_worker_counts_are_bounded_by_the_machine(workers, message, tiny_family, tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(_space(tiny_family, tmp_path)))
    code, err = _run(["search", str(space), "--workers", workers], capsys)
    assert code == 2 and f"argument --workers: {message}" in err, err
    assert not (tmp_path / "results").exists()


def _results_folder(tmp_path: Path) -> Path:
    """A results folder as a search leaves it (summary.json naming its study, study.db beside)."""
    folder = tmp_path / "results" / "s"
    folder.mkdir(parents=True)
    storage = f"sqlite:///{folder / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    (folder / "summary.json").write_text(json.dumps({"study": "s", "storage": storage}))
    return folder


@pytest.mark.parametrize("edit,message", [
    ("summary_not_json", "summary.json: not a summary evomerge wrote"),
    ("summary_without_study", "no study name in it"),
    ("study_db_moved", "no study.db here"),
    ("study_db_random_bytes", "cannot open the study storage"),
])
def test_a_hand_edited_results_folder_is_one_line(edit, message, tmp_path, capsys):
    folder = _results_folder(tmp_path)
    if edit == "summary_not_json":
        (folder / "summary.json").write_text("{not json")
    elif edit == "summary_without_study":
        (folder / "summary.json").write_text("[]")
    elif edit == "study_db_moved":
        shutil.move(folder / "study.db", tmp_path / "elsewhere.db")
        (folder / "summary.json").write_text(json.dumps({"study": "s"}))
    else:
        (folder / "study.db").write_bytes(os.urandom(8192))
    code, err = _run(["export", str(folder), str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_report_on_a_corrupt_or_damaged_database_is_one_line(tmp_path, capsys):
    folder = _results_folder(tmp_path)
    db = folder / "study.db"
    connection = sqlite3.connect(db)  # a zeroed page in the middle of an otherwise valid database
    page = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.close()
    data = db.read_bytes()  # every page but the header zeroed: the tables' pages are gone
    db.write_bytes(data[:page] + bytes(len(data) - page))
    code, err = _run(["report", "--storage", f"sqlite:///{db}", "--study-name", "s", "--results",
                      str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith("evomerge: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_a_plot_that_fails_costs_only_itself(tmp_path, monkeypatch, caplog):
    from evomerge.report import plots
    from evomerge.report.results import write_results

    folder = _results_folder(tmp_path)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{folder / 'study.db'}")

    def broken(*args, **kwargs):
        raise ValueError("matplotlib could not")

    monkeypatch.setattr(plots, "history", broken)
    out = tmp_path / "out"
    write_results(study, out, task_names=["t"])
    assert (out / "summary.json").is_file() and (out / "leaderboard.md").is_file()
    assert not (out / "history.png").exists()
    assert "history.png not drawn: ValueError: matplotlib could not" in caplog.text


@pytest.mark.parametrize("damage,message", [
    ("tokenizer", "cannot load its tokenizer"),
    ("layers", "config.json num_hidden_layers is -1; it must be a count above 0"),
])
def test_a_damaged_source_is_named_before_anything_is_written(damage, message, tiny_family, tmp_path, capsys):
    """A corrupt tokenizer was copied into OUT_DIR and `merge` said it succeeded."""
    source = tmp_path / "damaged"
    shutil.copytree(tiny_family["ft_math"], source)
    if damage == "tokenizer":
        (source / "tokenizer.json").write_text("{not json")
    else:
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": -1}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe({**tiny_family, "ft_math": str(source)}))
    code, err = _run(["merge", str(recipe), str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and str(source) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_a_moe_prompt_beyond_the_base_models_context_is_refused_before_any_forward(mode, tiny_family, tmp_path, capsys):
    """A 2 MB gate prompt ran for minutes on a model of 1,024 positions."""
    long = "the cat sat on the mat " * 2_000  # 46 kB, ~12k tokens (the 2 MB case takes the same path, slower)
    experts = [{"source_model": tiny_family[name], "positive_prompts": [prompt]}
               for name, prompt in (("ft_math", "2 + 2 = 4"), ("ft_code", long))]
    config = tmp_path / "moe.yaml"
    config.write_text(yaml.safe_dump({"base_model": tiny_family["base"], "gate_mode": mode, "dtype": "float32",
                                      "experts_per_token": 1, "experts": experts}))
    code, err = _run(["moe", str(config), str(tmp_path / "out")], capsys)
    assert code == 2 and "tokens; the base model" in err and "reads at most 1024" in err, err
    assert not (tmp_path / "out").exists()


def test_eval_takes_tasks_by_commas_or_spaces():
    """`--tasks a b` was 'unrecognized arguments: b'; lm-eval's comma form still works."""
    from evomerge.cli import build_parser, parse_tasks

    for argv in (["--tasks", "gsm8k", "mmlu:gold_loglik"], ["--tasks", "gsm8k,mmlu:gold_loglik"]):
        args = build_parser().parse_args(["eval", "m", *argv])
        requests = parse_tasks(args.tasks, "accuracy", None, 0, None)
        assert [(r.task, r.metric) for r in requests] == [("gsm8k", "accuracy"), ("mmlu", "gold_loglik")]
