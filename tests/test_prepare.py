import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from stages import prepare
from tests.conftest import (
    kill_stage_midway,
    one_error_line,
    run_stage_cli,
    stage_environment,
    working_directory,
    write_colour_folder,
    write_image,
    write_params,
)
from transfer.catalog import Catalog
from transfer.data import SPLITS, ImageStore
from transfer.errors import PipelineError


def test_prepare_writes_the_store_and_the_report(embedded_project):
    report = json.loads((embedded_project / "reports" / "data.json").read_text())
    assert report["classes"] == ["blue", "green", "red"]
    assert report["skipped"] == [] and report["duplicates"] == []
    for split in SPLITS:
        store = ImageStore(embedded_project / "data" / "prepared", split)
        assert len(store) == sum(report["counts"][split].values()) == report["totals"][split] > 0


def test_digits_source_gives_all_1797_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"data": {"source": "digits"}})
    prepare.main()
    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    totals = report["totals"]
    assert sum(totals.values()) == 1797
    assert 200 < totals["test"] < 340 and 200 < totals["val"] < 340  # about 15% each
    assert report["small_images"]["count"] == 1797  # 8x8 pixels: reported, not hidden


def test_bad_params_fail_with_one_line_and_no_output(tmp_path):
    write_params(tmp_path, {"data": {"sorce": "digits"}})
    result = run_stage_cli("prepare", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: unknown key 'data.sorce' (did you mean 'data.source'?); "
        "valid keys in data: source, val_size, test_size, min_per_class, max_per_class, "
        "short_side, exclude, relabel"]
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()


def test_missing_source_and_tiny_class_are_named(tmp_path):
    write_params(tmp_path, {"data": {"source": "data/raw/nothing"}})
    result = run_stage_cli("prepare", tmp_path)
    assert result.returncode == 1
    assert "error: data.source: 'data/raw/nothing' does not exist" in result.stderr
    assert "Traceback" not in result.stderr

    write_colour_folder(tmp_path / "data" / "raw" / "few", per_class=2)
    write_params(tmp_path, {"data": {"source": "data/raw/few"}})
    result = run_stage_cli("prepare", tmp_path)
    assert result.returncode == 1
    assert ("error: classes 'blue' (2), 'green' (2), 'red' (2) have fewer usable images than "
            "data.min_per_class=5" in result.stderr)
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.parametrize("source", ["elsewhere/photos", "data/raw/../../elsewhere/photos",
                                    "elsewhere/labels.csv"])
def test_a_source_dvc_does_not_watch_is_refused(tmp_path, source):
    write_colour_folder(tmp_path / "elsewhere" / "photos", per_class=6)
    (tmp_path / "elsewhere" / "labels.csv").write_text("path,label\n")
    (tmp_path / "data" / "raw").mkdir(parents=True)
    write_params(tmp_path, {"data": {"source": source}})
    result = run_stage_cli("prepare", tmp_path)
    assert one_error_line(result).startswith(
        f"error: data.source: '{source}' is outside data/raw/, which dvc.yaml watches for "
        "changes, so dvc repro would call the results up to date after its files change; "
        "copy it in (e.g. cp -r ")
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.parametrize("source", ["data/raw/linked", "data/raw/linked/labels.csv",
                                    "data/raw/inside/linked"])
@pytest.mark.parametrize("stage", ["check_params", "prepare"])
def test_a_source_reached_through_a_link_out_of_data_raw_is_refused(tmp_path, source, stage):
    # DVC records a link in data/raw/ as a link, not what it leads to: files added there
    # later would leave `dvc status` saying everything is up to date.
    elsewhere = tmp_path / "elsewhere"
    write_colour_folder(elsewhere, per_class=6)
    (elsewhere / "labels.csv").write_text("path,label\n")
    (tmp_path / "data" / "raw" / "inside").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "linked").symlink_to(elsewhere)
    (tmp_path / "data" / "raw" / "inside" / "linked").symlink_to(elsewhere)
    write_params(tmp_path, {"data": {"source": source}})
    target = elsewhere / "labels.csv" if source.endswith(".csv") else elsewhere
    assert one_error_line(run_stage_cli(stage, tmp_path)) == (
        f"error: data.source: '{source}' leads through a link to '{target}', outside "
        "data/raw/: dvc.yaml watches data/raw/ but not what its links lead to, so dvc repro "
        "would call the results up to date after those files change; copy the files into "
        "data/raw/ instead of linking them")
    assert not (tmp_path / "data" / "prepared").exists()


