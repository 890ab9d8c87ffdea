"""``python -m stages.compare``: experiments as a table that fits a terminal (the run on real
experiments is in tests/test_pipeline.py)."""

import json
import os

import pytest

from stages import compare
from transfer.errors import PipelineError, UsageError
from transfer.experiments import experiments, flatten


def entry(rev, name, C, accuracy, log_loss, finetune=None, source="digits"):
    metrics = {"head": {"accuracy": accuracy, "balanced_accuracy": accuracy,
                        "macro_f1": accuracy, "log_loss": log_loss, "ece": 0.05}}
    if finetune is not None:
        metrics["finetune"] = {"accuracy": finetune, "balanced_accuracy": finetune,
                               "macro_f1": finetune, "log_loss": 0.2, "ece": 0.04}
    return {"rev": rev, "name": name, "error": None, "experiments": None, "data": {
        "rev": rev, "timestamp": "2026-12-03T06:00:00", "deps": {}, "outs": {}, "meta": {},
        "params": {"params.yaml": {"data": {"seed": 42, "data": {"source": source},
                                            "head": {"C": C, "class_weight": None}}}},
        "metrics": {"metrics/evaluate.json": {"data": metrics}}}}


def exp_show():
    """What ``dvc exp show --json`` gives: the workspace, then the commit and its experiments
    (the newest first), one of them failed."""
    baseline = entry("a" * 40, "main", "auto", 0.93, 0.30)
    failed = {"rev": "d" * 40, "name": "sour-moth", "error": {"msg": "failed"},
              "experiments": None, "data": None}
    baseline["experiments"] = [
        {"name": "big-cats", "executor": None, "revs": [entry("b" * 40, "big-cats", 10, 0.92,
                                                              0.35, finetune=0.95)]},
        {"name": "tiny-dogs", "executor": None, "revs": [entry("c" * 40, "tiny-dogs", 0.001,
                                                               0.85, 0.47)]},
        {"name": "sour-moth", "executor": {"state": "failed", "name": "dvc-task"},
         "revs": [failed]},
    ]
    return [entry("workspace", None, 10, 0.92, 0.35, finetune=0.95), baseline]