def test_a_link_from_one_folder_of_data_raw_to_another_is_read(tmp_path):
    write_colour_folder(tmp_path / "data" / "raw" / "photos-v2", per_class=6)
    (tmp_path / "data" / "raw" / "photos").symlink_to(tmp_path / "data" / "raw" / "photos-v2")
    write_params(tmp_path, {"data": {"source": "data/raw/photos"}})
    assert run_stage_cli("prepare", tmp_path).returncode == 0


@pytest.mark.parametrize(("source", "suggested"), [
    ("Digits", "digits"), ("data/raw/monkey10", "data/raw/monkeys10"),
    ("~/photos/monkeys10", "data/raw/monkeys10"), ("data/raw/lemurs", None)])
@pytest.mark.parametrize("stage", ["check_params", "prepare"])
def test_a_source_that_does_not_exist_is_named_before_anything_else(tmp_path, source,
                                                                    suggested, stage):
    # check_params says it first, so that `dvc repro` stops before DVC deletes prepare's
    # outputs; 'Digits' is a misspelt built-in set, not a folder outside data/raw/ to copy in.
    write_colour_folder(tmp_path / "data" / "raw" / "monkeys10", per_class=6)
    write_params(tmp_path, {"data": {"source": source}})
    line = one_error_line(run_stage_cli(stage, tmp_path))
    hint = f" (did you mean '{suggested}'?)" if suggested else ""
    assert line == (f"error: data.source: '{source}' does not exist{hint}; expected 'digits', "
                    "'torchvision:<Name>', or a .csv manifest or an image-folder root under "
                    "data/raw/")


def test_a_source_tracked_by_dvc_but_not_pulled_says_to_pull_it(tmp_path):
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "monkeys10.dvc").write_text("outs:\n- path: monkeys10\n")
    write_params(tmp_path, {"data": {"source": "data/raw/monkeys10"}})
    assert one_error_line(run_stage_cli("check_params", tmp_path)) == (
        "error: data.source: 'data/raw/monkeys10' is tracked by DVC (data/raw/monkeys10.dvc) "
        "but not in the workspace; fetch it: dvc pull data/raw/monkeys10.dvc")


def test_a_misspelt_folder_is_matched_among_folders_before_the_built_in_set(tmp_path):
    write_colour_folder(tmp_path / "data" / "raw" / "Digits", per_class=6)
    (tmp_path / "data" / "raw" / "gone").symlink_to(tmp_path / "nowhere")
    for source, hint in (("data/raw/digits", "data/raw/Digits"), ("data/raw/gone", None)):
        write_params(tmp_path, {"data": {"source": source}})
        line = one_error_line(run_stage_cli("check_params", tmp_path))
        assert line.startswith(f"error: data.source: '{source}' does not exist")
        assert (f"(did you mean '{hint}'?)" in line) if hint else "did you mean" not in line


def test_a_folder_holding_a_manifest_points_to_it(tmp_path, caplog):
    root = tmp_path / "data" / "raw" / "set"
    write_colour_folder(root / "img", per_class=6)
    (root / "labels.csv").write_text("path,label\n")
    write_params(tmp_path, {"data": {"source": "data/raw/set"}})
    with working_directory(tmp_path), pytest.raises(PipelineError, match="one class"):
        prepare.main()
    assert "to read labels.csv as a manifest, point data.source at it " \
           "('data/raw/set/labels.csv')" in caplog.text


@pytest.mark.slow
def test_a_killed_prepare_leaves_no_partial_store_and_reruns_identically(tmp_path, monkeypatch):
    from benchmarks.decode_speed import generate

    generate(tmp_path / "data" / "raw" / "photos", 120, size=(1600, 1200))
    write_params(tmp_path, {"data": {"source": "data/raw/photos", "min_per_class": 1}})
    monkeypatch.chdir(tmp_path)
    prepare.main()
    store = tmp_path / "data" / "prepared"
    reference = {p.name: p.read_bytes() for p in store.iterdir()}
    shutil.rmtree(store)
    staging = (tmp_path / "data").glob
    kill_stage_midway("prepare", tmp_path, lambda: any(
        p.stat().st_size for p in staging(".prepared.tmp-*/staging/*")))
    assert not store.exists()
    prepare.main()  # what `dvc repro` runs next
    assert not list((tmp_path / "data").glob(".prepared.*"))
    assert {p.name: p.read_bytes() for p in store.iterdir()} == reference


def test_a_full_catalog_disk_names_tmpdir_and_leaves_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_colour_folder(tmp_path / "data" / "raw" / "colours")
    write_params(tmp_path, {"data": {"source": "data/raw/colours"}})

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Catalog, "find_duplicates", full)
    with pytest.raises(PipelineError, match=r"prepare's temporary catalog failed \(database "
                                            r"or disk is full\); it lives in \$TMPDIR"):
        prepare.main()
    assert not (tmp_path / "data" / "prepared").exists()
    assert not list((tmp_path / "data").glob(".prepared*"))


def test_a_single_class_stops_prepare_naming_it(tmp_path):
    for i in range(6):
        write_image(tmp_path / "data" / "raw" / "one" / "cats" / f"{i}.png", (i, 2, 3), seed=i)
    write_params(tmp_path, {"data": {"source": "data/raw/one"}})
    assert one_error_line(run_stage_cli("prepare", tmp_path)) == (
        "error: data.source 'data/raw/one': one class found ('cats'); a classifier needs at "
        "least two classes (two class folders, or two labels in the manifest)")
    assert not (tmp_path / "data" / "prepared").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]  # no scratch left


def write_pre_split(root, layout: dict[str, list[str]], per_class: int = 3) -> None:
    """``root/<split>/<class>/<i>.png`` for each split and its classes, every image unique."""
    for s, (split, classes) in enumerate(layout.items()):
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png", (40 * c, 9 * s, i), seed=s * 99 + i)


def test_a_training_split_of_one_class_stops_prepare(tmp_path):
    write_pre_split(tmp_path / "data" / "raw" / "set",
                    {"train": ["a"], "val": ["a", "b"], "test": ["a", "b"]})
    write_params(tmp_path, {"data": {"source": "data/raw/set", "min_per_class": 1}})
    assert one_error_line(run_stage_cli("prepare", tmp_path)) == (
        "error: data.source 'data/raw/set': one class with a training image ('a'); a classifier "
        "needs at least two classes (two class folders, or two labels in the manifest)")


def test_a_class_without_training_images_is_a_warning(tmp_path, monkeypatch, caplog):
    import logging

    write_pre_split(tmp_path / "data" / "raw" / "set",
                    {"train": ["a", "b"], "val": ["a", "b", "c"], "test": ["a", "b", "c"]})
    write_params(tmp_path, {"data": {"source": "data/raw/set", "min_per_class": 1}})
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        prepare.main()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["no training image for class c: the model can never predict it; add "
                        "images or lower data.val_size/data.test_size"]
    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    assert report["missing_from_split"] == {"train": ["c"]}


def test_a_class_without_validation_or_test_images_is_a_warning(tmp_path, monkeypatch, caplog):
    import logging

    write_pre_split(tmp_path / "data" / "raw" / "set",
                    {"train": ["a", "b", "c"], "val": ["a", "b"], "test": ["a", "c"]})
    write_params(tmp_path, {"data": {"source": "data/raw/set", "min_per_class": 1}})
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        prepare.main()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "no val image for class c: the head's regularisation and temperature and the "
        "fine-tuned epoch kept are chosen without it",
        "no test image for class b: evaluate cannot measure how well it is recognised"]


@pytest.mark.parametrize(("name", "shown", "escape"), [("new\nline", "new\\nline", "\\n"),
                                                      ("bell\a", "bell\\x07", "\\x07")])
def test_a_label_with_a_control_character_stops_prepare_in_one_line(tmp_path, name, shown,
                                                                    escape):
    root = write_colour_folder(tmp_path / "data" / "raw" / "colours")
    (root / "red").rename(root / name)
    write_params(tmp_path, {"data": {"source": "data/raw/colours"}})
    assert one_error_line(run_stage_cli("prepare", tmp_path)) == (
        f"error: data.source: class folder 'data/raw/colours/{shown}': the class name "
        f"'{shown}' holds the control character '{escape}'; rename the folder")
    assert not (tmp_path / "data" / "prepared").exists()