@pytest.fixture
def project(monkeypatch, tmp_path):
    """A project folder to run ``compare.main`` in, ``dvc exp show`` answering ``exp_show()``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setattr(compare, "dvc", lambda *args: json.dumps(exp_show()))
    monkeypatch.setattr(compare, "kept_epoch", lambda row: 0)
    return tmp_path


def test_flatten_gives_dotted_keys_and_keeps_lists_and_nulls_whole():
    assert flatten({"head": {"C": 1, "hidden": [256, 64], "x": None}, "seed": 3}) == {
        "head.C": 1, "head.hidden": [256, 64], "head.x": None, "seed": 3}


def test_rows_are_the_workspace_the_commit_and_its_experiments_in_order():
    rows = experiments(exp_show())
    assert [(row.name, row.state) for row in rows] == [
        ("workspace", None), ("main", None), ("big-cats", None), ("tiny-dogs", None),
        ("sour-moth", "failed")]
    assert rows[0].rev is None and rows[1].rev == "a" * 40
    assert rows[2].params["head.C"] == 10 and rows[2].metrics["finetune.accuracy"] == 0.95
    assert rows[4].params == {} and rows[4].metrics == {}


def test_only_changed_parameters_become_columns_and_the_best_values_are_starred(monkeypatch):
    monkeypatch.setattr(compare, "kept_epoch", lambda row: 2)
    rows = experiments(exp_show())[1:]
    metrics = compare.metric_columns(rows, compare.SHORT)
    assert metrics == ["head.accuracy", "head.log_loss", "head.ece",
                       "finetune.accuracy", "finetune.log_loss", "finetune.ece"]
    header, body = compare.build_table(rows, metrics, star=True)
    assert header == ["experiment", "head.C", "head acc", "head log loss", "head ECE",
                      "ft acc", "ft log loss", "ft ECE", "ft epoch"]
    assert body[0] == ["main", "auto", "0.9300*", "0.3000*", "0.0500", "-", "-", "-", "-"]
    assert body[1] == ["big-cats", "10", "0.9200", "0.3500", "0.0500", "0.9500", "0.2000",
                       "0.0400", "2"]
    assert body[3][:2] == ["sour-moth (failed)", "-"]
    # One value in a whole column (the ECE here) is nobody's best.
    assert not any(line[4].endswith("*") for line in body)


def test_sorting_puts_the_best_first_lowest_for_losses_highest_for_accuracy():
    rows = experiments(exp_show())[1:]
    by_loss = compare.sort_rows(rows, "head.log_loss")
    assert [row.name for row in by_loss] == ["main", "big-cats", "tiny-dogs", "sour-moth"]
    by_accuracy = compare.sort_rows(rows, "head.accuracy")
    assert [row.name for row in by_accuracy][:3] == ["main", "big-cats", "tiny-dogs"]
    assert [row.name for row in compare.sort_rows(rows, "head.C")] == [
        "tiny-dogs", "big-cats", "main", "sour-moth"]  # "auto" is not a number: after them


def test_the_workspace_row_is_left_out_when_it_holds_its_commits_results():
    rows = experiments(exp_show())
    assert compare.drop_unchanged_workspace(rows)[0].name == "workspace"  # it differs
    rows[0].params, rows[0].metrics = rows[1].params, rows[1].metrics
    assert compare.drop_unchanged_workspace(rows)[0].name == "main"


def test_the_table_aligns_its_columns_and_csv_and_markdown_hold_the_same_cells():
    header, body = ["experiment", "head.C", "head acc"], [["main", "auto", "0.9300*"],
                                                          ["tiny-dogs", "0.001", "0.8500"]]
    # The header's first line holds each column's section, its second the rest of the title.
    assert compare.render(header, body, "table").splitlines() == [
        "            head   head model",
        "experiment      C         acc",
        "main         auto     0.9300*",
        "tiny-dogs   0.001      0.8500"]
    assert compare.render(header, body, "csv").splitlines()[1] == "main,auto,0.9300*"
    assert compare.render(header, body, "md").splitlines()[2] == "| main | auto | 0.9300* |"


def test_main_prints_the_table_and_refuses_an_unknown_sort_key(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="from the project root"):
        compare.main([])
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    calls = []
    monkeypatch.setattr(compare, "dvc", lambda *args: calls.append(args) or
                        json.dumps(exp_show()))
    monkeypatch.setattr(compare, "kept_epoch", lambda row: 0)
    compare.main(["--sort-by", "head.log_loss", "--rev", "main"])
    assert calls == [("exp", "show", "--json", "--rev", "main")]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["head", "head", "model", "fine-tuned", "model"]
    assert lines[1].split()[:3] == ["experiment", "C", "acc"]
    assert [line.split()[0] for line in lines[2:]] == [
        "main", "workspace", "big-cats", "tiny-dogs", "sour-moth"]
    with pytest.raises(PipelineError, match=r"--sort-by: 'head.f1' is neither a metric nor a "
                                            r"parameter.*metrics: head.accuracy, "):
        compare.main(["--sort-by", "head.f1"])


def test_a_parameter_older_commits_lack_is_a_column_only_where_its_values_differ():
    rows = experiments(exp_show())[1:4]
    rows[0].params.pop("head.class_weight")  # an older commit, before the key existed
    rows[1].params["head.new"] = 1  # only one row has it: nothing to compare
    assert compare.changed_params(rows) == ["head.C"]
    rows[2].params["head.class_weight"] = "balanced"
    assert compare.changed_params(rows) == ["head.C", "head.class_weight"]


def test_sections_stand_over_their_columns_and_widen_the_narrowest():
    header = ["experiment", "seed", "finetune.lr", "finetune.epochs", "audit.k", "ft acc",
              "ft epoch"]
    body = [["main", "42", "0.001", "3", "10", "0.9500", "2"]]
    assert compare.render(header, body, "table").splitlines() == [
        "                  finetune          audit  fine-tuned model",
        "experiment  seed     lr  epochs      k     acc     epoch",
        "main          42  0.001       3     10  0.9500         2"]
    # Markdown and CSV keep each whole title in one line.
    assert compare.render(header, body, "csv").splitlines()[0] == ",".join(header)


def test_drop_and_keep_choose_columns_as_dvc_exp_show_does():
    columns = ["head.C", "audit.k", "audit.margin", "head.accuracy", "finetune.accuracy"]
    assert compare.selected(columns, None, None) == columns
    assert compare.selected(columns, "audit|finetune", None) == ["head.C", "head.accuracy"]
    assert compare.selected(columns, "audit", "margin") == [
        "head.C", "audit.margin", "head.accuracy", "finetune.accuracy"]


def test_main_drops_columns_and_refuses_a_pattern_that_is_not_one(project, capsys):
    compare.main(["--drop", "finetune|head.C", "--format", "csv"])
    assert capsys.readouterr().out.splitlines()[0] == \
        "experiment,head acc,head log loss,head ECE"
    with pytest.raises(UsageError, match=r"--drop: 'head.\(' is not a regular expression"):
        compare.main(["--drop", "head.("])


def test_a_table_wider_than_the_terminal_says_how_to_narrow_it(monkeypatch):
    table = "x" * 130 + "\n"
    monkeypatch.setattr(compare.shutil, "get_terminal_size", lambda: os.terminal_size((100, 40)))
    monkeypatch.setattr(compare.sys.stdout, "isatty", lambda: True)
    assert compare.wider_than_the_terminal(table).startswith(
        "the table is 130 characters wide, the terminal 100: --drop REGEX")
    assert compare.wider_than_the_terminal("x" * 90 + "\n") is None
    monkeypatch.setattr(compare.sys.stdout, "isatty", lambda: False)  # a pipe or a file
    assert compare.wider_than_the_terminal(table) is None


def test_a_table_wider_than_the_width_is_printed_in_blocks_of_columns_that_fit():
    header = ["experiment", "data.source", "backbone.name", "head.C", "head acc",
              "head log loss", "head ECE"]
    body = [["main", "data/raw/monkeys", "tf_efficientnet_lite0", "auto", "0.9831",
             "0.0503*", "0.0254"],
            ["m-lite2", "data/raw/monkeys", "tf_efficientnet_lite2", "auto", "0.9944*",
             "0.0542", "0.0095*"]]
    whole = compare.render(header, body, "table")
    assert compare.wrapped(header, body, 0) == whole
    assert compare.wrapped(header, body, compare.width_of(whole)) == whole
    blocks = compare.wrapped(header, body, 60).split("\n\n")
    assert [block.splitlines() for block in blocks] == [
        ["            data              backbone               head",
         "experiment            source                   name     C",
         "main        data/raw/monkeys  tf_efficientnet_lite0  auto",
         "m-lite2     data/raw/monkeys  tf_efficientnet_lite2  auto"],
        ["            head model",
         "experiment      acc  log loss      ECE",
         "main         0.9831   0.0503*   0.0254",
         "m-lite2     0.9944*    0.0542  0.0095*"]]
    # A column wider than the width with the experiment's stands in a block of its own.
    narrow = compare.wrapped(header, body, 30).split("\n\n")
    assert [block.splitlines()[1].split()[1:] for block in narrow] == [
        ["source"], ["name"], ["C", "acc"], ["log", "loss", "ECE"]]
    assert [compare.width_of(block) for block in narrow] == [28, 33, 28, 29]


def test_main_wraps_a_table_wider_than_the_terminal_and_not_into_a_pipe(project, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(compare.shutil, "get_terminal_size", lambda: os.terminal_size((50, 40)))
    compare.main([])
    whole = capsys.readouterr().out
    assert "\n\n" not in whole and compare.width_of(whole) > 50  # into a pipe: one table
    monkeypatch.setattr(compare.sys.stdout, "isatty", lambda: True)
    compare.main([])
    blocks = capsys.readouterr().out.split("\n\n")
    assert len(blocks) > 1 and all(compare.width_of(block) <= 50 for block in blocks)
    assert all(block.splitlines()[1].startswith("experiment") for block in blocks)
    compare.main(["--width", "0"])
    assert capsys.readouterr().out == whole
    with pytest.raises(UsageError, match=r"--width: -1 is not a width"):
        compare.main(["--width", "-1"])