def test_a_link_out_of_the_data_root_stops_prepare_in_one_line(tmp_path):
    secret = write_image(tmp_path / "secret.png", (0, 0, 0))
    root = write_colour_folder(tmp_path / "data" / "raw" / "colours")
    (root / "red" / "link.png").symlink_to(secret)
    write_params(tmp_path, {"data": {"source": "data/raw/colours"}})
    assert one_error_line(run_stage_cli("prepare", tmp_path)) == (
        f"error: data.source: 'data/raw/colours/red/link.png' is a link to '{secret}', outside "
        "the data root 'data/raw/colours'; copy the file into the data root or remove the link")


def test_huge_files_and_devices_are_skipped_unread(tmp_path, monkeypatch):
    root = write_colour_folder(tmp_path / "data" / "raw" / "colours")
    with open(root / "red" / "huge.png", "wb") as f:  # sparse: no disk used, nothing read
        f.truncate(600 * 2**20)
    os.mkfifo(root / "blue" / "pipe.png")  # reading it would block
    write_params(tmp_path, {"data": {"source": "data/raw/colours"}})
    monkeypatch.chdir(tmp_path)
    prepare.main()
    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    assert report["skipped"] == [
        {"path": "blue/pipe.png", "reason": "not a regular file (a pipe, socket or device)"},
        {"path": "red/huge.png", "reason": "larger than 512 MiB (not read)"}]


def test_ctrl_c_leaves_nothing_and_says_so_in_one_line(tmp_path):
    """Ctrl-C reaches the whole process group, the decode workers too."""
    from benchmarks.decode_speed import generate

    generate(tmp_path / "data" / "raw" / "photos", 300, size=(800, 600))
    write_params(tmp_path, {"data": {"source": "data/raw/photos", "min_per_class": 1}})
    process = subprocess.Popen([sys.executable, "-m", "stages.prepare"], cwd=tmp_path,
                               env=stage_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in (tmp_path / "data").glob(".prepared.tmp-*/staging/*")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (130, "interrupted; nothing was written\n")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]
    assert not list((tmp_path / "reports").iterdir())


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run(tmp_path):
    write_params(tmp_path, {"data": {"source": "digits"}})
    scratch = tmp_path / "data"
    kill_stage_midway("prepare", tmp_path,
                      lambda: len(list(scratch.glob(".prepared.scratch-*/digits/*/*"))) > 100)
    [left] = scratch.glob(".prepared.scratch-*")  # beside the store, not in /tmp
    with working_directory(tmp_path):
        prepare.main()
    assert not left.exists()
    assert sorted(p.name for p in scratch.iterdir()) == ["prepared"]


def test_the_closing_summary_counts_in_words_and_says_how_many_it_does_not_list():
    report = {"classes": ["a", "b"], "totals": {"train": 1, "val": 0, "test": 0}, "skipped": [],
              "duplicates": [], "conflicts": [{"ids": ["x", "y"], "labels": ["a", "b"]}],
              "missing_from_split": {}, "small_images": {"count": 0},
              "left_out_by_max_per_class": 0,
              "curation": {"exclude": {"file": "data/exclude.txt", "entries": 5,
                                       "excluded": [{"path": "a/1.png"}],
                                       "unmatched": [f"data/exclude.txt:{i}" for i in
                                                     range(2, 7)]},
                           "relabel": {"file": "data/relabel.csv", "entries": 0}}}
    assert prepare.summarize(report) == [
        "2 classes, 1 image: train 1, val 0, test 0",
        "1 image under several labels excluded",
        "data/exclude.txt: 1 image excluded",
        "details: reports/data.json"]
    report["curation"]["relabel"] = {"file": "data/relabel.csv", "entries": 2,
                                     "unmatched": ["data/relabel.csv:3"],
                                     "of_excluded": [{"path": "a/1.png",
                                                      "entry": "data/relabel.csv:2"}]}
    assert prepare.not_applied(report["curation"]) == [
        "data/exclude.txt: 5 lines name no image of data.source (a typo, or rows for another "
        "data set?): data/exclude.txt:2, data/exclude.txt:3, data/exclude.txt:4 and 2 more",
        "data/relabel.csv: 1 line names no image of data.source (a typo, or rows for another "
        "data set?): data/relabel.csv:3",
        "data/relabel.csv:2: 'a/1.png' is excluded, so it is not relabelled"]
